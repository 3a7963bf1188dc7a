.PHONY: install test lint format native bench clean

install:
	pip install torch==2.13.0 && pip install -e ".[test,trl]"

test:
	python -m pytest -q

lint:
	ruff check . && ruff format --check .

format:
	ruff format . && ruff check --fix .

native:
	cmake -S . -B build/native -DCMAKE_BUILD_TYPE=Release && cmake --build build/native -j

bench:
	python -m pytest bench/test_ops.py --benchmark-enable -q && python -m bench.train_step \
		&& python -m bench.render

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache decpo/native_backend/*.so

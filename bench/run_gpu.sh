#!/usr/bin/env bash
# The whole GPU suite in one device call (< 10 minutes on an H200):
#   1. install carried wheels (.whl/: liger-kernel, cut-cross-entropy, trl and their
#      missing dependencies; see the device README for how to download them),
#   2. build nothing (the native CPU library is not needed on the GPU),
#   3. run the op suite and the training step, writing JSON and plots under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
# Predicted times (FLOPs and bytes of decpo's tiling) to set beside the measured ones.
python3 -m bench.kernel_stats --roofline 2>&1 | tee "$OUT/roofline.txt"
timeout 420 python3 -m pytest bench/test_ops.py --benchmark-enable -q -p no:cacheprovider \
  --benchmark-columns=median 2>&1 | tee "$OUT/ops.log" | tail -60
timeout 160 python3 -m bench.train_step --device cuda 2>&1 | tee "$OUT/train_step.log"
python3 -m bench.render
# Final results, or the partial ones a time limit left (at most 8 files come back).
cp bench/results/*-cuda-*.json bench/results/ops-cuda.png bench/results/*cuda*partial* \
  bench/README.md "$OUT/" 2>/dev/null
echo "done"

#!/usr/bin/env bash
# The GPU suite, in stages that each fit one 10-minute device call:
#   bash bench/run_gpu.sh check        correctness: bench.gpu_check (benchmark shapes
#                                      against float64), the op tests on the GPU
#                                      (DECPO_TEST_DEVICE=cuda) and, alongside on the
#                                      CPU cores, the sm_90a compile gate
#   bash bench/run_gpu.sh bench-token  op benchmarks: the token_logprobs cases
#   bash bench/run_gpu.sh bench-rest   op benchmarks: logprobs_from_logits and
#                                      decorrelation_penalty, then the training step
#   bash bench/run_gpu.sh trl          TRL's head against decpo's in DPOTrainer
# Carried wheels in .whl/ (liger-kernel, cut-cross-entropy, trl and their missing
# dependencies: see bench/README.md, "GPU runs") are installed first. Logs and JSON go
# to $OUT (default bench/results/).
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: bash bench/run_gpu.sh check|bench-token|bench-rest|trl}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
  python3 -c 'from bench.render import git_commit; print("commit", git_commit())'
  date -u
} 2>&1 | tee "$OUT/gpu-$stage.txt"

bench_ops() {  # $1: DECPO_BENCH_CASES, $2: time limit (s)
  DECPO_BENCH_CASES=$1 timeout "$2" python3 -m pytest bench/test_ops.py --benchmark-enable -q \
    -p no:cacheprovider --benchmark-columns=median 2>&1 | tee "$OUT/ops-$stage.log" | tail -40
}

case $stage in
  check)
    # The compile gate needs only the CPU: it runs beside the GPU checks.
    (timeout 500 python3 -m bench.kernel_stats --gate --launched-only \
      --out "$OUT/kernel-stats-gpu-image.json" > "$OUT/gate.log" 2>&1; echo "gate exit $?" >> "$OUT/gate.log") &
    timeout 240 python3 -m bench.gpu_check --out "$OUT/gpu-check.json" 2>&1 | tee "$OUT/gpu-check.log"
    DECPO_TEST_DEVICE=cuda timeout 280 python3 -m pytest tests/ops tests/triton_backend -q -n 8 \
      -p no:cacheprovider --deselect tests/triton_backend/test_kernel_gate.py 2>&1 \
      | tee "$OUT/tests-cuda.log" | tail -30
    wait
    tail -5 "$OUT/gate.log"
    ;;
  bench-token)
    python3 -m bench.kernel_stats --roofline > "$OUT/roofline.txt" 2>&1
    bench_ops token_logprobs 540
    ;;
  bench-rest)
    bench_ops logprobs_from_logits,decorrelation_penalty 240
    timeout 330 python3 -m bench.train_step --device cuda 2>&1 | tee "$OUT/train_step.log"
    ;;
  trl)
    timeout 540 python3 -m bench.trl_head --device cuda 2>&1 | tee "$OUT/trl_head.log"
    ;;
  *)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
# This stage's results (final, or the partial rows a time limit left) next to the logs;
# the committed ones are older than the stage's header file.
find bench/results -maxdepth 1 -name '*cuda*' -newer "$OUT/gpu-$stage.txt" \
  -exec cp {} "$OUT/" \; 2>/dev/null
echo "done: $stage"

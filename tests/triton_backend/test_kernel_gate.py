"""The compile gate: every Triton kernel variant, compiled for Hopper (sm_90a) exactly
as the launchers launch it, has no register spill, runs its bf16/fp16 dots on wgmma
and feeds them through cp.async or TMA. No GPU needed (Triton's own ptxas)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def _run(code: list[str], timeout: int = 1200) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"PYTHONPATH": str(ROOT), "TRITON_DEFAULT_FP_FUSION": "1"}
    return subprocess.run(
        [sys.executable, *code], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_every_launched_variant_passes_the_gate(tmp_path):
    out = tmp_path / "stats.json"
    result = _run(["-m", "bench.kernel_stats", "--gate", "--launched-only", "--out", str(out)])
    log = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, log
    assert " 0 with problems" in result.stdout, log
    assert out.is_file()
    assert "_logits_kernel" in result.stdout and "_grad_kernel" in result.stdout, log
    assert "_dweight_kernel" in result.stdout, log


SPILLING = """
import sys
from bench import kernel_stats
from decpo.triton_backend import logprobs
from decpo.triton_backend.common import KernelConfig

# A 256 x 256 fp32 logit tile on 4 warps: 512 accumulator registers a thread.
bad = KernelConfig("spill", {"BLOCK_M": 256, "BLOCK_V": 128, "BLOCK_D": 64}, 2, 3)
logprobs._GEMM1 = (bad, *logprobs._GEMM1[1:])
rc = kernel_stats.main(["--gate", "--launched-only", "--only", "token_logprobs fwd bfloat16"])
sys.exit(10 + rc)
"""


def test_gate_fails_on_a_spilling_config():
    result = _run(["-c", SPILLING])
    log = result.stdout[-4000:] + result.stderr[-3000:]
    assert result.returncode == 11, log  # main() returned 1: the gate failed
    assert "spills" in result.stdout and "spill " in result.stdout, log

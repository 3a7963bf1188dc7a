"""decpo's TRL head with sharded LM heads, 2 ranks (torchrun, gloo, CPU) against one
process: an FSDP2 DTensor head, and a DeepSpeed ZeRO-3 partitioned head (when
deepspeed imports; it is not a dependency)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[2]


def _torchrun(script: str, tmp_path: Path) -> str:
    result = tmp_path / "result.txt"
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--standalone", str(Path(__file__).with_name(script)), str(result)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.is_file(), proc.stderr[-3000:]
    return result.read_text()


def test_fsdp2_sharded_head_two_ranks_equal_one(tmp_path):
    assert _torchrun("fsdp2_head.py", tmp_path) == "ok"


def test_deepspeed_zero3_partitioned_head_two_ranks_equal_one(tmp_path):
    pytest.importorskip("deepspeed")
    assert _torchrun("zero3_head.py", tmp_path) == "ok"

"""decpo's TRL head with an FSDP2 DTensor LM head: 2 ranks (torchrun, gloo, CPU) give
what 1 process gives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[2]


def test_fsdp2_sharded_head_two_ranks_equal_one(tmp_path):
    result = tmp_path / "result.txt"
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--standalone", str(Path(__file__).with_name("fsdp2_head.py")), str(result)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.is_file(), proc.stderr[-3000:]
    assert result.read_text() == "ok", result.read_text()

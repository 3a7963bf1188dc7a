import os

import pytest
import torch

# Triton kernels run in the CPU interpreter where there is no GPU. Set before any
# Triton kernel module is imported (decpo imports them lazily, on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# DECPO_TEST_DEVICE=cuda runs the op tests on the GPU (tests/helpers.py: DEVICE):
#   DECPO_TEST_DEVICE=cuda python -m pytest tests/ops tests/triton_backend
if (_device := os.environ.get("DECPO_TEST_DEVICE", "cpu")) != "cpu":
    if _device != "cuda" or not torch.cuda.is_available():
        raise pytest.UsageError(
            f"DECPO_TEST_DEVICE={_device!r}: only 'cuda' is supported, on a machine with a GPU"
        )
    torch.set_default_device(_device)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

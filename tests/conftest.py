import os

import pytest
import torch

# Triton kernels run in the CPU interpreter where there is no GPU. Set before any
# Triton kernel module is imported (decpo imports them lazily, on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

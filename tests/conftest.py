"""Test-session setup.

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when `kernels` is first imported,
so it must be set here, before any test module imports the project. On a machine without CUDA
the kernels run under Triton's CPU interpreter; on a GPU they run compiled.

TF32 is off in every test: the fp32 exactness checks compare the reference path (whose patch-embedding
convolution cuDNN would run in TF32 by default on a GPU) against IEEE fp32 kernels, to 1e-4.

Every test starts from its own fixed seed (torch, numpy, random): the crc32 of its node id, so the same
inputs every run, whatever ran before it, and other inputs in every test (and every parametrisation).
"""

import os
import random
import zlib

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def seed(request: pytest.FixtureRequest) -> int:
    value = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)
    return value


@pytest.fixture(autouse=True)
def no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn

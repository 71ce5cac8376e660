"""Test-session setup.

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when `kernels` is first imported,
so it must be set here, before any test module imports the project. On a machine without CUDA
the kernels run under Triton's CPU interpreter; on a GPU they run compiled.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

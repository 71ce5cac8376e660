"""The per-dtype tolerances a fused result must meet: the kernel tests' (tests/kernel_helpers.py) and the
backend check's (train/backend_check.py), one table for both.

Relative to the largest value of the fp32 reference, per dtype, outputs and gradients alike.
fp32: the kernels compute exactly what the reference computes, up to summation order.
fp16 / bf16: a few units in the last place of the storage format; on the GPU a result may also be as far from
the fp32 reference as twice PyTorch's own path in that dtype (the users of this table add that bound).
"""

from __future__ import annotations

import torch

RTOL: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}

"""Host-side helpers shared by the kernel files: when Triton can run, block-size arithmetic, dot precision.

Nothing here launches a kernel or touches a GPU driver at import time, so `import kernels` works on a
CPU-only machine (with or without `TRITON_INTERPRET=1`).
"""

import functools

import torch
import triton


@triton.jit
def _probe():
    pass


# Triton decides at decoration time whether a kernel runs compiled or in the CPU interpreter
# (TRITON_INTERPRET=1 must be set before `kernels` is imported). Asking a decorated function is
# exact whatever spelling of the variable was used and whatever Triton version parses it.
INTERPRET: bool = type(_probe).__name__ == "InterpretedFunction"


def triton_can_run(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels can process these tensors: CUDA tensors, or any tensor under the interpreter."""
    if INTERPRET:
        return True
    return all(t.is_cuda for t in tensors)


def require_triton(op: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error when a custom op is called directly on tensors Triton cannot process."""
    if not triton_can_run(*tensors):
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"kernels: {op} got tensors on {devices}; the Triton kernels need CUDA tensors, or "
            "TRITON_INTERPRET=1 set before `import kernels` to run them on the CPU. The public functions "
            "(kernels.attention, ...) fall back to kernels.reference automatically instead."
        )


def next_pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))


def dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` for tl.dot on fp32 operands.

    fp32 inputs get exact IEEE products (slow on tensor-core GPUs, but fp32 is the testing path). With fp16/bf16
    inputs, the dots that still see fp32 operands (the feature-mix backward's W^T dy and dy F^T) use 3xTF32,
    accurate to about fp32. For fp16/bf16 operands Triton ignores the option. This is the one switch to flip
    (to "ieee") should "tf32x3" not compile on some GPU / Triton version.
    """
    return "ieee" if dtype == torch.float32 else "tf32x3"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a small constant under the interpreter)."""
    if device.type != "cuda":
        return 2
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_dtype(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"kernels.{op}: {name} has dtype {t.dtype}; supported are float16, bfloat16, float32")

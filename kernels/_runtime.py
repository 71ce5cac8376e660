"""Host-side helpers shared by the kernel files: Triton or its stand-in, when Triton can run, block-size
arithmetic, dot precision, input checks.

Nothing here launches a kernel or touches a GPU driver at import time, so `import kernels` works on a
CPU-only machine (with or without `TRITON_INTERPRET=1`) and where triton is not installed at all: then
`triton` and `tl` below are stand-ins, just enough for the op modules to define (never run) their kernels,
and every public function falls back to `kernels.reference`.
"""

import functools
import types

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS or a CPU-only wheel set: the references stand in for every kernel
    TRITON_AVAILABLE = False

    class _KernelWithoutTriton:
        """What `@triton.jit` makes of a kernel when triton is missing: it can be defined, never launched."""

        def __init__(self, fn):
            self.fn = fn
            self.__name__ = fn.__name__

        def __getitem__(self, grid):
            raise RuntimeError(f"kernels: cannot launch {self.__name__}: triton is not installed")

    class _Constexpr:
        """tl.constexpr as an annotation and as `tl.constexpr(value)` for module constants."""

        def __new__(cls, value):
            return value

    triton = types.SimpleNamespace(
        jit=_KernelWithoutTriton,
        cdiv=lambda a, b: -(-a // b),
        next_power_of_2=lambda n: 1 << max(int(n) - 1, 0).bit_length(),
    )
    tl = types.SimpleNamespace(constexpr=_Constexpr)
else:
    TRITON_AVAILABLE = True


@triton.jit
def _probe():
    pass


# Triton decides at decoration time whether a kernel runs compiled or in the CPU interpreter
# (TRITON_INTERPRET=1 must be set before `kernels` is imported). Asking a decorated function is
# exact whatever spelling of the variable was used and whatever Triton version parses it.
INTERPRET: bool = type(_probe).__name__ == "InterpretedFunction"


def triton_can_run(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels can process these tensors: CUDA tensors, or any tensor under the interpreter."""
    if not TRITON_AVAILABLE:
        return False
    if INTERPRET:
        return True
    return all(t.is_cuda for t in tensors)


def require_triton(op: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error when a custom op is called directly on tensors Triton cannot process."""
    if not TRITON_AVAILABLE:
        raise RuntimeError(
            f"kernels: {op} is a raw Triton op and triton is not installed (`import triton` failed). The public "
            "functions (kernels.attention, kernels.bias_gelu, ...) fall back to kernels.reference instead; or "
            "install triton."
        )
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


LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E): softmax kernels scale their logits by it and use exp2

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_dtype(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"kernels.{op}: {name} has dtype {t.dtype}; supported are float16, bfloat16, float32")


def check_ids(op: str, ids: torch.Tensor, batch: int | None = None) -> None:
    """Index tensors of the gathers: (B, n) int64 or int32, B = `batch` when given."""
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"kernels.{op}: ids must be (B, n) int64 or int32, got {tuple(ids.shape)} {ids.dtype}")
    if batch is not None and ids.shape[0] != batch:
        raise ValueError(f"kernels.{op}: ids has batch {ids.shape[0]}, expected {batch}")

"""The ledger's recorder: a ``TorchDispatchMode`` that sees every aten op (after autograd and autocast) and every
custom op with the torch ops of its body, Triton launch hooks that count a launch and hide the interpreter's own
copies, and saved-tensor hooks that measure what the forward keeps for backward. What each op costs is
rules.py's business; ``Ledger`` is the context manager that puts the three together."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.ledger.rules import LedgerError, distinct_bytes, is_free, op_bytes, op_class, op_flops, tensors_in

PHASES = ("forward", "backward", "optimizer")


class OpEvent(NamedTuple):
    name: str  # "aten.add.Tensor", "crossmae.attention_fwd.default", "triton:<kernel>"
    op_class: str
    phase: str  # one of PHASES
    launches: int  # 0 for views / allocations, else 1
    bytes_read: int
    bytes_written: int
    flops: int
    parent: str | None  # the custom op whose body ran this op
    triton_kernels: int  # Triton launches inside this custom op


@dataclass
class StepCount:
    """Everything one recorded step did, in order."""

    batch: int
    events: list[OpEvent] = field(default_factory=list)
    saved_bytes: int = 0
    saved_tensors: int = 0
    triton_outside_custom: int = 0
    loss: float | None = None


def _backend_keyset(args: tuple, kwargs: dict) -> torch._C.DispatchKeySet:
    """The backend dispatch key of the op's tensors: where a custom op's implementation is registered."""
    tensors = tensors_in((args, kwargs))
    device = tensors[0].device.type if tensors else "cpu"
    key = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA}.get(device)
    if key is None:
        raise LedgerError(f"ledger: custom op on device {device!r}: only cpu and cuda are supported")
    return torch._C.DispatchKeySet(key)


_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd


class _Recorder(TorchDispatchMode):
    """Records every op that reaches the Python dispatch key (i.e. after autograd and autocast), custom ops'
    bodies included; paused while a Triton kernel runs (the interpreter's own copies are not GPU work)."""

    def __init__(self, count: StepCount):
        super().__init__()
        self.count = count
        self.phase = "forward"
        self.suspended = 0
        self.parents: list[list] = []  # [name, triton launches] of the custom ops being run

    def triton_launch(self, kernel_name: str, args: tuple) -> None:
        if self.parents:
            self.parents[-1][1] += 1
            return
        self.count.triton_outside_custom += 1
        self.count.events.append(OpEvent(f"triton:{kernel_name}", "triton kernel (no custom op)", self.phase, 1,
                                         distinct_bytes(tensors_in(args)), 0, 0, None, 1))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.suspended:
            return func(*args, **kwargs)
        custom = func.namespace != "aten"
        if not custom and torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), _COMPOSITE):
            # A composite op reaches this key below autograd (in a custom op's body: `.to()`, `reshape`...); run
            # its decomposition with the mode active, so that the copies it may make are recorded, not hidden.
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        cls = op_class(func)
        if custom:
            self.parents.append([func._schema.name, 0])
            try:
                with self:  # re-entered: the body's torch ops are recorded too
                    out = func.redispatch(_backend_keyset(args, kwargs), *args, **kwargs)
            finally:
                _, kernels_launched = self.parents.pop()
        else:
            out = func(*args, **kwargs)
            kernels_launched = 0
        parent = self.parents[-1][0] if self.parents else None
        if is_free(cls):
            self.count.events.append(OpEvent(str(func), cls, self.phase, 0, 0, 0, 0, parent, 0))
            return out
        read, written = op_bytes(func, args, kwargs, out)
        self.count.events.append(OpEvent(str(func), cls, self.phase, 1, read, written,
                                         op_flops(func, args, kwargs), parent, kernels_launched))
        return out


@contextlib.contextmanager
def _triton_launch_hooks(recorder: _Recorder) -> Iterator[None]:
    """Count Triton launches and pause recording while they run: wraps ``InterpretedFunction.run`` (the CPU
    interpreter) and ``JITFunction.run`` (compiled launches); restored on exit."""
    patched: list[Any] = []
    try:
        from triton.runtime.interpreter import InterpretedFunction

        patched.append(InterpretedFunction)
    except ImportError:
        pass
    try:
        from triton.runtime.jit import JITFunction

        patched.append(JITFunction)
    except ImportError:
        pass
    originals = [cls.run for cls in patched]

    def wrap(original):
        def run(self, *args, grid, warmup, **kwargs):
            if warmup:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            recorder.triton_launch(getattr(self, "__name__", "kernel"), args)
            recorder.suspended += 1
            try:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                recorder.suspended -= 1

        return run

    for cls, original in zip(patched, originals, strict=True):
        cls.run = wrap(original)
    try:
        yield
    finally:
        for cls, original in zip(patched, originals, strict=True):
            cls.run = original


class Ledger:
    """Context manager that records one step: ``with Ledger(batch, exclude=model) as led: ...; led.count``.

    ``led.phase = "backward"`` tags the following ops (the training step's ``on_phase`` does it). Saved tensors
    are collected while phase is "forward"; storages of ``exclude``'s parameters and buffers are not
    activations and are skipped.
    """

    def __init__(self, batch: int = 0, exclude: torch.nn.Module | None = None):
        self.count = StepCount(batch)
        self._recorder = _Recorder(self.count)
        self._stack = contextlib.ExitStack()
        self._excluded = set()
        if exclude is not None:
            self._excluded = {t.untyped_storage().data_ptr()
                              for t in [*exclude.parameters(), *exclude.buffers()]}
        self._saved: dict[int, int] = {}

    @property
    def phase(self) -> str:
        return self._recorder.phase

    @phase.setter
    def phase(self, value: str) -> None:
        if value not in PHASES:
            raise ValueError(f"phase={value!r}: expected one of {PHASES}")
        self._recorder.phase = value

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if self._recorder.phase == "forward" and not self._recorder.suspended:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in self._excluded:
                if key not in self._saved:
                    self.count.saved_tensors += 1
                self._saved[key] = max(self._saved.get(key, 0), storage.nbytes())
        return t

    def __enter__(self) -> Ledger:
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        self._stack.enter_context(_triton_launch_hooks(self._recorder))
        self._stack.enter_context(self._recorder)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self.count.saved_bytes = sum(self._saved.values())

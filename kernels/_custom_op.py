"""One registration for every fused op: a Triton launch as a `torch.library` custom op, its fake, its autograd.

    kernel_op("crossmae::x_bwd(Tensor dy, Tensor x) -> Tensor", launch, fake)            # a plain op
    fused_op("crossmae::x_fwd(Tensor x, float eps) -> (Tensor y, Tensor rstd)", launch, fake,
             save=("x", "rstd"), differentiable=("y",), grads=("x",),
             backward=lambda saved, dy: x_bwd(dy, saved.x, saved.rstd))                   # with autograd

`launch` is the op file's host function, called with the op's arguments in schema order once `require_triton`
has passed (it raises a clear error on tensors Triton cannot process, or without triton); `fake` builds outputs
of the right shapes and dtypes for torch.compile / opcheck. The schema is written out (the PyTorch schema
language); a fused op names its outputs there, and its declaration says:

    save            inputs and outputs the backward reads: tensors through ctx.save_for_backward, other values
                    (floats, ints, None) as they are. The backward sees them as attributes of `saved`, plus
                    `saved.shapes` / `saved.dtypes` (every tensor input's) and `saved.needs_grad` (by input).
    differentiable  the outputs with a gradient (default: all); the others are marked non-differentiable.
                    Gradients are not materialised: an unused differentiable output's gradient arrives as None.
    grads, backward backward(saved, *gradients of the differentiable outputs) returns the gradients of the
                    inputs named in `grads`, in that order (one tensor or a tuple). Each is cast to its input's
                    dtype, and dropped (None) where that input needs no gradient; the backward is not called
                    when none of them does.

Only public torch.library API of torch >= 2.4 is used (custom_op with an explicit schema, register_fake,
register_autograd), so the same code serves torch 2.11 and 2.13.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Sequence

import torch

from ._runtime import require_triton


def _split(schema: str) -> tuple[str, str]:
    """"ns::name(args) -> returns" -> ("ns::name", "(args) -> returns")."""
    name, paren, rest = schema.partition("(")
    return name.strip(), paren + rest


def _names(part: str, what: str, schema: str) -> tuple[str, ...]:
    """The names in a schema's argument or return list ("Tensor q, float eps=1e-06" -> ("q", "eps"))."""
    names = []
    for item in part.strip().removeprefix("(").removesuffix(")").split(","):
        words = item.split("=")[0].split()
        if not words:
            continue
        if len(words) != 2:
            raise ValueError(f"kernels: in {schema!r} every {what} needs a type and a name, got {item.strip()!r}")
        names.append(words[1])
    return tuple(names)


def kernel_op(schema: str, launch: Callable, fake: Callable):
    """A custom op that runs `launch` on tensors Triton can process (see the module docstring).

    A module-level `launch` is looked up by name in its module at every call, as a call written in that module
    would be, so a test can wrap or replace the host function (monkeypatch) and see the op run it.
    """
    name, signature = _split(schema)
    module = sys.modules[launch.__module__]
    by_name = getattr(module, launch.__name__, None) is launch

    def run(*args, **kwargs):
        require_triton(name, *(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)))
        return (getattr(module, launch.__name__) if by_name else launch)(*args, **kwargs)

    op = torch.library.custom_op(name, run, mutates_args=(), schema=signature)
    op.register_fake(fake)
    return op


def fused_op(
    schema: str,
    launch: Callable,
    fake: Callable,
    *,
    save: Sequence[str],
    grads: Sequence[str],
    backward: Callable,
    differentiable: Sequence[str] | None = None,
):
    """kernel_op plus its autograd, from the declaration described in the module docstring."""
    op = kernel_op(schema, launch, fake)
    arguments, _, returns = _split(schema)[1].partition("->")
    names_in = _names(arguments, "argument", schema)
    outputs = _names(returns, "output", schema)
    differentiable = tuple(outputs if differentiable is None else differentiable)
    for what, names, known in (("save", save, names_in + outputs), ("grads", grads, names_in),
                               ("differentiable", differentiable, outputs)):
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ValueError(f"kernels: {what}={tuple(names)} of {schema!r} names {unknown}, not among {known}")
    diff_index = [outputs.index(n) for n in differentiable]

    def setup_context(ctx, inputs, output):  # torch passes these by keyword
        args = dict(zip(names_in, inputs, strict=True))
        outs = dict(zip(outputs, output if isinstance(output, tuple) else (output,), strict=True))
        values = args | outs
        ctx.tensor_names = [n for n in save if isinstance(values[n], torch.Tensor)]
        ctx.save_for_backward(*(values[n] for n in ctx.tensor_names))
        ctx.other_values = {n: values[n] for n in save if n not in ctx.tensor_names}
        ctx.shapes = {n: a.shape for n, a in args.items() if isinstance(a, torch.Tensor)}
        ctx.dtypes = {n: a.dtype for n, a in args.items() if isinstance(a, torch.Tensor)}
        ctx.mark_non_differentiable(*(o for n, o in outs.items() if n not in differentiable))
        ctx.set_materialize_grads(False)

    def autograd_backward(ctx, *output_grads):
        needs_grad = dict(zip(names_in, ctx.needs_input_grad, strict=True))
        if not any(needs_grad[n] for n in grads):
            return (None,) * len(names_in)
        saved = types.SimpleNamespace(**dict(zip(ctx.tensor_names, ctx.saved_tensors, strict=True)),
                                      **ctx.other_values, shapes=ctx.shapes, dtypes=ctx.dtypes,
                                      needs_grad=needs_grad)
        result = backward(saved, *(output_grads[i] for i in diff_index))
        by_name = dict(zip(grads, result if isinstance(result, tuple) else (result,), strict=True))
        return tuple(by_name[n].to(ctx.dtypes[n]) if needs_grad[n] and by_name.get(n) is not None else None
                     for n in names_in)

    op.register_autograd(autograd_backward, setup_context=setup_context)
    return op

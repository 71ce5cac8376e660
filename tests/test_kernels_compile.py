"""Every kernel launch the host functions make at CrossMAE's real shapes compiles for a Hopper GPU (sm_90),
without a GPU: Triton's code generator plus the ptxas bundled with the triton wheel.

This catches what the CPU interpreter cannot (unsupported ops or layouts, type errors in code the interpreter
runs leniently, dot precisions) and prints each kernel's registers and spills (`pytest -s`). The launches are
captured by running the host functions on "meta" tensors with the kernels replaced by recorders, so exactly
the block sizes / warps / dtypes the host would launch are compiled. Skipped where the triton wheel has no
NVIDIA backend or ptxas.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch
import triton

from kernel_helpers import requires_kernels

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
except ImportError as exc:  # a Triton whose AOT compile API moved
    pytest.skip(f"triton's compile API is not importable here: {exc}", allow_module_level=True)

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
if not os.path.exists(PTXAS):
    pytest.skip("the triton wheel has no bundled ptxas", allow_module_level=True)

pytestmark = requires_kernels
MODULES = [importlib.import_module(f"kernels.{name}") for name in ("attention", "feature_mix", "gather")]
attention_mod, mix_mod, gather_mod = MODULES
META = torch.device("meta")
PTR_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64",
             torch.int32: "*i32"}


class Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, kernel, calls: list):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.kernel, args, kwargs))


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device=META)


def _host_calls():
    """label -> host function call on meta tensors at a CrossMAE shape."""
    cases = {}
    for dtype in (torch.bfloat16, torch.float32):
        tag = "bf16" if dtype == torch.bfloat16 else "fp32"
        # (B, Lq, Lk, H, d): decoder gamma 0.25 / 0.75, encoder B/16, ViT-H, d = 128, MAE decoder (multi-block)
        shapes = [(256, 49, 50, 16, 32), (256, 147, 50, 16, 32), (256, 50, 50, 12, 64), (256, 50, 50, 16, 80),
                  (64, 50, 50, 8, 128), (256, 197, 197, 16, 32)]
        for B, Lq, Lk, H, d in shapes if dtype == torch.bfloat16 else shapes[:1] + shapes[-1:]:
            def attn(B=B, Lq=Lq, Lk=Lk, H=H, d=d, dtype=dtype):
                q = _meta(B, Lq, H, d, dtype=dtype)
                kv = _meta(B, Lk, 2, H, d, dtype=dtype)
                out, lse = attention_mod.attention_forward(q, kv[:, :, 0], kv[:, :, 1], 1 / math.sqrt(d))
                attention_mod.attention_backward(torch.empty_like(out), q, kv[:, :, 0], kv[:, :, 1], out, lse, 0.1)
            cases[f"attention {tag} Lq{Lq} Lk{Lk} H{H} d{d}"] = attn
        # (k maps, N rows, C, depth): ViT-B, ViT-L, ViT-H
        for K, N, C, J in [(13, 256 * 50, 768, 12), (25, 256 * 50, 1024, 12), (33, 256 * 65, 1280, 12)]:
            def mix(K=K, N=N, C=C, J=J, dtype=dtype):
                feats = _meta(K, N, C, dtype=dtype)
                w, g, b = _meta(J, K, dtype=torch.float32), _meta(J, C, dtype=torch.float32), _meta(J, C,
                                                                                                    dtype=torch.float32)
                out, mean, rstd = mix_mod.feature_mix_forward(feats, w, g, b, 1e-6)
                mix_mod.feature_mix_backward(torch.empty_like(out), feats, w, g, mean, rstd)
            cases[f"feature_mix {tag} k{K} C{C} depth{J}"] = mix

        def gathers(dtype=dtype):
            B, L, C, n, p = 256, 196, 768, 49, 16
            ids = _meta(B, n, dtype=torch.int64)
            x, pos = _meta(B, L, C, dtype=dtype), _meta(L, C, dtype=torch.float32)
            out = gather_mod.gather_rows_forward(x, pos, ids)
            gather_mod.gather_rows_forward(None, _meta(L, 512, dtype=torch.float32), ids)
            gather_mod.gather_rows_backward_x(out, ids, L)
            gather_mod.gather_rows_backward_table(out, ids, L, torch.float32)
            imgs = _meta(B, 3, 224, 224, dtype=torch.float32)
            gather_mod.gather_target_patches_forward(imgs, ids, p, True, 1e-6)
            patches = _meta(B, n, p * p * 3, dtype=dtype)
            img, inv = gather_mod.scatter_patches_forward(patches, ids, 224, 224, p, imgs)
            gather_mod.scatter_patches_backward(img, ids, inv, p, True, True)
        cases[f"gathers {tag}"] = gathers
    return cases


def _signature(fn: JITFunction, args: tuple, constexprs: dict) -> dict:
    sig, values = {}, iter(args)
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        value = next(values)
        if isinstance(value, torch.Tensor):
            sig[name] = PTR_TYPES[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    return sig


def _ptxas_usage(ptx: str) -> tuple[int | None, int | None]:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        info = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                              text=True, timeout=120).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    return (int(regs.group(1)) if regs else None), (int(spill.group(1)) if spill else None)


def compile_case(case: str) -> list[dict]:
    """Capture the launches of one host call and compile each distinct one; runs outside the interpreter."""
    calls: list = []
    saved = {}
    for mod in MODULES:
        for name in dir(mod):
            obj = getattr(mod, name)
            if name.startswith("_") and name.endswith("_kernel") and hasattr(obj, "fn"):
                saved[(mod, name)] = obj
                setattr(mod, name, Recorder(obj, calls))
    try:
        _host_calls()[case]()
    finally:
        for (mod, name), obj in saved.items():
            setattr(mod, name, obj)
    results, seen = [], set()
    for kernel, args, kwargs in calls:
        fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
        options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 2)}
        sig = _signature(fn, args, kwargs)
        key = (fn.__name__, tuple(sig.items()), tuple(sorted(kwargs.items())), tuple(options.items()))
        if key in seen:
            continue
        seen.add(key)
        row = {"case": case, "kernel": fn.__name__, "num_warps": options["num_warps"],
               "blocks": {k: v for k, v in kwargs.items() if k.startswith("BLOCK")}}
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=kwargs),
                                      target=GPUTarget("cuda", 90, 32), options=options)
            row["registers"], row["spill_bytes"] = _ptxas_usage(compiled.asm["ptx"])
            row["error"] = None
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[-3000:]
        results.append(row)
    return results


@pytest.fixture(scope="module")
def compiled() -> dict[str, list[dict]]:
    """Compile every case in one subprocess without TRITON_INTERPRET: under the interpreter even
    triton.language's own @jit helpers (tl.sum ...) are interpreted functions the code generator cannot use."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=root, capture_output=True,
                          text=True, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 and not rows:
        pytest.fail(f"compile subprocess failed:\n{proc.stderr[-4000:]}")
    by_case: dict[str, list[dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], []).append(row)
    return by_case


@pytest.mark.parametrize("case", list(_host_calls()))
def test_kernels_compile_for_sm90(case, compiled):
    rows = compiled.get(case)
    assert rows, f"{case}: no kernel compiled (crashed before?)"
    for row in rows:
        print(f"{case:40s} {row['kernel']:32s} warps {row['num_warps']:2d} regs {row.get('registers')} "
              f"spill {row.get('spill_bytes')} B {row['blocks']}")
    failed = [f"{row['kernel']} {row['blocks']}: {row['error']}" for row in rows if row["error"]]
    assert not failed, "\n\n".join(failed)


if __name__ == "__main__":
    for name in _host_calls():
        for result in compile_case(name):
            print(json.dumps(result), flush=True)

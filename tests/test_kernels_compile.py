"""Every kernel launch of a CrossMAE / MAE training step compiles for sm_90 and sm_80 exactly as a GPU launch would
compile it, without a GPU; registers, spills and shared memory of each kernel are recorded.

What is compiled. The real host functions of every kernel file in KERNEL_FILES (forward and backward) run on
"meta" tensors at the shapes the S/B/L/H models launch in one training step (batch 256; bf16 and fp16 autocast,
and fp32 without autocast, which the fp32 exactness tests and fp32 training runs launch; the models' own
layouts: q/k/v strided views of one projection, kv a slice of the batched kv projection, ids as the masking
produces them), with every kernel replaced by a recorder. Beside the training step, the launches the GPU tests
make at the models' shapes: the reconstruction grid (patches pasted on a base image, the unpatchify kernel's
HAS_BASE path) with the paste's gradient (patchify's OWNER_ONLY path), and the position-table gradient of
gather_rows. Recording on meta tensors costs nothing, so fp32 and ViT-H are recorded at batch 256 as well.

Each recorded launch then goes through Triton's own launch path instead of a hand-built signature: the binder
JITFunction.run uses (`create_function_from_signature`, i.e. `specialize_impl`: integers equal to 1 become
constants, integers and pointers divisible by 16 are marked so, pointer alignment from data_ptr(), which for a meta
tensor is its storage offset in bytes, as for a 16-byte-aligned CUDA allocation) and `_pack_args` (the CUDA
backend's `parse_options`: num_warps 4, num_stages 3 unless the launch passes them), then `triton.compile` for
GPUTarget("cuda", 90 | 80). Registers and spills are read from the ptxas log of that very compile
(knobs.nvidia.dump_ptxas_log; older Triton: ptxas rerun with the flags make_cubin uses), shared memory from the
compiled metadata. Identical specialisations are compiled once. Host functions that size grids by the SM count see
132 SMs for sm_90 (H100 / H200) and 108 for sm_80 (A100).

Tests: every compile succeeds; every launch fits the target's shared memory per block (SHARED_LIMIT: what
Triton's launcher compares it with, the device's opt-in maximum: 227 KB on sm_90, 163 KB on sm_80); no kernel
spills at ViT-S/B/L shapes in bf16 / fp16 (ViT-H spills, and fp32 ones, are recorded, not failed: fp32 is the
exactness tests' path, where a few spilled bytes cost speed, not results); every kernel a kernel file launches is
compiled.
`pytest -s` prints the table. CROSSMAE_SAVE_KERNEL_RESOURCES=1 writes bench/results/kernel_resources.{md,json}
(the default run writes nothing). CROSSMAE_COMPILE_ARCHS (default "90,80") picks the targets.
Skipped where the triton wheel has no NVIDIA backend, no bundled ptxas, or lacks the launch internals used here.
Adding a kernel file is one entry in KERNEL_FILES: the module name and a function yielding its launches per model.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import inspect
import io
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SAVE_ENV = "CROSSMAE_SAVE_KERNEL_RESOURCES"
ARCHS = tuple(int(a) for a in os.environ.get("CROSSMAE_COMPILE_ARCHS", "90,80").split(","))
SM_COUNT = {90: 132, 80: 108}  # H100 / H200 and A100: what num_sms() returns on those cards
BATCH = 256
# bf16 / fp16: autocast training; fp32: no autocast (fp32 exactness tests, fp32 training), other block sizes
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# cudaDevAttrMaxSharedMemoryPerBlockOptin of H100 / H200 and A100: Triton's launcher refuses a kernel whose
# metadata.shared exceeds it ("out of resource: shared memory")
SHARED_LIMIT = {90: 232448, 80: 166912}
META = torch.device("meta")

try:
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, KernelInterface, create_function_from_signature
except ImportError as exc:  # a Triton whose launch / compile internals moved
    pytest.skip(f"triton {triton.__version__}: launch internals not importable ({exc}); this test reuses "
                "JITFunction's binder", allow_module_level=True)
if not hasattr(JITFunction, "_pack_args") or len(inspect.signature(create_function_from_signature).parameters) != 3:
    pytest.skip(f"triton {triton.__version__}: JITFunction's launch path (_pack_args, "
                "create_function_from_signature(sig, kparams, backend)) differs; update specialise() to it",
                allow_module_level=True)
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
if not PTXAS.exists():
    pytest.skip("the triton wheel has no bundled ptxas (no NVIDIA backend)", allow_module_level=True)


# --------------------------------------------------------------------------------------------------------------
# The models' shapes
# --------------------------------------------------------------------------------------------------------------

MODELS = [f"{family}_vit_{size}" for family in ("crossmae", "mae") for size in ("small", "base", "large", "huge")]
NO_SPILL_SIZES = ("small", "base", "large")


@dataclass(frozen=True)
class StepShapes:
    """What one training step of a model feeds the kernels (from the model's registered config)."""

    model: str
    cross_attention: bool  # the family's decoder: cross-attention (CrossMAE) or self-attention (MAE)
    img_size: int
    patch: int
    num_patches: int  # L
    len_keep: int  # visible patches; the encoder sees 1 + len_keep tokens
    n_pred: int  # predicted patches (MAE: every masked one)
    enc_dim: int
    enc_heads: int
    dec_dim: int
    dec_heads: int
    dec_depth: int
    num_features: int  # k, CrossMAE's IBA candidates

    @property
    def tokens(self) -> int:
        return 1 + self.len_keep


def step_shapes(model: str) -> StepShapes:
    from model.registry import CONFIGS, family_of

    (name,) = [n for n in CONFIGS if n.startswith(model + "_patch")]
    cfg = CONFIGS[name]
    split = cfg.split
    return StepShapes(model, family_of(cfg).cross_attention, cfg.img_size, cfg.patch_size, cfg.num_patches,
                      split.len_keep, split.n_pred, cfg.embed_dim, cfg.num_heads, cfg.decoder_embed_dim,
                      cfg.decoder_num_heads, cfg.decoder_depth, cfg.num_features)


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device=META)


def _ids(s: StepShapes) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible_ids, pred_ids) laid out as model.masking.split_ids returns them."""
    shuffle = _meta(BATCH, s.num_patches, dtype=torch.int64)
    return shuffle[:, : s.len_keep], _meta(BATCH, s.n_pred, dtype=torch.int64)


Launch = tuple[str, Callable[[], None]]  # (shape label, a call of host functions on meta tensors)


def _qkv(B: int, T: int, H: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    return _meta(B, T, 3 * H * d, dtype=dtype).view(B, T, 3, H, d)  # Attention.forward's fused projection


def _cross_q_kv(s: StepShapes, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    H, d = s.dec_heads, s.dec_dim // s.dec_heads
    q = _meta(BATCH, s.n_pred, s.dec_dim, dtype=dtype).view(BATCH, s.n_pred, H, d)
    # FusedOps.mixed_kv: one baddbmm (depth, B*T, 2D), unbound per block; block 1 starts at an offset
    kv = _meta(s.dec_depth, BATCH * s.tokens, 2 * s.dec_dim, dtype=dtype)[1].view(BATCH, s.tokens, 2, H, d)
    return q, kv


def _attention_inputs(s: StepShapes, dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], tuple]]]:
    """(shape label, make) per attention of a training step: make() returns (qkv,) for a self-attention, (q, kv)
    for a cross-attention. Encoder self-attention; CrossMAE's decoder cross-attention or MAE's self-attention."""
    H, d = s.enc_heads, s.enc_dim // s.enc_heads
    yield f"encoder self B{BATCH} L{s.tokens} H{H} d{d}", lambda: (_qkv(BATCH, s.tokens, H, d, dtype),)
    H, d = s.dec_heads, s.dec_dim // s.dec_heads
    if s.cross_attention:
        yield f"decoder cross B{BATCH} Lq{s.n_pred} Lk{s.tokens} H{H} d{d}", lambda: _cross_q_kv(s, dtype)
    else:
        T = 1 + s.num_patches
        yield f"decoder self B{BATCH} L{T} H{H} d{d}", lambda: (_qkv(BATCH, T, H, d, dtype),)


def _attention_launches(mod, s: StepShapes, dtype: torch.dtype) -> Iterator[Launch]:
    """The forward of each attention, through the packed self / cross entry points the custom ops call."""
    def forward(*inputs):
        launch = mod.self_attention_forward if len(inputs) == 1 else mod.cross_attention_forward
        launch(*inputs, 1 / math.sqrt(inputs[0].shape[-1]))

    for shape, make in _attention_inputs(s, dtype):
        yield shape, lambda make=make: forward(*make())


def _attention_backward_launches(_mod, s: StepShapes, dtype: torch.dtype) -> Iterator[Launch]:
    """The backward of each attention as the custom ops launch it: kernels/attention.py's packed wrappers, which
    have this file's kernels write dq / dk / dv into slices of one d(qkv) or d(kv), from the forward's contiguous
    output and fp32 logsumexp."""
    attention = importlib.import_module("kernels.attention")  # the package attribute is the function

    def backward(*inputs):
        q = inputs[0][:, :, 0] if len(inputs) == 1 else inputs[0]
        B, Lq, H, d = q.shape
        out, lse = _meta(B, Lq, H, d, dtype=dtype), _meta(B, H, Lq)
        launch = attention.self_attention_backward if len(inputs) == 1 else attention.cross_attention_backward
        launch(torch.empty_like(out), *inputs, out, lse, 1 / math.sqrt(d))

    for shape, make in _attention_inputs(s, dtype):
        yield shape, lambda make=make: backward(*make())


def _stream_widths(s: StepShapes) -> list[tuple[str, int, int]]:
    """(stage, tokens, width) of the residual streams: encoder, then the decoder's queries."""
    decoder_tokens = s.n_pred if s.cross_attention else 1 + s.num_patches
    return [("encoder", s.tokens, s.enc_dim), ("decoder", decoder_tokens, s.dec_dim)]


def _layer_norm_launches(mod, s: StepShapes, dtype: torch.dtype) -> Iterator[Launch]:
    """FusedOps.add_layer_norm: the stream (activation dtype) with fp32 LayerNorm parameters, plain and fused
    with the residual add, and their backward (with and without the stream's own gradient)."""
    for stage, T, C in _stream_widths(s):
        def run(T=T, C=C):
            x, branch = _meta(BATCH, T, C, dtype=dtype), _meta(BATCH, T, C, dtype=dtype)
            weight, bias = _meta(C), _meta(C)
            y, mean, rstd = mod.layer_norm_forward(x, weight, bias, 1e-6)
            mod.layer_norm_backward(torch.empty_like(y), x, weight, mean, rstd)
            h, y, mean, rstd = mod.add_layer_norm_forward(x, branch, weight, bias, 1e-6)
            mod.layer_norm_backward(torch.empty_like(y), h, weight, mean, rstd, torch.empty_like(h))

        yield f"{stage} B{BATCH} T{T} C{C}", run


def _bias_gelu_launches(mod, s: StepShapes, dtype: torch.dtype) -> Iterator[Launch]:
    """The MLPs' fc1 output (activation dtype) + fp32 bias, GELU; recomputed in backward."""
    for stage, T, C in _stream_widths(s):
        def run(T=T, N=4 * C):
            z, bias = _meta(BATCH, T, N, dtype=dtype), _meta(N)
            mod.bias_gelu_forward(z, bias)
            mod.bias_gelu_backward(torch.empty_like(z), z, bias)

        yield f"{stage} mlp B{BATCH} T{T} N{4 * C}", run


def _mse_loss_launches(mod, s: StepShapes, dtype: torch.dtype) -> Iterator[Launch]:
    """The loss: predictions in the activation dtype, fp32 norm-pix targets."""
    P = s.patch * s.patch * 3

    def run():
        pred, target = _meta(BATCH, s.n_pred, P, dtype=dtype), _meta(BATCH, s.n_pred, P)
        loss = mod.mse_loss_forward(pred, target)
        mod.mse_loss_backward(torch.empty_like(loss), pred, target)

    yield f"B{BATCH} n{s.n_pred} P{P}", run


def _feature_mix_launches(mod, s: StepShapes, dtype: torch.dtype) -> Iterator[Launch]:
    if not s.cross_attention:
        return
    K, N, C, J = s.num_features, BATCH * s.tokens, s.enc_dim, s.dec_depth

    def run():
        feats = _meta(K, N, C, dtype=dtype)  # torch.stack of the encoder features, viewed (k, B*T, C)
        weight, gamma, beta = _meta(J, K), _meta(J, C), _meta(J, C)  # fp32 parameters under autocast
        out, mean, rstd = mod.feature_mix_forward(feats, weight, gamma, beta, 1e-6)
        mod.feature_mix_backward(torch.empty_like(out), feats, weight, gamma, mean, rstd)

    yield f"k{K} N{N} C{C} depth{J}", run


def _gather_rows_launches(mod, s: StepShapes, dtype: torch.dtype) -> Iterator[Launch]:
    """Position rows of the visible (encoder) and, for CrossMAE, the predicted (decoder) patches, with the table
    gradient (inverse index + table kernel): the models' sin-cos tables are frozen, but the GPU tests launch it.
    The tables stay fp32 under autocast: dtype does not reach these launches."""
    visible_ids, pred_ids = _ids(s)
    L = s.num_patches

    def gather(ids, C):
        out = mod.gather_rows_forward(_meta(1, 1 + L, C)[0, 1:], ids)
        mod.gather_rows_backward_table(torch.empty_like(out), ids, L, out.dtype)

    yield f"encoder B{BATCH} n{s.len_keep} C{s.enc_dim}", lambda: gather(visible_ids, s.enc_dim)
    if s.cross_attention:
        yield f"decoder B{BATCH} n{s.n_pred} C{s.dec_dim}", lambda: gather(pred_ids, s.dec_dim)


def _patches_launches(mod, s: StepShapes, dtype: torch.dtype) -> Iterator[Launch]:
    """Images and their patches stay fp32 under autocast: dtype does not reach these launches. The gather_patches
    backward (its inverse index included) runs only when the images require grad, the paste-back's backward
    only in the GPU tests; both are compiled all the same."""
    visible_ids, pred_ids = _ids(s)
    p = s.patch
    imgs = _meta(BATCH, 3, s.img_size, s.img_size)

    def encoder():
        patches = mod.gather_patches_forward(imgs, visible_ids, p)  # FusedOps.embed_patches
        mod.gather_patches_backward(torch.empty_like(patches), visible_ids, p, s.img_size, s.img_size)

    yield f"encoder B{BATCH} n{s.len_keep} p{p}", encoder

    def targets():
        mod.gather_target_patches_forward(imgs, pred_ids, p, True, 1e-6)

    yield f"targets B{BATCH} n{s.n_pred} p{p}", targets

    def reconstruction():
        """The model's _reconstruction (raw patches, pasted on a zero image and on the masked image), and the
        paste's gradient to patches (patchify, OWNER_ONLY) and base (unpatchify, HAS_BASE without patches)."""
        blank = torch.zeros_like(imgs)
        visible = mod.gather_target_patches_forward(imgs, visible_ids, p, False, 1e-6)[0]
        pred = mod.gather_target_patches_forward(imgs, pred_ids, p, False, 1e-6)[0]  # pred.float(): (B, n, P)
        masked, _ = mod.scatter_patches_forward(visible, visible_ids, s.img_size, s.img_size, p, blank)
        mod.scatter_patches_forward(pred, pred_ids, s.img_size, s.img_size, p, blank)
        pasted, inv = mod.scatter_patches_forward(pred, pred_ids, s.img_size, s.img_size, p, masked)
        mod.scatter_patches_backward(torch.empty_like(pasted), pred_ids, inv, p, True, True)

    yield f"reconstruction B{BATCH} n{s.len_keep}|{s.n_pred} p{p}", reconstruction


@dataclass(frozen=True)
class KernelFile:
    module: str  # kernels/<module>.py
    launches: Callable[..., Iterator[Launch]]  # (module, StepShapes, dtype) -> its launches in one training step


KERNEL_FILES = [
    KernelFile("attention", _attention_launches),
    KernelFile("attention_backward", _attention_backward_launches),
    KernelFile("bias_gelu", _bias_gelu_launches),
    KernelFile("feature_mix", _feature_mix_launches),
    KernelFile("gather_rows", _gather_rows_launches),
    KernelFile("layer_norm", _layer_norm_launches),
    KernelFile("mse_loss", _mse_loss_launches),
    KernelFile("patches", _patches_launches),
]


# --------------------------------------------------------------------------------------------------------------
# Recording launches and compiling them as JITFunction.run would
# --------------------------------------------------------------------------------------------------------------


class Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, kernel: KernelInterface, calls: list):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.kernel, args, dict(kwargs)))


@contextlib.contextmanager
def recording(modules: list, sm_count: int) -> Iterator[list]:
    calls: list = []
    saved = []
    for mod in modules:
        for name, obj in vars(mod).items():
            if isinstance(obj, KernelInterface):
                saved.append((mod, name, obj))
                setattr(mod, name, Recorder(obj, calls))
        if hasattr(mod, "num_sms"):
            saved.append((mod, "num_sms", mod.num_sms))
            mod.num_sms = lambda device: sm_count
    try:
        yield calls
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


_BACKENDS: dict = {}
_BINDERS: dict = {}


def specialise(kernel: KernelInterface, args: tuple, kwargs: dict, arch: int):
    """(src, options) that `kernel[grid](*args, **kwargs)` would compile for sm_<arch>, via Triton's own binder."""
    if not isinstance(kernel, JITFunction):
        raise TypeError(f"{kernel!r}: only plain @triton.jit kernels are recorded; for an autotuned / heuristic "
                        "kernel, record each config it would compile")
    if arch not in _BACKENDS:
        target = GPUTarget("cuda", arch, 32)
        _BACKENDS[arch] = (target, make_backend(target))
    target, backend = _BACKENDS[arch]
    kwargs = dict(kwargs)  # what JITFunction.run adds before binding
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    key = (id(kernel), arch)
    if key not in _BINDERS:
        _BINDERS[key] = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = _BINDERS[key](*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return target, ASTSource(kernel, signature, constexprs, attrs), options


def _ptxas_usage(log: str) -> dict:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    if not regs or not spills:
        raise RuntimeError(f"no register / spill line in the ptxas log:\n{log[-2000:]}")
    return {"registers": int(regs.group(1)), "spill_bytes": int(spills.group(1))}


def _rerun_ptxas(ptx: str, arch: int) -> str:
    """Triton without the dump_ptxas_log knob: run ptxas -v with the flags CUDABackend.make_cubin passes."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        cmd = [str(PTXAS), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", str(src), "-o",
               str(Path(tmp) / "k.o")]
        return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stderr


def compile_launch(target, src, options) -> dict:
    log = io.StringIO()
    has_knob = hasattr(knobs.nvidia, "dump_ptxas_log")
    before = knobs.nvidia.dump_ptxas_log if has_knob else None
    try:
        if has_knob:
            knobs.nvidia.dump_ptxas_log = True  # make_cubin prints its ptxas -v log to stdout
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
    finally:
        if has_knob:
            knobs.nvidia.dump_ptxas_log = before
    text = log.getvalue() if has_knob else _rerun_ptxas(compiled.asm["ptx"], target.arch)
    return {**_ptxas_usage(text), "shared_bytes": int(compiled.metadata.shared)}


def compile_all(file_names: list[str] | None = None) -> Iterator[dict]:
    """One row per (kernel file, model, launch shape, dtype, arch, kernel launch); compiles each distinct
    specialisation once. Runs outside the interpreter (see the `resources` fixture). Every kernel file's kernels
    are recorded, whichever files' launches run: a host function may launch another file's kernel (patches.py
    launches gather_rows.py's inverse index)."""
    modules, entries = [], []
    for entry in KERNEL_FILES:
        try:
            modules.append(importlib.import_module(f"kernels.{entry.module}"))
        except ModuleNotFoundError as exc:
            yield {"file": entry.module, "missing": str(exc)}
            continue
        if file_names is None or entry.module in file_names:
            entries.append((entry, modules[-1]))
    done: dict = {}
    for arch in ARCHS:
        for entry, mod in entries:
            for model in MODELS:
                s = step_shapes(model)
                for dtype_name, dtype in DTYPES.items():
                    for shape, call in entry.launches(mod, s, dtype):
                        row = {"file": entry.module, "model": model, "shape": shape, "dtype": dtype_name,
                               "arch": f"sm_{arch}"}
                        try:
                            with recording(modules, SM_COUNT[arch]) as calls:
                                call()
                        except Exception as exc:  # a host function that fails on these shapes
                            yield {**row, "kernel": "(host)", "error": f"{type(exc).__name__}: {exc}"}
                            continue
                        for kernel, args, kwargs in calls:
                            yield {**row, **_compiled_row(done, kernel, args, kwargs, arch)}


def _compiled_row(done: dict, kernel, args, kwargs, arch) -> dict:
    name = getattr(kernel, "__name__", repr(kernel))
    try:
        target, src, options = specialise(kernel, args, kwargs, arch)
    except Exception as exc:
        return {"kernel": name, "error": f"specialise: {type(exc).__name__}: {exc}"}
    key = (name, repr(src.signature), repr(sorted(src.constants.items(), key=str)), repr(src.attrs),
           repr(sorted(options.__dict__.items())), arch)
    if key not in done:
        info = {"kernel": name, "num_warps": options.num_warps, "num_stages": options.num_stages,
                "constexprs": {_arg_name(kernel, path): _plain(v) for path, v in src.constants.items()},
                "error": None}
        try:
            info.update(compile_launch(target, src, options))
        except Exception as exc:
            info["error"] = f"{type(exc).__name__}: {exc}"[-3000:]
        done[key] = info
    return done[key]


def _arg_name(kernel: JITFunction, path: tuple) -> str:
    name = kernel.arg_names[path[0]]
    return name if len(path) == 1 else f"{name}{list(path[1:])}"


def _plain(value):
    return value if isinstance(value, (int, float, bool, str)) or value is None else str(value)


# --------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resources() -> list[dict]:
    """Record and compile everything in one subprocess without TRITON_INTERPRET: under the interpreter
    the kernels (and triton.language's own @jit helpers) are interpreted functions the code generator cannot use.
    A fresh Triton cache makes every compile run ptxas, whose log is the register / spill source."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        # One subprocess per target, side by side (compiling is CPU-bound: two cores, half the wall time).
        procs = [subprocess.Popen([sys.executable, __file__], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env={**env, "TRITON_CACHE_DIR": os.path.join(cache, str(arch)),
                                                  "CROSSMAE_COMPILE_ARCHS": str(arch)})
                 for arch in ARCHS]
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=1200)
            if proc.returncode != 0:
                pytest.fail(f"compile subprocess failed (rc {proc.returncode}):\n{stderr[-4000:]}")
            rows += [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    missing = {(r["file"], r["missing"]): r for r in rows if "missing" in r}  # each subprocess reports them
    rows = [r for r in rows if "kernel" in r] + list(missing.values())
    if os.environ.get(SAVE_ENV) == "1":
        write_results(rows)
    print("\n" + "\n".join(markdown_table([r for r in rows if "kernel" in r])))
    return rows


CASES = [(entry.module, model) for entry in KERNEL_FILES for model in MODELS]


@pytest.mark.parametrize("file,model", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_launches_compile(file, model, resources):
    missing = [r["missing"] for r in resources if r.get("file") == file and "missing" in r]
    if missing:
        pytest.skip(f"kernels/{file}.py is not importable: {missing[0]}")
    rows = [r for r in resources if r.get("file") == file and r.get("model") == model]
    if not rows:
        pytest.skip(f"{model} launches nothing from kernels/{file}.py")
    failed = [f"{r['shape']} {r['dtype']} {r['arch']} {r['kernel']}: {r['error']}" for r in rows if r["error"]]
    assert not failed, "\n\n".join(failed)
    too_big = [f"{r['shape']} {r['dtype']} {r['arch']} {r['kernel']} ({r['constexprs']}): {r['shared_bytes']} B > "
               f"{SHARED_LIMIT[int(r['arch'][3:])]} B" for r in rows
               if r["shared_bytes"] > SHARED_LIMIT[int(r["arch"][3:])]]
    assert not too_big, "shared memory over the per-block limit (the launch would fail):\n" + "\n".join(too_big)
    if model.rsplit("_", 1)[-1] in NO_SPILL_SIZES:
        # The training dtypes must not spill. fp32 (the exactness tests' path, IEEE dots on the FMA units) is
        # checked to compile and fit, its spills recorded in the table (2026-12-02: a few bytes at S/B/L on sm_80).
        spills = [f"{r['shape']} {r['dtype']} {r['arch']} {r['kernel']} (warps {r['num_warps']}, "
                  f"{r['constexprs']}): {r['registers']} registers, {r['spill_bytes']} B spilled"
                  for r in rows if r["spill_bytes"] and r["dtype"] != "fp32"]
        assert not spills, "kernels spill at ViT-S/B/L shapes in bf16 / fp16:\n" + "\n".join(spills)


def _probe_kernel(x_ptr, n, m, k, BLOCK: tl.constexpr):  # only specialised here, never compiled
    pass


def test_specialisation_follows_triton_launch_rules():
    """specialise() is Triton's own binder: an integer 1 becomes a constant, integers and pointers divisible by 16
    are marked so (a meta view's data_ptr is its byte offset), and the CUDA defaults fill num_warps / num_stages."""
    fn = JITFunction(_probe_kernel)
    x = _meta(64, dtype=torch.bfloat16)
    _, src, options = specialise(fn, (x[1:], 1, 32, 17), {"BLOCK": 64}, 90)
    assert src.signature == {"x_ptr": "*bf16", "n": "constexpr", "m": "i32", "k": "i32", "BLOCK": "constexpr"}
    assert {path[0]: value for path, value in src.constants.items()} == {1: 1, 4: 64}
    divisible = {path[0] for path, attrs in src.attrs.items() if ["tt.divisibility", 16] in attrs}
    assert divisible == {2}, src.attrs  # the view starts 2 bytes in: not 16-byte aligned
    _, src, options = specialise(fn, (x[8:], 1, 32, 17), {"BLOCK": 64}, 80)
    assert {path[0] for path, attrs in src.attrs.items() if ["tt.divisibility", 16] in attrs} == {0, 2}
    assert (options.num_warps, options.num_stages) == (4, 3)
    _, _, options = specialise(fn, (x, 2, 32, 17), {"BLOCK": 64, "num_warps": 8, "num_stages": 2}, 90)
    assert (options.num_warps, options.num_stages) == (8, 2)


def test_every_launched_kernel_is_compiled(resources):
    """Each @triton.jit kernel a kernel file launches (`name[grid](...)` in its source) is compiled, for every
    target, in fp32 and in the half dtypes: a kernel only the GPU tests launch still gets a launch here."""
    compiled = {(r["kernel"], r["arch"], r["dtype"]) for r in resources if "kernel" in r and not r.get("error")}
    missing = []
    for entry in KERNEL_FILES:
        text = (ROOT / "kernels" / f"{entry.module}.py").read_text()
        for name in re.findall(r"@triton\.jit\s*\ndef (\w+)", text):
            if re.search(rf"\b{name}\[", text):
                missing += [f"{entry.module}.{name} {dtype} sm_{arch}" for arch in ARCHS for dtype in DTYPES
                            if (name, f"sm_{arch}", dtype) not in compiled]
    assert not missing, "launched kernels never compiled:\n" + "\n".join(missing)


def test_kernel_table_covers_every_kernel_file():
    """A kernels/*.py that defines Triton kernels must get an entry in KERNEL_FILES (files that only call other
    files' ops, such as a model's autograd.Function, need none)."""
    files = {p.stem for p in (ROOT / "kernels").glob("*.py")
             if not p.stem.startswith("_") and "@triton.jit" in p.read_text()}
    missing = files - {entry.module for entry in KERNEL_FILES}
    assert not missing, f"kernels/{sorted(missing)}.py have no KERNEL_FILES entry in {Path(__file__).name}"


# --------------------------------------------------------------------------------------------------------------
# Results table
# --------------------------------------------------------------------------------------------------------------

COLUMNS = ("kernel", "model", "shape", "dtype", "arch", "config", "num_warps", "num_stages", "registers",
           "spill_bytes", "shared_bytes")


def _config(row: dict) -> str:
    """The kernel's own constexpr parameters (block sizes, flags), not the arguments specialised to 1."""
    return " ".join(f"{k}={v}" for k, v in (row.get("constexprs") or {}).items() if k.isupper())


def _merged(rows: list[dict]) -> list[dict]:
    """Rows identical up to dtype (fp32 gathers under bf16 and fp16 autocast) merged into one "bf16, fp16" row;
    a launch repeated within one shape (the reconstruction's pastes) is listed once."""
    merged: dict = {}
    for r in rows:
        r = {**r, "config": _config(r)}
        key = (*(str(r.get(c)) for c in COLUMNS if c != "dtype"), str(r.get("constexprs")))
        if key not in merged:
            merged[key] = r
        elif r["dtype"] not in merged[key]["dtype"].split(", "):
            merged[key]["dtype"] += ", " + r["dtype"]
    return list(merged.values())


def markdown_table(rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in _merged(rows):
        cells = [str(r.get(c, "")) if not r.get("error") or c in ("kernel", "model", "shape", "dtype", "arch")
                 else "ERROR" for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_results(rows: list[dict]) -> None:
    ptxas = subprocess.run([str(PTXAS), "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    facts = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "torch": torch.__version__, "triton": triton.__version__, "ptxas": ptxas[-1] if ptxas else None,
             "python": platform.python_version(), "gpu": "none (ahead-of-time compile)",
             "command": f"{SAVE_ENV}=1 python -m pytest -q tests/test_kernels_compile.py",
             "batch": BATCH, "archs": [f"sm_{a}" for a in ARCHS], "sm_count": SM_COUNT}
    compiled = [r for r in rows if "kernel" in r]
    missing = [r for r in rows if "missing" in r]
    RESULTS.mkdir(parents=True, exist_ok=True)
    # one launch per line: diffable, a fraction of an indented dump's size
    lines = [json.dumps(r, separators=(",", ":")) for r in compiled]
    (RESULTS / "kernel_resources.json").write_text(
        f'{{"machine": {json.dumps(facts)},\n"missing": {json.dumps(missing)},\n"results": [\n'
        + ",\n".join(lines) + "\n]}\n")
    spilled = sorted({(r["kernel"], r["model"], r["dtype"], r["arch"]) for r in compiled if r.get("spill_bytes")})
    md = ["# Kernel resources: registers, spills, shared memory per launch", "",
          f"{facts['date']} · no GPU: ahead-of-time compile · torch {facts['torch']} · triton {facts['triton']} · "
          f"{facts['ptxas']} · Python {facts['python']}", "",
          f"Command: `{facts['command']}`", "",
          f"Every launch the S/B/L/H CrossMAE and MAE models make in one training step (forward and backward), batch "
          f"{BATCH}, under bf16 and fp16 autocast and in fp32, plus the reconstruction grid's pastes with their "
          "gradient and the position-table gradient (GPU-test launches at the models' shapes), compiled through "
          f"Triton's launch-time specialisation for {', '.join(facts['archs'])} (tests/test_kernels_compile.py). "
          "Registers and spill stores from ptxas -v, shared memory (bytes) from the compiled metadata, against "
          f"the per-block limit {SHARED_LIMIT}. Rows identical across dtypes are merged.", ""]
    if missing:
        md += [f"Not covered (kernel file not importable): {', '.join(r['file'] for r in missing)}", ""]
    md += [f"Spilling launches: {len(spilled)}" + (": " + "; ".join(" ".join(s) for s in spilled) if spilled else ""),
           ""]
    md += markdown_table(compiled)
    (RESULTS / "kernel_resources.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    only = sys.argv[1].split(",") if len(sys.argv) > 1 else None
    for result in compile_all(only):
        print(json.dumps(result), flush=True)

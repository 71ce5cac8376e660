"""Kernel benchmarks: the Triton kernels of kernels/ against PyTorch and, where installed, flash-attn / xformers.

    pytest bench/test_kernels.py --benchmark   # GPU: kernels_<gpu>_<date>.{json,md}, kernels_latest.{json,md}
                                               # (folder: bench/results.py; --save-results: bench/results/)
    pytest bench/test_kernels.py               # smoke check: tiny shapes (CPU interpreter is fine)
    GPU_ALL_STAGES=env,kernel_tests,kernel_bench bash bench/gpu_all.sh   # GPU kernel tests + this benchmark

Full mode times with `triton.testing.do_bench` (median of ~100 ms of repetitions after 25 ms of warm-up), bf16,
batch 256, the shapes of CrossMAE ViT-B at 224 px:
* attention, forward and forward+backward: decoder 16 heads of 32, 49 / 147 queries on 50 keys; encoder 12 heads
  of 64 on 50 tokens. Ours (also reading k / v as views of a fused kv projection) vs every torch SDPA backend
  (flash, memory-efficient, cuDNN, math; via torch.nn.attention.sdpa_kernel) and flash-attn / xformers.
  TFLOP/s count 4*B*H*Lq*Lk*d for the forward and 3.5x that for forward+backward (backward = 2.5x forward,
  flash-attention's convention). Goal (not asserted): forward+backward >= 2x the fastest SDPA backend.
* feature mixing: 13 maps of (256, 50, 768) into 12 layer-normalised (256*50, 768) outputs, vs the authors'
  dataflow in eager PyTorch (stack to (B, T, C, k), matmul, 12 LayerNorms) and torch.compile of the reference.
* gathers: decoder query rows (147 of 196), norm-pix targets (147 patches of 16x16x3 from fp32 images), scatter
  of 147 predicted patches onto images.
  GB/s count the bytes that must move (each input element read once, each output element written once),
  next to the device-to-device copy bandwidth measured in the same run (1 GiB tensor copy).
  Goal (not asserted): >= 70% of copy bandwidth.
* a sweep of our attention kernels' block_m / num_warps, to choose the defaults on this card (runs last).

Every error is recorded with its message; one from our kernels also fails the test, after the report is written
(the references' errors, e.g. an SDPA backend that does not support a shape, are results). Without triton the file
is skipped: the kernels are unavailable.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    # The smoke check runs the kernels in Triton's CPU interpreter, which must be chosen before `kernels` is
    # first imported (as tests/conftest.py does for the tests).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402

if not kernels.TRITON_AVAILABLE:
    pytest.skip("triton is not installed: the kernels are unavailable here", allow_module_level=True)

from bench import machine  # noqa: E402
from bench.harness import kernel_ms, try_kernel_ms  # noqa: E402
from bench.results import fmt, markdown_table, write_results  # noqa: E402
from kernels import reference as ref  # noqa: E402
from kernels.attention import attention_forward  # noqa: E402
from kernels.attention_backward import attention_backward  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
pytestmark = pytest.mark.skipif(not (CUDA or kernels.INTERPRET),
                                reason="kernels was imported before TRITON_INTERPRET=1 was set and there is no GPU")

REPORT: dict = {"machine": None, "copy": None, "attention": [], "attention_sweep": [], "feature_mix": [],
                "gathers": []}


# ------------------------------------------------------------------------------------------------------------
# facts, report
# ------------------------------------------------------------------------------------------------------------


def machine_facts() -> dict:
    """bench.machine's facts, plus what matters for kernels: interpreter or not, the optional references."""
    facts = machine.machine_facts()
    facts["interpreter"] = kernels.INTERPRET
    for name in ("flash_attn", "xformers"):
        try:
            facts[name] = __import__(name).__version__
        except Exception:
            facts[name] = None
    return facts


def write_report(results_dir, full: bool) -> None:
    """Rewrite this run's kernels_* results with everything measured so far (a run cut short keeps them)."""
    facts = REPORT["machine"]
    copy = REPORT["copy"]
    lines = [f"# Kernel benchmarks on {facts['gpu'] or 'the CPU (Triton interpreter)'}", "",
             f"{facts['date']} · driver {facts['driver']} · CUDA {facts['cuda_runtime']} · torch {facts['torch']} · "
             f"triton {facts['triton']} · flash-attn {facts['flash_attn'] or 'not installed'} · xformers "
             f"{facts['xformers'] or 'not installed'} · Python {facts['python']}", "",
             f"Command: `{facts['command']}`", "",
             "Median of `triton.testing.do_bench` (25 ms warm-up, 100 ms of repetitions). bf16 unless noted." if full
             else "**Smoke check** (tiny shapes, fp32, one wall-clock call each): shows the code runs, measures "
                  "nothing.", ""]
    if copy:
        lines += [f"Device-to-device copy bandwidth (1 GiB `copy_`, read + write): **{copy['gb_per_s']:,.0f} GB/s**.",
                  ""]
    if REPORT["attention"]:
        lines += ["## Attention", "",
                  "TFLOP/s: 4·B·H·Lq·Lk·d forward, 3.5x that forward+backward. 'vs best SDPA': the fastest torch SDPA "
                  "backend's time divided by this one's (goal for ours, forward+backward: >= 2).", ""]
        lines += [*markdown_table(
            ["shape", "mode", "implementation", "ms", "TFLOP/s", "vs best SDPA"],
            [[row["shape"], row["mode"], row["impl"] + (f" ({row['error']})" if row["error"] else ""),
              fmt(row["ms"], 3), fmt(row["tflops"]), fmt(row.get("vs_best_sdpa"), 2, "x")]
             for row in REPORT["attention"]]), ""]
    if REPORT["attention_sweep"]:
        lines += ["## Attention block-size sweep (ours; best per shape and mode)", ""]
        best: dict = {}
        for row in REPORT["attention_sweep"]:
            key = (row["shape"], row["mode"])
            if row["ms"] is not None and (key not in best or row["ms"] < best[key]["ms"]):
                best[key] = row
        table = []
        for (shape, mode), row in best.items():
            default = next((r["ms"] for r in REPORT["attention_sweep"]
                            if r["shape"] == shape and r["mode"] == mode and r["is_default"]), None)
            table.append([shape, mode, f"`{row['config']}`", fmt(row["ms"], 3), fmt(default, 3)])
        lines += [*markdown_table(["shape", "mode", "best config", "ms", "default config ms"], table), ""]
    for section, title in (("feature_mix", "Inter-block feature mixing"), ("gathers", "Gathers and scatters")):
        if not REPORT[section]:
            continue
        lines += [f"## {title}", "", "GB/s over the bytes that must move; '% copy' relative to the copy bandwidth "
                  "above (goal for ours: >= 70%).", ""]
        table = []
        for row in REPORT[section]:
            note = f" ({row['error']})" if row["error"] else ""
            pct = None if (row["gb_per_s"] is None or not copy) else 100 * row["gb_per_s"] / copy["gb_per_s"]
            table.append([row["op"], row["shape"], row["mode"], row["impl"] + note, fmt(row["ms"], 3),
                          f"{row['bytes'] / 1e6:,.1f}", fmt(row["gb_per_s"], 0), fmt(pct, 0, "%")])
        lines += [*markdown_table(["op", "shape", "mode", "implementation", "ms", "MB moved", "GB/s", "% copy"],
                                  table), ""]
    payload = {k: v for k, v in REPORT.items() if k != "machine"}
    write_results(results_dir, "kernels", facts, payload, lines, dated=full)


@pytest.fixture(scope="module")
def report(benchmark_full, results_dir):
    if benchmark_full and not CUDA:
        pytest.skip("--benchmark times kernels on a CUDA GPU; without one run the smoke check (no flag)")
    REPORT["machine"] = machine_facts()

    def flush():
        write_report(results_dir, benchmark_full)

    yield flush
    flush()


# ------------------------------------------------------------------------------------------------------------
# device-to-device copy
# ------------------------------------------------------------------------------------------------------------


def test_copy_bandwidth(report, benchmark_full):
    numel = (2**30 if benchmark_full else 2**20) // 4
    src = torch.empty(numel, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    ms = kernel_ms(lambda: dst.copy_(src), benchmark_full)
    REPORT["copy"] = {"bytes": 2 * src.nbytes, "ms": ms, "gb_per_s": 2 * src.nbytes / ms / 1e6}
    print(f"copy: {REPORT['copy']['gb_per_s']:,.0f} GB/s")
    assert torch.equal(dst, src)
    report()


# ------------------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------------------


def attention_shapes(full: bool):
    """(label, B, Lq, Lk, H, d)"""
    if full:
        return [("decoder gamma=0.25: 49q x 50k, 16x32", 256, 49, 50, 16, 32),
                ("decoder gamma=0.75: 147q x 50k, 16x32", 256, 147, 50, 16, 32),
                ("encoder ViT-B: 50 x 50, 12x64", 256, 50, 50, 12, 64)]
    return [("smoke: 5q x 6k, 2x16", 1, 5, 6, 2, 16)]


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def attention_impls() -> dict:
    """name -> (fn(q, k, v) on (B, L, H, d) tensors, SDPA backend or None)."""
    from torch.nn.attention import SDPBackend

    impls = {"triton (ours)": (kernels.attention, None),
             "triton (ours), k/v views of fused kv": ("kv_views", None)}
    for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("memory-efficient", SDPBackend.EFFICIENT_ATTENTION),
                           ("cuDNN", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
        impls[f"torch SDPA {label}"] = (sdpa, backend)
    try:
        from flash_attn import flash_attn_func

        impls["flash-attn"] = (flash_attn_func, None)
    except ImportError:
        pass
    try:
        import xformers.ops as xops

        impls["xformers"] = (xops.memory_efficient_attention, None)
    except ImportError:
        pass
    return impls


def test_attention(report, benchmark_full):
    from torch.nn.attention import sdpa_kernel

    dtype = torch.bfloat16 if benchmark_full else torch.float32
    for label, B, Lq, Lk, H, d in attention_shapes(benchmark_full):
        flops = 4 * B * H * Lq * Lk * d
        q = torch.randn(B, Lq, H, d, device=DEVICE, dtype=dtype, requires_grad=True)
        kv = torch.randn(B, Lk, 2, H, d, device=DEVICE, dtype=dtype, requires_grad=True)
        k_view, v_view = kv[:, :, 0], kv[:, :, 1]
        k = k_view.detach().contiguous().requires_grad_()
        v = v_view.detach().contiguous().requires_grad_()
        dout = torch.randn(B, Lq, H, d, device=DEVICE, dtype=dtype)
        expected = ref.attention_reference(q.float(), k.float(), v.float())
        rows = []
        for name, (fn, backend) in attention_impls().items():
            if fn == "kv_views":
                fn, args, leaves = kernels.attention, (q, k_view, v_view), [q, kv]
            else:
                args, leaves = (q, k, v), [q, k, v]
            ctx = sdpa_kernel(backend) if backend is not None else torch.autograd.graph.saved_tensors_hooks(
                lambda t: t, lambda t: t)  # a no-op context
            with ctx:
                error = None
                try:
                    out = fn(*args)
                    err = (out.float() - expected).abs().max().item()
                    if not err < 0.25:  # a sanity check of the function computed, not of precision
                        error = f"wrong result (max error {err:.3g})"
                except Exception as exc:
                    error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
                    ms = None
                    if error is None:
                        if mode == "fwd":
                            def step(fn=fn, args=args):
                                with torch.no_grad():
                                    fn(*args)
                        else:
                            def step(fn=fn, args=args, dout=dout):
                                fn(*args).backward(dout)
                        ms, error_mode = try_kernel_ms(step, benchmark_full, grad_to_none=leaves)
                    else:
                        error_mode = error
                    rows.append({"shape": label, "B": B, "Lq": Lq, "Lk": Lk, "H": H, "d": d, "dtype": str(dtype),
                                 "mode": mode, "impl": name, "ms": ms, "error": error_mode,
                                 "tflops": None if ms is None else mult * flops / ms / 1e9})
        for mode in ("fwd", "fwd+bwd"):
            sdpa_ms = [r["ms"] for r in rows if r["mode"] == mode and r["impl"].startswith("torch SDPA") and r["ms"]]
            for r in rows:
                if r["mode"] == mode and r["ms"] and sdpa_ms:
                    r["vs_best_sdpa"] = min(sdpa_ms) / r["ms"]
        for r in sorted(rows, key=lambda r: r["mode"]):
            print(f"{label:42s} {r['mode']:8s} {r['impl']:40s} {fmt(r['ms'], 3):>9s} ms {fmt(r['tflops']):>7s} "
                  f"TFLOP/s {r['error'] or ''}")
        REPORT["attention"] += rows
        failed = [f"{r['impl']} {r['mode']}: {r['error']}" for r in rows
                  if r["impl"].startswith("triton (ours)") and (r["ms"] is None or r["error"])]
        assert not failed, failed
        report()


# ------------------------------------------------------------------------------------------------------------
# inter-block feature mixing
# ------------------------------------------------------------------------------------------------------------


def mix_authors_dataflow(feats_list, weight, gammas, betas, eps=1e-6):
    """The authors' dataflow in eager PyTorch: stack to (B, T, C, k), one matmul, a LayerNorm per block."""
    stacked = torch.stack(feats_list, dim=-1)  # (B, T, C, k)
    mixed = stacked @ weight.t().to(stacked.dtype)  # (B, T, C, depth)
    return [F.layer_norm(mixed[..., j], mixed.shape[2:3], gammas[j], betas[j], eps)
            for j in range(weight.shape[0])]


def test_feature_mix(report, benchmark_full):
    K, B, T, C, J = (13, 256, 50, 768, 12) if benchmark_full else (3, 2, 3, 40, 2)
    dtype = torch.bfloat16 if benchmark_full else torch.float32
    N = B * T
    es = torch.empty((), dtype=dtype).element_size()
    feats = torch.randn(K, N, C, device=DEVICE, dtype=dtype, requires_grad=True)
    weight = (torch.randn(J, K, device=DEVICE) / math.sqrt(K)).requires_grad_()
    gamma = torch.ones(J, C, device=DEVICE, requires_grad=True)
    beta = torch.zeros(J, C, device=DEVICE, requires_grad=True)
    dout = torch.randn(J, N, C, device=DEVICE, dtype=dtype)
    feats_list = [f.view(B, T, C).detach().requires_grad_() for f in feats.detach()]
    compiled_ref = torch.compile(ref.feature_mix_layernorm_reference, backend="inductor" if benchmark_full
                                 else "aot_eager")
    impls = {
        "triton (ours)": (lambda: kernels.feature_mix_layernorm(feats, weight, gamma, beta), [feats]),
        "torch eager, authors' dataflow (stack, matmul, LayerNorms)": (
            lambda: torch.stack(mix_authors_dataflow(feats_list, weight, gamma, beta)).view(J, N, C), feats_list),
        "torch.compile(reference)": (lambda: compiled_ref(feats, weight, gamma, beta), [feats]),
    }
    fwd_bytes = (K + J) * N * C * es
    bwd_bytes = (K + J + K) * N * C * es + 2 * J * N * 4  # + re-read features, read dout, write dfeats, stats
    shape = f"k={K} maps of ({B}, {T}, {C}) -> {J}"
    expected = ref.feature_mix_layernorm_reference(feats.float(), weight, gamma, beta)
    for name, (fn, leaves) in impls.items():
        out, error = None, None
        try:
            out = fn()
            err = (out.float() - expected).abs().max().item()
            if not err < 0.25:  # a sanity check of the function computed, not of precision
                error = f"wrong result (max error {err:.3g})"
        except Exception as exc:
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        for mode, nbytes in (("fwd", fwd_bytes), ("fwd+bwd", fwd_bytes + bwd_bytes)):
            ms, err_mode = None, error
            if error is None:
                if mode == "fwd":
                    def step(fn=fn):
                        with torch.no_grad():
                            fn()
                else:
                    def step(fn=fn):
                        fn().backward(dout)
                ms, err_mode = try_kernel_ms(step, benchmark_full, grad_to_none=[*leaves, weight, gamma, beta])
            REPORT["feature_mix"].append({"op": "feature_mix_layernorm", "shape": shape, "mode": mode, "impl": name,
                                          "dtype": str(dtype), "ms": ms, "bytes": nbytes, "error": err_mode,
                                          "gb_per_s": None if ms is None else nbytes / ms / 1e6})
            print(f"feature mix {mode:8s} {name:60s} {fmt(ms, 3):>9s} ms {err_mode or ''}")
    ours = [r for r in REPORT["feature_mix"] if r["impl"] == "triton (ours)"]
    failed = [f"{r['mode']}: {r['error']}" for r in ours if r["ms"] is None or r["error"]]
    assert ours and not failed, failed
    report()


# ------------------------------------------------------------------------------------------------------------
# gathers and scatters
# ------------------------------------------------------------------------------------------------------------


def test_gathers(report, benchmark_full):
    if benchmark_full:
        B, img, p, D, n_pred = 256, 224, 16, 512, 147
    else:
        B, img, p, D, n_pred = 2, 16, 4, 16, 6
    L = (img // p) ** 2
    P = p * p * 3
    dtype = torch.bfloat16 if benchmark_full else torch.float32
    es = torch.empty((), dtype=dtype).element_size()
    noise = torch.rand(B, L, device=DEVICE)
    shuffle = noise.argsort(dim=1)
    pred_ids = shuffle[:, L - n_pred:]
    table = torch.randn(L, D, device=DEVICE)
    imgs = torch.randn(B, 3, img, img, device=DEVICE)  # fp32, as the data loader delivers them
    patches = torch.randn(B, n_pred, P, device=DEVICE, dtype=dtype, requires_grad=True)
    backend = "inductor" if benchmark_full else "aot_eager"
    ops = [
        # (op, shape, mode, impl name, fn, leaves for grad reset, dout or None, bytes)
        ("gather_rows", f"table ({L}, {D}) fp32, {n_pred} ids", "fwd",
         {"triton (ours)": lambda: kernels.gather_rows(table, pred_ids),
          "torch eager (reference)": lambda: ref.gather_rows_reference(table, pred_ids)},
         [], None, L * D * 4 + B * n_pred * D * 4),
        ("gather_target_patches", f"imgs ({B}, 3, {img}, {img}) fp32, {n_pred} patches, norm_pix", "fwd",
         {"triton (ours)": lambda: kernels.gather_target_patches(imgs, pred_ids, p),
          "torch eager (reference)": lambda: ref.gather_target_patches_reference(imgs, pred_ids, p),
          "torch.compile(reference)": torch.compile(lambda: ref.gather_target_patches_reference(imgs, pred_ids, p),
                                                    backend=backend)},
         [], None, 2 * B * n_pred * P * 4 + 2 * B * n_pred * 4 * 2),
        ("scatter_patches", f"{n_pred} patches onto ({B}, 3, {img}, {img}) base", "fwd",
         {"triton (ours)": lambda: kernels.scatter_patches(patches, pred_ids, img, p, base=imgs),
          "torch eager (reference)": lambda: ref.scatter_patches_reference(patches, pred_ids, img, p, base=imgs)},
         [patches], None, B * 3 * img * img * (es + 4)),
    ]
    for op, shape, mode, impls, leaves, dout, nbytes in ops:
        for name, fn in impls.items():
            if mode == "fwd":
                def step(fn=fn):
                    with torch.no_grad():
                        fn()
            else:
                def step(fn=fn, dout=dout):
                    fn().backward(dout)
            ms, error = try_kernel_ms(step, benchmark_full, grad_to_none=leaves or None)
            REPORT["gathers"].append({"op": op, "shape": shape, "mode": mode, "impl": name, "dtype": str(dtype),
                                      "ms": ms, "bytes": nbytes, "error": error,
                                      "gb_per_s": None if ms is None else nbytes / ms / 1e6})
            print(f"{op:22s} {mode:8s} {name:28s} {fmt(ms, 3):>9s} ms {error or ''}")
    ours = [r for r in REPORT["gathers"] if r["impl"] == "triton (ours)"]
    failed = [f"{r['op']} {r['mode']}: {r['error']}" for r in ours if r["ms"] is None or r["error"]]
    assert not failed, failed
    report()


# ------------------------------------------------------------------------------------------------------------
# attention block sizes (last: the longest part, and the results above are already written if it is cut short)
# ------------------------------------------------------------------------------------------------------------


def sweep_configs(full: bool, seqlen_q: int):
    if not full:
        return [{"block_m": 16, "num_warps": 4}]
    # num_stages stays at its default: with <= 64 keys the key loop runs once, so pipelining has nothing to overlap
    block_ms = [bm for bm in (16, 32, 64, 128) if bm <= max(16, 2 * seqlen_q)]
    return [{"block_m": bm, "num_warps": w} for bm in block_ms for w in (4, 8)]


def test_attention_config_sweep(report, benchmark_full):
    """Our kernels' block_m / num_warps (block_n stays the smallest cover of the 50 keys)."""
    if os.environ.get("KERNEL_BENCH_SWEEP", "1") == "0":
        pytest.skip("KERNEL_BENCH_SWEEP=0")
    dtype = torch.bfloat16 if benchmark_full else torch.float32
    from kernels.attention import _default_blocks
    from kernels.attention_backward import _default_bwd_blocks

    for label, B, Lq, Lk, H, d in attention_shapes(benchmark_full):
        q, k, v, dout = (torch.randn(B, L, H, d, device=DEVICE, dtype=dtype) for L in (Lq, Lk, Lk, Lq))
        scale = 1 / math.sqrt(d)
        out, lse = attention_forward(q, k, v, scale)
        defaults = {"fwd": _default_blocks(Lq, Lk, d, dtype), "bwd": _default_bwd_blocks(Lq, Lk, d, dtype)}
        fwd_args, bwd_args = (q, k, v, scale), (dout, q, k, v, out, lse, scale)
        for config in sweep_configs(benchmark_full, Lq):
            for mode in ("fwd", "bwd"):
                cfg = dict(defaults[mode], **config)
                if mode == "fwd":
                    def step(cfg=cfg, args=fwd_args):
                        attention_forward(*args, config=cfg)
                else:
                    def step(cfg=cfg, args=bwd_args):
                        attention_backward(*args, config=cfg)
                ms, error = try_kernel_ms(step, benchmark_full)
                REPORT["attention_sweep"].append({"shape": label, "mode": mode, "config": cfg, "ms": ms, "error": error,
                                                  "is_default": cfg == defaults[mode]})
        report()
    # Every configuration runs, except one that asks for more shared memory / registers than this card has
    # (a real limit of that configuration, which the sweep exists to find), and never the default.
    failed = [r for r in REPORT["attention_sweep"] if r["ms"] is None and not (
        benchmark_full and not r["is_default"] and "OutOfResources" in (r["error"] or ""))]
    assert REPORT["attention_sweep"] and not failed, failed


def test_smoke_fails_when_our_kernel_fails(monkeypatch):
    """The check above must fail, not record "n/a", when our kernel raises (here: a fake launch failure)."""
    def broken(*args, **kwargs):
        raise RuntimeError("kernel launch failed (fake)")

    monkeypatch.setattr(kernels, "attention", broken)
    measured = list(REPORT["attention"])
    try:
        with pytest.raises(AssertionError, match="kernel launch failed"):
            test_attention(lambda: None, False)
    finally:
        REPORT["attention"][:] = measured  # the report keeps only real measurements

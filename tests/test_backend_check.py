"""--backend auto (train/backend_check.py): the numbers check on the real kernels (CPU, Triton's interpreter), the
per-op fallback and the triton refusal when one fused op is perturbed, the choice from injected timings, the
verdict cache, and two gloo ranks agreeing. Tiny models: one encoder and one decoder block on 16-pixel images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kernels
from model import create_model, get_config
from model.ops import FusedOps, ReferenceOps, resolve_backend
from train import backend_check
from train.backend_check import BackendRefused, checked_choice, choose_backend, decide, pretrain_workload, run_check

pytestmark = pytest.mark.skipif(not (kernels.TRITON_AVAILABLE and (kernels.INTERPRET or torch.cuda.is_available())),
                                reason="the fused kernels need triton and a GPU or TRITON_INTERPRET=1")

MODEL = "crossmae_vit_tiny_patch8"
TINY = dict(img_size=16, patch_size=4, depth=1, decoder_depth=1, inter_block=False)  # no IBA: the slowest kernel
CPU = torch.device("cpu")


def tiny_workload(batch: int = 2, precision: str = "fp32") -> backend_check.Workload:
    return pretrain_workload(MODEL, get_config(MODEL, **TINY), batch, precision, False, CPU)


def timings(torch_ms: float, fused_ms: float):
    """A timer that runs nothing and reports the given milliseconds per path."""
    return lambda path, step: {"torch": torch_ms, "fused": fused_ms}[path] / 1e3


PASSING = {"images": 2, "rtol": 1e-4, "full": {"passed": True, "tensor": "loss", "error": 0.0, "bound": 1e-4,
                                                "ratio": 0.0}, "ops": {}, "failing_ops": [], "fused_usable": True}


def quick_check(torch_ms: float, fused_ms: float):
    """A check with passing numbers (no kernels run) and injected step times."""
    def check(workload, timer=None):
        verdict_numbers = backend_check.check_numbers
        backend_check.check_numbers = lambda w, n: PASSING
        try:
            return run_check(workload, timer=timings(torch_ms, fused_ms), warmup=0, steps=1)
        finally:
            backend_check.check_numbers = verdict_numbers
    return check


def test_auto_on_a_cpu_is_torch_without_the_check(monkeypatch, tmp_path):
    def must_not_run(*args, **kwargs):
        raise AssertionError("auto on a CPU ran the backend check")

    monkeypatch.setattr(backend_check, "checked_choice", must_not_run)
    monkeypatch.setattr(backend_check, "run_check", must_not_run)
    assert choose_backend("auto", tiny_workload(), tmp_path) == ("torch", frozenset())
    assert choose_backend("torch", tiny_workload(), tmp_path) == ("torch", frozenset())
    assert resolve_backend("auto") == ("torch", frozenset())
    model = create_model(MODEL, backend="auto", **TINY)
    assert model.cfg.backend == "torch" and isinstance(model.ops, ReferenceOps)
    assert get_config(MODEL).backend == "auto"  # unresolved until a model is built
    assert not (tmp_path / backend_check.VERDICT_FILE).exists()


def test_the_numbers_check_passes_on_the_real_kernels():
    numbers = backend_check.check_numbers(tiny_workload())
    assert numbers["full"]["passed"], numbers["full"]
    assert numbers["fused_usable"] and numbers["failing_ops"] == [] and numbers["ops"] == {}
    assert numbers["rtol"] == 1e-4 and numbers["images"] == 2  # fp32's tolerance; the whole (small) batch


@pytest.fixture(scope="module")
def perturbed_verdict():
    """The verdict when the fused MLP's output is off by 1e-2 relative (and the fused path is faster)."""
    fused_mlp = FusedOps.mlp
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(FusedOps, "mlp", lambda self, x, fc1, fc2: fused_mlp(self, x, fc1, fc2) * (1 + 1e-2))
        return run_check(tiny_workload(), timer=timings(10.0, 5.0), warmup=0, steps=1)


def test_a_perturbed_op_makes_auto_fall_back_for_that_op_alone(perturbed_verdict):
    numbers = perturbed_verdict["numbers"]
    assert not numbers["full"]["passed"]
    assert numbers["failing_ops"] == ["mlp"] and numbers["fused_usable"]
    assert numbers["ops"]["mlp"]["tensor"] != "(raised)" and numbers["ops"]["mlp"]["ratio"] > 1
    assert all(result["passed"] for op, result in numbers["ops"].items() if op != "mlp")
    backend, reference_ops = decide(perturbed_verdict, "auto")
    assert (backend, reference_ops) == ("triton", frozenset({"mlp"}))
    assert perturbed_verdict["decision"]["decided_by"] == "speed"
    assert create_model(MODEL, backend=backend, reference_ops=reference_ops, **TINY).ops.reference_ops == {"mlp"}


def test_a_perturbed_op_makes_triton_refuse_naming_it(perturbed_verdict):
    assert issubclass(BackendRefused, ValueError)  # the run's entry point turns it into exit status 2
    with pytest.raises(BackendRefused) as refused:
        decide(perturbed_verdict, "triton")
    line = str(refused.value)
    assert "\n" not in line
    assert line.startswith("--backend triton: the fused mlp fails the numbers check")
    assert f"{perturbed_verdict['numbers']['ops']['mlp']['tensor']}: max error" in line


@pytest.mark.parametrize("torch_ms,fused_ms,expected", [(10.0, 12.0, "torch"), (10.0, 8.0, "triton")])
def test_the_choice_from_injected_timings(torch_ms, fused_ms, expected):
    verdict = quick_check(torch_ms, fused_ms)(tiny_workload())
    assert decide(verdict, "auto") == (expected, frozenset())
    assert verdict["decision"]["decided_by"] == "speed"
    assert verdict["speed"] == {"warmup": 0, "steps": 1, "torch_ms": torch_ms, "fused_ms": fused_ms}
    ratio = f"{max(torch_ms, fused_ms) / min(torch_ms, fused_ms):.2f}x {'faster' if expected == 'triton' else 'slower'}"
    assert ratio in backend_check.summary(verdict, "auto", cached=False)
    assert decide(verdict, "triton") == ("triton", frozenset())  # forced: correct is enough


def test_failing_numbers_decide_torch_without_timing(monkeypatch):
    failing = {**PASSING, "full": {**PASSING["full"], "passed": False, "ratio": 3.0}, "fused_usable": False}
    monkeypatch.setattr(backend_check, "check_numbers", lambda w, n: failing)
    monkeypatch.setattr(backend_check, "time_step", lambda *a, **k: pytest.fail("timed a path that failed"))
    verdict = run_check(tiny_workload())
    assert decide(verdict, "auto") == ("torch", frozenset()) and verdict["decision"]["decided_by"] == "numbers"
    with pytest.raises(BackendRefused, match="the fused model fails the numbers check"):
        decide(verdict, "triton")


def test_a_cache_hit_skips_the_check_and_a_changed_key_does_not(tmp_path, caplog):
    cache, out = tmp_path / "cache", tmp_path / "run"
    calls = []

    def counted(workload, timer=None):
        calls.append(workload.batch_size)
        return quick_check(10.0, 8.0)(workload)

    assert checked_choice("auto", tiny_workload(2), cache_dir=cache, output_dir=out, check=counted) == \
        ("triton", frozenset())
    assert calls == [2] and len(list(cache.glob("*.json"))) == 1
    record = json.loads((out / backend_check.VERDICT_FILE).read_text())
    assert record["cached"] is False and record["key"]["batch"] == 2 and record["decision"]["backend"] == "triton"

    def must_not_run(workload, timer=None):
        raise AssertionError("a cache hit ran the check")

    assert checked_choice("auto", tiny_workload(2), cache_dir=cache, output_dir=out, check=must_not_run) == \
        ("triton", frozenset())
    assert json.loads((out / backend_check.VERDICT_FILE).read_text())["cached"] is True

    checked_choice("auto", tiny_workload(4), cache_dir=cache, output_dir=out, check=counted)  # another batch
    assert calls == [2, 4] and len(list(cache.glob("*.json"))) == 2

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    with caplog.at_level("WARNING", logger="train"):
        assert checked_choice("auto", tiny_workload(2), cache_dir=blocked, check=counted) == ("triton", frozenset())
    assert "cannot cache the backend verdict" in caplog.text


# -- two gloo ranks ---------------------------------------------------------------------------------------------

def _rank(rank: int, store_path: str, out: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        # Rank 0 checks (fused faster); rank 1 must not check at all, and its own timings would say torch.
        check = quick_check(10.0, 8.0) if rank == 0 else quick_check(8.0, 10.0)
        if rank == 1:
            def check(workload, timer=None):
                raise AssertionError("rank 1 ran the check")
        choice = checked_choice("auto", tiny_workload(), cache_dir=Path(out) / f"cache{rank}", check=check)
        Path(out, f"rank{rank}.json").write_text(json.dumps([choice[0], sorted(choice[1])]))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_agree(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    choices = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert choices == [["triton", []], ["triton", []]]
    assert list((tmp_path / "cache0").glob("*.json")) and not (tmp_path / "cache1").exists()

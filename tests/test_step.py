"""The one training step (train/step.py): micro-batch accumulation, the lr, the gradients, the loss scaler,
the phases the ledger times, the data wait; and the masking noise's seeds."""

from __future__ import annotations

import contextlib
import time

import pytest
import torch
from torch import nn

from train.step import MaskedAutoencoding, TrainStep, noise_seed, resolve_precision

CPU = torch.device("cpu")


class Recording(torch.optim.SGD):
    """Plain SGD that records, at each step, the groups' lrs and the gradients it is handed."""

    def __init__(self, params, lr: float, events: list | None = None):
        super().__init__(params, lr=lr)
        self.seen: list[dict] = []
        self.events = events

    def step(self, closure=None):
        self.seen.append({"lrs": [g["lr"] for g in self.param_groups],
                          "grads": [p.grad.clone() for g in self.param_groups for p in g["params"]]})
        if self.events is not None:
            self.events.append("step")
        return super().step(closure)


class Regression:
    """A least-squares objective; batches are ``(x, y)``. Records how it is called and under which autocast."""

    def __init__(self, model: nn.Module, events: list | None = None):
        self.model, self.events = model, events
        self.calls: list[tuple[int, int, int]] = []
        self.autocast: list[tuple[str, bool]] = []

    def inputs(self, batch, step: int, micro: int, accum: int):
        self.calls.append((step, micro, accum))
        self.autocast.append(("inputs", torch.is_autocast_enabled("cpu")))
        if self.events is not None:
            self.events.append("inputs")
        return batch

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.autocast.append(("loss", torch.is_autocast_enabled("cpu")))
        if self.events is not None:
            self.events.append("loss")
        return ((self.model(x) - y) ** 2).mean()


def regression_data(n: int, seed: int, dtype=torch.float64) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(3, 2).to(dtype)
    with torch.no_grad():
        model.weight.copy_(torch.randn(2, 3, generator=g))
        model.bias.copy_(torch.randn(2, generator=g))
    return model, torch.randn(n, 3, generator=g, dtype=dtype), torch.randn(n, 2, generator=g, dtype=dtype)


def split(x: torch.Tensor, y: torch.Tensor, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(x.chunk(k), y.chunk(k), strict=True))


# -- accumulation -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("accum", [2, 3])
def test_accumulation_gives_the_gradient_of_the_mean_loss_over_all_micro_batches(accum, dtype, tol):
    model, x, y = regression_data(4 * accum, seed=accum, dtype=dtype)
    reference = nn.Linear(3, 2).to(dtype)
    reference.load_state_dict(model.state_dict())
    expected = torch.autograd.grad(((reference(x) - y) ** 2).mean(), list(reference.parameters()))

    opt = Recording(model.parameters(), lr=0.1)
    TrainStep(opt, Regression(model), precision="fp32", device=CPU, accum_iter=accum)(iter(split(x, y, accum)), 0)
    for got, want in zip(opt.seen[0]["grads"], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)

    # ... and so the same update as one step over the concatenated batch.
    whole = Recording(reference.parameters(), lr=0.1)
    TrainStep(whole, Regression(reference), precision="fp32", device=CPU)(iter([(x, y)]), 0)
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_the_objective_sees_the_step_and_each_micro_batch_in_order():
    model, x, y = regression_data(12, seed=1)
    objective = Regression(model)
    batches = iter(split(x, y, 3) * 2)
    step = TrainStep(Recording(model.parameters(), lr=0.1), objective, precision="fp32", device=CPU, accum_iter=3)
    step(batches, 7)
    step(batches, 8)
    assert objective.calls == [(7, 0, 3), (7, 1, 3), (7, 2, 3), (8, 0, 3), (8, 1, 3), (8, 2, 3)]
    assert next(batches, None) is None  # exactly accum_iter batches a step


def test_the_returned_loss_is_the_detached_sum_of_the_micro_losses():
    model, x, y = regression_data(12, seed=2)
    with torch.no_grad():
        expected = sum(((model(xb) - yb) ** 2).mean() for xb, yb in split(x, y, 3))
    loss, _ = TrainStep(Recording(model.parameters(), lr=0.1), Regression(model), precision="fp32", device=CPU,
                        accum_iter=3)(iter(split(x, y, 3)), 0)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and loss.device == CPU
    assert not loss.requires_grad and loss.grad_fn is None
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


def test_the_gradients_are_dropped_after_the_step():
    model, x, y = regression_data(8, seed=3)
    TrainStep(Recording(model.parameters(), lr=0.1), Regression(model), precision="fp32", device=CPU,
              accum_iter=2)(iter(split(x, y, 2)), 0)
    assert all(p.grad is None for p in model.parameters())


# -- the learning rate ----------------------------------------------------------------------------------------

def test_the_lr_is_set_on_every_group_before_the_optimizer_steps():
    model, x, y = regression_data(4, seed=4)
    opt = Recording([{"params": [model.weight], "lr_scale": 0.5}, {"params": [model.bias]}], lr=1.0)
    step = TrainStep(opt, Regression(model), precision="fp32", device=CPU)
    step(iter([(x, y)]), 0, lr=0.2)
    assert opt.seen[-1]["lrs"] == [0.1, 0.2]  # lr times each group's lr_scale (1 without one)
    step(iter([(x, y)]), 1, lr=0.0)
    assert opt.seen[-1]["lrs"] == [0.0, 0.0]
    for g in opt.param_groups:
        g["lr"] = 0.3
    step(iter([(x, y)]), 2)  # lr=None: the optimizer's own
    assert opt.seen[-1]["lrs"] == [0.3, 0.3]


def test_the_update_uses_the_lr_given_for_this_step():
    model, x, y = regression_data(4, seed=5)
    before = model.weight.detach().clone()
    opt = Recording(model.parameters(), lr=1.0)
    TrainStep(opt, Regression(model), precision="fp32", device=CPU)(iter([(x, y)]), 0, lr=0.01)
    torch.testing.assert_close(model.weight.detach(), before - 0.01 * opt.seen[0]["grads"][0], rtol=1e-12, atol=0)


# -- precision and the loss scaler --------------------------------------------------------------------------

@pytest.mark.parametrize("precision,scaled", [("fp32", False), ("bf16", False), ("fp16", True)])
def test_the_loss_scaler_is_enabled_for_fp16_only(precision, scaled):
    model = nn.Linear(2, 2)
    step = TrainStep(Recording(model.parameters(), lr=0.1), Regression(model), precision=precision, device=CPU)
    assert step.scaler.is_enabled() is scaled
    assert bool(step.state_dict()) is scaled  # the checkpoint carries the scale only when there is one


def test_precision_defaults_to_bf16_on_a_gpu_and_fp32_elsewhere_and_refuses_others():
    assert resolve_precision(None, torch.device("cuda", 0)) == "bf16"
    assert resolve_precision(None, CPU) == "fp32"
    assert resolve_precision("fp16", CPU) == "fp16"
    with pytest.raises(ValueError, match="fp64"):
        resolve_precision("fp64", CPU)


@pytest.mark.parametrize("precision,autocast", [("fp32", False), ("bf16", True)])
def test_the_loss_runs_under_autocast_and_the_inputs_outside_it(precision, autocast):
    model, x, y = regression_data(4, seed=6, dtype=torch.float32)
    objective = Regression(model)
    TrainStep(Recording(model.parameters(), lr=0.1), objective, precision=precision, device=CPU)(iter([(x, y)]), 0)
    assert objective.autocast == [("inputs", False), ("loss", autocast)]


def test_accum_iter_below_one_is_refused():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="accum_iter"):
        TrainStep(Recording(model.parameters(), lr=0.1), Regression(model), precision="fp32", device=CPU,
                  accum_iter=0)


# -- phases, DDP, data wait ------------------------------------------------------------------------------------

class Batches:
    """An iterator over ``items`` that records each fetch in ``events`` and sleeps ``delay`` seconds first."""

    def __init__(self, items, events: list | None = None, delay: float = 0.0):
        self.items, self.events, self.delay = iter(items), events, delay

    def __iter__(self):
        return self

    def __next__(self):
        if self.delay:
            time.sleep(self.delay)
        if self.events is not None:
            self.events.append("batch")
        return next(self.items)


def test_phases_are_announced_in_order_around_the_work_they_name():
    """The ledger times forward / backward / optimizer by these calls: each is announced after the data wait
    and before its work."""
    events: list[str] = []
    model, x, y = regression_data(8, seed=7)
    model.weight.register_hook(lambda grad: events.append("grad"))
    step = TrainStep(Recording(model.parameters(), lr=0.1, events=events), Regression(model, events),
                     precision="fp32", device=CPU, accum_iter=2, on_phase=lambda name: events.append(f"<{name}>"))
    step(Batches(split(x, y, 2), events), 0)
    micro = ["batch", "<forward>", "inputs", "loss", "<backward>", "grad"]
    assert events == [*micro, *micro, "<optimizer>", "step"]


def test_ddp_all_reduce_is_deferred_to_the_last_micro_batch():
    inside = []

    class FakeDDP(nn.Module):
        @contextlib.contextmanager
        def no_sync(self):
            inside.append(True)
            try:
                yield
            finally:
                inside.pop()

    synced: list[bool] = []
    model, x, y = regression_data(12, seed=8)
    model.weight.register_hook(lambda grad: synced.append(not inside))
    TrainStep(Recording(model.parameters(), lr=0.1), Regression(model), precision="fp32", device=CPU, accum_iter=3,
              ddp=FakeDDP())(iter(split(x, y, 3)), 0)
    assert synced == [False, False, True]  # backward of micro-batches 0 and 1 under no_sync; 2 all-reduces


def test_the_time_spent_waiting_for_batches_is_returned():
    model, x, y = regression_data(12, seed=9)
    delay = 0.05
    _, waited = TrainStep(Recording(model.parameters(), lr=0.1), Regression(model), precision="fp32", device=CPU,
                          accum_iter=3)(Batches(split(x, y, 3), delay=delay), 0)
    assert waited >= 0.9 * 3 * delay  # a lower bound only: a loaded machine sleeps longer, never shorter


# -- the masking noise ------------------------------------------------------------------------------------------

def test_noise_seed_matches_the_original_formula_on_hand_computed_cases():
    """((seed * 1_000_003 + rank) * 1_000_000_007 + step * accum + micro) mod (2**63 - 1), as train/pretrain.py
    seeded the masks before the step moved to train/step.py: resumed runs of old checkpoints draw the same masks."""
    assert noise_seed(0, 0, 0, 0, 1) == 0
    assert noise_seed(0, 0, 3, 0, 1) == 3
    assert noise_seed(0, 0, 3, 1, 2) == 7
    assert noise_seed(0, 1, 0, 0, 1) == 1_000_000_007
    assert noise_seed(1, 0, 0, 0, 1) == 1_000_003_007_000_021  # 1_000_003 * 1_000_000_007
    assert noise_seed(2, 3, 10, 1, 4) == 2_000_009_014_000_104  # 2_000_009 * 1_000_000_007 + 41
    # (2**40 * 1_000_003 + 5) * 1_000_000_007 + 371 = 1_099_514_934_007_487_817_176_183_702, reduced mod 2**63 - 1
    assert noise_seed(2**40, 5, 123, 2, 3) == 120_986_966_104_797_766


def test_noise_seeds_are_distinct_across_positions_and_valid_generator_seeds():
    for accum in (1, 4):
        grid = [(seed, rank, step, micro) for seed in (0, 1, 2, 12345) for rank in range(8) for step in range(200)
                for micro in range(accum)]
        seeds = [noise_seed(*position, accum) for position in grid]
        assert len(set(seeds)) == len(grid), accum
        assert all(0 <= s < 2**63 - 1 for s in seeds)
    assert [noise_seed(7, 2, 5, 1, 4) for _ in range(3)] == [noise_seed(7, 2, 5, 1, 4)] * 3
    largest = noise_seed(2**62, 2**20, 2**40, 3, 4)
    assert 0 <= largest < 2**63 - 1
    torch.Generator().manual_seed(largest)  # every value is one a generator accepts


def test_masked_autoencoding_draws_the_noise_of_its_position():
    class Net(nn.Module):
        def forward(self, imgs, noise):
            return {"loss": imgs.mean() + noise.mean()}

    objective = MaskedAutoencoding(Net(), num_patches=6, seed=3, rank=1, device=CPU)
    imgs = torch.zeros(4, 3, 8, 8)
    labels = torch.arange(4)
    got_imgs, noise = objective.inputs((imgs, labels), step=5, micro=1, accum=2)
    assert got_imgs is imgs
    expected = torch.rand(4, 6, generator=torch.Generator().manual_seed(noise_seed(3, 1, 5, 1, 2)))
    assert torch.equal(noise, expected)
    assert torch.equal(objective.inputs((imgs, labels), 5, 1, 2)[1], noise)  # a position always draws the same
    assert not torch.equal(objective.inputs((imgs, labels), 5, 0, 2)[1], noise)
    assert not torch.equal(objective.inputs((imgs, labels), 6, 1, 2)[1], noise)
    torch.testing.assert_close(objective.loss(imgs, noise), noise.mean())

"""The optimisation recipe of SPEC.md section 2 (train/optim.py): the lr schedule, the lr scaling rule, the
weight-decay groups, the optimizer's construction and the lr setter."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from train.optim import build_optimizer, lr_at, param_groups, scaled_lr, set_lr

LR, MIN_LR, WARMUP, EPOCHS = 1e-3, 1e-5, 4.0, 40.0


def schedule(epoch: float, lr: float = LR, min_lr: float = MIN_LR, warmup: float = WARMUP,
             epochs: float = EPOCHS) -> float:
    return lr_at(epoch, lr, min_lr, warmup, epochs)


# -- lr_at ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("epoch", [0.0, 0.01, 0.25, 1.0, 1.5, 2.0, 3.999])
def test_warmup_rises_linearly_from_zero(epoch):
    assert schedule(epoch) == pytest.approx(LR * epoch / WARMUP, rel=1e-15, abs=0.0)


def test_warmup_starts_at_zero_and_peaks_at_exactly_lr_when_it_ends():
    assert schedule(0.0) == 0.0
    assert lr_at(WARMUP, LR, 0.0, WARMUP, EPOCHS) == LR  # no min_lr: the peak is lr to the bit
    assert schedule(WARMUP) == pytest.approx(LR, rel=1e-15)  # min_lr + (lr - min_lr): lr up to one rounding
    assert schedule(WARMUP - 1e-9) == pytest.approx(LR, rel=1e-8)  # continuous at the end of the warmup


@pytest.mark.parametrize("progress", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_after_warmup_a_half_cosine_decays_to_min_lr(progress):
    epoch = WARMUP + progress * (EPOCHS - WARMUP)
    expected = MIN_LR + (LR - MIN_LR) * (1 + math.cos(math.pi * progress)) / 2
    assert schedule(epoch) == pytest.approx(expected, rel=1e-12)


def test_the_decay_ends_at_min_lr_midway_at_the_mean_and_stays_at_min_lr_after_the_end():
    assert schedule(EPOCHS) == MIN_LR
    assert schedule((WARMUP + EPOCHS) / 2) == pytest.approx((LR + MIN_LR) / 2, rel=1e-12)
    for after in (EPOCHS + 1e-6, EPOCHS + 0.5, 2 * EPOCHS, 1e6):
        assert schedule(after) == MIN_LR, after


def test_no_warmup_starts_at_the_peak():
    assert lr_at(0.0, LR, 0.0, 0.0, EPOCHS) == LR
    assert lr_at(0.0, LR, MIN_LR, 0.0, EPOCHS) == pytest.approx(LR, rel=1e-15)
    assert lr_at(EPOCHS / 2, LR, 0.0, 0.0, EPOCHS) == pytest.approx(LR / 2, rel=1e-12)
    assert lr_at(EPOCHS, LR, MIN_LR, 0.0, EPOCHS) == MIN_LR


def test_fractional_epochs_follow_the_formula_per_iteration():
    """The schedule is per iteration (epoch + step / steps_per_epoch), not per epoch: e.g. 7 steps an epoch."""
    for k in range(0, int(EPOCHS) * 7 + 1):
        epoch = k / 7
        if epoch < WARMUP:
            expected = LR * epoch / WARMUP
        else:
            expected = MIN_LR + (LR - MIN_LR) * (1 + math.cos(math.pi * (epoch - WARMUP) / (EPOCHS - WARMUP))) / 2
        assert schedule(epoch) == pytest.approx(expected, rel=1e-12, abs=1e-300), epoch


def test_the_warmup_is_strictly_increasing_and_the_decay_non_increasing():
    rising = [schedule(WARMUP * k / 400) for k in range(401)]
    assert all(a < b for a, b in itertools.pairwise(rising))
    falling = [schedule(WARMUP + (EPOCHS - WARMUP) * k / 400) for k in range(401)]
    assert all(a >= b for a, b in itertools.pairwise(falling))
    assert falling[0] > falling[200] > falling[-1]  # and it does decay
    assert min(rising + falling) >= 0.0 and max(rising + falling) <= LR


# -- scaled_lr ---------------------------------------------------------------------------------------------

def test_scaled_lr_is_gamma_over_p_times_blr_times_batch_over_256():
    # CrossMAE at gamma 0.25, p 0.75, the paper's blr and effective batch 4096: 1/3 * 1.5e-4 * 16.
    assert scaled_lr(1.5e-4, 4096, 0.75, 0.25) == pytest.approx(8e-4, rel=1e-14)
    assert scaled_lr(1.5e-4, 4096, 0.75, 0.5) == pytest.approx(1.6e-3, rel=1e-14)
    assert scaled_lr(2e-4, 512, 0.6, 0.15) == pytest.approx(0.25 * 2e-4 * 2, rel=1e-14)


@pytest.mark.parametrize("eff_batch", [1, 8, 256, 1024, 4096])
def test_scaled_lr_is_mae_s_rule_when_gamma_equals_p(eff_batch):
    assert scaled_lr(1.5e-4, eff_batch, 0.75, 0.75) == 1.5e-4 * eff_batch / 256


def test_scaled_lr_is_linear_in_the_batch_and_the_base_lr():
    base = scaled_lr(1.5e-4, 256, 0.75, 0.25)
    assert base == pytest.approx(0.5e-4, rel=1e-14)  # batch 256: the base lr times gamma/p
    assert scaled_lr(1.5e-4, 1024, 0.75, 0.25) == pytest.approx(4 * base, rel=1e-14)
    assert scaled_lr(3e-4, 256, 0.75, 0.25) == pytest.approx(2 * base, rel=1e-14)


# -- weight-decay groups and the optimizer --------------------------------------------------------------------

class Mixed(nn.Module):
    """Every kind of parameter a ViT has: matrices, convolution kernels, (1, 1, C) tokens, a position
    table, biases, norm scales; and a frozen layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2, bias=False)
        self.scale = nn.Parameter(torch.ones(()))  # a 0-d parameter: no decay
        self.frozen = nn.Linear(4, 4)
        for p in self.frozen.parameters():
            p.requires_grad = False


def ids(params) -> set[int]:
    return {id(p) for p in params}


def test_weight_decay_exactly_on_trainable_parameters_of_two_or_more_dims():
    model = Mixed()
    groups = param_groups(model, weight_decay=0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    decay, no_decay = (ids(g["params"]) for g in groups)
    m = model
    assert decay == ids([m.conv.weight, m.cls_token, m.pos_embed, m.fc.weight, m.head.weight])
    assert no_decay == ids([m.conv.bias, m.norm.weight, m.norm.bias, m.fc.bias, m.scale])


def test_every_trainable_parameter_is_in_exactly_one_group_and_frozen_ones_in_none():
    model = Mixed()
    listed = [id(p) for g in param_groups(model, 0.05) for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(listed) == sorted(trainable)  # each once: no duplicates, none missing
    assert not ids(model.frozen.parameters()) & set(listed)


def test_build_optimizer_on_the_cpu_is_adamw_0_9_0_95_foreach_with_the_two_groups():
    model = Mixed()
    opt = build_optimizer(model, lr=3e-4, weight_decay=0.05, device=torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(g["lr"] == 3e-4 for g in opt.param_groups)
    assert [ids(g["params"]) for g in opt.param_groups] == [ids(g["params"]) for g in param_groups(model, 0.05)]


def test_build_optimizer_chooses_the_fused_adamw_on_cuda(monkeypatch):
    """Inspected without a GPU: the arguments build_optimizer hands AdamW for a CUDA device."""
    made = {}

    def record(params, **kwargs):
        made.update(kwargs, groups=params)
        return "adamw"

    monkeypatch.setattr(torch.optim, "AdamW", record)
    assert build_optimizer(Mixed(), lr=1e-4, weight_decay=0.05, device=torch.device("cuda", 0)) == "adamw"
    assert made["fused"] is True and not made["foreach"]
    assert made["betas"] == (0.9, 0.95) and made["lr"] == 1e-4
    assert [g["weight_decay"] for g in made["groups"]] == [0.05, 0.0]


def test_one_adamw_step_decays_matrices_and_leaves_vectors_undecayed():
    """The groups reach the update: with a zero gradient AdamW moves a parameter only by its weight decay."""
    model = Mixed()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5, device=torch.device("cpu"))
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(model.fc.weight, before["fc.weight"] * (1 - 0.1 * 0.5))
    assert torch.equal(model.fc.bias, before["fc.bias"]) and torch.equal(model.norm.weight, before["norm.weight"])
    assert torch.equal(model.frozen.weight, before["frozen.weight"])


# -- set_lr ---------------------------------------------------------------------------------------------------

def test_set_lr_sets_every_group_and_scales_by_each_group_s_lr_scale():
    # Landed with the lead's change that made set_lr honour a group's lr_scale (default 1) in place of
    # set_scaled_lr: fine-tuning's layer-decay groups and pre-training's plain groups share one setter.
    a, b, c = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr_scale": 0.25}, {"params": [c], "lr_scale": 1.0}],
                          lr=1.0)
    set_lr(opt, 0.4)
    assert [g["lr"] for g in opt.param_groups] == [0.4, 0.1, 0.4]
    set_lr(opt, 0.0)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0, 0.0]

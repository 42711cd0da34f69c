"""warmup_cosine: torch's LinearLR + CosineAnnealingLR give the documented lr sequence."""

from __future__ import annotations

import math

import pytest
import torch

from oal_shared.schedules import warmup_cosine


def _lrs(total: int, warmup: int, ratio: float, peak: float = 1.0, steps: int | None = None) -> list[float]:
    """The lr in effect for each of `steps` optimiser steps (default: total), plus the one after."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = warmup_cosine(optimizer, total, warmup, ratio)
    seen = []
    for _ in range(steps if steps is not None else total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return [*seen, optimizer.param_groups[0]["lr"]]


def _formula(step: int, total: int, warmup: int, ratio: float) -> float:
    """The module docstring's formula, written out for comparison."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return ratio + (1 - ratio) * (1 + math.cos(math.pi * progress)) / 2


def test_warms_up_then_decays_to_the_floor():
    lrs = _lrs(100, warmup=10, ratio=0.0)
    assert lrs[0] == pytest.approx(0.1), "the first step already trains"
    assert lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5), "half way through the cosine"
    assert _lrs(100, warmup=0, ratio=0.1)[100] == pytest.approx(0.1), "ends at the floor"


@pytest.mark.parametrize(("total", "warmup", "ratio"), [(40, 0, 0.0), (40, 1, 0.0), (40, 2, 0.25), (30, 7, 0.1)])
def test_every_step_follows_the_formula(total, warmup, ratio):
    lrs = _lrs(total, warmup, ratio, peak=0.2)
    assert lrs == pytest.approx([0.2 * _formula(s, total, warmup, ratio) for s in range(total + 1)], rel=1e-9)


def test_a_warm_up_longer_than_the_run_only_warms_up():
    assert _lrs(5, warmup=10, ratio=0.0)[:5] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


def test_param_groups_keep_their_ratio_without_a_floor():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizer = torch.optim.SGD([{"params": [params[0]], "lr": 0.1}, {"params": [params[1]], "lr": 1e-4}])
    scheduler = warmup_cosine(optimizer, 20, warmup_steps=4)
    for _ in range(15):
        optimizer.step()
        scheduler.step()
        first, second = (group["lr"] for group in optimizer.param_groups)
        assert first / second == pytest.approx(1000.0)


def test_a_floor_over_param_groups_at_different_lrs_is_refused():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizer = torch.optim.SGD([{"params": [params[0]], "lr": 0.1}, {"params": [params[1]], "lr": 1e-4}])
    with pytest.raises(ValueError, match="one optimiser per peak lr"):
        warmup_cosine(optimizer, 20, warmup_steps=4, min_lr_ratio=0.1)

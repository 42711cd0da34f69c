"""Learning-rate schedules built from torch's own schedulers, for the trainer and the generator pretraining.

`warmup_cosine`: linear warm-up, then a cosine from the peak down to a floor. The lr in effect for
the s-th optimiser step (s = 0, 1, ...; call `.step()` once after each optimiser step) is

    s <  warmup:  peak * (s + 1) / warmup
    s >= warmup:  floor + (peak - floor) * (1 + cos(pi * (s - warmup) / max(1, total - warmup))) / 2

with floor = min_lr_ratio * peak: the first step already trains, and the last one runs at the floor's
edge. Torch computes the cosine recursively, so values agree with the formula to rounding. The
scheduler's `state_dict()` is plain numbers: saved with the optimiser's, a resumed run continues the
same sequence.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> LRScheduler:
    """The schedule of the module docstring on every param group of `optimizer` (peak = its lr now).

    CosineAnnealingLR's floor is one absolute lr per optimiser, so a floor above 0 needs one peak lr
    per optimiser; give each part with its own peak its own optimiser.
    """
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"total_steps must be >= 1 and warmup_steps >= 0, got {total_steps} and {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    peaks = {group.get("initial_lr", group["lr"]) for group in optimizer.param_groups}
    if min_lr_ratio > 0 and len(peaks) > 1:
        raise ValueError(
            f"min_lr_ratio {min_lr_ratio} with param groups at different lrs {sorted(peaks)}: "
            "the floor would not be a fraction of each; use one optimiser per peak lr"
        )
    floor = min_lr_ratio * max(peaks)
    if warmup_steps == 0:
        return CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=floor)
    # LinearLR's factor at step s is start + (1 - start) * s / total_iters: (s + 1) / warmup here.
    warmup = LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=max(1, warmup_steps - 1))
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=floor)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])

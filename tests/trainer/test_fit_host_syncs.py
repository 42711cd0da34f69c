"""The fit loop waits for the device only at the log interval, and still stops on a non-finite loss.

`.item()` or an `if` on a device tensor each step makes the host wait for that step before it
queues the next; the loop keeps its sums on the device and looks at them (and at the finiteness
of every step's loss) when it writes a log line and before an epoch's checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from oal_shared.settings import Settings
from oal_trainer import fit as fit_module
from oal_trainer import loss_sums
from oal_trainer.fit import FitHooks, fit
from oal_trainer.objective import OALObjective
from tests.utils.trainer_runs import tiny_config

torch.set_num_threads(1)

LOOP_FILES = {fit_module.__file__, loss_sums.__file__}
STEPS = 4  # train_subset 128 / batch 32


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(artifact_dir=tmp_path / "artifacts", torch_threads=1)


def test_a_non_finite_loss_names_its_step_and_nothing_of_it_is_logged_or_saved(tmp_path, settings, monkeypatch):
    real_forward = OALObjective.forward
    calls = []

    def forward_turning_nan_at_the_second_step(self, batch):
        losses = real_forward(self, batch)
        calls.append(1)
        if len(calls) == 2:
            return dataclasses.replace(losses, loss=losses.loss * float("nan"))
        return losses

    monkeypatch.setattr(OALObjective, "forward", forward_turning_nan_at_the_second_step)
    run_dir = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 1 \(epoch 0\); terms: ce="):
        fit(tiny_config("ce", log_interval=STEPS, evaluate=False), run_dir, settings=settings)
    assert len(calls) == STEPS  # the check waited for the log interval ...
    assert not (run_dir / "train_log.jsonl").exists()  # ... and came before its log line
    assert not any(run_dir.rglob("*.pt")) and not (run_dir / "model.safetensors").exists()


def count_syncs_from_fit(monkeypatch) -> list[str]:
    """Record every tensor-to-host read (`item`, `tolist`, `bool`, `float`) made by the loop's own code."""
    seen: list[str] = []
    for name in ("item", "tolist", "__bool__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename in LOOP_FILES:
                seen.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return seen


def test_the_loop_reads_the_device_per_log_line_not_per_step(tmp_path, settings, monkeypatch):
    # TensorBoard off: its hook writes every step's losses, so it reads them every step.
    config = tiny_config("ce", log_interval=STEPS, epochs=2, evaluate=False, tensorboard=False)
    seen = count_syncs_from_fit(monkeypatch)
    fit(config, tmp_path / "quiet", settings=settings)
    quiet = len(seen)
    # Per epoch (one log line at its end): the finiteness check, the log line's means, the epoch's
    # means. Per-step reads would be at least one a step (8), with .item() per term many more.
    assert 0 < quiet <= 3 * config.epochs < STEPS * config.epochs

    seen.clear()
    read = []
    fit(config, tmp_path / "hooked", settings=settings, hooks=FitHooks(on_step=lambda info: read.append(info.losses)))
    assert len(read) == STEPS * config.epochs and all("loss" in losses and "ce" in losses for losses in read)
    assert len(seen) > quiet  # a hook that reads the numbers each step pays for it, the loop does not

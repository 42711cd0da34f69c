"""Checkpoints: weights, optimiser and lr-schedule state round-trip exactly; bad files are named."""

from __future__ import annotations

import json

import pytest
import torch

from oal_shared.schedules import warmup_cosine
from oal_trainer.checkpoint import (
    CheckpointError,
    TrainingState,
    load_checkpoint,
    read_safetensors,
    save_checkpoint,
    save_weights,
)
from oal_trainer.models import build_model

torch.set_num_threads(1)


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_restores_weights_and_optimizer_state(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet_tiny", 6, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    path = save_checkpoint(
        tmp_path / "last.safetensors", {"m": model}, {"sgd": optimizer}, TrainingState(3, 42), {"lr": 0.1}
    )

    torch.manual_seed(1)
    fresh = build_model("resnet_tiny", 6, 1)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.9, nesterov=True)
    state = load_checkpoint(path, {"m": fresh}, {"sgd": fresh_optimizer}, {"lr": 0.1})
    assert state == TrainingState(3, 42)
    assert _same_weights(model.state_dict(), fresh.state_dict())
    assert fresh_optimizer.param_groups[0]["lr"] == 0.1
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(optimizer.state[p]["momentum_buffer"], fresh_optimizer.state[q]["momentum_buffer"])
    with pytest.raises(CheckpointError, match="lr: 0.1 -> 0.2"):
        load_checkpoint(path, {"m": fresh}, {"sgd": fresh_optimizer}, {"lr": 0.2})


def _parts(seed: int) -> tuple[dict[str, torch.nn.Module], dict[str, torch.optim.Optimizer], dict]:
    """Two trained parts at different peak lrs, one SGD and one warm-up + cosine (with a floor) each."""
    torch.manual_seed(seed)
    modules = {"a": torch.nn.Linear(3, 2), "b": torch.nn.Linear(2, 1)}
    optimizers = {
        name: torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9)
        for (name, module), lr in zip(modules.items(), (0.1, 0.003), strict=True)
    }
    schedulers = {name: warmup_cosine(opt, 12, warmup_steps=3, min_lr_ratio=0.1) for name, opt in optimizers.items()}
    return modules, optimizers, schedulers


def _train(modules, optimizers, schedulers, steps: int) -> list[tuple[float, float]]:
    """`steps` steps on fixed data; the (lr_a, lr_b) each step ran at."""
    lrs = []
    for step in range(steps):
        x = torch.full((4, 3), float(step))
        loss = modules["b"](modules["a"](x)).pow(2).mean()
        for optimizer in optimizers.values():
            optimizer.zero_grad()
        loss.backward()
        lrs.append(tuple(opt.param_groups[0]["lr"] for opt in optimizers.values()))
        for optimizer in optimizers.values():
            optimizer.step()
        for scheduler in schedulers.values():
            scheduler.step()
    return lrs


def test_a_resumed_schedule_gives_the_lrs_of_an_uninterrupted_one(tmp_path):
    uninterrupted = _train(*_parts(0), steps=12)

    modules, optimizers, schedulers = _parts(0)
    first_half = _train(modules, optimizers, schedulers, steps=5)
    path = save_checkpoint(tmp_path / "last.safetensors", modules, optimizers, TrainingState(1, 5), {}, schedulers)

    fresh_modules, fresh_optimizers, fresh_schedulers = _parts(1)  # other weights, schedule back at step 0
    load_checkpoint(path, fresh_modules, fresh_optimizers, {}, fresh_schedulers)
    second_half = _train(fresh_modules, fresh_optimizers, fresh_schedulers, steps=7)

    assert first_half + second_half == uninterrupted, "bit for bit, warm-up and cosine alike"
    assert [a / b for a, b in uninterrupted] == pytest.approx([0.1 / 0.003] * 12), "each part keeps its ratio"
    assert uninterrupted[-1][0] > 0.1 * 0.1, "the last step runs just above the floor"


def test_a_checkpoint_without_the_asked_scheduler_is_refused_naming_it(tmp_path):
    modules, optimizers, schedulers = _parts(0)
    path = save_checkpoint(tmp_path / "last.safetensors", modules, optimizers, TrainingState(0, 0), {})
    with pytest.raises(CheckpointError, match="no scheduler state for a, b"):
        load_checkpoint(path, modules, optimizers, {}, schedulers)
    with pytest.raises(CheckpointError, match="no optimiser state for c"):
        load_checkpoint(path, modules, {**optimizers, "c": optimizers["a"]}, {})


def test_a_checkpoint_of_another_schema_is_refused(tmp_path):
    modules, optimizers, _ = _parts(0)
    path = save_checkpoint(tmp_path / "last.safetensors", modules, optimizers, TrainingState(0, 0), {})
    tensors, metadata = read_safetensors(path)
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={**metadata, "schema_version": "1"})
    with pytest.raises(CheckpointError, match="schema_version '1' is not supported"):
        load_checkpoint(path, modules, optimizers, {})


def test_weights_are_replaced_whole_and_leave_no_temp_file(tmp_path):
    path = tmp_path / "model.safetensors"
    model = torch.nn.Linear(2, 2)
    save_weights(model, path, {"model": "linear"})
    with torch.no_grad():
        model.weight.add_(1.0)
    save_weights(model, path, {"model": "linear"})
    tensors, metadata = read_safetensors(path)
    assert torch.equal(tensors["weight"], model.weight.detach())
    assert metadata == {"model": "linear"}
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_a_write_that_fails_half_way_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    modules, optimizers, _ = _parts(0)
    path = save_checkpoint(tmp_path / "last.safetensors", modules, optimizers, TrainingState(1, 4), {})
    before = path.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("oal_trainer.checkpoint.save_file", disk_full)
    with pytest.raises(CheckpointError, match="No space left") as caught:
        save_checkpoint(path, modules, optimizers, TrainingState(2, 8), {})
    assert str(path) in str(caught.value)
    assert path.read_bytes() == before
    assert json.loads(read_safetensors(path)[1]["state"])["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"], "no temp file left behind"


def test_a_field_added_since_the_checkpoint_resumes_only_at_its_default(tmp_path):
    model = build_model("resnet_tiny", 6, 1)
    optimizers = {"sgd": torch.optim.SGD(model.parameters(), lr=0.1)}
    path = save_checkpoint(tmp_path / "last.safetensors", {"m": model}, optimizers, TrainingState(1, 4), {"lr": 0.1})
    defaults = {"lr": 0.1, "amp": "off"}

    state = load_checkpoint(path, {"m": model}, optimizers, {"lr": 0.1, "amp": "off"}, key_defaults=defaults)
    assert state == TrainingState(1, 4)
    with pytest.raises(CheckpointError, match="amp: None -> 'bf16'"):
        load_checkpoint(path, {"m": model}, optimizers, {"lr": 0.1, "amp": "bf16"}, key_defaults=defaults)
    with pytest.raises(CheckpointError, match="amp: None -> 'off'"):  # without defaults, a new key is a change
        load_checkpoint(path, {"m": model}, optimizers, {"lr": 0.1, "amp": "off"})


def test_a_field_that_became_runtime_since_the_checkpoint_is_passed_over(tmp_path):
    # outlier_workers was in the key until the stream's draw stopped depending on it.
    model = build_model("resnet_tiny", 6, 1)
    optimizers = {"sgd": torch.optim.SGD(model.parameters(), lr=0.1)}
    key = {"lr": 0.1, "outlier_workers": 1}
    path = save_checkpoint(tmp_path / "last.safetensors", {"m": model}, optimizers, TrainingState(1, 4), key)
    runtime = {"outlier_workers"}
    assert load_checkpoint(path, {"m": model}, optimizers, {"lr": 0.1}, runtime_fields=runtime) == TrainingState(1, 4)
    with pytest.raises(CheckpointError, match="outlier_workers: 1 -> None"):
        load_checkpoint(path, {"m": model}, optimizers, {"lr": 0.1})
    with pytest.raises(CheckpointError, match="lr: 0.1 -> 0.2"):
        load_checkpoint(path, {"m": model}, optimizers, {"lr": 0.2}, runtime_fields=runtime)

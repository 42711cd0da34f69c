"""Mixed precision (`amp`) and `compile` of the fit step on the CPU (oal_trainer.precision).

bf16 autocast runs on the CPU, so it is trained here; fp16 is CUDA only (refused on the CPU, trained
by tests/trainer/test_cuda_precision.py), but its GradScaler is torch's own on any device, so its
skip rule and checkpoint round trip are checked here on a real scaler.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oal_shared.errors import ConfigError
from oal_shared.settings import Settings
from oal_trainer.checkpoint import TrainingState, load_weights, read_grad_scaler_state, save_checkpoint
from oal_trainer.fit import FitHooks, fit
from oal_trainer.loss_sums import FiniteWatch
from oal_trainer.models import build_model
from oal_trainer.objective import StepLosses
from oal_trainer.precision import Precision, autocast_each
from oal_trainer.run import build_run
from tests.utils.trainer_runs import tiny_config, write_test_shards

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("precision")
    settings = Settings(artifact_dir=root / "artifacts", torch_threads=1)
    shards = write_test_shards(root / "shards", num_shards=2, per_shard=24)
    fit(tiny_config("ce", evaluate=False), root / "ce", settings=settings)
    # oal-energy: every term that needs float32 (CE, both KDs, both CLUBs, energy) in one objective.
    inputs = {"teacher_run": root / "ce", "init_from": root / "ce", "shards": shards, "evaluate": False}
    return {"root": root, "settings": settings, "inputs": inputs}


def first_step_losses(config, run_dir: Path, settings: Settings) -> tuple[StepLosses, list[torch.dtype]]:
    """The first step's losses of `config`, and the dtype of the student's logits in that step."""
    run = build_run(config, run_dir, settings)
    run.objective.train()
    precision = Precision(config.amp, run.ctx.device)
    seen: list[torch.dtype] = []
    run.student.register_forward_hook(lambda module, args, out: seen.append(out[0].dtype))
    batch = next(autocast_each(run.batches(0), precision))
    with precision.autocast():
        losses = run.objective(batch)
    return losses, seen


def test_bf16_runs_the_student_in_bf16_and_every_loss_term_in_float32(world):
    config = tiny_config("oal-energy", amp="bf16", **world["inputs"])
    losses, student_dtypes = first_step_losses(config, world["root"] / "bf16-step", world["settings"])
    assert student_dtypes == [torch.bfloat16]  # autocast was on around the forward
    assert set(losses.terms) >= {"ce", "logit_kd", "feature_kd", "club_emb", "club_latent", "energy"}
    assert {name: value.dtype for name, value in losses.terms.items()} == dict.fromkeys(losses.terms, torch.float32)

    off, off_dtypes = first_step_losses(
        config.model_copy(update={"amp": "off"}), world["root"] / "off-step", world["settings"]
    )
    assert off_dtypes == [torch.float32]
    # Same weights and batch: bf16 moves the numbers a little (so it did something), not a lot.
    assert losses.terms["ce"].item() != off.terms["ce"].item()
    for name, value in off.terms.items():
        assert math.isclose(losses.terms[name].item(), value.item(), rel_tol=0.1, abs_tol=0.05), name


def test_a_bf16_smoke_run_trains_to_finite_losses_and_records_its_precision(world):
    config = tiny_config("oal-energy", amp="bf16", epochs=2, **world["inputs"])
    result = fit(config, world["root"] / "bf16", settings=world["settings"])
    assert result.steps == 8
    records = [json.loads(line) for line in (result.run_dir / "train_log.jsonl").read_text().splitlines()]
    assert len(records) == 4
    assert all(math.isfinite(value) for record in records for key, value in record.items() if key != "epoch")
    run_info = json.loads((result.run_dir / "run.json").read_text())
    assert run_info["precision"] == {"amp": "bf16", "compile": False, "channels_last": True}
    # The final weights are float32: autocast changes the arithmetic, never the parameters' dtype.
    assert {t.dtype for t in load_file(result.run_dir / "model.safetensors").values()} <= {torch.float32, torch.int64}


def test_fp16_on_the_cpu_is_refused_naming_amp_before_anything_is_written(world):
    run_dir = world["root"] / "fp16-cpu"
    with pytest.raises(ConfigError, match=r"amp: fp16 needs a CUDA device.*use amp=bf16 on the CPU"):
        fit(tiny_config("ce", amp="fp16", device="cpu", evaluate=False), run_dir, settings=world["settings"])
    assert not run_dir.exists()


def test_an_unknown_amp_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"amp=fp8: Input should be 'off', 'bf16' or 'fp16'"):
        tiny_config("ce", amp="fp8")


def overflowing_step(precision: Precision, model: torch.nn.Module, optimizer, factor: float) -> StepLosses:
    """One step whose loss is finite but whose scaled gradient overflows when `factor` is huge."""
    x = torch.ones(4, 3)
    with precision.autocast():
        out = model(x)  # float16
    loss = (out.float() * factor).mean()  # in float32, as OALObjective computes its terms
    optimizer.zero_grad(set_to_none=True)
    precision.backward(loss)
    precision.step([optimizer])
    return StepLosses(terms={"ce": loss.detach()}, loss=loss.detach(), q_fit=torch.zeros(()))


def test_an_fp16_step_with_overflowing_gradients_is_skipped_not_a_nan_error():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    precision = Precision("fp16", torch.device("cpu"))  # torch's GradScaler, here on the CPU
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scale = precision.scaler.get_scale()
    watch = FiniteWatch()

    # 1e34 x the initial scale 65536 overflows in backward (fp16 there); the loss itself is finite.
    losses = overflowing_step(precision, model, optimizer, factor=1e34)
    watch.add(losses, step=0, epoch=0)
    watch.check()  # no FloatingPointError: the loss was finite
    assert math.isfinite(losses.loss.item())
    assert precision.skipped_steps == 1
    assert precision.scaler.get_scale() == scale / 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the step was skipped

    overflowing_step(precision, model, optimizer, factor=1.0)  # an ordinary step is taken
    assert precision.skipped_steps == 1
    assert not torch.equal(before["weight"], model.weight)
    assert precision.record() == {"amp": "fp16", "skipped_steps": 1, "final_scale": scale / 2}


def test_the_grad_scaler_state_round_trips_through_the_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    precision = Precision("fp16", torch.device("cpu"))
    overflowing_step(precision, model, optimizer, factor=1e34)  # scale 65536 -> 32768
    for _ in range(3):
        overflowing_step(precision, model, optimizer, factor=1.0)  # growth tracker 3
    state = precision.state_dict()
    assert state["scale"] == 32768.0 and state["_growth_tracker"] == 3

    path = save_checkpoint(
        tmp_path / "last.safetensors",
        {"model": model},
        {"model": optimizer},
        TrainingState(1, 4),
        {},
        grad_scaler=state,
    )
    assert read_grad_scaler_state(path) == state
    resumed = Precision("fp16", torch.device("cpu"))
    resumed.load_state_dict(read_grad_scaler_state(path))
    assert resumed.state_dict() == state

    # amp off or bf16 saves no scaler state, and an fp16 resume from such a file is refused by name.
    plain = save_checkpoint(tmp_path / "plain.safetensors", {"model": model}, {}, TrainingState(1, 4), {})
    assert read_grad_scaler_state(plain) == {}
    with pytest.raises(ConfigError, match="amp: fp16 run resumed from a checkpoint without GradScaler state"):
        Precision("fp16", torch.device("cpu")).load_state_dict(read_grad_scaler_state(plain))


def compile_unavailable() -> str | None:
    """Why torch.compile cannot run here (None: it can), probed on a one-line function."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2))
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing: inductor cannot build here
        return f"torch.compile does not work here ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return None


class StopAfterFirstEpoch(Exception):
    pass


def stop_after_first_epoch(epochs_done: int, means: dict) -> None:
    if epochs_done == 1:
        raise StopAfterFirstEpoch


@pytest.mark.slow  # inductor compiles the student's forward and backward: about a minute on 2 busy cores
def test_a_compiled_run_saves_plain_keys_and_resumes_uncompiled(tmp_path):
    reason = compile_unavailable()
    if reason:
        pytest.skip(reason)
    settings = Settings(artifact_dir=tmp_path / "artifacts", torch_threads=1)
    run_dir = tmp_path / "compiled"
    compiled = tiny_config("ce", compile=True, epochs=2, evaluate=False)
    with pytest.raises(StopAfterFirstEpoch):
        fit(compiled, run_dir, settings=settings, hooks=FitHooks(on_epoch_end=stop_after_first_epoch))
    checkpoint = load_file(run_dir / "checkpoints" / "last.safetensors")
    assert not [key for key in checkpoint if "_orig_mod" in key]

    # compile is a runtime field: the same run goes on uncompiled from the compiled run's checkpoint.
    result = fit(compiled.model_copy(update={"compile": False}), run_dir, settings=settings)
    assert (result.epochs, result.steps) == (2, 8)
    plain = build_model("resnet_tiny", 6, 1, 28, "auto")
    load_weights(plain, run_dir / "model.safetensors")  # strict: every key matches an uncompiled model
    assert json.loads((run_dir / "run.json").read_text())["precision"]["compile"] is False


def test_a_non_finite_loss_under_bf16_still_stops_the_run_and_names_the_mode(world, monkeypatch):
    from oal_trainer.objective import OALObjective

    real_forward = OALObjective.forward

    def nan_forward(self, batch):
        losses = real_forward(self, batch)
        return StepLosses(terms=losses.terms, loss=losses.loss * float("nan"), q_fit=losses.q_fit)

    monkeypatch.setattr(OALObjective, "forward", nan_forward)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 0 .*; under amp=bf16 values round"):
        fit(tiny_config("ce", amp="bf16", evaluate=False), world["root"] / "bf16-nan", settings=world["settings"])


def test_an_fp16_step_passes_over_an_optimiser_whose_part_got_no_gradient():
    used, unused = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (used, unused)]
    precision = Precision("fp16", torch.device("cpu"))
    before = unused.weight.clone()
    with precision.autocast():
        out = used(torch.ones(4, 3))
    precision.backward(out.float().mean())
    precision.step(optimizers)  # torch's GradScaler alone would assert "No inf checks were recorded"
    assert torch.equal(unused.weight, before) and precision.skipped_steps == 0

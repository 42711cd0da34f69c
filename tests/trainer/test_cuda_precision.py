"""The fit step on CUDA under amp bf16 and fp16 (GradScaler), compile and channels_last.

Skipped without CUDA (tests/conftest.py); benchmarks/gpu_check.sh runs them on a GPU machine.
The CPU side of the same code (bf16, the scaler's skip rule and checkpoint) is tests/trainer/test_precision.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oal_shared.settings import Settings
from oal_trainer.fit import FitHooks, fit
from tests.utils.trainer_runs import tiny_config, write_test_shards

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cuda-precision")
    settings = Settings(artifact_dir=root / "artifacts", torch_threads=1)
    shards = write_test_shards(root / "shards", num_shards=2, per_shard=24)
    fit(tiny_config("ce", device="cuda", evaluate=False), root / "ce", settings=settings)
    inputs = {"teacher_run": root / "ce", "init_from": root / "ce", "shards": shards, "device": "cuda"}
    return {"root": root, "settings": settings, "inputs": inputs}


def train_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_an_amp_run_on_cuda_trains_to_finite_losses_and_evaluates(world, amp):
    config = tiny_config("oal-energy", amp=amp, epochs=2, **world["inputs"])
    result = fit(config, world["root"] / f"amp-{amp}", settings=world["settings"])
    records = train_log(result.run_dir)
    assert records and all(math.isfinite(v) for r in records for k, v in r.items() if k != "epoch")
    assert 0 <= result.metrics["id_accuracy"] <= 1
    precision = json.loads((result.run_dir / "run.json").read_text())["precision"]
    assert precision["amp"] == amp
    if amp == "fp16":
        # The scale starts at 2**16 and only halves on skipped steps: what is left says how many.
        assert precision["final_scale"] == 2.0**16 / 2 ** precision["skipped_steps"]
        assert precision["skipped_steps"] < result.steps  # most steps were taken
    assert {t.dtype for t in load_file(result.run_dir / "model.safetensors").values()} <= {torch.float32, torch.int64}


class Stop(Exception):
    pass


def stop_after_first(epochs_done: int, means: dict) -> None:
    if epochs_done == 1:
        raise Stop


def test_an_fp16_run_resumed_from_its_checkpoint_ends_as_an_uninterrupted_one(world, monkeypatch):
    # Deterministic cuDNN convolutions, so what differs is what the resume did.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    config = tiny_config("oal-energy", amp="fp16", epochs=2, evaluate=False, **world["inputs"])
    whole = fit(config, world["root"] / "fp16-whole", settings=world["settings"])
    run_dir = world["root"] / "fp16-resumed"
    with pytest.raises(Stop):
        fit(config, run_dir, settings=world["settings"], hooks=FitHooks(on_epoch_end=stop_after_first))
    checkpoint_meta = json.loads(_metadata(run_dir / "checkpoints" / "last.safetensors")["state"])
    assert checkpoint_meta["grad_scaler"]["scale"] > 0
    resumed = fit(config, run_dir, settings=world["settings"])
    a, b = load_file(whole.run_dir / "model.safetensors"), load_file(resumed.run_dir / "model.safetensors")
    assert a.keys() == b.keys()
    # Close, not equal: some CUDA backward kernels (adaptive average pooling) add with atomics, so
    # even two uninterrupted runs differ in the last bits. A scale restarted at 2**16 would differ in
    # which steps were skipped, and so in whole steps.
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5, msg=key)
    scale = [json.loads((d / "run.json").read_text())["precision"]["final_scale"] for d in (whole.run_dir, run_dir)]
    assert scale[0] == scale[1]


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


@pytest.mark.parametrize("channels_last", [True, False])
def test_a_compiled_bf16_run_on_cuda_saves_plain_keys(world, channels_last):
    config = tiny_config("ce", amp="bf16", compile=True, channels_last=channels_last, device="cuda", evaluate=False)
    result = fit(config, world["root"] / f"compiled-{channels_last}", settings=world["settings"])
    assert not [k for k in load_file(result.run_dir / "model.safetensors") if "_orig_mod" in k]
    assert all(math.isfinite(v) for r in train_log(result.run_dir) for k, v in r.items() if k != "epoch")

"""TensorBoard event files from the fit loop: written into each run dir, readable by TensorBoard's own
EventAccumulator with the documented tags and values, one TensorBoard run per sweep run, and off by config."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed: pip install 'oal-ood[tensorboard]'")

from oal_trainer.fit import FitHooks, fit  # noqa: E402
from oal_trainer.tensorboard_log import read_tags, scalar_values  # noqa: E402
from tests.utils.trainer_runs import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def sweep_like(tmp_path_factory):
    """Two finished `ce` runs laid out as a sweep: OUT/ce/seed-0, OUT/ce/seed-1."""
    from oal_shared.settings import Settings

    root = tmp_path_factory.mktemp("tb")
    settings = Settings(artifact_dir=str(root / "artifacts"), shard_root=str(root / "shards"))
    steps: dict[int, list] = {}
    for seed in (0, 1):
        config = tiny_config("ce", seed=seed, epochs=2)
        hooks = FitHooks(on_step=lambda info, seed=seed: steps.setdefault(seed, []).append(info))
        fit(config, root / "sweep" / "ce" / f"seed-{seed}", settings=settings, hooks=hooks)
    return root / "sweep", steps


def test_event_files_hold_the_training_curves_and_the_evaluation(sweep_like):
    out, steps = sweep_like
    run_dir = out / "ce" / "seed-0"
    assert list(run_dir.glob("events.out.tfevents.*")), "no event file in the run dir"
    tags = read_tags(run_dir)
    scalars = set(tags["scalars"])
    assert {"loss/loss", "loss/ce", "train/lr", "train/samples_per_s", "epoch/loss", "epoch/ce"} <= scalars
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for scorer, per_set in metrics["scores"].items():
        for dataset in per_set:
            assert f"ood/{scorer}/{dataset}/auroc" in scalars
            assert f"ood/{scorer}/{dataset}/fpr95_ood_positive" in scalars
    assert "ood/id_accuracy" in scalars
    for name in metrics["datasets"]:
        assert f"scores/energy/{name}" in tags["histograms"]
    assert {"eval/roc", "eval/score_hist"} <= set(tags["images"])
    assert any(tag.startswith("pr/energy/") for tag in tags["tensors"])  # PR curves are tensor summaries

    # values are the loop's and the evaluation's, not just the tags
    logged = scalar_values(run_dir, "loss/loss")
    interval = tiny_config("ce").log_interval  # step scalars at the log interval: each read syncs the device
    expected = [info for info in steps[0] if info.step % interval == 0]
    assert expected and [step for step, _ in logged] == [info.step for info in expected]
    assert [value for _, value in logged] == pytest.approx([info.losses["loss"] for info in expected], rel=1e-6)
    assert scalar_values(run_dir, "train/lr")[0][1] == pytest.approx(expected[0].lr, rel=1e-6)
    ((_, auroc),) = scalar_values(run_dir, "ood/energy/near/auroc")
    assert auroc == pytest.approx(metrics["scores"]["energy"]["near"]["auroc"], rel=1e-6)
    assert len(scalar_values(run_dir, "epoch/loss")) == 2


def test_tensorboard_logdir_of_a_sweep_shows_each_run_side_by_side(sweep_like):
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    out, _ = sweep_like
    multiplexer = EventMultiplexer().AddRunsFromDirectory(str(out))
    multiplexer.Reload()
    assert set(multiplexer.Runs()) == {"ce/seed-0", "ce/seed-1"}


def test_tensorboard_false_writes_no_event_files_and_jsonl_stays(tmp_path):
    from oal_shared.settings import Settings

    settings = Settings(artifact_dir=str(tmp_path / "artifacts"), shard_root=str(tmp_path / "shards"))
    run_dir = tmp_path / "quiet"
    fit(tiny_config("ce", tensorboard=False, evaluate=False), run_dir, settings=settings)
    assert not list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "train_log.jsonl").is_file()

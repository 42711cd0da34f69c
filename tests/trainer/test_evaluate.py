"""evaluate_model on a tiny random model and a tiny hand-built Benchmark; every output file checked."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

from oal_shared.data.benchmark import OOD_LABEL, Benchmark, ImageSet
from oal_shared.errors import ConfigError
from oal_trainer.evaluate import EvaluationError, evaluate_model
from oal_trainer.evaluate_outputs import RESULTS_COLUMNS, SCORES_FIXED_COLUMNS, metrics_table, write_eval_outputs
from oal_trainer.metrics import AUROC, FPR95_OOD_POSITIVE, accuracy, ood_metrics
from oal_trainer.scorers import SCORERS, Scorer, get_scorer, register_scorer

torch.set_num_threads(1)
SIDE = 8  # pixels
NUM_CLASSES = 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class TinyNet(nn.Module):
    """Flatten -> Linear -> ReLU -> Linear, with the model interface the trainer's models expose."""

    def __init__(self, num_classes: int = NUM_CLASSES, feature_dim: int = 6):
        super().__init__()
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor, return_feature: bool = False):
        features = self.body(x)  # (B, D)
        logits = self.head(features)  # (B, K)
        return (logits, features) if return_feature else logits


def _image_set(name: str, kind: str, count: int, rng: np.random.Generator, brightness: int) -> ImageSet:
    images = np.clip(rng.normal(brightness, 40, (count, SIDE, SIDE)), 0, 255).astype(np.uint8)
    if kind == "id":
        labels = (np.arange(count) % NUM_CLASSES).astype(np.int64)
    else:
        labels = np.full(count, OOD_LABEL, dtype=np.int64)
    images.flags.writeable = False  # as in the real benchmarks, which are cached and shared
    return ImageSet(name, kind, images, labels)


@pytest.fixture(scope="module")
def benchmark() -> Benchmark:
    rng = np.random.default_rng(0)
    return Benchmark(
        name="tiny-bench",
        class_names=("a", "b", "c"),
        id_train=_image_set("tiny-train", "id", 12, rng, 120),
        id_test=_image_set("tiny-test", "id", 10, rng, 120),
        near=(_image_set("near-a", "near", 6, rng, 110), _image_set("near-b", "near", 5, rng, 100)),
        far=(_image_set("far-a", "far", 7, rng, 30), _image_set("far-b", "far", 4, rng, 220)),
        mean=(0.45,),
        std=(0.2,),
    )


@pytest.fixture(scope="module")
def model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def _direct_logits(model: TinyNet, image_set: ImageSet, mean: float, std: float) -> torch.Tensor:
    x = (torch.tensor(image_set.images, dtype=torch.float32) / 255.0 - mean) / std
    with torch.no_grad():
        return model(x.unsqueeze(1))


def test_evaluate_model_scores_every_image_like_a_direct_forward(model, benchmark):
    model.train()
    result = evaluate_model(model, benchmark, batch_size=4)  # batches of 4 split every set unevenly
    assert model.training, "evaluate_model must restore the model's training mode"
    assert [s.name for s in result.sets] == ["tiny-test", "near-a", "near-b", "far-a", "far-b"]
    model.eval()
    image_sets = (benchmark.id_test, *benchmark.near, *benchmark.far)
    for image_set, scored in zip(image_sets, result.sets, strict=True):
        logits = _direct_logits(model, image_set, 0.45, 0.2)
        np.testing.assert_allclose(scored.scores["energy"], torch.logsumexp(logits, 1).numpy(), rtol=1e-5)
        np.testing.assert_allclose(scored.scores["max_logit"], logits.amax(1).numpy(), rtol=1e-5)
        np.testing.assert_allclose(scored.scores["msp"], torch.softmax(logits, 1).amax(1).numpy(), rtol=1e-5)
        np.testing.assert_array_equal(scored.preds, logits.argmax(1).numpy())
        np.testing.assert_array_equal(scored.labels, image_set.labels)
        assert scored.kind == image_set.kind


def test_normalize_argument_overrides_the_benchmark_stats(model, benchmark):
    result = evaluate_model(model, benchmark, scorers=("energy",), normalize=((0.5,), (0.25,)))
    model.eval()
    expected = torch.logsumexp(_direct_logits(model, benchmark.id_test, 0.5, 0.25), 1).numpy()
    np.testing.assert_allclose(result.id_set.scores["energy"], expected, rtol=1e-5)


def test_metrics_dict_has_per_set_and_group_means(model, benchmark):
    result = evaluate_model(model, benchmark)
    metrics = result.metrics()
    assert metrics["id_accuracy"] == pytest.approx(accuracy(result.id_set.preds, result.id_set.labels))
    assert set(metrics["scores"]) == {"energy", "msp", "max_logit"}
    energy = metrics["scores"]["energy"]
    assert list(energy) == ["near-a", "near-b", "near", "far-a", "far-b", "far"]
    id_scores = result.id_set.scores["energy"]
    assert energy["far-b"] == pytest.approx(ood_metrics(id_scores, result.ood_sets[3].scores["energy"]))
    assert energy["near"][AUROC] == pytest.approx((energy["near-a"][AUROC] + energy["near-b"][AUROC]) / 2)
    assert "OpenOOD" in metrics["conventions"][FPR95_OOD_POSITIVE]
    assert metrics["datasets"]["far-a"] == {"kind": "far", "num_images": 7}


def test_write_eval_outputs_writes_every_file_with_the_documented_columns(model, benchmark, tmp_path: Path):
    result = evaluate_model(model, benchmark)
    paths = write_eval_outputs(tmp_path / "run", result)
    assert set(paths) == {"metrics", "scores", "results", "roc", "score_hist"}
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics == json.loads(json.dumps(result.metrics()))

    with paths["scores"].open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == (*SCORES_FIXED_COLUMNS, "score_energy", "score_msp", "score_max_logit")
    assert len(rows) == sum(len(s) for s in result.sets)
    id_rows = [row for row in rows if row["kind"] == "id"]
    assert accuracy([int(r["pred"]) for r in id_rows], [int(r["label"]) for r in id_rows]) == pytest.approx(
        metrics["id_accuracy"]
    )
    far_b = np.array([float(r["score_energy"]) for r in rows if r["dataset"] == "far-b"])
    np.testing.assert_allclose(far_b, result.ood_sets[3].scores["energy"], rtol=1e-7)

    with paths["results"].open(newline="") as handle:
        results = list(csv.reader(handle))
    assert tuple(results[0]) == RESULTS_COLUMNS
    energy_rows = [row for row in results[1:] if row[-1] == "energy"]
    assert [row[0] for row in energy_rows] == ["near-a", "near-b", "nearood", "far-a", "far-b", "farood"]
    assert len(results) == 1 + 3 * len(energy_rows)
    nearood = dict(zip(RESULTS_COLUMNS, energy_rows[2], strict=True))
    near = metrics["scores"]["energy"]["near"]
    assert float(nearood["AUROC"]) == pytest.approx(100 * near[AUROC], abs=0.006)  # written with 2 decimals
    assert float(nearood["FPR@95"]) == pytest.approx(100 * near[FPR95_OOD_POSITIVE], abs=0.006)
    assert float(nearood["ACC"]) == pytest.approx(100 * metrics["id_accuracy"], abs=0.006)

    for key in ("roc", "score_hist"):
        assert paths[key].read_bytes()[:8] == PNG_SIGNATURE


def test_metrics_table_states_conventions_and_lists_every_row(model, benchmark):
    metrics = evaluate_model(model, benchmark, scorers=("msp",)).metrics()
    table = metrics_table(metrics, scorer="msp")
    assert table.row_count == 6  # 4 OOD sets + near and far means
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(table)
    text = console.export_text()
    assert "Hendrycks" in text and "OpenOOD" in text and "ID accuracy" in text
    with pytest.raises(ConfigError, match="energy"):
        metrics_table(metrics)  # energy was not evaluated


def test_bad_arguments_are_refused_naming_what_is_wrong(model, benchmark):
    with pytest.raises(ConfigError, match="unknown scorer 'nonesuch'"):
        evaluate_model(model, benchmark, scorers=("energy", "nonesuch"))
    with pytest.raises(ConfigError, match="normalize mean"):
        evaluate_model(model, benchmark, normalize=((0.5, 0.5), (0.2,)))
    with pytest.raises(ConfigError, match="batch_size"):
        evaluate_model(model, benchmark, batch_size=0)
    with pytest.raises(EvaluationError, match=r"expected \(10, 3\)"):
        evaluate_model(TinyNet(num_classes=4), benchmark, batch_size=16)


class FeatureNormScorer:
    """A feature-based scorer from outside the module, to prove the registry is open."""

    name = "test_feature_norm"

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        return features.norm(dim=1)


def test_a_registered_scorer_is_used_by_name_and_gets_the_features(model, benchmark):
    scorer = FeatureNormScorer()
    assert isinstance(scorer, Scorer)
    register_scorer(scorer)
    try:
        assert get_scorer("test_feature_norm") is scorer
        with pytest.raises(ConfigError, match="taken"):
            register_scorer(FeatureNormScorer())
        result = evaluate_model(model, benchmark, scorers=("test_feature_norm",))
        model.eval()
        x = (torch.tensor(benchmark.id_test.images, dtype=torch.float32) / 255.0 - 0.45) / 0.2
        with torch.no_grad():
            _, features = model(x.unsqueeze(1), return_feature=True)
        np.testing.assert_allclose(result.id_set.scores["test_feature_norm"], features.norm(dim=1), rtol=1e-5)
    finally:
        SCORERS.pop("test_feature_norm", None)

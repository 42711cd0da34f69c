"""pytorch-ood's detectors behind our scorer registry: each checked against a numpy computation of its
formula on the same features, orientation (higher = more ID) checked against our built-in scores,
and the whole path through evaluate_model and `oal-train eval --scorer`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from torch import nn

pytest.importorskip("pytorch_ood", reason="the detectors extra is not installed: pip install 'oal-ood[detectors]'")

from oal_shared.errors import ConfigError  # noqa: E402
from oal_trainer.detectors import ASHScorer, DICEScorer, ODINScorer, ReActScorer  # noqa: E402
from oal_trainer.evaluate import evaluate_model  # noqa: E402
from oal_trainer.id_features import ID_FEATURES_FILE  # noqa: E402
from oal_trainer.scorers import (  # noqa: E402
    DETECTOR_SCORERS,
    IDFeatures,
    InputScorer,
    ScorerContext,
    bind_scorer,
    get_scorer,
)
from tests.trainer.test_evaluate import TinyNet, _image_set, benchmark, model  # noqa: E402,F401  (fixtures)

torch.set_num_threads(1)
N_TRAIN, N_QUERY, DIM, CLASSES = 120, 30, 8, 3


class FeatureHead(nn.Module):
    """A model whose input *is* its feature vector: forward(h) = head(h); lets a test pick the features."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.head = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)

    def forward(self, x: torch.Tensor, return_feature: bool = False):
        h = x.flatten(1)
        return (self.head(h), h) if return_feature else self.head(h)


@pytest.fixture(scope="module")
def case():
    """ID training features in 3 clusters (non-negative, as after a ReLU), queries, a random head."""
    rng = np.random.default_rng(0)
    centers = rng.uniform(0.5, 2.0, (CLASSES, DIM))
    labels = np.arange(N_TRAIN) % CLASSES
    train = np.abs(centers[labels] + rng.normal(0, 0.3, (N_TRAIN, DIM)))
    query = np.abs(rng.normal(1.0, 1.0, (N_QUERY, DIM)))
    weight, bias = rng.normal(0, 1, (CLASSES, DIM)), rng.normal(0, 0.1, CLASSES)
    net = FeatureHead(torch.tensor(weight, dtype=torch.float32), torch.tensor(bias, dtype=torch.float32))
    to_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    fit = IDFeatures(net.head(to_t(train)).detach(), to_t(train), torch.tensor(labels))
    context = ScorerContext(model=net, device=torch.device("cpu"), input_std=(1.0,), id_train=lambda: fit)
    # numpy works in float64 on the float32 values the detectors see
    train32, query32 = to_t(train).double().numpy(), to_t(query).double().numpy()
    w32, b32 = net.head.weight.detach().double().numpy(), net.head.bias.detach().double().numpy()
    return {"context": context, "train": train32, "labels": labels, "query": query32, "w": w32, "b": b32}


def _score(name_or_scorer, case, features: np.ndarray | None = None) -> np.ndarray:
    scorer = name_or_scorer if not isinstance(name_or_scorer, str) else get_scorer(name_or_scorer)
    bound = scorer.bind(case["context"])
    h = torch.tensor(case["query"] if features is None else features, dtype=torch.float32)
    logits = case["context"].model.head(h).detach()
    return bound(logits, h).numpy()


def test_every_detector_is_registered_and_known_by_name():
    for name in DETECTOR_SCORERS:
        assert get_scorer(name).name == name
    with pytest.raises(ConfigError, match="known scorers: .*knn.*vim"):
        get_scorer("vim2")


def test_knn_is_minus_the_distance_to_the_kth_nearest_normalised_training_feature(case):
    k = get_scorer("knn").k
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    distances = np.linalg.norm(unit(case["query"])[:, None] - unit(case["train"])[None], axis=2)
    expected = -np.sort(distances, axis=1)[:, k - 1]
    np.testing.assert_allclose(_score("knn", case), expected, rtol=1e-5, atol=1e-6)


def test_mahalanobis_is_minus_half_the_distance_to_the_nearest_class_mean(case):
    train, labels, query = case["train"], case["labels"], case["query"]
    means = np.stack([train[labels == c].mean(0) for c in range(CLASSES)])
    scatter = sum((train[labels == c] - means[c]).T @ (train[labels == c] - means[c]) for c in range(CLASSES))
    precision = np.linalg.inv(scatter + 1e-6 * np.eye(DIM))  # pytorch-ood: unnormalised scatter (docstring)
    d = np.stack([np.einsum("nd,de,ne->n", query - m, precision, query - m) for m in means], axis=1)
    np.testing.assert_allclose(_score("mahalanobis", case), -0.5 * d.min(axis=1), rtol=1e-4, atol=1e-6)


def test_vim_is_energy_minus_alpha_times_the_residual_norm(case):
    w, b, train, query = case["w"], case["b"], case["train"], case["query"]
    d = get_scorer("vim").dim or DIM // 2
    origin = -np.linalg.pinv(w) @ b
    centred = train - origin
    _, vectors = np.linalg.eigh(centred.T @ centred / len(train))
    residual_basis = vectors[:, : DIM - d]  # eigenvectors of the smallest eigenvalues
    alpha = (train @ w.T + b).max(axis=1).mean() / np.linalg.norm(centred @ residual_basis, axis=1).mean()
    expected = logsumexp(query @ w.T + b, axis=1) - alpha * np.linalg.norm((query - origin) @ residual_basis, axis=1)
    np.testing.assert_allclose(_score("vim", case), expected, rtol=1e-3, atol=1e-3)


def test_react_clips_at_the_training_percentile_then_takes_the_energy(case):
    threshold = np.percentile(case["train"], 90)
    clipped = np.minimum(case["query"], threshold)
    expected = logsumexp(clipped @ case["w"].T + case["b"], axis=1)
    np.testing.assert_allclose(_score("react", case), expected, rtol=1e-5, atol=1e-5)


def test_ash_s_keeps_the_top_features_rescaled_then_takes_the_energy(case):
    query, percentile = case["query"], ASHScorer().percentile
    keep = DIM - int(np.round(DIM * percentile))
    shaped = np.zeros_like(query)
    for row, values in enumerate(query):
        top = np.argsort(values)[-keep:]
        shaped[row, top] = values[top] * np.exp(values.sum() / values[top].sum())
    expected = logsumexp(shaped @ case["w"].T + case["b"], axis=1)
    np.testing.assert_allclose(_score("ash", case), expected, rtol=1e-4, atol=1e-4)


def test_dice_drops_the_weights_of_lowest_contribution_then_takes_the_energy(case):
    w, p = case["w"], DICEScorer().p
    contribution = case["train"].mean(axis=0)[None, :] * w
    masked = np.where(contribution > np.quantile(contribution, p), w, 0.0)
    expected = logsumexp(case["query"] @ masked.T + case["b"], axis=1)
    np.testing.assert_allclose(_score("dice", case), expected, rtol=1e-4, atol=1e-4)


def test_odin_is_the_tempered_max_softmax_after_one_signed_gradient_step(case):
    """For a linear model the input gradient of CE(z/T, argmax) is W^T (softmax(z/T) - onehot) / T."""
    std, temperature, eps = 0.5, 10.0, 0.01
    context = ScorerContext(model=case["context"].model, device=torch.device("cpu"), input_std=(std,))
    bound = ODINScorer(temperature=temperature, eps=eps).bind(context)
    assert isinstance(bound, InputScorer)
    w, b, x = case["w"], case["b"], case["query"]
    z = (x @ w.T + b) / temperature
    onehot = np.eye(CLASSES)[z.argmax(axis=1)]
    gradient = (softmax(z, axis=1) - onehot) @ w / temperature
    x_hat = x - eps * np.sign(gradient) / std
    expected = softmax((x_hat @ w.T + b) / temperature, axis=1).max(axis=1)
    x_in = torch.tensor(x, dtype=torch.float32)[:, :, None, None]  # (B, D, 1, 1): an "image" per row
    np.testing.assert_allclose(bound.score_inputs(x_in).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_orientation_matches_the_built_in_scores_in_the_limits(case):
    """Detectors that reduce to energy / MSP at one setting give exactly those: higher = more ID.
    (ReAct at the 100th percentile clips nothing of the training features it was fitted on.)"""
    train = case["train"]
    h = torch.tensor(train, dtype=torch.float32)
    logits = case["context"].model.head(h).detach()
    energy = get_scorer("energy")(logits, h).numpy()
    np.testing.assert_allclose(_score(ReActScorer(percentile=1.0), case, train), energy, rtol=1e-5)
    np.testing.assert_allclose(_score(ASHScorer(variant="ash-p", percentile=0.0), case, train), energy, rtol=1e-5)
    odin = ODINScorer(temperature=1.0, eps=0.0).bind(case["context"])
    msp = get_scorer("msp")(logits, h).numpy()
    np.testing.assert_allclose(odin.score_inputs(h[:, :, None, None]).numpy(), msp, rtol=1e-5)


def test_distance_detectors_score_training_points_above_far_points(case):
    """Pushed far along a direction the head ignores (the logits stay, so ViM's energy term does too)."""
    train = case["train"][:10]
    unseen = np.linalg.svd(case["w"])[2][-1]  # a unit vector in the null space of W
    far = train + 25.0 * unseen
    for name in ("knn", "mahalanobis", "vim"):
        assert (_score(name, case, train) > _score(name, case, far)).all(), name


def test_fitted_detectors_need_the_id_training_set(case):
    bare = ScorerContext(model=case["context"].model, device=torch.device("cpu"), input_std=(1.0,))
    with pytest.raises(ConfigError, match="'knn' is fitted on the ID training set"):
        bind_scorer("knn", bare)
    bind_scorer("ash", bare)  # nothing to fit
    fit = case["context"].id_train()
    gap = fit.labels != 1  # no image of class 1: Mahalanobis has no mean for it
    holed = IDFeatures(fit.logits[gap], fit.features[gap], fit.labels[gap])
    context = ScorerContext(model=bare.model, device=bare.device, input_std=(1.0,), id_train=lambda: holed)
    with pytest.raises(ConfigError, match=r"no image of classes \[1\]"):
        bind_scorer("mahalanobis", context)


def test_evaluate_model_fits_on_the_given_training_set_and_caches_its_features(model, benchmark, tmp_path):  # noqa: F811
    from dataclasses import replace

    from oal_trainer.data import id_train_set

    larger = _image_set("tiny-train-200", "id", 200, np.random.default_rng(5), 120)  # KNN's k=50 needs >= 50
    train = id_train_set(replace(benchmark, id_train=larger), None, 0)
    cache = tmp_path / ID_FEATURES_FILE
    names = ("energy", *DETECTOR_SCORERS)
    with pytest.raises(ConfigError, match="pass id_train"):
        evaluate_model(model, benchmark, scorers=names)
    first = evaluate_model(model, benchmark, scorers=names, id_train=train, features_cache=cache)
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    second = evaluate_model(model, benchmark, scorers=names, id_train=train, features_cache=cache)
    assert cache.stat().st_mtime_ns == stamp  # read back, not rewritten
    for name in names:
        assert first.id_set.scores[name].shape == (len(benchmark.id_test),)
        np.testing.assert_allclose(first.id_set.scores[name], second.id_set.scores[name], rtol=1e-6)
        assert np.isfinite(first.id_set.scores[name]).all(), name
    metrics = first.metrics()
    assert set(metrics["scores"]) == set(names)
    # another model never reads this cache
    torch.manual_seed(1)
    other = evaluate_model(TinyNet(), benchmark, scorers=("knn",), id_train=train, features_cache=cache)
    assert cache.stat().st_mtime_ns != stamp
    assert not np.allclose(other.id_set.scores["knn"], first.id_set.scores["knn"])


@pytest.mark.slow
def test_oal_train_eval_with_detector_scorers_writes_their_metrics(oal_env, tmp_path):
    from tests.trainer.test_cli import TINY_SETS, invoke

    run_dir = tmp_path / "ce"
    result = invoke("fit", "--recipe", "ce", "--out", run_dir, "--preset", "smoke", "--no-progress", *TINY_SETS)
    assert result.exit_code == 0, result.output
    result = invoke("eval", run_dir, "--scorer", "vim", "--scorer", "knn", "--scorer", "odin")
    assert result.exit_code == 0, result.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"energy", "vim", "knn", "odin"} <= set(metrics["scores"])
    assert (run_dir / ID_FEATURES_FILE).is_file()
    results = (run_dir / "results.csv").read_text().splitlines()
    assert {line.rsplit(",", 1)[1] for line in results[1:]} >= {"vim", "knn", "odin", "energy"}
    result = invoke("eval", run_dir, "--scorer", "nonesuch")
    assert result.exit_code == 2 and "unknown scorer 'nonesuch'" in result.output

"""Stage B: k-NN distances, boundary selection, candidate selection (correct and reference), counts."""

from __future__ import annotations

import logging
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oal_shared.embeddings import EmbeddingSet
from oal_shared.errors import ConfigError, EmbeddingSetError
from oal_synth.sampler import (
    BoundaryOutliers,
    class_seed,
    faithful_selection,
    knn_distance,
    sample_class_outliers,
    sample_outliers,
    split_evenly,
)
from oal_synth.spec import SamplerConfig
from tests.utils.tiny_sd import tiny_model_runtime


@pytest.fixture(autouse=True)
def _one_thread():
    with tiny_model_runtime():
        yield


def naive_knn_distance(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: one query at a time, full sort of its distances to every bank point."""
    q = F.normalize(queries.double(), dim=1)
    b = F.normalize(bank.double(), dim=1)
    return torch.stack([torch.sort((b - row).norm(dim=1)).values[k - 1] for row in q]).float()


def on_circle(angles: list[float]) -> torch.Tensor:
    return torch.tensor([[math.cos(a), math.sin(a)] for a in angles], dtype=torch.float32)


def clustered_set(num_points: int = 240, dim: int = 8, seed: int = 0) -> torch.Tensor:
    """A dense core plus a sparse tail: density varies a lot, so low-density choices matter."""
    generator = torch.Generator().manual_seed(seed)
    centre = F.normalize(torch.ones(dim), dim=0)
    core = centre + 0.05 * torch.randn(num_points - 40, dim, generator=generator)
    tail = centre + 0.4 * torch.randn(40, dim, generator=generator)
    return torch.cat([core, tail])


def embedding_set(per_class: list[int], dim: int = 6, seed: int = 0, scale: float = 1.0) -> EmbeddingSet:
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in enumerate(per_class)])
    centres = rng.normal(size=(len(per_class), dim))
    vectors = centres[labels] + 0.3 * rng.normal(size=(len(labels), dim))
    vectors = scale * vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return EmbeddingSet(
        embeddings=vectors.astype(np.float32),
        labels=labels,
        space="test-space/1",
        class_names=tuple(f"class{c}" for c in range(len(per_class))),
    )


SMALL = SamplerConfig(k=5, select=4, n_candidates=64, keep=2, sigma=0.1)


# k-NN distance ---------------------------------------------------------------------------------


def test_knn_distance_matches_a_per_query_sort():
    generator = torch.Generator().manual_seed(1)
    bank = torch.randn(50, 7, generator=generator)
    queries = torch.randn(13, 7, generator=generator)
    for k in (1, 4, 50):
        torch.testing.assert_close(
            knn_distance(queries, bank, k), naive_knn_distance(queries, bank, k), atol=1e-5, rtol=0
        )


def test_knn_query_in_bank_is_its_own_first_neighbour():
    bank = on_circle([0.0, 0.3, 1.0, 2.0])
    assert torch.allclose(knn_distance(bank, bank, 1), torch.zeros(4), atol=1e-3)
    # 2nd neighbour of the point at angle 0 is the one at 0.3: chord 2 sin(0.15).
    assert knn_distance(bank[:1], bank, 2).item() == pytest.approx(2 * math.sin(0.15), abs=1e-4)


def test_knn_distance_is_computed_on_normalised_vectors():
    bank = on_circle([0.0, 0.5, 1.0])
    scaled = knn_distance(bank * torch.tensor([[3.0], [0.2], [7.0]]), bank * 10, 2)
    torch.testing.assert_close(scaled, knn_distance(bank, bank, 2))


def test_knn_k_larger_than_bank_is_clamped_with_a_warning(caplog):
    bank = on_circle([0.0, 0.4, 0.9])
    with caplog.at_level(logging.WARNING, logger="oal_synth.sampler"):
        clamped = knn_distance(bank, bank, 10)
    assert "k=10 exceeds the 3 points" in caplog.text
    torch.testing.assert_close(clamped, knn_distance(bank, bank, 3))


def test_knn_distance_stays_exact_across_chunks(monkeypatch):
    generator = torch.Generator().manual_seed(2)
    bank = torch.randn(40, 5, generator=generator)
    queries = torch.randn(30, 5, generator=generator)
    whole = knn_distance(queries, bank, 6, backend="torch")
    monkeypatch.setattr("oal_synth.sampler.KNN_CHUNK_ELEMENTS", 40 * 7)  # 7 query rows per chunk
    torch.testing.assert_close(knn_distance(queries, bank, 6, backend="torch"), whole)


def test_knn_distance_refuses_mismatched_dimensions():
    with pytest.raises(ConfigError, match="queries have D=3, bank has D=4"):
        knn_distance(torch.ones(2, 3), torch.ones(5, 4), 1)


def test_faiss_backend_agrees_with_torch():
    pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(3)
    bank = torch.randn(60, 9, generator=generator)
    torch.testing.assert_close(
        knn_distance(bank, bank, 7, backend="faiss"), knn_distance(bank, bank, 7, backend="torch"), atol=1e-5, rtol=0
    )


# Boundary and candidate selection -------------------------------------------------------------


def test_boundary_points_are_the_largest_knn_distance_points():
    # 20 points packed around angle 0 and three stragglers: with k=3 the stragglers are the boundary.
    packed = [0.005 * i for i in range(-10, 10)]
    stragglers = [0.6, -0.9, 1.4]
    embeddings = on_circle(packed + stragglers)
    config = SamplerConfig(k=3, select=3, n_candidates=8, keep=1, sigma=0.05)
    out = sample_class_outliers(embeddings, config, torch.Generator().manual_seed(0), class_id=0)
    expected = torch.topk(naive_knn_distance(embeddings, embeddings, 3), 3).indices
    assert set(out.boundary_index.tolist()) == set(expected.tolist()) == {20, 21, 22}


def test_correct_selection_keeps_each_boundary_points_lowest_density_candidates():
    embeddings = clustered_set()
    config = SamplerConfig(k=10, select=6, n_candidates=100, keep=3, sigma=0.1)
    generator = torch.Generator().manual_seed(4)
    out = sample_class_outliers(embeddings, config, generator, class_id=0)
    assert out.embeddings.shape == (config.select * config.keep, embeddings.shape[1])
    # Redraw the same candidates from the same seed and check each kept one is among the top `keep`.
    boundary = torch.topk(knn_distance(embeddings, embeddings, config.k), config.select).indices
    eps = torch.randn(
        (config.select, config.n_candidates, embeddings.shape[1]), generator=torch.Generator().manual_seed(4)
    )
    candidates = F.normalize(F.normalize(embeddings, dim=1)[boundary][:, None] + config.sigma * eps, dim=-1)
    distances = knn_distance(candidates.reshape(-1, embeddings.shape[1]), embeddings, config.k).view(config.select, -1)
    best = torch.topk(distances, config.keep, dim=1).values  # (S, keep), descending
    reported = out.knn_distance.view(config.keep, config.select).T  # rank-major rows -> (S, keep)
    torch.testing.assert_close(reported, best)
    torch.testing.assert_close(knn_distance(out.embeddings, embeddings, config.k), out.knn_distance)


def test_faithful_selection_reproduces_the_reference_indexing():
    # Two boundary points, three candidates each. The reference views the point-major flat
    # distances [.1 .9 .2 | .8 .3 .5] as (3, 2) and ranks its columns.
    distances = torch.tensor([[0.1, 0.9, 0.2], [0.8, 0.3, 0.5]])
    assert faithful_selection(distances, keep=1).tolist() == [[2], [0]]
    # The correct choice would be candidate 1 for point 0: the bug keeps a denser one.
    assert torch.topk(distances, 1, dim=1).indices.tolist() == [[1], [0]]


def test_correct_and_faithful_differ_and_correct_is_lower_density():
    embeddings = clustered_set(seed=5)
    config = SamplerConfig(k=10, select=8, n_candidates=200, keep=2, sigma=0.1)
    correct = sample_class_outliers(embeddings, config, torch.Generator().manual_seed(9), class_id=0)
    faithful = sample_class_outliers(
        embeddings, config.model_copy(update={"faithful_knn_bug": True}), torch.Generator().manual_seed(9), class_id=0
    )
    assert torch.equal(correct.boundary_index, faithful.boundary_index)
    assert not torch.allclose(correct.embeddings, faithful.embeddings)
    assert correct.knn_distance.mean() > faithful.knn_distance.mean() + 0.01
    # Per boundary point, the correct picks are the top `keep`: sorted, each beats the faithful one.
    per_point = [
        r.knn_distance.view(config.keep, config.select).T.sort(dim=1, descending=True).values
        for r in (correct, faithful)
    ]
    assert (per_point[0] >= per_point[1] - 1e-6).all()


def test_outliers_are_rescaled_to_the_anchor_norm():
    out = sample_class_outliers(clustered_set(), SMALL, torch.Generator().manual_seed(0), 0, anchor_norm=3.5)
    torch.testing.assert_close(out.embeddings.norm(dim=1), torch.full((len(out),), 3.5))
    unit = sample_class_outliers(clustered_set(), SMALL, torch.Generator().manual_seed(0), 0)
    torch.testing.assert_close(unit.embeddings.norm(dim=1), torch.ones(len(unit)))


def test_a_class_with_one_embedding_is_refused():
    with pytest.raises(EmbeddingSetError, match="class 7: boundary sampling needs at least 2 embeddings, got 1"):
        sample_class_outliers(torch.ones(1, 4), SMALL, torch.Generator(), class_id=7)


# Whole embedding sets -----------------------------------------------------------------------------


def test_sample_outliers_gives_exact_counts_spread_evenly():
    es = embedding_set([30, 25, 40])
    # One round gives keep * select = 8 per class, so 100 outliers need recycling (34, 33, 33).
    result = sample_outliers(es, SMALL, num_outliers=100, seed=0)
    assert [r.class_id for r in result] == [0, 1, 2]
    assert [len(r) for r in result] == split_evenly(100, 3) == [34, 33, 33]
    for r in result:
        assert r.embeddings.shape[1] == es.dim
        assert r.boundary_index.dtype == torch.int64 and r.knn_distance.dtype == torch.float32
        assert int(r.boundary_index.max()) < int((es.labels == r.class_id).sum())
        # Recycled rounds draw fresh candidates, so no outlier repeats.
        assert torch.unique(r.embeddings, dim=0).shape[0] == len(r)
    # Trimming: fewer outliers than one round; earlier classes take the remainder.
    assert [len(r) for r in sample_outliers(es, SMALL, num_outliers=7, seed=0)] == [3, 2, 2]


def test_sample_outliers_skips_classes_whose_share_is_zero():
    result = sample_outliers(embedding_set([10, 10, 10, 10]), SMALL, num_outliers=2, seed=0)
    assert [(r.class_id, len(r)) for r in result] == [(0, 1), (1, 1)]


def test_sample_outliers_is_deterministic_for_the_seed():
    es = embedding_set([20, 20])
    first = sample_outliers(es, SMALL, 30, seed=11)
    again = sample_outliers(es, SMALL, 30, seed=11)
    other = sample_outliers(es, SMALL, 30, seed=12)
    for a, b, c in zip(first, again, other, strict=True):
        assert torch.equal(a.embeddings, b.embeddings) and torch.equal(a.boundary_index, b.boundary_index)
        assert not torch.equal(a.embeddings, c.embeddings)


def test_a_class_draws_the_same_outliers_whichever_classes_are_asked_for():
    es = embedding_set([20, 20, 20])
    alone = sample_outliers(es, SMALL.model_copy(update={"classes": [2]}), 10, seed=5)
    together = sample_outliers(es, SMALL.model_copy(update={"classes": [0, 2]}), 20, seed=5)
    assert [r.class_id for r in together] == [0, 2]
    assert torch.equal(alone[0].embeddings, together[1].embeddings)
    assert class_seed(5, 2) != class_seed(5, 0)


def test_sample_outliers_rescales_to_the_class_norm():
    result = sample_outliers(embedding_set([15, 15], scale=4.0), SMALL, 10, seed=0)
    for r in result:
        torch.testing.assert_close(r.embeddings.norm(dim=1), torch.full((len(r),), 4.0))


def test_sample_outliers_refuses_a_class_with_too_few_embeddings():
    with pytest.raises(EmbeddingSetError, match=r"class 1 \('class1'\) has 1 embeddings"):
        sample_outliers(embedding_set([10, 1]), SMALL, 10, seed=0)


def test_sample_outliers_refuses_unknown_classes():
    with pytest.raises(ConfigError, match=r"sampler.classes names \[5\].*only 2 classes"):
        sample_outliers(embedding_set([10, 10]), SMALL.model_copy(update={"classes": [0, 5]}), 10, seed=0)


def test_boundary_outliers_fields_line_up():
    out = sample_class_outliers(clustered_set(), SMALL, torch.Generator().manual_seed(0), class_id=3)
    assert isinstance(out, BoundaryOutliers) and out.class_id == 3
    assert out.embeddings.dtype == torch.float32
    assert len(out.boundary_index) == len(out.knn_distance) == len(out) == SMALL.select * SMALL.keep


def test_a_class_smaller_than_k_is_sampled_with_k_clamped_once(caplog):
    embeddings = clustered_set(num_points=60)
    with caplog.at_level(logging.WARNING, logger="oal_synth.sampler"):
        out = sample_class_outliers(embeddings, SamplerConfig(k=300, select=5, n_candidates=40), torch.Generator(), 4)
    assert caplog.text.count("exceeds") == 1 and "class 4: k=300 exceeds its 60 embeddings" in caplog.text
    torch.testing.assert_close(knn_distance(out.embeddings, embeddings, 60), out.knn_distance)


# The k-NN backend is the spec's, never the machine's -------------------------------------------


class _WrongFaiss:
    """A stand-in `faiss` module whose index answers nonsense: any use of it changes the outliers."""

    class IndexFlatL2:
        def __init__(self, dim):
            self.dim = dim

        def add(self, bank):
            pass

        def search(self, queries, k):
            rows = np.random.default_rng(0).random((len(queries), k), dtype=np.float32)
            return np.sort(rows, axis=1) * 4, None


def test_the_default_backend_draws_the_same_outliers_whether_or_not_faiss_is_importable(monkeypatch):
    config = SamplerConfig(k=5, select=4, n_candidates=30, keep=2)
    assert config.knn_backend == "torch"
    es = embedding_set([40, 40], seed=11)
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    without = sample_outliers(es, config, 20, seed=3)
    monkeypatch.setitem(sys.modules, "faiss", _WrongFaiss)
    with_faiss = sample_outliers(es, config, 20, seed=3)
    for a, b in zip(without, with_faiss, strict=True):
        torch.testing.assert_close(a.embeddings, b.embeddings, atol=0, rtol=0)
        assert torch.equal(a.boundary_index, b.boundary_index)
    # The stand-in is reached when a job asks for faiss, so the comparison above could have failed.
    faiss_job = sample_outliers(es, config.model_copy(update={"knn_backend": "faiss"}), 20, seed=3)
    assert not all(torch.equal(a.embeddings, b.embeddings) for a, b in zip(without, faiss_job, strict=True))


def test_a_faiss_job_without_faiss_installed_names_the_field(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    config = SamplerConfig(k=5, select=4, n_candidates=30, keep=2, knn_backend="faiss")
    with pytest.raises(ConfigError, match="sampler.knn_backend is 'faiss', but faiss is not installed"):
        sample_outliers(embedding_set([40, 40], seed=11), config, 10, seed=3)


def test_knn_backend_refuses_other_names():
    with pytest.raises(ValueError, match="knn_backend"):
        SamplerConfig(knn_backend="auto")
    with pytest.raises(ConfigError, match="backend must be 'torch' or 'faiss'"):
        knn_distance(torch.ones(3, 2), torch.ones(3, 2), 1, backend="auto")


def test_real_faiss_sampling_matches_torch_on_well_separated_data():
    pytest.importorskip("faiss")
    config = SamplerConfig(k=5, select=4, n_candidates=30, keep=2)
    es = embedding_set([40, 40], seed=11)
    torch_run = sample_outliers(es, config, 20, seed=3)
    faiss_run = sample_outliers(es, config.model_copy(update={"knn_backend": "faiss"}), 20, seed=3)
    for a, b in zip(torch_run, faiss_run, strict=True):
        assert torch.equal(a.boundary_index, b.boundary_index)
        torch.testing.assert_close(a.embeddings, b.embeddings, atol=1e-6, rtol=0)

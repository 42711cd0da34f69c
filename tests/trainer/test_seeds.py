"""Seed hygiene: seed, data_seed and outlier_seed each move only their own stream, and run.json says
which seeds shaped a run (docs/TRAINER.md, Sweeps)."""

from __future__ import annotations

import json

import pytest
import torch

from oal_shared.settings import Settings
from oal_trainer.fit import fit
from oal_trainer.run import build_run
from tests.utils.trainer_runs import tiny_config, write_test_shards

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_test_shards(tmp_path_factory.mktemp("seed-shards"), num_shards=2, per_shard=24)


def _first_step(config, tmp_path, name):
    run = build_run(config, tmp_path / name, Settings(artifact_dir=tmp_path / "artifacts", torch_threads=1))
    batch = next(run.batches(0))
    weights = torch.cat([p.detach().flatten() for m in run.modules.values() for p in m.parameters()])
    return weights, batch


def test_each_seed_moves_only_its_own_stream(tmp_path, shards):
    # memory outliers: the draw order is a pure function of the outlier seed, no reader processes.
    common = {"shards": shards, "outlier_source": "memory", "w_club_emb": 0.1, "w_logit_kd": 0.0, "w_feature_kd": 0.0}
    base = _first_step(tiny_config("oal", seed=3, **common), tmp_path, "base")
    other_data = _first_step(tiny_config("oal", seed=3, data_seed=9, **common), tmp_path, "data")
    other_outliers = _first_step(tiny_config("oal", seed=3, outlier_seed=9, **common), tmp_path, "outliers")
    other_seed = _first_step(tiny_config("oal", seed=4, data_seed=3, outlier_seed=3, **common), tmp_path, "seed")

    def same_weights(a, b):
        return torch.equal(a[0], b[0])

    def same_images(a, b):
        return torch.equal(a[1].images, b[1].images)

    def same_outliers(a, b):
        return torch.equal(a[1].outlier_embeddings, b[1].outlier_embeddings)

    assert same_weights(base, other_data) and not same_images(base, other_data) and same_outliers(base, other_data)
    assert same_weights(base, other_outliers) and same_images(base, other_outliers)
    assert not same_outliers(base, other_outliers)
    assert not same_weights(base, other_seed) and same_images(base, other_seed) and same_outliers(base, other_seed)


def test_run_json_names_every_seed(tmp_path, shards):
    settings = Settings(artifact_dir=tmp_path / "artifacts", torch_threads=1)
    fit(tiny_config("ce", seed=5, evaluate=False), tmp_path / "ce", settings=settings)
    config = tiny_config("ce", seed=1, data_seed=2, init_from=tmp_path / "ce", evaluate=False, lr=0.005, augment=False)
    fit(config, tmp_path / "ft", settings=settings)
    seeds = json.loads((tmp_path / "ft" / "run.json").read_text())["seeds"]
    assert seeds == {"weights": 1, "data": 2, "outliers": 1, "init_run": 5, "synthesis": None}

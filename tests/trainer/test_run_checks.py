"""build_run refuses what would only fail after training, before any weight is trained."""

from __future__ import annotations

import pytest

from oal_shared.errors import ConfigError
from oal_shared.settings import Settings
from oal_trainer.fit import fit
from tests.utils.trainer_runs import tiny_config


def test_an_unknown_scorer_is_refused_before_training(tmp_path):
    settings = Settings(artifact_dir=tmp_path / "artifacts", torch_threads=1)
    with pytest.raises(ConfigError, match="nope"):
        fit(tiny_config("ce", eval_scorers=["energy", "nope"]), tmp_path / "run", settings=settings)
    assert not (tmp_path / "run" / "checkpoints").exists(), "nothing was trained"

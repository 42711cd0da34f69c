"""torchrun: a 2-process CPU fit (gloo) with shards and CLUB terms; single-process defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oal_shared.errors import ConfigError
from oal_trainer.distributed import DistContext, init_distributed, mean_across_ranks, resolve_device
from tests.utils.trainer_runs import TINY_RUN, write_test_shards


@pytest.mark.slow
def test_two_process_torchrun_fit(tmp_path):
    shards = write_test_shards(tmp_path / "shards", num_shards=2, per_shard=24)
    run_dir = tmp_path / "run"
    overrides = {**TINY_RUN, "shards": shards, "w_logit_kd": 0, "w_feature_kd": 0, "eval_subset": 32}
    torchrun = Path(sys.executable).parent / "torchrun"
    argv = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "oal_trainer.cli", "fit"]
    argv += ["--recipe", "oal", "--out", str(run_dir), "--no-progress"]
    argv += [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    env = {
        **os.environ,
        "OAL_ARTIFACT_DIR": str(tmp_path / "artifacts"),
        "OMP_NUM_THREADS": "1",
        "OAL_TORCH_THREADS": "1",
    }
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]

    info = json.loads((run_dir / "run.json").read_text())
    assert info["world_size"] == 2
    # Each rank reads half of the 128 ID images in batches of 32: 2 steps per epoch.
    assert info["steps_per_epoch"] == 2 and info["steps"] == 2
    assert info["outliers"]["batches"] == 2, "rank 0 drew one outlier batch per step"
    for name in ("model.safetensors", "config.json", "metrics.json", "scores.csv", "roc.png"):
        assert (run_dir / name).is_file(), name
    # Rank 0 alone logs; the run line appears once (fit also checks that both ranks agree on weights).
    assert done.stderr.count("recipe oal, resnet_tiny") == 1, done.stderr[-4000:]


def test_a_single_process_is_not_distributed(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_distributed("cpu")
    assert ctx == DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert ctx.is_main and not ctx.enabled
    assert mean_across_ranks({"loss": 1.5}, ctx) == {"loss": 1.5}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_asking_for_cuda_without_it_names_the_device_field():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="device: cuda:0 asked for"):
        resolve_device("cuda")

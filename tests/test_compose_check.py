"""The compose pipeline for real (`make compose-check`), and the host-side shard check it relies on.

The real check builds every CPU image and runs the whole pipeline in containers; it takes many minutes
and a container engine, so it runs only when asked:

    OAL_COMPOSE_CHECK=1 .venv/bin/python -m pytest tests/test_compose_check.py -k real

The shard checker (docker/check/verify_shards.py) runs in `make test`, against real shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.utils.shards import write_outlier_shards

REPO = Path(__file__).resolve().parents[1]
CHECK_SCRIPT = REPO / "scripts" / "compose-check.sh"
VERIFY_SHARDS = REPO / "docker" / "check" / "verify_shards.py"
RUN_REAL_CHECK = os.environ.get("OAL_COMPOSE_CHECK") == "1"


def verify(folder: Path, expected: int) -> subprocess.CompletedProcess:
    # The checker reads the manifest as the API serves it, a copy beside the shards here.
    manifest = folder.parent / f"{folder.name}-manifest.json"
    manifest.write_text((folder / "manifest.json").read_text())
    # The host that runs it has no venv: run it with the interpreter alone, no project imports.
    return subprocess.run(
        [sys.executable, "-I", str(VERIFY_SHARDS), str(folder), str(manifest), str(expected)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def job_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "job"
    write_outlier_shards(folder, num_shards=3, per_shard=5)
    return folder


def test_shard_check_accepts_a_finished_job(job_folder: Path):
    result = verify(job_folder, expected=15)
    assert result.returncode == 0, result.stderr
    assert "3 shards, 15 samples" in result.stdout


def test_shard_check_refuses_a_wrong_count(job_folder: Path):
    result = verify(job_folder, expected=16)
    assert result.returncode == 1
    assert "15 samples in all, the job asked for 16" in result.stderr


def test_shard_check_refuses_a_changed_shard(job_folder: Path):
    shard = job_folder / "outliers-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # inside the first member's data, past its 512-byte header
    shard.write_bytes(bytes(data))
    result = verify(job_folder, expected=15)
    assert result.returncode == 1
    assert "outliers-000001.tar: sha256" in result.stderr


def test_shard_check_refuses_a_key_written_twice(job_folder: Path):
    # A worker killed mid-job must not leave a sample in two shards: append one of shard 0's samples to
    # shard 2 and fix the manifest's bytes, sha256 and count, so that only the repeat is wrong.
    with tarfile.open(job_folder / "outliers-000000.tar") as first:
        key = first.getmembers()[0].name.split(".", 1)[0]
        repeated = [(m, first.extractfile(m).read()) for m in first.getmembers() if m.name.startswith(f"{key}.")]
    last = job_folder / "outliers-000002.tar"
    with tarfile.open(last, "a") as tar:
        for member, payload in repeated:
            tar.addfile(member, fileobj=io.BytesIO(payload))
    manifest = json.loads((job_folder / "manifest.json").read_text())
    entry = next(e for e in manifest["shards"] if e["name"] == last.name)
    entry.update(bytes=last.stat().st_size, sha256=hashlib.sha256(last.read_bytes()).hexdigest(), count=6)
    manifest["num_samples"] = 16
    (job_folder / "manifest.json").write_text(json.dumps(manifest))
    result = verify(job_folder, expected=16)
    assert result.returncode == 1
    assert f"keys ['{key}'] already in an earlier shard" in result.stderr


def test_compose_check_script_parses():
    result = subprocess.run(["bash", "-n", str(CHECK_SCRIPT)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(
    not RUN_REAL_CHECK,
    reason="builds the images and runs the compose pipeline for many minutes; run it with "
    "OAL_COMPOSE_CHECK=1 (or `make compose-check`), on a machine with docker compose or podman",
)
def test_real_compose_pipeline():
    engine = shutil.which("docker") or shutil.which("podman")
    assert engine, "OAL_COMPOSE_CHECK=1 needs docker or podman"
    result = subprocess.run(["bash", str(CHECK_SCRIPT)], capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "passed in" in result.stdout

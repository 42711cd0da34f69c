"""Fixtures every test folder uses: isolated settings and a real, flushed Redis database."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from oal_shared.settings import get_settings

# Tests use their own Redis database so a developer's queued jobs in db 0 are never touched.
TEST_REDIS_URL = os.environ.get("OAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` skip, saying why, on a machine without a CUDA device."""
    cuda_items = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_items:
        return
    import torch  # only when a cuda test was collected: most runs need not pay the import here

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA device; torch {torch.__version__} sees none")
    for item in cuda_items:
        item.add_marker(skip)


@pytest.fixture
def oal_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Point every setting that writes at a fresh tmp dir; returns the resulting Settings.

    Tests that need other values set more `OAL_*` variables with monkeypatch and call
    `get_settings.cache_clear()` again.
    """
    monkeypatch.setenv("OAL_REDIS_URL", TEST_REDIS_URL)
    monkeypatch.setenv("OAL_SHARD_ROOT", str(tmp_path / "shards"))
    monkeypatch.setenv("OAL_ARTIFACT_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("OAL_GENERATOR_ROOT", str(tmp_path / "generators"))
    monkeypatch.setenv("OAL_QUEUE_NAME", "oal-test")
    monkeypatch.delenv("OAL_API_TOKEN", raising=False)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture
def redis_conn():
    """A connection to the test database of the real Redis, empty before and after the test."""
    from redis import Redis

    conn = Redis.from_url(TEST_REDIS_URL)
    try:
        conn.ping()
    except Exception as exc:  # noqa: BLE001 - any failure here means the same thing to the reader
        pytest.fail(f"Redis at {TEST_REDIS_URL} does not answer ({exc}); `make test` starts one")
    conn.flushdb()
    yield conn
    conn.flushdb()
    conn.close()

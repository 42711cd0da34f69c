"""The one settings class of the product: every value comes from `OAL_*` environment variables.

Defaults name their unit. `get_settings()` is cached; tests override values through the
environment and call `get_settings.cache_clear()`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE = "oal-synth"
DEBIAN_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OAL_", env_file=None, extra="ignore")

    # Infrastructure
    redis_url: str = Field(DEFAULT_REDIS_URL, description="Redis that carries the RQ job queue.")
    queue_name: str = Field(DEFAULT_QUEUE, description="RQ queue the API enqueues on and workers listen to.")

    # Where things live on disk
    data_dir: Path = Field(Path("data"), description="Root of data sets (fashion-mnist/, cifar10/, ...).")
    fmnist_dir: Path | None = Field(None, description="Folder with Fashion-MNIST IDX files (.gz or raw).")
    allow_download: bool = Field(False, description="Let torchvision download Fashion-MNIST if no copy is found.")
    shard_root: Path = Field(Path("artifacts/shards"), description="Every job writes its shards below this.")
    artifact_dir: Path = Field(Path("artifacts"), description="Uploaded embedding sets, generators, caches.")
    generator_root: Path = Field(
        Path("artifacts/generators"), description="Only diffusers folders below this root may be loaded by path."
    )

    # API
    api_token: SecretStr | None = Field(None, description="When set, mutating endpoints need 'Bearer <token>'.")
    api_host: str = Field("127.0.0.1", description="Address `oal-synth serve` binds to.")
    api_port: int = Field(8000, ge=1, le=65535, description="Port `oal-synth serve` binds to.")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest request body accepted (bytes).")
    max_queued_jobs: int = Field(1000, ge=1, description="Submissions beyond this many queued jobs get 429.")

    # Job limits (validated per job spec; 422 names the field)
    max_outliers: int = Field(200_000, ge=1, description="Most outliers one job may ask for.")
    max_steps: int = Field(1000, ge=1, description="Most denoising steps one job may ask for.")
    max_shard_samples: int = Field(100_000, ge=1, description="Most samples per shard.")
    job_timeout_s: int = Field(6 * 3600, ge=10, description="RQ job timeout (seconds).")
    job_retries: int = Field(3, ge=0, description="How often RQ retries a failed job (it resumes).")
    job_retry_interval_s: int = Field(0, ge=0, description="Wait before a failed job is retried (seconds).")
    worker_heartbeat_s: int = Field(10, ge=1, description="Worker heartbeat; a job is abandoned after 3 missed.")
    worker_maintenance_s: int = Field(30, ge=1, description="How often a worker cleans registries (seconds).")
    result_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="How long finished jobs stay readable (seconds).")
    failure_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="How long failed jobs stay readable (seconds).")

    # Compute
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    torch_threads: int = Field(0, ge=0, description="Torch intra-op threads; 0 leaves torch's default.")

    # ID images (trainer and the worker's benchmark embedding)
    id_in_memory_max_mb: int = Field(
        1024, ge=0, description="ID train sets up to this size as float32 tensors are held; larger ones stream (MB)."
    )
    id_stream_workers: int = Field(
        2, ge=0, description="DataLoader worker processes that decode streamed ID images when num_workers is 0."
    )

    # Outliers (trainer, outlier_source=auto)
    outlier_in_memory_max_mb: int = Field(
        256, ge=0, description="Outlier jobs up to this size as float32 tensors are held; larger ones stream (MB)."
    )

    @field_validator("api_token")
    @classmethod
    def _refuse_placeholder_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value().strip().lower() in {"", "changeme", "change-me", "secret"}:
            raise ValueError("OAL_API_TOKEN is a placeholder; set a real secret or leave it unset")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value not in {"auto", "cpu", "cuda"} and not value.startswith("cuda:"):
            raise ValueError(f"OAL_DEVICE must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

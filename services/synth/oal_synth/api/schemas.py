"""Response bodies, as pydantic models so /openapi.json documents them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Progress(BaseModel):
    done: int = Field(description="Outliers written so far (shards already on disk count on resume).")
    total: int = Field(description="Outliers the job writes in all.")


class ShardOut(BaseModel):
    name: str
    count: int
    bytes: int
    sha256: str


class JobError(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    id: str
    status: str = Field(description="RQ's word: queued, started, finished, failed, canceled, stopped, ...")
    progress: Progress
    shards: list[ShardOut]
    error: JobError | None
    spec: dict[str, Any] | None
    output_dir: str | None = None
    manifest_path: str | None = Field(None, description="Set once the job is finished.")
    retries_left: int | None = None
    created_at: str | None = None
    started_at: str | None = None
    ended_at: str | None = None


class EmbeddingSetOut(BaseModel):
    id: str = Field(description="Content id; use it as embeddings.set_id in a job spec.")
    space: str
    dim: int
    count: int
    classes: list[str]
    class_counts: list[int]
    source: str
    bytes: int
    created: bool | None = Field(None, description="False when an identical set was stored before.")


class GeneratorOut(BaseModel):
    id: str
    kind: str
    space: str
    embed_dim: int
    latent_shape: list[int]
    scaling_factor: float
    content_hash: str
    class_names: list[str]
    description: str = ""


class GeneratorList(BaseModel):
    generators: list[GeneratorOut]


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = Field(None, description="Dotted path of the request field at fault.")
    details: list[dict[str, str]] | None = Field(None, description="Every problem found: {field, message}.")
    request_id: str | None = Field(None, description="The X-Request-ID of this answer; the server log has it too.")


class ErrorOut(BaseModel):
    error: ErrorDetail

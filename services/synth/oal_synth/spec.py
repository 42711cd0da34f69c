"""The job spec: what a client asks the synthesis service for.

Pure pydantic, no torch: the API validates with it, the worker runs from it, and every shard's
provenance and the manifest record it. Limits that depend on deployment settings (most outliers,
most steps) are checked in `check_limits`, so a 422 names the field either way; checks against the
generator and the embeddings are in `oal_synth.validation`.

Numbers are strict: JSON `true` is not the count 1 and `"5"` is not 5 (a float field takes an
integer, never a bool). `embeddings` is a tagged union keyed on which of its keys is present, so a
client sends `{"set_id": ...}` or `{"benchmark": ...}` and an error names the member's own field.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    Tag,
    field_validator,
    model_validator,
)

from oal_shared.data.folder_spec import is_benchmark_file
from oal_shared.settings import Settings

SCHEDULERS = ("ddim", "pndm", "dpm-solver")
GENERATOR_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
#: Built-in benchmarks a job may embed by id (the embedded generator's 28x28 grey images); any other
#: benchmark comes as a benchmark file below the worker's data root.
EMBEDDABLE_BENCHMARKS = ("fmnist-osr",)


class SamplerConfig(BaseModel):
    """Stage B of the method (NPOS-style boundary sampling); defaults are the paper's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    k: StrictInt = Field(
        300, ge=1, le=10_000, description="k of the k-th nearest-neighbour distance (query is its own 1st)."
    )
    select: StrictInt = Field(50, ge=1, le=10_000, description="Boundary points per class (largest k-th-NN distance).")
    sigma: StrictFloat = Field(0.07, gt=0, le=10, description="Std of the Gaussian noise around a boundary point.")
    n_candidates: StrictInt = Field(1500, ge=1, le=100_000, description="Noisy candidates drawn per boundary point.")
    keep: StrictInt = Field(2, ge=1, le=1000, description="Lowest-density candidates kept per boundary point.")
    classes: list[StrictInt] | None = Field(None, description="ID class indices to synthesise for; all when null.")
    faithful_knn_bug: StrictBool = Field(
        False, description="Reproduce the reference code's wrong candidate indexing (for comparison only)."
    )
    # Part of the spec (and so of every sample's provenance and the resume check), not picked by
    # what a worker has installed: the backends round differently, so near ties in the k-th
    # distance can pick other outliers, and one job must draw the same ones on every worker.
    knn_backend: Literal["torch", "faiss"] = Field(
        "torch",
        description="k-NN backend of boundary sampling: torch (default, every machine) or faiss (the faiss extra).",
    )

    @model_validator(mode="after")
    def _keep_fits(self) -> SamplerConfig:
        if self.keep > self.n_candidates:
            raise ValueError(f"sampler.keep ({self.keep}) must not exceed sampler.n_candidates ({self.n_candidates})")
        return self

    @field_validator("classes")
    @classmethod
    def _classes_unique(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            if not value:
                raise ValueError("sampler.classes must name at least one class, or be null for all")
            if any(c < 0 for c in value) or len(set(value)) != len(value):
                raise ValueError("sampler.classes must be distinct non-negative class indices")
        return value


class DiffusionConfig(BaseModel):
    """Stage C: how each outlier embedding is denoised into a latent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scheduler: Literal["ddim", "pndm", "dpm-solver"] = Field("ddim", description="Sampler algorithm by name.")
    steps: StrictInt = Field(50, ge=1, description="Denoising steps.")
    guidance_scale: StrictFloat = Field(7.5, ge=1.0, le=50.0, description="Classifier-free guidance; 1 disables it.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Model dtype; auto = float16 on CUDA, float32 on CPU."
    )
    batch_size: StrictInt = Field(64, ge=1, le=4096, description="Outliers denoised per forward batch.")
    height: StrictInt | None = Field(
        None, ge=8, le=2048, description="Image height in pixels; generator default if null."
    )
    width: StrictInt | None = Field(
        None, ge=8, le=2048, description="Image width in pixels; generator default if null."
    )


class ShardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_samples: StrictInt = Field(1000, ge=1, description="Most samples per shard.")
    latent_dtype: Literal["float16", "float32"] = Field("float16", description="dtype of latent.npy.")


class EmbeddingsFromSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    set_id: Annotated[str, Field(pattern=r"^[a-f0-9]{8,64}$", description="Id of an uploaded embedding set.")]


class EmbeddingsFromBenchmark(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    benchmark: str = Field(
        description="Embed this benchmark's ID train split with the generator: 'fmnist-osr', or a benchmark "
        "file (.toml or .json) relative to the worker's data root (OAL_DATA_DIR).",
        max_length=1000,
    )
    per_class: StrictInt = Field(500, ge=2, le=100_000, description="ID training images embedded per class.")

    @field_validator("benchmark")
    @classmethod
    def _builtin_or_file(cls, value: str) -> str:
        if value in EMBEDDABLE_BENCHMARKS:
            return value
        if not is_benchmark_file(value):
            raise ValueError(
                f"must be one of {list(EMBEDDABLE_BENCHMARKS)} or a benchmark file (.toml or .json) relative to "
                f"the data root, got {value!r}"
            )
        if value.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", value) or "\x00" in value:
            raise ValueError("a benchmark file must be a path relative to the data root, without '..'")
        return value


EMBEDDINGS_FROM_SET = "set"
EMBEDDINGS_FROM_BENCHMARK = "benchmark"
#: Tags of the `embeddings` union; pydantic puts the tag into an error's location, after "embeddings".
EMBEDDINGS_TAGS = (EMBEDDINGS_FROM_SET, EMBEDDINGS_FROM_BENCHMARK)
EMBEDDINGS_SHAPE_MESSAGE = (
    "needs exactly one of the keys set_id (an uploaded embedding set) or benchmark "
    "(a benchmark whose ID train images the worker embeds)"
)


def embeddings_source(value: Any) -> str | None:
    """The union tag of an `embeddings` value: which key a dict has, or which model an instance is.

    None (neither key, or both) makes pydantic report one error at `embeddings` itself.
    """
    if isinstance(value, EmbeddingsFromSet):
        return EMBEDDINGS_FROM_SET
    if isinstance(value, EmbeddingsFromBenchmark):
        return EMBEDDINGS_FROM_BENCHMARK
    if isinstance(value, dict):
        has_set, has_benchmark = "set_id" in value, "benchmark" in value
        if has_set != has_benchmark:
            return EMBEDDINGS_FROM_SET if has_set else EMBEDDINGS_FROM_BENCHMARK
    return None


EmbeddingsSource = Annotated[
    Annotated[EmbeddingsFromSet, Tag(EMBEDDINGS_FROM_SET)]
    | Annotated[EmbeddingsFromBenchmark, Tag(EMBEDDINGS_FROM_BENCHMARK)],
    Discriminator(
        embeddings_source,
        custom_error_type="embeddings_source",
        custom_error_message=EMBEDDINGS_SHAPE_MESSAGE,
    ),
]


def field_path(loc: tuple[int | str, ...]) -> str:
    """Dotted request-field path of a pydantic error location within a JobSpec.

    Drops the union tag pydantic inserts after `embeddings` (("embeddings", "set", "set_id") is
    the field embeddings.set_id); every other part is a field name or a list index.
    """
    parts = [str(part) for part in loc]
    if len(parts) >= 2 and parts[0] == "embeddings" and parts[1] in EMBEDDINGS_TAGS:
        del parts[1]
    return ".".join(parts)


class JobSpec(BaseModel):
    """One synthesis job. Everything that shapes the output is in here and recorded with it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    generator: str = Field(description="Generator id from GET /v1/generators, or a folder under the generator root.")
    embeddings: EmbeddingsSource = Field(
        description="Where the ID embeddings come from: {set_id} or {benchmark, per_class}."
    )
    num_outliers: StrictInt = Field(ge=1, description="Outliers to write in total, spread evenly over classes.")
    seed: StrictInt = Field(
        0, ge=0, le=2**63 - 1, description="Seed of sampling and diffusion; same seed, same shards."
    )
    sampler: SamplerConfig = SamplerConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    shards: ShardConfig = ShardConfig()

    @field_validator("generator")
    @classmethod
    def _generator_name(cls, value: str) -> str:
        if not GENERATOR_ID_PATTERN.match(value) or ".." in value.split("/"):
            raise ValueError("generator must be an id or relative folder name: letters, digits, . _ / -; no '..'")
        return value

    def check_limits(self, settings: Settings) -> list[tuple[str, str]]:
        """Deployment limits; returns (field, message) pairs, empty when the spec fits."""
        problems = []
        if self.num_outliers > settings.max_outliers:
            problems.append(("num_outliers", f"at most {settings.max_outliers} allowed, got {self.num_outliers}"))
        if self.diffusion.steps > settings.max_steps:
            problems.append(("diffusion.steps", f"at most {settings.max_steps} allowed, got {self.diffusion.steps}"))
        if self.shards.max_samples > settings.max_shard_samples:
            problems.append(
                ("shards.max_samples", f"at most {settings.max_shard_samples} allowed, got {self.shards.max_samples}")
            )
        return problems

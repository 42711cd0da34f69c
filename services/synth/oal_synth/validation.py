"""One validation of a synthesis job, for the API (a 422 at submit) and the worker (a failed job).

Both sides ask the same questions in the same words: does the spec parse, does it fit the
deployment's limits, and does it fit its generator and its ID embeddings (`validate_job`). The API
answers them from JSON on disk (the generator's `oal_generator.json`, the embedding set's summary)
before anything is queued; the worker answers them again with the loaded generator and the
embeddings in hand, because a job can be enqueued past the API and files change in between.

Each answer is a list of `Problem`s (field path + message); empty means the job may run. No torch
here: the API process imports this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from oal_shared.data.benchmark import FMNIST_OSR, FMNIST_OSR_ID_CLASSES
from oal_shared.data.fashion_mnist import FMNIST_CLASSES
from oal_shared.data.folder_spec import (
    check_sources,
    class_names_of,
    is_benchmark_file,
    read_benchmark_file,
    resolve_benchmark_file,
)
from oal_shared.embeddings import EmbeddingSet
from oal_shared.errors import ConfigError, OALError, SpaceMismatchError
from oal_shared.settings import Settings, get_settings
from oal_synth.generators.base import GeneratorInfo
from oal_synth.generators.registry import GeneratorNotFoundError, find_generator
from oal_synth.spec import EmbeddingsFromBenchmark, EmbeddingsFromSet, JobSpec, field_path
from oal_synth.store import EmbeddingSetNotFoundError, EmbeddingSetStore

__all__ = [
    "EmbeddingsSummary",
    "Problem",
    "check_submission",
    "describe_problems",
    "embeddings_name",
    "limit_problems",
    "parse_job_spec",
    "raise_for_problems",
    "spec_problems",
    "validate_job",
]

#: Boundary sampling needs a k-th neighbour inside the class (docs/METHOD.md, Stage B).
MIN_CLASS_EMBEDDINGS = 2

# Problem codes; the API answers them as `error.code`, the worker picks its exception by them.
INVALID = "invalid_request"
LIMIT = "limit_exceeded"
SPACE = "space_mismatch"
UNKNOWN_GENERATOR = "unknown_generator"
UNKNOWN_SET = "unknown_embedding_set"
UNKNOWN_BENCHMARK = "unknown_benchmark"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a job: the dotted request field at fault and what to change."""

    field: str
    message: str
    code: str = INVALID

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclass(frozen=True)
class EmbeddingsSummary:
    """What validation needs of a job's ID embeddings, without the vectors.

    `space`, `dim` and `class_counts` are None where they are not known yet: the API has not
    embedded a benchmark (the worker embeds it with the job's generator, so its space is the
    generator's by construction).
    """

    name: str  # how messages call it: "embedding set <id>", "benchmark fmnist-osr"
    class_names: tuple[str, ...]
    space: str | None = None
    dim: int | None = None
    class_counts: tuple[int, ...] | None = None

    @classmethod
    def from_store_summary(cls, summary: Mapping[str, Any]) -> EmbeddingsSummary:
        """From what `EmbeddingSetStore.describe` returns (the JSON beside a stored set)."""
        return cls(
            name=f"embedding set {summary['id']}",
            class_names=tuple(summary["classes"]),
            space=summary["space"],
            dim=int(summary["dim"]),
            class_counts=tuple(int(c) for c in summary["class_counts"]),
        )

    @classmethod
    def from_embedding_set(cls, es: EmbeddingSet, name: str) -> EmbeddingsSummary:
        counts = np.bincount(es.labels, minlength=es.num_classes)
        return cls(
            name=name,
            class_names=es.class_names,
            space=es.space,
            dim=es.dim,
            class_counts=tuple(int(c) for c in counts),
        )

    @classmethod
    def for_benchmark(cls, benchmark: str, settings: Settings | None = None) -> EmbeddingsSummary:
        """A benchmark before it is embedded: only its ID classes are known.

        A benchmark file is looked up inside the data root and read (its class folders listed, no
        image opened, no torch imported); a missing, malformed or escaping file raises naming it.
        """
        name = f"benchmark {benchmark}"
        if benchmark == FMNIST_OSR:
            return cls(name=name, class_names=tuple(FMNIST_CLASSES[c] for c in FMNIST_OSR_ID_CLASSES))
        if not is_benchmark_file(benchmark):
            raise ConfigError(f"embeddings.benchmark: unknown benchmark {benchmark!r}")
        data_dir = Path((settings or get_settings()).data_dir)
        path = resolve_benchmark_file(benchmark, data_dir, confined=True)
        spec = read_benchmark_file(path)
        check_sources(spec, data_dir, path)
        return cls(name=name, class_names=class_names_of(spec, data_dir, path))


def embeddings_name(spec: JobSpec) -> str:
    """How messages name the job's embeddings, the same in the API and in the worker."""
    if isinstance(spec.embeddings, EmbeddingsFromSet):
        return f"embedding set {spec.embeddings.set_id}"
    return f"benchmark {spec.embeddings.benchmark}"


def _embeddings_field(spec: JobSpec) -> str:
    return "embeddings.set_id" if isinstance(spec.embeddings, EmbeddingsFromSet) else "embeddings.benchmark"


# ---------------------------------------------------------------------------- the checks


def spec_problems(errors: Iterable[Mapping[str, Any]]) -> list[Problem]:
    """pydantic's errors for a JobSpec, as problems at request-field paths (union tags dropped)."""
    problems = []
    for error in errors:
        message = (
            str(error.get("msg", "invalid value")).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        )
        problems.append(Problem(field_path(tuple(error.get("loc", ()))) or "body", message))
    return problems


def limit_problems(spec: JobSpec, settings: Settings) -> list[Problem]:
    """The deployment's limits (most outliers, steps, shard size)."""
    return [Problem(field, message, LIMIT) for field, message in spec.check_limits(settings)]


def validate_job(spec: JobSpec, generator: GeneratorInfo | None, embeddings: EmbeddingsSummary | None) -> list[Problem]:
    """What the schema cannot check: the spec against its generator and its ID embeddings.

    generator None: not described yet (a bare diffusers folder); embeddings None: not found. Each
    check runs when what it needs is known, so the worker, knowing more, checks at least as much.
    """
    problems: list[Problem] = []
    if generator is not None:
        problems += _generator_problems(spec, generator, embeddings)
    if embeddings is not None:
        problems += _class_problems(spec, embeddings)
    return problems


def _generator_problems(spec: JobSpec, generator: GeneratorInfo, embeddings: EmbeddingsSummary | None) -> list[Problem]:
    if isinstance(spec.embeddings, EmbeddingsFromBenchmark) and not generator.can_embed_images:
        space = f" (space {generator.space!r})" if generator.space else ""
        message = (
            f"generator {generator.id!r} ({generator.kind}) cannot embed benchmark images: it is conditioned "
            f"on token embeddings{space}; upload an embedding set in that space (POST /v1/embedding-sets) "
            "and pass embeddings.set_id"
        )
        return [Problem("embeddings", message)]
    if embeddings is None:
        return []
    field = _embeddings_field(spec)
    # A generator not built yet (tiny-random) has no space to compare; the worker checks after building it.
    if embeddings.space is not None and generator.space and embeddings.space != generator.space:
        message = (
            f"{embeddings.name} lives in space {embeddings.space!r}, but generator {generator.id!r} is "
            f"conditioned on space {generator.space!r}; upload embeddings made for this generator, or pick "
            "a generator of that space"
        )
        return [Problem(field, message, SPACE)]
    if embeddings.dim is not None and embeddings.dim != generator.embed_dim:
        message = (
            f"{embeddings.name} has dim {embeddings.dim}, generator {generator.id!r} expects {generator.embed_dim}"
        )
        return [Problem(field, message, SPACE)]
    return []


def _class_problems(spec: JobSpec, embeddings: EmbeddingsSummary) -> list[Problem]:
    num_classes = len(embeddings.class_names)
    named = spec.sampler.classes
    beyond = [c for c in named or () if c >= num_classes]
    if beyond:
        message = f"names {beyond}, but {embeddings.name} has {num_classes} classes (0..{num_classes - 1})"
        return [Problem("sampler.classes", message)]
    if embeddings.class_counts is None:
        return []
    classes = list(named) if named is not None else list(range(num_classes))
    # Outliers are spread evenly over the classes, earlier ones first: with fewer outliers than
    # classes, only the first num_outliers classes are sampled at all.
    sampled = classes[: spec.num_outliers]
    sparse = [c for c in sampled if embeddings.class_counts[c] < MIN_CLASS_EMBEDDINGS]
    if not sparse:
        return []
    listed = ", ".join(f"{c} ({embeddings.class_names[c]!r}: {embeddings.class_counts[c]})" for c in sparse)
    message = (
        f"{embeddings.name} has fewer than {MIN_CLASS_EMBEDDINGS} embeddings in class(es) {listed}; "
        "boundary sampling needs at least 2 per class: leave those classes out of sampler.classes"
    )
    return [Problem("sampler.classes" if named is not None else _embeddings_field(spec), message)]


# ---------------------------------------------------------------------------- the two callers


def check_submission(spec: JobSpec, settings: Settings, store: EmbeddingSetStore) -> list[Problem]:
    """Every problem the API can find before queueing: limits, lookups, then `validate_job`."""
    problems = limit_problems(spec, settings)
    try:
        generator = find_generator(spec.generator, settings)
    except GeneratorNotFoundError as exc:
        problems.append(Problem("generator", str(exc), UNKNOWN_GENERATOR))
        generator = None
    embeddings: EmbeddingsSummary | None
    if isinstance(spec.embeddings, EmbeddingsFromSet):
        try:
            embeddings = EmbeddingsSummary.from_store_summary(store.describe(spec.embeddings.set_id))
        except EmbeddingSetNotFoundError as exc:
            problems.append(Problem("embeddings.set_id", str(exc), UNKNOWN_SET))
            embeddings = None
    else:
        try:
            embeddings = EmbeddingsSummary.for_benchmark(spec.embeddings.benchmark, settings)
        except OALError as exc:  # not there, not readable, or pointing out of the data root
            message = str(exc).removeprefix("embeddings.benchmark: ")
            problems.append(Problem("embeddings.benchmark", message, UNKNOWN_BENCHMARK))
            embeddings = None
    return problems + validate_job(spec, generator, embeddings)


def describe_problems(problems: Sequence[Problem]) -> str:
    return "; ".join(str(problem) for problem in problems)


def raise_for_problems(problems: Sequence[Problem]) -> None:
    """The worker's side: SpaceMismatchError for a space problem, else ConfigError; both fail the job at once."""
    if not problems:
        return
    error = SpaceMismatchError if any(p.code == SPACE for p in problems) else ConfigError
    raise error(describe_problems(problems))


def parse_job_spec(spec_json: Mapping[str, Any], settings: Settings) -> JobSpec:
    """The worker's first step: the spec as it came off the queue, parsed and held to the limits."""
    try:
        spec = JobSpec.model_validate(spec_json)
    except ValidationError as exc:
        raise ConfigError(f"invalid job spec: {describe_problems(spec_problems(exc.errors()))}") from exc
    raise_for_problems(limit_problems(spec, settings))
    return spec

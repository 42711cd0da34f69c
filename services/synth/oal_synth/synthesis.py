"""The synthesis job RQ runs: `run_synthesis_job(spec_json) -> summary`.

Read top-down like a diffusers pipeline's `__call__`:

 1. check the spec (schema and deployment limits)
 2. load the generator (kept loaded per worker process, so the next job skips the load)
 3. get the ID embeddings: an uploaded set, or the benchmark's ID train images embedded here
 4. check the job against its generator and embeddings (`oal_synth.validation`, as the API did)
 5. sample boundary outliers (Stage B)
 6. plan shards: outlier order and per-outlier seeds depend only on the spec, so shard i's bytes
    depend only on the spec and i
 7. denoise each shard not already on disk as planned, batch by batch, checking for cancel
    between batches
 8. write manifest.json (under the job folder's lock, from the shards as found) and return a summary

A retried job (worker killed, timeout, crash) runs the same steps; a shard already under its
final name is complete by construction (write, fsync, rename), and it is kept only when every
sample in it is the one this job plans (job id, generator content hash, spec, seeds, embeddings:
`oal_synth.resume`), so the job resumes where it stopped and writes the same bytes it would have
written the first time.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from oal_shared.data.benchmark import Benchmark, load_benchmark
from oal_shared.data.folder_spec import is_benchmark_file, resolve_benchmark_file
from oal_shared.embeddings import EmbeddingSet
from oal_shared.errors import ConfigError, OALError
from oal_shared.paths import safe_join
from oal_shared.seeds import derive_seed
from oal_shared.settings import Settings, get_settings
from oal_shared.shards import (
    MANIFEST_NAME,
    OutlierSample,
    ShardInfo,
    sample_key,
    write_manifest,
)
from oal_synth.generators.base import GeneratorInfo, LatentGenerator
from oal_synth.generators.registry import load_generator
from oal_synth.job_context import JobContext, clear_stop_request, request_stop  # noqa: F401 - stop controls re-exported
from oal_synth.resume import (
    PlannedSample,
    confirm_shards,
    job_folder_lock,
    naming_path_on_error,
    remove_stale_temp_files,
    reusable_shard,
    spec_sha256,
    write_planned_shard,
)
from oal_synth.sampler import BoundaryOutliers, sample_outliers
from oal_synth.spec import EmbeddingsFromBenchmark, EmbeddingsFromSet, JobSpec
from oal_synth.store import EmbeddingSetStore
from oal_synth.validation import EmbeddingsSummary, embeddings_name, parse_job_spec, raise_for_problems, validate_job

logger = logging.getLogger(__name__)

#: Embedded benchmark sets kept per process (cheap to keep, slow-ish to recompute on a CPU).
EMBEDDING_CACHE_SIZE = 4
#: Images per embed_images call when embedding a benchmark.
EMBED_BATCH = 512

_benchmark_embeddings: OrderedDict[tuple, EmbeddingSet] = OrderedDict()


def run_synthesis_job(spec_json: dict, job_id: str | None = None) -> dict:
    """Synthesise the outliers of one job spec into shards under `settings.shard_root/<job id>`.

    Under RQ the job id is the RQ job's; run directly, pass `job_id`. Returns a JSON summary.
    """
    started = time.perf_counter()
    settings = get_settings()
    context = JobContext.current(job_id)

    # 1. Check the spec.
    spec = check_job_spec(spec_json, settings)
    out_dir = safe_join(Path(settings.shard_root), context.job_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    context.update(progress={"done": 0, "total": spec.num_outliers}, shards=[], output_dir=str(out_dir), error=None)
    context.check_interrupts()

    # 2. Load the generator (the registry keeps it loaded in this process for the next job).
    loading = time.perf_counter()
    generator = load_generator(spec.generator, settings, dtype=spec.diffusion.dtype)
    logger.info("job %s: generator %s ready in %.1f s", context.job_id, spec.generator, time.perf_counter() - loading)
    info = generator.info
    raise_for_problems(validate_job(spec, info, None))  # e.g. benchmark images for a generator that cannot embed

    # 3. Get the ID embeddings.
    es = job_embeddings(spec, generator, settings)

    # 4. Check the job against them: space, dim, classes (the API's check, with what only the worker knows).
    raise_for_problems(validate_job(spec, info, EmbeddingsSummary.from_embedding_set(es, embeddings_name(spec))))

    # 5. Sample boundary outliers.
    plan = plan_outliers(sample_outliers(es, spec.sampler, spec.num_outliers, spec.seed), spec.seed)
    logger.info(
        "job %s: %d outliers over %d classes from %d embeddings",
        context.job_id,
        len(plan),
        len(set(plan.class_ids.tolist())),
        len(es),
    )

    # 6. Plan shards.
    shard_rows = plan_shards(len(plan), spec.shards.max_samples)

    # 7. Denoise and write every shard not already on disk as planned (a killed writer's temp files go).
    remove_stale_temp_files(out_dir)
    infos: list[ShardInfo] = []
    done, resumed, denoised = 0, 0, 0
    for index, rows in enumerate(shard_rows):
        planned = planned_samples(plan, rows, spec, info, es, context.job_id)
        existing = reusable_shard(out_dir, index, planned)
        if existing is not None:
            info_i, resumed = existing, resumed + 1
        else:
            samples = []
            for batch in batches(rows, spec.diffusion.batch_size):
                context.check_interrupts()
                offset = batch.start - rows.start
                samples += denoise_batch(generator, plan, batch, spec, es, planned[offset : offset + len(batch)])
                context.update(progress={"done": done + len(samples), "total": len(plan)})
            info_i = write_planned_shard(out_dir, index, samples, planned)
            denoised += len(rows)  # this run's work, without resumed shards: the throughput metric's count
        done += len(rows)
        infos.append(info_i)
        context.update(progress={"done": done, "total": len(plan)}, shards=[i.to_json() for i in infos])
    remove_stale_temp_files(out_dir)

    # 8. Write the manifest, holding the folder lock, of the shards as they are on disk now.
    with job_folder_lock(out_dir), naming_path_on_error(out_dir / MANIFEST_NAME, "the manifest"):
        infos = confirm_shards(
            out_dir, infos, lambda index: planned_samples(plan, shard_rows[index], spec, info, es, context.job_id)
        )
        manifest_path = write_manifest(
            out_dir,
            spec.model_dump(mode="json"),
            infos,
            generator=info.to_json(),
            extra={
                "job_id": context.job_id,
                "embeddings": {
                    "source": es.source,
                    "space": es.space,
                    "class_names": list(es.class_names),
                    "count": len(es),
                },
            },
        )
    context.update(manifest_path=str(manifest_path))
    seconds = time.perf_counter() - started
    logger.info(
        "job %s: %d samples in %d shards (%d resumed) in %.1f s",
        context.job_id,
        done,
        len(infos),
        resumed,
        seconds,
    )
    return {
        "job_id": context.job_id,
        "output_dir": str(out_dir),
        "manifest_path": str(manifest_path),
        "num_samples": done,
        "num_shards": len(infos),
        "resumed_shards": resumed,
        "denoised_samples": denoised,
        "generator": info.id,
        "seconds": round(seconds, 3),
    }


# ---------------------------------------------------------------------------- steps


def check_job_spec(spec_json: dict, settings: Settings) -> JobSpec:
    """Step 1: the spec off the queue, parsed and held to the limits (ConfigError naming the fields)."""
    return parse_job_spec(spec_json, settings)


def job_embeddings(spec: JobSpec, generator: LatentGenerator, settings: Settings) -> EmbeddingSet:
    if isinstance(spec.embeddings, EmbeddingsFromSet):
        return EmbeddingSetStore.from_settings(settings).load(spec.embeddings.set_id)
    if isinstance(spec.embeddings, EmbeddingsFromBenchmark):
        return embed_benchmark(spec.embeddings, spec.seed, generator, settings)
    raise ConfigError(f"embeddings: unsupported source {type(spec.embeddings).__name__}")


def embed_benchmark(
    source: EmbeddingsFromBenchmark, seed: int, generator: LatentGenerator, settings: Settings
) -> EmbeddingSet:
    """Embed `per_class` ID train images per class (a subset fixed by the seed) with the generator.

    A benchmark file is taken only from inside the data root; only the chosen images are decoded.
    """
    info = generator.info
    try:
        version = _benchmark_version(source.benchmark, settings)
        key = (info.id, info.content_hash, source.benchmark, version, source.per_class, seed)
        if key in _benchmark_embeddings:
            _benchmark_embeddings.move_to_end(key)
            return _benchmark_embeddings[key]
        benchmark = load_benchmark(source.benchmark, settings, confined=True)
    except OALError as exc:  # missing, malformed, bad images, or out of the data root: the job cannot run
        raise ConfigError(f"embeddings.benchmark: {exc}") from exc
    _check_embeddable(benchmark, generator, source.benchmark)
    images, labels = benchmark.id_train.images, benchmark.id_train.labels
    chosen = []
    for cls in range(len(benchmark.class_names)):
        rows = np.flatnonzero(labels == cls)
        take = min(source.per_class, rows.size)
        if take < source.per_class:
            logger.warning("class %d has %d train images, fewer than per_class=%d", cls, rows.size, source.per_class)
        rng = np.random.default_rng([seed, cls])
        chosen.append(np.sort(rng.choice(rows, size=take, replace=False)))
    index = np.concatenate(chosen)
    with torch.inference_mode():
        parts = [generator.embed_images(images[index[i : i + EMBED_BATCH]]) for i in range(0, index.size, EMBED_BATCH)]
    embeddings = torch.cat(parts).detach().float().cpu().numpy()  # (N, D)
    es = EmbeddingSet(
        embeddings=np.ascontiguousarray(embeddings, dtype=np.float32),
        labels=labels[index].astype(np.int64),
        space=info.space,
        class_names=tuple(benchmark.class_names),
        source=f"{source.benchmark} id_train, {source.per_class} per class (seed {seed}), "
        f"embedded by {info.id} ({info.content_hash[:12]})",
    )
    _benchmark_embeddings[key] = es
    while len(_benchmark_embeddings) > EMBEDDING_CACHE_SIZE:
        _benchmark_embeddings.popitem(last=False)
    return es


def _benchmark_version(benchmark: str, settings: Settings) -> int | None:
    """A benchmark file's mtime (an edited file is embedded afresh); None for a built-in benchmark."""
    if not is_benchmark_file(benchmark):
        return None
    return resolve_benchmark_file(benchmark, Path(settings.data_dir), confined=True).stat().st_mtime_ns


def _check_embeddable(benchmark: Benchmark, generator: LatentGenerator, name: str) -> None:
    """A generator with its own image encoder (the embedded one: square grey images) takes only its size."""
    side = getattr(generator, "image_size", None)
    if side is None:
        return
    if (benchmark.image_size, benchmark.in_channels) != (side, 1):
        colour = "grey" if benchmark.in_channels == 1 else "RGB"
        raise ConfigError(
            f"embeddings.benchmark: {name} has {benchmark.image_size}x{benchmark.image_size} {colour} images, "
            f"generator {generator.info.id!r} embeds {side}x{side} grey images; set image_size = {side} and "
            "channels = 1 in the benchmark file"
        )


@dataclass(frozen=True)
class OutlierPlan:
    """Every outlier of the job in its fixed order; row i is global index i."""

    embeddings: torch.Tensor  # (N, D) float32
    class_ids: np.ndarray  # (N,) int64
    boundary_index: np.ndarray  # (N,) int64, row of the class set the outlier was drawn around
    knn_distance: np.ndarray  # (N,) float32
    rep: np.ndarray  # (N,) int64, how many earlier outliers share (class, boundary point)
    seeds: np.ndarray  # (N,) int64, the diffusion seed of each outlier

    def __len__(self) -> int:
        return int(self.class_ids.shape[0])


def outlier_seed(seed: int, index: int) -> int:
    """Diffusion seed of outlier `index`: a hash of (job seed, index), 63 bits, independent of batching."""
    return derive_seed("oal-outlier", seed, index)


def plan_outliers(outliers: list[BoundaryOutliers], seed: int) -> OutlierPlan:
    """Concatenate the classes in the sampler's order and number the outliers."""
    if not outliers:
        raise ConfigError("num_outliers: the sampler produced no outliers")
    class_ids = np.concatenate([np.full(len(o), o.class_id, dtype=np.int64) for o in outliers])
    boundary = np.concatenate([o.boundary_index.numpy().astype(np.int64) for o in outliers])
    seen: dict[tuple[int, int], int] = {}
    rep = np.empty_like(boundary)
    for i, pair in enumerate(zip(class_ids.tolist(), boundary.tolist(), strict=True)):
        rep[i] = seen.get(pair, 0)
        seen[pair] = rep[i] + 1
    return OutlierPlan(
        embeddings=torch.cat([o.embeddings.float() for o in outliers]),
        class_ids=class_ids,
        boundary_index=boundary,
        knn_distance=np.concatenate([o.knn_distance.numpy().astype(np.float32) for o in outliers]),
        rep=rep,
        seeds=np.array([outlier_seed(seed, i) for i in range(class_ids.shape[0])], dtype=np.int64),
    )


def plan_shards(total: int, max_samples: int) -> list[range]:
    """Consecutive row ranges of at most `max_samples`: shard i holds rows [i*max, (i+1)*max)."""
    return [range(start, min(start + max_samples, total)) for start in range(0, total, max_samples)]


def batches(rows: range, batch_size: int) -> list[range]:
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def planned_samples(
    plan: OutlierPlan, rows: range, spec: JobSpec, info: GeneratorInfo, es: EmbeddingSet, job_id: str
) -> list[PlannedSample]:
    """Everything the samples of `rows` hold but the latents: keys, classes, embeddings, provenance.

    Computed before denoising, so a resumed job can compare a shard on disk with its plan.
    """
    spec_hash = spec_sha256(spec.model_dump(mode="json"))
    sampler = spec.sampler.model_dump(mode="json")
    planned = []
    for i in rows:
        cls = int(plan.class_ids[i])
        meta = {
            "job_id": job_id,
            "index": i,
            "generator": {"id": info.id, "kind": info.kind, "content_hash": info.content_hash},
            "space": info.space,
            "class": cls,
            "class_name": es.class_names[cls],
            "boundary_index": int(plan.boundary_index[i]),
            "knn_distance": float(plan.knn_distance[i]),
            "seed": int(plan.seeds[i]),
            "scheduler": spec.diffusion.scheduler,
            "steps": spec.diffusion.steps,
            "guidance_scale": spec.diffusion.guidance_scale,
            "scaling_factor": info.scaling_factor,
            "sampler": dict(sampler),
            "spec_sha256": spec_hash,
        }
        key = sample_key(job_id, cls, int(plan.boundary_index[i]), int(plan.rep[i]))
        planned.append(PlannedSample(key=key, cls=cls, embedding=plan.embeddings[i].numpy().copy(), meta=meta))
    return planned


def denoise_batch(
    generator: LatentGenerator,
    plan: OutlierPlan,
    rows: range,
    spec: JobSpec,
    es: EmbeddingSet,
    planned: list[PlannedSample],
) -> list[OutlierSample]:
    """Stage C for rows of the plan: one latent per outlier embedding, with its planned key and provenance."""
    index = np.arange(rows.start, rows.stop)
    embeddings = plan.embeddings[rows.start : rows.stop]  # (B, D)
    with torch.inference_mode():
        latents = generator.generate_latents(
            embeddings,
            class_ids=plan.class_ids[index].tolist(),
            seeds=plan.seeds[index].tolist(),
            diffusion=spec.diffusion,
            class_names=es.class_names,
        )  # (B, C, H, W) float32, unscaled
    latents_np = latents.detach().float().cpu().numpy().astype(spec.shards.latent_dtype)
    return [
        OutlierSample(key=want.key, latent=latents_np[offset], embedding=want.embedding, cls=want.cls, meta=want.meta)
        for offset, want in enumerate(planned)
    ]

"""Where a finished job's boundary outliers sit in the condition encoder's space, before and after decoding.

For each outlier: its conditioning embedding (what the sampler drew) and its decoded image
re-embedded by the condition encoder (what pixel-space training actually sees). Each is placed
against its class's ID embeddings, the job's own embedding set (re-made from the manifest's spec,
as the worker made it, and checked against the k-NN distances the job recorded): the k-NN distance
to the class, as a percentile of the class's leave-one-out ID-to-ID k-NN distances (50: a typical
ID point; 100: farther than every ID point), for k = 1 (the nearest real image) and the job's k.
Reference rows put the same numbers on real test images and on ID-conditioned samples.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from rich.table import Table
from tqdm.auto import tqdm

from oal_shared.embeddings import EmbeddingSet
from oal_shared.errors import ConfigError, OALError
from oal_shared.outlier_images import check_generator
from oal_shared.seeds import derive_seed
from oal_shared.settings import Settings
from oal_shared.shards import OutlierManifest, iter_outlier_samples, load_manifest
from oal_synth.generators.embedded import EmbeddedGenerator
from oal_synth.quality import Embedded, QualityConfig, to_uint8
from oal_synth.quality_metrics import (
    EDGE_PERCENTILE,
    class_means,
    distribution_summary,
    nearest_mean_labels,
    percentile_of,
)
from oal_synth.sampler import knn_distance
from oal_synth.spec import EmbeddingsFromBenchmark
from oal_synth.synthesis import embed_benchmark

logger = logging.getLogger(__name__)


def job_embedding_set(manifest: OutlierManifest, generator: EmbeddedGenerator, settings: Settings) -> EmbeddingSet:
    """The ID embeddings the job sampled from, embedded again exactly as the worker did."""
    where = manifest.folder / "manifest.json"
    spec = manifest.spec
    source = spec.get("embeddings") if isinstance(spec, dict) else None
    if not isinstance(source, dict) or "benchmark" not in source:
        raise ConfigError(
            f"--shards: {where} spec.embeddings is {source!r}; quality re-embeds the job's ID set, "
            "so it needs a job made from a benchmark ({'benchmark': ...}), not an uploaded set"
        )
    try:
        seed = int(spec["seed"])
        es = embed_benchmark(EmbeddingsFromBenchmark(**source), seed, generator, settings)
    except (KeyError, TypeError, ValueError, ValidationError) as exc:
        raise ConfigError(f"--shards: {where} spec.embeddings / spec.seed unusable ({exc})") from exc
    recorded = manifest.document.get("embeddings") or {}
    for field, ours in (("space", es.space), ("count", len(es))):
        if field in recorded and recorded[field] != ours:
            raise ConfigError(
                f"--shards: {where} embeddings.{field} is {recorded[field]!r}, re-embedding gives {ours!r}"
            )
    return es


def open_job(job_dir: Path, generator_dir: Path) -> OutlierManifest:
    """The job's manifest, refused (naming both folders) unless this generator made its latents:
    another generator's VAE would decode them into other images."""
    try:
        manifest = load_manifest(job_dir)
        check_generator(generator_dir, manifest)
    except OALError as exc:
        raise ConfigError(f"--shards: {exc}") from exc
    return manifest


def measure_boundary(
    generator: EmbeddedGenerator,
    manifest: OutlierManifest,
    config: QualityConfig,
    settings: Settings,
    reference: dict[str, Embedded],
    progress: bool = False,
) -> dict:
    job_dir = manifest.folder
    es = job_embedding_set(manifest, generator, settings)
    samples = list(iter_outlier_samples(manifest.shard_paths, layout=manifest.layout))
    if config.max_outliers is not None and len(samples) > config.max_outliers:
        rng = np.random.default_rng(derive_seed("oal-quality-outliers", config.seed))
        samples = [samples[i] for i in np.sort(rng.choice(len(samples), config.max_outliers, replace=False))]
    conditions = np.stack([s.embedding for s in samples]).astype(np.float32)
    labels = np.array([s.cls for s in samples], dtype=np.int64)
    latents = torch.from_numpy(np.stack([s.latent.astype(np.float32) for s in samples]))
    decoded = []
    with tqdm(total=len(samples), desc="outliers", unit="img", disable=not progress) as bar:
        for start in range(0, len(samples), 256):
            decoded.append(to_uint8(generator.decode_latents(latents[start : start + 256])))
            bar.update(len(decoded[-1]))
    decoded_embeddings = generator.embed_images(np.concatenate(decoded)).numpy()

    try:
        job_k = int(manifest.spec["sampler"]["k"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"--shards: {job_dir / 'manifest.json'} spec.sampler.k missing ({exc})") from exc
    space = ClassSpace(es, sorted({1, job_k}))
    sets = {"conditioning": Embedded(conditions, labels), "decoded": Embedded(decoded_embeddings, labels, conditions)}
    if tuple(es.class_names) == tuple(generator.info.class_names or es.class_names):
        sets.update(reference)
    else:
        logger.warning("the job's classes differ from the generator's: reference rows left out")
    recorded = np.array([float(s.meta.get("knn_distance", np.nan)) for s in samples])
    ours = space.distances(conditions, labels, job_k)  # the sampler's own d_k: outliers are not in the bank
    return {
        "job_dir": str(job_dir),
        "job_id": manifest.job_id,
        "num_outliers": int(manifest.num_samples),
        "measured_outliers": len(samples),
        "embedding_set": {"source": es.source, "space": es.space, "count": len(es)},
        "ks": space.ks,
        "job_k": job_k,
        "recorded_knn_distance_max_abs_diff": float(np.nanmax(np.abs(recorded - ours))) if len(ours) else None,
        "edge_percentile": EDGE_PERCENTILE,
        "id_to_id": {
            str(k): {name: distribution_summary(space.id_distances[k][c]) for c, name in enumerate(es.class_names)}
            for k in space.ks
        },
        "sets": {name: space.describe(embedded) for name, embedded in sets.items()},
        "per_class": {
            name: {
                which: space.describe(Embedded(e.embeddings[labels == c], labels[labels == c]), brief=True)
                for which, e in (("conditioning", sets["conditioning"]), ("decoded", sets["decoded"]))
            }
            for c, name in enumerate(es.class_names)
            if (labels == c).any()
        },
    }


class ClassSpace:
    """The job's ID embeddings by class, their leave-one-out k-NN distances, and the class means."""

    def __init__(self, es: EmbeddingSet, ks: list[int]):
        self.num_classes = len(es.class_names)
        self.ks = ks
        self.banks = [torch.from_numpy(es.embeddings[es.labels == c]) for c in range(self.num_classes)]
        self.means = class_means(es.embeddings, es.labels, self.num_classes)
        # k+1 on the bank itself: each point is its own first neighbour, so this is its k-th other one.
        self.id_distances = {
            k: [knn_distance(bank, bank, min(k + 1, len(bank))).numpy() for bank in self.banks] for k in ks
        }

    def distances(self, embeddings: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
        """k-NN distance of each row to its own class's bank, (N,)."""
        out = np.full(len(labels), np.nan)
        for c in np.unique(labels):
            rows = labels == c
            out[rows] = knn_distance(torch.from_numpy(embeddings[rows]), self.banks[c], k).numpy()
        return out

    def percentiles(self, embeddings: np.ndarray, k: int) -> np.ndarray:
        """Percentile of each row's k-NN distance to every class against that class's ID-to-ID ones, (N, K)."""
        queries = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
        return np.stack(
            [
                percentile_of(knn_distance(queries, bank, k).numpy(), self.id_distances[k][c])
                for c, bank in enumerate(self.banks)
            ],
            axis=1,
        )

    def describe(self, embedded: Embedded, brief: bool = False) -> dict:
        labels = embedded.labels
        predicted = nearest_mean_labels(embedded.embeddings, self.means)
        out: dict = {"n": int(len(labels)), "own_class_accuracy": float((predicted == labels).mean())}
        for k in self.ks:
            every = self.percentiles(embedded.embeddings, k)  # (N, K)
            own = every[np.arange(len(labels)), labels]
            numbers = {
                "percentile": distribution_summary(own),
                "at_edge_fraction": float((own >= EDGE_PERCENTILE).mean()),
                "beyond_all_id_fraction": float((own >= 100.0).mean()),
            }
            if not brief:
                numbers["distance"] = distribution_summary(self.distances(embedded.embeddings, labels, k))
                numbers["near_no_class_fraction"] = float((every.min(axis=1) >= EDGE_PERCENTILE).mean())
            out[f"k{k}"] = numbers
        if not brief:
            out["predicted_class_fraction"] = np.bincount(predicted, minlength=self.num_classes).tolist()
            out["predicted_class_fraction"] = [v / max(len(labels), 1) for v in out["predicted_class_fraction"]]
        if embedded.conditions is not None and not brief:
            a, b = embedded.embeddings, embedded.conditions
            cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            out["cosine_to_condition"] = distribution_summary(cosine)
        return out


def boundary_table(boundary: dict) -> Table:
    k1, kj = "k1", f"k{boundary['job_k']}"
    table = Table(
        title=f"Boundary outliers of {boundary['job_dir']} ({boundary['measured_outliers']} of "
        f"{boundary['num_outliers']}): percentile of the k-NN distance to the own class among ID-to-ID ones"
    )
    columns = (
        "set",
        "n",
        "own class",
        "median pct k=1",
        f"median pct k={boundary['job_k']}",
        f">= p{EDGE_PERCENTILE:.0f} (k={boundary['job_k']})",
        "beyond all ID",
        "near no class (k=1)",
        "cos to cond",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "set" else "right")
    for name, s in boundary["sets"].items():
        cosine = s.get("cosine_to_condition")
        table.add_row(
            name,
            str(s["n"]),
            f"{s['own_class_accuracy']:.3f}",
            f"{s[k1]['percentile']['p50']:.1f}",
            f"{s[kj]['percentile']['p50']:.1f}",
            f"{s[kj]['at_edge_fraction']:.3f}",
            f"{s[kj]['beyond_all_id_fraction']:.3f}",
            f"{s[k1]['near_no_class_fraction']:.3f}",
            f"{cosine['p50']:.3f}" if cosine else "-",
        )
    return table

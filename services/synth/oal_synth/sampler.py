"""Stage B of the method: low-likelihood boundary sampling in the conditioning space (NPOS style).

Per class c with L2-normalised embeddings E_c (N x D), following docs/METHOD.md, Stage B:

1. d_k(x) = distance from x to its k-th nearest neighbour in E_c (x counts as its own 1st).
2. Boundary points B: the `select` points of E_c with the largest d_k.
3. Candidates: for each b in B, `n_candidates` draws normalise(b + sigma * eps), eps ~ N(0, I).
4. Keep, per b, the `keep` candidates with the largest d_k against E_c (lowest density),
   rescaled to the class's anchor norm.

Everything is vectorised torch. The k-NN runs on the backend the job names
(`sampler.knn_backend`): "torch" (the default) or "faiss" (the `faiss` extra, exact flat L2 on the
CPU). The backend is chosen by the spec, never by what a machine has installed, because the two
round differently and a near tie in the k-th distance can pick another boundary point or candidate:
one job must draw the same outliers on every worker. Distances are Euclidean between unit vectors
(faiss' squared distances are rooted), so they lie in [0, 2].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F

from oal_shared.errors import ConfigError, EmbeddingSetError
from oal_shared.seeds import derive_seed

if TYPE_CHECKING:
    from oal_shared.embeddings import EmbeddingSet
    from oal_synth.spec import SamplerConfig

logger = logging.getLogger(__name__)

# Distance-matrix entries computed at once by the torch k-NN (float32: 64 MiB), so memory stays
# bounded whatever the sizes of queries and bank.
KNN_CHUNK_ELEMENTS = 1 << 24
# Candidate-tensor entries (boundary points x candidates x D) drawn at once. A constant, not a
# memory probe, because the block size decides how the random stream is consumed: the same
# config and seed must give the same outliers on every machine.
CANDIDATE_BLOCK_ELEMENTS = 1 << 23

KnnBackend = Literal["torch", "faiss"]


@dataclass
class BoundaryOutliers:
    """The outlier embeddings of one class and where each came from."""

    embeddings: torch.Tensor  # (M, D) float32, rescaled to the anchor norm when one was given
    boundary_index: torch.Tensor  # (M,) int64, row of the class set each outlier was drawn around
    knn_distance: torch.Tensor  # (M,) float32, k-th NN distance of the (unit) outlier to the class set
    class_id: int

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])


def _faiss_module():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """k-th smallest entry of each row; for k past the middle the (N-k+1) largest are fewer to find."""
    n = values.shape[1]
    if k > n // 2:
        return torch.topk(values, n - k + 1, dim=1, largest=True, sorted=False).values.amin(dim=1)
    return torch.kthvalue(values, k, dim=1).values


def _knn_distance_torch(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    rows_per_chunk = max(1, KNN_CHUNK_ELEMENTS // bank.shape[0])
    out = []
    for start in range(0, queries.shape[0], rows_per_chunk):
        chunk = queries[start : start + rows_per_chunk]  # (m, D)
        # ||q - b||^2 = 2 - 2 q.b for unit vectors; clamp the rounding error below zero.
        squared = (2.0 - 2.0 * chunk @ bank.T).clamp_min_(0.0)  # (m, N)
        kth = _kth_smallest(squared, k)  # (m,)
        out.append(kth.sqrt_())
    return torch.cat(out) if out else queries.new_zeros(0)


def _knn_distance_faiss(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    faiss = _faiss_module()
    if faiss is None:
        raise ConfigError(
            "sampler.knn_backend is 'faiss', but faiss is not installed on this machine "
            "(pip install 'oal-ood[faiss]', or use knn_backend 'torch')"
        )
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank.detach().cpu().contiguous().numpy())
    squared, _ = index.search(queries.detach().cpu().contiguous().numpy(), k)  # (M, k) squared L2, ascending
    kth = torch.from_numpy(squared[:, -1].copy()).clamp_min_(0.0).sqrt_()
    return kth.to(queries.device)


def knn_distance(queries: torch.Tensor, bank: torch.Tensor, k: int, backend: KnnBackend = "torch") -> torch.Tensor:
    """k-th nearest-neighbour distance of each query to the bank, on L2-normalised vectors.

    queries (M, D), bank (N, D) -> (M,) float32. A query that is also in the bank finds itself at
    distance 0, so it counts as its own first neighbour. k larger than N is clamped to N (logged).
    `backend` "faiss" needs faiss installed (ConfigError otherwise); it runs on the CPU.
    """
    if queries.ndim != 2 or bank.ndim != 2:
        raise ConfigError(
            f"knn_distance wants 2-D queries and bank, got {tuple(queries.shape)} and {tuple(bank.shape)}"
        )
    if queries.shape[1] != bank.shape[1]:
        raise ConfigError(f"knn_distance: queries have D={queries.shape[1]}, bank has D={bank.shape[1]}")
    if bank.shape[0] == 0:
        raise ConfigError("knn_distance: the bank is empty")
    if k < 1:
        raise ConfigError(f"knn_distance: k must be >= 1, got {k}")
    if backend not in ("torch", "faiss"):
        raise ConfigError(f"knn_distance: backend must be 'torch' or 'faiss', got {backend!r}")
    if k > bank.shape[0]:
        logger.warning("k=%d exceeds the %d points of the bank; using k=%d", k, bank.shape[0], bank.shape[0])
        k = bank.shape[0]
    queries = F.normalize(queries.float(), dim=1)
    bank = F.normalize(bank.float().to(queries.device), dim=1)
    if backend == "faiss":
        return _knn_distance_faiss(queries, bank, k)
    return _knn_distance_torch(queries, bank, k)


def _boundary_indices(
    normed: torch.Tensor, k: int, select: int, class_id: int, backend: KnnBackend = "torch"
) -> torch.Tensor:
    """Rows of the class set with the largest k-th NN distance, largest first: (S,) int64."""
    if select > normed.shape[0]:
        logger.warning(
            "class %d: select=%d exceeds its %d embeddings; every point is a boundary point",
            class_id,
            select,
            normed.shape[0],
        )
        select = normed.shape[0]
    kth = knn_distance(normed, normed, k, backend)  # (N,)
    return torch.topk(kth, select, largest=True, sorted=True).indices


def _draw_candidates(
    boundary: torch.Tensor, config: SamplerConfig, generator: torch.Generator, bank: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Noisy candidates around each boundary point and their k-th NN distances to `bank`.

    boundary (S, D) unit rows -> candidates (S, C, D) or None, distances (S, C). The candidates
    themselves are only kept when the faithful (buggy) selection needs them all at once.
    """
    num_points, dim = boundary.shape
    per_block = max(1, CANDIDATE_BLOCK_ELEMENTS // (config.n_candidates * dim))
    keep_all = config.faithful_knn_bug
    candidate_blocks, distance_blocks, kept_blocks = [], [], []
    for start in range(0, num_points, per_block):
        block = boundary[start : start + per_block]  # (s, D)
        eps = torch.randn((block.shape[0], config.n_candidates, dim), generator=generator, dtype=torch.float32).to(
            block.device
        )  # (s, C, D)
        candidates = F.normalize(block[:, None, :] + config.sigma * eps, dim=-1)  # (s, C, D)
        distances = knn_distance(candidates.reshape(-1, dim), bank, config.k, config.knn_backend)  # (s*C,)
        distances = distances.view(block.shape[0], -1)  # (s, C)
        distance_blocks.append(distances)
        if keep_all:
            candidate_blocks.append(candidates)
        else:
            # Correct selection: the `keep` lowest-density candidates of each boundary point.
            top = torch.topk(distances, config.keep, dim=1, largest=True, sorted=True).indices  # (s, keep)
            kept_blocks.append(torch.gather(candidates, 1, top[:, :, None].expand(-1, -1, dim)))
            distance_blocks[-1] = torch.gather(distances, 1, top)
    if keep_all:
        return torch.cat(candidate_blocks), torch.cat(distance_blocks)
    return torch.cat(kept_blocks), torch.cat(distance_blocks)


def faithful_selection(distances: torch.Tensor, keep: int) -> torch.Tensor:
    """The reference code's candidate choice, bug included: (S, C) distances -> (S, keep) columns.

    Dream-OOD / OAL `generate_outliers` lays the S*C candidates out point-major (rows
    i*C .. i*C+C-1 belong to boundary point i), then `KNN_dis_search_distance` reshapes their k-th
    distances with `.view(C, -1)` (it should be `.view(S, C)` and topk over dim 1). Column i of that
    (C, S) view holds the flat entries r*S + i, which belong to boundary point (r*S + i) // C, mostly
    not i. `topk(dim=0)` then ranks those entries, and the winning rows r are used as
    `i*C + r`, i.e. candidate r of boundary point i. So each boundary point gets `keep` of its own
    candidates chosen by the density of *other* candidates: effectively random noisy copies of the
    boundary points, not its lowest-density ones. (The reference also reuses one noise draw for
    every boundary point and subsamples the boundary points; this flag reproduces only the indexing.)
    """
    num_points, num_candidates = distances.shape
    tangled = distances.reshape(-1).view(num_candidates, num_points)  # (C, S), the wrong reshape
    rows = torch.topk(tangled, keep, dim=0, largest=True, sorted=True).indices  # (keep, S)
    return rows.T.contiguous()  # (S, keep): candidate r of boundary point i


def _one_round(
    normed: torch.Tensor,
    boundary_index: torch.Tensor,
    config: SamplerConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass of steps 3-4. Returns unit outliers (keep*S, D), boundary rows, k-th distances.

    Rows are ordered rank-major (every boundary point's best candidate first, then every second
    best, ...), so trimming a round keeps the outliers spread over all boundary points.
    """
    candidates, distances = _draw_candidates(normed[boundary_index], config, generator, normed)
    if config.faithful_knn_bug:
        columns = faithful_selection(distances, config.keep)  # (S, keep)
        dim = candidates.shape[-1]
        candidates = torch.gather(candidates, 1, columns[:, :, None].expand(-1, -1, dim))  # (S, keep, D)
        distances = torch.gather(distances, 1, columns)  # (S, keep)
    outliers = candidates.transpose(0, 1).reshape(-1, candidates.shape[-1])  # (keep*S, D)
    origin = boundary_index.repeat(config.keep)  # (keep*S,)
    return outliers, origin, distances.T.reshape(-1)


def _check_class_set(class_embeddings: torch.Tensor, class_id: int) -> None:
    if class_embeddings.ndim != 2:
        raise EmbeddingSetError(
            f"class {class_id}: embeddings must be (N, D), got shape {tuple(class_embeddings.shape)}"
        )
    if class_embeddings.shape[0] < 2:
        raise EmbeddingSetError(
            f"class {class_id}: boundary sampling needs at least 2 embeddings, got {class_embeddings.shape[0]}"
        )
    if not torch.isfinite(class_embeddings).all():
        raise EmbeddingSetError(f"class {class_id}: embeddings hold NaN or infinite values")


def _sample(
    class_embeddings: torch.Tensor,
    config: SamplerConfig,
    generator: torch.Generator,
    class_id: int,
    anchor_norm: float | None,
    min_count: int,
) -> BoundaryOutliers:
    """Rounds of fresh candidates until at least `min_count` outliers exist (boundary found once)."""
    _check_class_set(class_embeddings, class_id)
    normed = F.normalize(class_embeddings.float(), dim=1)  # (N, D)
    if config.k > normed.shape[0]:
        # Clamp once here, so the warning is logged once per class rather than per candidate block.
        logger.warning(
            "class %d: k=%d exceeds its %d embeddings; using k=%d", class_id, config.k, len(normed), len(normed)
        )
        config = config.model_copy(update={"k": normed.shape[0]})
    boundary_index = _boundary_indices(normed, config.k, config.select, class_id, config.knn_backend)  # (S,)
    outliers, origins, distances = [], [], []
    count = 0
    while count < max(min_count, 1):
        emb, origin, dist = _one_round(normed, boundary_index, config, generator)
        outliers.append(emb)
        origins.append(origin)
        distances.append(dist)
        count += emb.shape[0]
    embeddings = torch.cat(outliers)
    if anchor_norm is not None:
        embeddings = embeddings * float(anchor_norm)
    return BoundaryOutliers(
        embeddings=embeddings.float().cpu(),
        boundary_index=torch.cat(origins).long().cpu(),
        knn_distance=torch.cat(distances).float().cpu(),
        class_id=class_id,
    )


def sample_class_outliers(
    class_embeddings: torch.Tensor,
    config: SamplerConfig,
    generator: torch.Generator,
    class_id: int,
    anchor_norm: float | None = None,
) -> BoundaryOutliers:
    """Steps 1-4 for one class: `keep` outliers around each of `select` boundary points.

    class_embeddings (N, D), N >= 2, any norm (they are L2-normalised first). Returns keep*S rows,
    S = min(select, N), ordered rank-major; unit vectors, times `anchor_norm` when it is given.
    `config.faithful_knn_bug` switches to the reference code's selection (see `faithful_selection`).
    """
    return _sample(class_embeddings, config, generator, class_id, anchor_norm, min_count=1)


def class_seed(seed: int, class_id: int) -> int:
    """A per-class seed derived from the job seed, so a class's outliers do not depend on which
    other classes the job asked for."""
    return derive_seed("oal-sampler", seed, class_id)


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` spread over `parts`, earlier parts taking the remainder: (7, 3) -> [3, 2, 2]."""
    base, remainder = divmod(total, parts)
    return [base + (1 if i < remainder else 0) for i in range(parts)]


def sample_outliers(es: EmbeddingSet, config: SamplerConfig, num_outliers: int, seed: int) -> list[BoundaryOutliers]:
    """Outliers for every requested class (config.classes, or all), exactly `num_outliers` in total.

    Counts are spread evenly over the classes, earlier classes taking the remainder; a class whose
    share is 0 (fewer outliers than classes) is left out of the list. A class that needs more than
    one round (keep * select) gets further rounds of fresh candidates around the same boundary
    points; the last round is trimmed. Each class draws from its own generator seeded by
    `class_seed(seed, class_id)`, so the result is deterministic for the seed. Outliers are rescaled
    to the mean norm of their class's embeddings (1 for unit-norm sets).
    """
    if num_outliers < 1:
        raise ConfigError(f"num_outliers must be >= 1, got {num_outliers}")
    num_classes = len(es.class_names)
    classes = list(config.classes) if config.classes is not None else list(range(num_classes))
    unknown = [c for c in classes if c >= num_classes]
    if unknown:
        raise ConfigError(
            f"sampler.classes names {unknown}, but the embedding set has only {num_classes} classes "
            f"(0..{num_classes - 1})"
        )
    results = []
    for class_id, target in zip(classes, split_evenly(num_outliers, len(classes)), strict=True):
        if target == 0:
            continue
        class_embeddings = torch.from_numpy(np.ascontiguousarray(es.for_class(class_id)))  # (N_c, D)
        if class_embeddings.shape[0] < 2:
            raise EmbeddingSetError(
                f"class {class_id} ({es.class_names[class_id]!r}) has {class_embeddings.shape[0]} "
                "embeddings; "
                "boundary sampling needs at least 2"
            )
        anchor_norm = float(class_embeddings.norm(dim=1).mean())
        generator = torch.Generator().manual_seed(class_seed(seed, class_id))
        drawn = _sample(class_embeddings, config, generator, class_id, anchor_norm, min_count=target)
        results.append(
            BoundaryOutliers(
                embeddings=drawn.embeddings[:target],
                boundary_index=drawn.boundary_index[:target],
                knn_distance=drawn.knn_distance[:target],
                class_id=class_id,
            )
        )
        logger.debug("class %d: %d outliers from %d embeddings", class_id, target, class_embeddings.shape[0])
    return results

"""What the fit loop consumes: ID images as normalised tensors, and exactly B outliers per step.

Modules by role: `id_images` (ID tensors, subsets, loaders, augmentation), `streamed` (ID images
decoded in DataLoader workers when a set is too large to hold), `outliers` (the batch
type and the base every outlier source shares: it opens the job's manifest first), `stream`
(`OutlierStream`, shards read through `oal_shared.shards.outlier_pipeline`, resampled and
shuffled, every rank and DataLoader worker drawing its own seeded stream), `memory`
(`InMemoryOutliers`, every sample loaded once), `choice` (which of the two a run uses:
outlier_source=auto holds small jobs), `reduce` (f_ood) and `seeds`.
"""

from oal_trainer.data.choice import SOURCES, OutlierSourceChoice, choose_outlier_source, held_bytes
from oal_trainer.data.id_images import (
    IDTrainSet,
    augment_batch,
    black_pixel,
    id_loader,
    id_train_set,
    slice_benchmark,
    steps_per_epoch,
    subset_indices,
    to_model_input,
)
from oal_trainer.data.memory import InMemoryOutliers
from oal_trainer.data.outliers import (
    ManifestOutliers,
    OutlierBatch,
    OutlierSource,
    OutlierStats,
    ReaderDelta,
    collate_outliers,
    shard_urls,
)
from oal_trainer.data.reduce import reduce_latents, reduced_latent_dim
from oal_trainer.data.seeds import derive_seed, seeded_generator
from oal_trainer.data.stream import OutlierStream, WorkerFailure
from oal_trainer.data.streamed import StreamedImages, image_batches, uint8_batches

__all__ = [
    "SOURCES",
    "IDTrainSet",
    "InMemoryOutliers",
    "ManifestOutliers",
    "OutlierBatch",
    "OutlierSource",
    "OutlierSourceChoice",
    "OutlierStats",
    "OutlierStream",
    "ReaderDelta",
    "StreamedImages",
    "WorkerFailure",
    "augment_batch",
    "black_pixel",
    "choose_outlier_source",
    "collate_outliers",
    "derive_seed",
    "id_loader",
    "id_train_set",
    "held_bytes",
    "image_batches",
    "reduce_latents",
    "reduced_latent_dim",
    "seeded_generator",
    "shard_urls",
    "slice_benchmark",
    "steps_per_epoch",
    "subset_indices",
    "to_model_input",
    "uint8_batches",
]

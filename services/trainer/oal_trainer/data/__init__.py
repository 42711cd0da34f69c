"""What the fit loop consumes: ID images as normalised tensors, and exactly B outliers per step.

Modules by role: `id_images` (ID tensors, subsets, loaders, augmentation), `streamed` (ID images
decoded in DataLoader workers when a set is too large to hold), `outliers` (the batch
type and the base every outlier source shares: it opens the job's manifest first), `stream`
(`OutlierStream`: whole shards, read by `oal_shared.shards.blocks` in a seeded plan, through a
seeded shuffle pool; the same draw with any number of reader workers), `memory`
(`InMemoryOutliers`, every sample loaded once), `choice` (which of the two a run uses:
outlier_source=auto holds small jobs, and the record a resume keeps), `reduce` (f_ood) and `seeds`.
"""

from oal_trainer.data.choice import (
    SOURCES,
    STREAM_DRAW,
    OutlierSourceChoice,
    SourceRecord,
    choose_outlier_source,
    held_bytes,
    read_source_record,
    warn_if_the_stream_draw_changed,
    write_source_record,
)
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
    shard_urls,
)
from oal_trainer.data.reduce import reduce_latents, reduced_latent_dim
from oal_trainer.data.seeds import derive_seed, seeded_generator
from oal_trainer.data.stream import OutlierStream, ReaderDelta, WorkerFailure
from oal_trainer.data.streamed import StreamedImages, image_batches, uint8_batches

__all__ = [
    "SOURCES",
    "STREAM_DRAW",
    "IDTrainSet",
    "InMemoryOutliers",
    "ManifestOutliers",
    "OutlierBatch",
    "OutlierSource",
    "OutlierSourceChoice",
    "OutlierStats",
    "OutlierStream",
    "ReaderDelta",
    "SourceRecord",
    "StreamedImages",
    "WorkerFailure",
    "augment_batch",
    "black_pixel",
    "choose_outlier_source",
    "derive_seed",
    "id_loader",
    "id_train_set",
    "held_bytes",
    "image_batches",
    "reduce_latents",
    "reduced_latent_dim",
    "read_source_record",
    "seeded_generator",
    "shard_urls",
    "slice_benchmark",
    "steps_per_epoch",
    "subset_indices",
    "to_model_input",
    "uint8_batches",
    "warn_if_the_stream_draw_changed",
    "write_source_record",
]

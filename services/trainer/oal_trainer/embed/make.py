"""`oal-train embed`: an embedding set in a Stable Diffusion folder's token space, from ID images.

Stage A for SD (docs/METHOD.md, Stage A: ID embeddings). Two ways to get image features into the
token space, both trained by `align.fit_alignment` against the class-name token rows of
`sd_tokens`:

- `text-aligned` (Dream-OOD): a fresh image encoder (a model of `build_model`, plus a linear map to
  the token width) is trained on ID train images;
- `projected` (OAL): the frozen penultimate features of a trained classifier (a run dir) are mapped
  by a learned linear map.

Then `per_class` ID train images per class (a seeded subset) are embedded into the set, and the
encoder is scored on held-out ID test images: the share whose nearest class row is their own.
The set's `space` is the folder's `sd-token:<hash>`, so a job on another SD folder refuses it; its
`source` is a JSON record of how it was made (method, token ids per class, accuracy).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from oal_shared.data.benchmark import Benchmark, load_benchmark
from oal_shared.data.image_files import ImageFiles, take_images
from oal_shared.embeddings import EmbeddingSet
from oal_shared.errors import ConfigError
from oal_shared.generator_hash import GENERATOR_INFO_FILE
from oal_shared.settings import Settings
from oal_trainer.data.id_images import to_model_input
from oal_trainer.data.seeds import derive_seed
from oal_trainer.distributed import resolve_device
from oal_trainer.embed.align import (
    AlignResult,
    AlignSettings,
    ImageToToken,
    TokenHead,
    embed_inputs,
    feature_dim_of,
    fit_alignment,
    nearest_row_accuracy,
)
from oal_trainer.embed.sd_tokens import TOKEN_REDUCTION, ClassTokens, TokenSpace, class_tokens, load_token_space
from oal_trainer.models import build_model
from oal_trainer.teacher import load_run_model

logger = logging.getLogger(__name__)

METHODS = ("text-aligned", "projected")
# A fresh encoder needs passes over the images; a linear map on cached features trains in seconds.
DEFAULT_EPOCHS = {"text-aligned": 5, "projected": 30}
MADE_BY = "oal-train embed"


@dataclass(frozen=True)
class EmbedConfig:
    """Everything `oal-train embed` takes; checked on construction, errors name the option."""

    generator: Path
    benchmark: str = "fmnist-osr"
    method: str = "text-aligned"
    run: Path | None = None  # the classifier of `projected`
    class_names: tuple[str, ...] = ()  # empty: the benchmark's, in label order
    model: str = "resnet_small"  # the encoder of `text-aligned`
    per_class: int = 500  # ID train images per class embedded into the set
    train_per_class: int | None = 1000  # ID train images per class to train on; None: all
    eval_per_class: int = 200  # held-out ID test images per class for the accuracy
    epochs: int | None = None  # None: DEFAULT_EPOCHS of the method
    lr: float = 1e-3
    batch_size: int = 128
    temperature: float = 0.1
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "projected" and self.run is None:
            raise ConfigError("--run: --method projected maps the features of a trained classifier; name its run dir")
        if self.method == "text-aligned" and self.run is not None:
            raise ConfigError("--run: only --method projected uses a run dir; text-aligned trains its own encoder")
        for option, value in (
            ("--per-class", self.per_class),
            ("--train-per-class", 1 if self.train_per_class is None else self.train_per_class),
            ("--eval-per-class", self.eval_per_class),
            ("--epochs", 1 if self.epochs is None else self.epochs),
            ("--batch-size", self.batch_size),
        ):
            if value < 1:
                raise ConfigError(f"{option}: must be >= 1, got {value}")
        for option, value in (("--lr", self.lr), ("--temperature", self.temperature)):
            if not value > 0:
                raise ConfigError(f"{option}: must be > 0, got {value}")

    @property
    def epochs_to_run(self) -> int:
        return self.epochs if self.epochs is not None else DEFAULT_EPOCHS[self.method]


@dataclass(frozen=True, eq=False)
class EmbedResult:
    embedding_set: EmbeddingSet
    record: dict  # what the set's `source` holds, parsed
    seconds: float  # wall-clock time of the whole command (not in the record, so a rerun gives the same set)


def per_class_rows(labels: np.ndarray, num_classes: int, limit: int | None, seed: int, stream: str) -> np.ndarray:
    """Sorted rows: up to `limit` per class (all when None), a seeded choice within each class."""
    rng = np.random.default_rng(derive_seed(seed, "embed", stream))
    chosen = []
    for cls in range(num_classes):
        rows = np.flatnonzero(labels == cls)
        if limit is not None and rows.size > limit:
            rows = rng.choice(rows, size=limit, replace=False)
        chosen.append(rows)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _class_names(config: EmbedConfig, benchmark: Benchmark) -> tuple[str, ...]:
    if not config.class_names:
        return benchmark.class_names
    if len(config.class_names) != benchmark.num_classes:
        raise ConfigError(
            f"--class-name: {len(config.class_names)} names given, benchmark {benchmark.name!r} has "
            f"{benchmark.num_classes} classes ({', '.join(benchmark.class_names)}); give one per class, in label order"
        )
    return config.class_names


def _check_classes_present(name: str, labels: np.ndarray, class_names: tuple[str, ...]) -> None:
    counts = np.bincount(labels, minlength=len(class_names))
    empty = [class_names[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise ConfigError(f"benchmark set {name!r} has no images of class(es) {empty}")


class PenultimateFeatures(nn.Module):
    """A classifier seen through its penultimate features h (B, F)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, return_feature=True)[1]


@dataclass(frozen=True, eq=False)
class EncoderInputs:
    """What building either encoder needs: the training subset and where the targets lie."""

    config: EmbedConfig
    benchmark: Benchmark
    tokens: TokenSpace
    targets: ClassTokens
    images: np.ndarray | ImageFiles  # uint8 ID train images of the training subset
    labels: np.ndarray  # (N,) int64
    prepare: Callable[[np.ndarray], torch.Tensor]
    device: torch.device
    progress: bool


def _text_aligned_encoder(job: EncoderInputs) -> tuple[nn.Module, AlignResult, dict]:
    config, benchmark, images, prepare = job.config, job.benchmark, job.images, job.prepare
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "embed", "init"))
        backbone = build_model(config.model, benchmark.num_classes, benchmark.in_channels, benchmark.image_size)
        encoder = ImageToToken(backbone, job.tokens.dim, feature_dim_of(backbone, prepare(images[:2])))
    fit = fit_alignment(
        encoder, images, job.labels, prepare, job.targets.targets, _align_settings(config), job.device,
        f"text-aligned ({config.model})", job.progress,
    )  # fmt: skip
    return encoder, fit, {"model": config.model}


def _projected_encoder(job: EncoderInputs) -> tuple[nn.Module, AlignResult, dict]:
    config, benchmark = job.config, job.benchmark
    loaded = load_run_model(config.run, "--run", benchmark.num_classes, benchmark.in_channels, benchmark.image_size)
    run_benchmark = _run_benchmark(config.run)
    if run_benchmark is not None and run_benchmark != config.benchmark:
        raise ConfigError(
            f"--run: {config.run} was trained on benchmark {run_benchmark!r}, not {config.benchmark!r}; "
            "pass the benchmark its classifier knows"
        )
    for param in loaded.model.parameters():
        param.requires_grad_(False)
    features = PenultimateFeatures(loaded.model)
    cached = embed_inputs(features, job.images, job.prepare, config.batch_size, job.device)  # (N, F), once
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "embed", "init"))
        head = TokenHead(int(cached.shape[1]), job.tokens.dim)
    fit = fit_alignment(
        head, cached, job.labels, lambda batch: batch, job.targets.targets, _align_settings(config), job.device,
        f"projected ({loaded.model_name})", job.progress,
    )  # fmt: skip
    record = {"run": str(config.run), "model": loaded.model_name, "run_weights_sha256": loaded.weights_sha256}
    return nn.Sequential(features, head), fit, record


ENCODERS = {"text-aligned": _text_aligned_encoder, "projected": _projected_encoder}


def _run_benchmark(run_dir: Path) -> str | None:
    try:
        return json.loads((Path(run_dir) / "config.json").read_text()).get("benchmark")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None  # load_run_model has named what is wrong with the run dir already


def _align_settings(config: EmbedConfig) -> AlignSettings:
    return AlignSettings(
        epochs=config.epochs_to_run,
        lr=config.lr,
        batch_size=config.batch_size,
        temperature=config.temperature,
        seed=config.seed,
    )


def _registered_space(folder: Path) -> tuple[str | None, str | None]:
    """(id, space) from the folder's oal_generator.json when it has one: what the synthesis service lists."""
    try:
        info = json.loads((folder / GENERATOR_INFO_FILE).read_text(encoding="utf-8"))
        return info.get("id"), info.get("space")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None, None


def make_embedding_set(config: EmbedConfig, settings: Settings | None = None, progress: bool = False) -> EmbedResult:
    """Train the chosen encoder, embed `per_class` ID train images per class, score it on ID test images."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    tokens = load_token_space(config.generator)
    generator_id, registered = _registered_space(tokens.folder)
    if registered and registered != tokens.space:
        logger.warning(
            "%s: oal_generator.json says space %s, the weights give %s; run `oal-synth register-sd` again, "
            "or jobs will refuse this set",
            tokens.folder, registered, tokens.space,
        )  # fmt: skip
    benchmark = load_benchmark(config.benchmark, settings)
    names = _class_names(config, benchmark)
    targets = class_tokens(tokens, names)
    train_set, test_set = benchmark.id_train, benchmark.id_test
    _check_classes_present(train_set.name, train_set.labels, names)

    def prepare(images: np.ndarray) -> torch.Tensor:
        return to_model_input(images, benchmark.mean, benchmark.std)

    def subset(image_set, limit: int | None, stream: str) -> tuple[np.ndarray | ImageFiles, np.ndarray]:
        rows = per_class_rows(image_set.labels, len(names), limit, config.seed, stream)
        # Image files stay on disk (decoded a batch at a time); an array's rows are a uint8 copy.
        return take_images(image_set.images, rows), np.asarray(image_set.labels[rows], dtype=np.int64)

    train_images, train_labels = subset(train_set, config.train_per_class, "train")
    job = EncoderInputs(config, benchmark, tokens, targets, train_images, train_labels, prepare, device, progress)
    encoder, fit, encoder_record = ENCODERS[config.method](job)
    num_train = int(train_labels.shape[0])
    del job, train_images  # the uint8 training subset is not needed any more
    test_images, test_labels = subset(test_set, config.eval_per_class, "held-out")
    held_out = embed_inputs(encoder, test_images, prepare, config.batch_size, device)
    accuracy = nearest_row_accuracy(held_out, torch.from_numpy(test_labels), targets.targets)
    set_images, set_labels = subset(train_set, config.per_class, "set")
    vectors = embed_inputs(encoder, set_images, prepare, config.batch_size, device)
    record = {
        "made_by": MADE_BY,
        "method": config.method,
        "generator": str(tokens.folder.resolve()),
        "generator_id": generator_id,
        "space": tokens.space,
        "benchmark": config.benchmark,
        "class_tokens": targets.as_json(),
        "class_target": TOKEN_REDUCTION,
        "encoder": encoder_record,
        "temperature": config.temperature,
        "epochs": config.epochs_to_run,
        "lr": config.lr,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "train_images": num_train,
        "train_steps": fit.steps,
        "per_class": config.per_class,
        "final_loss": round(fit.last_loss, 6),
        "held_out_set": test_set.name,
        "held_out_images": int(test_labels.shape[0]),
        "nearest_row_accuracy": round(accuracy, 6),
        "set_nearest_row_accuracy": round(
            nearest_row_accuracy(vectors, torch.from_numpy(set_labels), targets.targets), 6
        ),
        "chance": round(1.0 / len(names), 6),
    }
    embedding_set = EmbeddingSet(
        embeddings=vectors.numpy().astype(np.float32),
        labels=set_labels,
        space=tokens.space,
        class_names=names,
        source=json.dumps(record, sort_keys=True),
    )
    seconds = time.perf_counter() - started
    logger.info(
        "embedding set: %d vectors, space %s, held-out nearest-row accuracy %.3f (%d images), %.1f s",
        len(embedding_set), tokens.space, accuracy, record["held_out_images"], seconds,
    )  # fmt: skip
    return EmbedResult(embedding_set=embedding_set, record=record, seconds=seconds)

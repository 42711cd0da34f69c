"""One typed config per training run, the named recipes and presets, and how overrides apply.

A run's config is resolved in layers, each one validated:

    TrainConfig defaults -> recipe -> preset (per recipe) -> --config FILE (JSON) -> --set key=value

and saved whole as `config.json` in the run dir, so `--config run/config.json` repeats a run.
Every weight, learning rate and count of Stage D (docs/METHOD.md, Stage D) is a field here.
"""

from __future__ import annotations

import difflib
import functools
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from oal_shared.errors import ConfigError

RECIPES = ("ce", "kd", "oal", "oal-energy", "latent-energy", "pixel-oe")
PRESETS = ("smoke", "demo", "full")

# Fields that change how a run executes but not what it computes: a run may resume with other values.
RUNTIME_FIELDS = frozenset(
    {
        "device",
        "threads",
        "log_interval",
        "num_workers",
        "cache_dir",
        "evaluate",
        "eval_subset",
        "eval_scorers",
        "eval_batch_size",
        "tensorboard",
        "allow_pickle_weights",  # a permission to read a file, not a change to what is computed
        "compile",  # the same operations, fused: a run may resume compiled or not (docs/GPU.md)
        "outlier_workers",  # where shards are read; the stream's draw does not depend on it (data/stream.py)
    }
)


class TrainConfig(BaseModel):
    """Everything that shapes one training run. Weights named w_* multiply one loss term each."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)

    # What is trained on what
    recipe: Literal["ce", "kd", "oal", "oal-energy", "latent-energy", "pixel-oe"] = Field(
        "ce", description="Recipe name."
    )
    preset: Literal["smoke", "demo", "full"] | None = Field(None, description="Preset applied, if any.")
    benchmark: str = Field(
        "fmnist-osr", description="Benchmark id (oal_shared.data.benchmark.BENCHMARKS) or a benchmark .toml/.json file."
    )
    model: str = Field("resnet_small", description="Student architecture (oal_trainer.models.MODEL_NAMES).")
    seed: int = Field(
        0, ge=0, description="Seeds the weights this run initialises, and data_seed / outlier_seed when they are null."
    )
    data_seed: int | None = Field(
        None, ge=0, description="Seeds the ID train subset, the ID order and the augmentation; seed if null."
    )
    outlier_seed: int | None = Field(None, ge=0, description="Seeds which outliers each step draws; seed if null.")

    # ID data
    train_subset: int | None = Field(None, ge=1, description="Train on this many ID images (seeded); all if null.")
    eval_subset: int | None = Field(None, ge=1, description="Evaluate on this many images per set; all if null.")
    batch_size: int = Field(128, ge=2, description="ID images per step (B).")
    augment: bool = Field(True, description="Random crop with padding and horizontal flip on ID train images.")
    crop_padding: int = Field(2, ge=0, le=16, description="Zero padding (pixels) before the random crop.")
    hflip: bool = Field(True, description="Random horizontal flip (p=0.5) when augment is on.")
    num_workers: int = Field(
        0, ge=0, description="DataLoader workers for held ID tensors (streamed sets use OAL_ID_STREAM_WORKERS)."
    )

    # Optimisation (docs/METHOD.md, Stage D: SGD nesterov, momentum 0.9, wd 5e-4, cosine per step)
    epochs: int = Field(100, ge=1, description="Passes over the ID train set.")
    lr: float = Field(0.1, gt=0, description="Student learning rate (peak of the cosine schedule).")
    lr_adapter: float = Field(0.01, gt=0, description="Learning rate of the feature adapter DT.")
    lr_club: float = Field(1e-4, gt=0, description="Learning rate of the CLUB q-networks.")
    lr_projector: float = Field(0.01, gt=0, description="Learning rate of the outlier projector P.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    nesterov: bool = Field(True, description="Nesterov momentum.")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps before the cosine decay.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a fraction of each peak lr.")

    # Loss weights and their settings
    w_ce: float = Field(1.0, ge=0, description="Cross-entropy on ID labels.")
    w_logit_kd: float = Field(0.0, ge=0, description="Logit KD, KL(softmax(z_t/T) || softmax(z_s/T)) T^2.")
    kd_temperature: float = Field(1.0, gt=0, description="Temperature T of logit KD.")
    w_feature_kd: float = Field(0.0, ge=0, description="Feature KD, KL(softmax(DT(h_t)) || softmax(h_s)).")
    w_club_emb: float = Field(0.0, ge=0, description="CLUB(outlier embedding v, h_s), MICL on embeddings.")
    w_club_latent: float = Field(0.0, ge=0, description="CLUB(f_ood, h_s), MICL on reduced outlier latents.")
    club_hidden: int = Field(256, ge=1, description="Hidden width of each CLUB q-network MLP.")
    club_mode: Literal["joint", "alternating"] = Field(
        "alternating",
        description="joint: reference (q minimises the bound); alternating: CLUB paper (q fit by ML).",
    )
    latent_reduce: Literal["flatten", "mean_ch_h"] = Field(
        "flatten",
        description="Latent (C,H,W) -> f_ood: flatten all, or the reference's mean over C and H (-> W).",
    )
    w_energy: float = Field(0.0, ge=0, description="Energy regulariser (Liu et al. 2020) on ID vs outlier logits.")
    energy_m_in: float = Field(-10.0, description="ID energy margin: E(x_in) above it is penalised.")
    energy_m_out: float = Field(-5.0, description="Outlier energy margin: E(x_out) below it is penalised.")
    w_oe: float = Field(0.0, ge=0, description="Outlier exposure: cross-entropy of outlier logits to uniform.")

    # Outliers
    shards: str | None = Field(None, description="Folder of outlier shards (outliers-*.tar + manifest.json).")
    outlier_source: Literal["auto", "stream", "memory"] = Field(
        "auto",
        description="stream: webdataset pipeline over the shards; memory: load all once; "
        "auto: memory when the job's samples fit in OAL_OUTLIER_IN_MEMORY_MAX_MB, else stream.",
    )
    outlier_batch_size: int | None = Field(None, ge=1, description="Outliers per step; null = batch_size (B).")
    outlier_space: Literal["latent", "pixel"] = Field(
        "latent", description="latent: use z0 as is (OAL); pixel: decode with the generator's VAE (pixel-oe)."
    )
    outlier_workers: int | None = Field(
        None,
        ge=0,
        description="DataLoader worker processes reading shards (stream); 0 reads in the training process; "
        "null: 0 on the CPU, where a reader process takes cores from the training threads, 1 on a GPU.",
    )
    shuffle_buffer: int = Field(1000, ge=0, description="Outlier shuffle buffer (samples).")
    on_bad_shard: Literal["raise", "skip"] = Field("raise", description="A corrupt shard stops the run or is skipped.")
    pixel_decode: Literal["precompute", "per_step"] = Field(
        "precompute", description="pixel space: decode every outlier once (cached) or each batch live."
    )
    generator_dir: str | None = Field(None, description="Generator folder whose vae/ decodes latents (pixel space).")

    # Teacher and initialisation
    teacher_run: str | None = Field(None, description="Run dir of a finished `ce` run whose model is the teacher.")
    teacher_mode: Literal["cache", "live"] = Field(
        "cache", description="cache: teacher outputs on un-augmented images, computed once; live: every step."
    )
    init_from: str | None = Field(None, description="Run dir of a finished `ce` run whose weights start the student.")
    # Your own model (docs/TRAINER.md): torchvision / timm weights from a local file, never downloaded.
    model_stem: Literal["auto", "imagenet", "cifar"] = Field(
        "auto", description="torchvision models: cifar = stride-1 first conv, no max-pool; auto: cifar below 64 px."
    )
    init_weights: str | None = Field(
        None, description="Weights file (.safetensors state dict) that starts the student; another head is re-made."
    )
    teacher_weights: str | None = Field(
        None, description="Weights file of a trained teacher, instead of teacher_run; needs teacher_model."
    )
    teacher_model: str | None = Field(None, description="Architecture of teacher_weights (a model name).")
    teacher_stem: Literal["auto", "imagenet", "cifar"] = Field(
        "auto", description="model_stem of teacher_weights: the stem it was trained with."
    )
    allow_pickle_weights: bool = Field(
        False, description="Read .pth/.pt/.bin weights (pickles can run code) with torch.load(weights_only=True)."
    )

    # Execution
    cache_dir: str | None = Field(
        None, description="Teacher outputs and decoded outliers are cached here; null = <artifact_dir>/trainer-cache."
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    threads: int | None = Field(
        None, ge=1, description="Torch CPU threads; null = OAL_TORCH_THREADS or torch's default."
    )
    channels_last: bool = Field(True, description="channels_last memory format (15-30% faster convs on CPU).")
    amp: Literal["off", "bf16", "fp16"] = Field(
        "off",
        description="Mixed precision of the fit step (oal_trainer.precision): autocast in bf16, or fp16 with a "
        "GradScaler (CUDA only); losses stay float32. docs/GPU.md says when it pays.",
    )
    compile: bool = Field(
        False, description="torch.compile the student (and a live teacher): compile time first, faster steps after."
    )
    log_interval: int = Field(50, ge=1, description="Steps between log lines.")
    evaluate: bool = Field(True, description="Evaluate into the run dir after training (Stage E).")
    eval_scorers: tuple[str, ...] = Field(("energy", "msp", "max_logit"), min_length=1, description="OOD scores.")
    eval_batch_size: int = Field(512, ge=1, description="Images per evaluation forward pass.")
    tensorboard: bool = Field(True, description="Also write TensorBoard event files into the run dir, if installed.")

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        problems = []
        if (self.w_logit_kd > 0 or self.w_feature_kd > 0) and not (self.teacher_run or self.teacher_weights):
            problems.append("teacher_run: required when w_logit_kd or w_feature_kd > 0 (or teacher_weights)")
        problems += self._weights_problems()
        if self.uses_outliers and not self.shards:
            problems.append("shards: required when w_club_emb, w_club_latent, w_energy or w_oe > 0")
        if self.outlier_space == "pixel" and not self.generator_dir:
            problems.append("generator_dir: required when outlier_space is pixel (its vae/ decodes the latents)")
        if self.teacher_mode == "cache" and self.augment and self.uses_teacher:
            problems.append("augment: a cached teacher saw un-augmented images; set augment=false or teacher_mode=live")
        if self.nesterov and self.momentum == 0:
            problems.append("nesterov: needs momentum > 0; set nesterov=false or a momentum")
        if self.energy_m_in >= self.energy_m_out:
            problems.append(f"energy_m_in ({self.energy_m_in}) must be below energy_m_out ({self.energy_m_out})")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _weights_problems(self) -> list[str]:
        problems = []
        if self.init_from and self.init_weights:
            problems.append("init_weights: give init_from (a run dir) or init_weights (a file), not both")
        if self.teacher_run and self.teacher_weights:
            problems.append("teacher_weights: give teacher_run (a run dir) or teacher_weights (a file), not both")
        if self.teacher_weights and not self.teacher_model:
            problems.append("teacher_model: required with teacher_weights (the architecture the file is for)")
        if self.teacher_model and not self.teacher_weights:
            problems.append("teacher_model: only with teacher_weights (a teacher_run names its own model)")
        return problems

    @property
    def uses_teacher(self) -> bool:
        return self.w_logit_kd > 0 or self.w_feature_kd > 0

    @property
    def uses_outliers(self) -> bool:
        return any(w > 0 for w in (self.w_club_emb, self.w_club_latent, self.w_energy, self.w_oe))

    @property
    def outliers_per_step(self) -> int:
        return self.outlier_batch_size or self.batch_size

    @property
    def effective_data_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def effective_outlier_seed(self) -> int:
        return self.seed if self.outlier_seed is None else self.outlier_seed

    def resume_key(self) -> dict[str, Any]:
        """The fields a checkpoint must agree on before a run may resume from it."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in RUNTIME_FIELDS}

    @classmethod
    def resume_key_defaults(cls) -> dict[str, Any]:
        """Each resume-key field's default, for checkpoints written before a field existed."""
        return {
            name: field.default
            for name, field in cls.model_fields.items()
            if name not in RUNTIME_FIELDS and not field.is_required()
        }


# Recipes: what each one adds to the defaults (docs/METHOD.md, Stage D). Fine-tuning recipes start from a `ce`
# run (init_from) at the reference's small lr and see clean images, matching a cached teacher.
_FINE_TUNE = {"lr": 0.005, "augment": False}
_KD = {**_FINE_TUNE, "w_logit_kd": 4.0, "w_feature_kd": 8.0}
_OAL = {**_KD, "w_club_emb": 0.1, "w_club_latent": 0.2}
RECIPE_OVERRIDES: dict[str, dict[str, Any]] = {
    "ce": {"lr": 0.1},
    "kd": _KD,
    "oal": _OAL,
    # Outliers have no pixels, so their logits come from the student's head on a projection of f_ood.
    "oal-energy": {**_OAL, "w_energy": 0.1},
    # The same energy term on projected latents without the teacher or MICL: the recipe the full
    # study supports when the teacher is no better than the student (docs/RESULTS.md).
    "latent-energy": {**_FINE_TUNE, "w_energy": 0.1},
    # Decode the same latents to pixels; the student sees them as images (outlier exposure + energy).
    "pixel-oe": {**_FINE_TUNE, "outlier_space": "pixel", "w_oe": 0.5, "w_energy": 0.1},
}

# Presets size a run. smoke: seconds, a small slice; demo: the embedded benchmark in minutes on 2 CPU
# cores (docs/BENCHMARKS.md speeds); full: the paper's 100 epochs, augmentation and a live teacher.
PRESET_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "smoke": {
        recipe: {"epochs": 1, "train_subset": 512, "eval_subset": 256, "batch_size": 64, "log_interval": 2}
        # 8 steps draw 512 outliers: decoding them as they come beats decoding a whole job first.
        | ({"pixel_decode": "per_step"} if recipe == "pixel-oe" else {})
        for recipe in RECIPES
    },
    "demo": {
        "ce": {"epochs": 3, "batch_size": 128, "log_interval": 50},
        **{recipe: {"epochs": 1, "batch_size": 128, "log_interval": 50} for recipe in RECIPES if recipe != "ce"},
    },
    "full": {
        "ce": {"epochs": 100, "batch_size": 128},
        **{
            recipe: {"epochs": 100, "batch_size": 128, "augment": True, "teacher_mode": "live"}
            for recipe in RECIPES
            if recipe != "ce"
        },
    },
}


def _validated(values: dict[str, Any], source: str) -> TrainConfig:
    unknown = [key for key in values if key not in TrainConfig.model_fields]
    if unknown:
        raise ConfigError(f"{source}: {_unknown_key_message(unknown[0])}")
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_validation_message(exc)}") from exc


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, TrainConfig.model_fields, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(TrainConfig.model_fields)}"
    return f"unknown config key {key!r}{hint}"


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        # Cross-field checks have no location; their messages start with the field they blame.
        parts.append(f"{'.'.join(str(p) for p in error['loc'])}: {message}" if error["loc"] else message)
    return "; ".join(parts)


def resolve_config(
    recipe: str,
    preset: str | None = None,
    config_file: Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> TrainConfig:
    """Build a run's config from the layers in the module docstring; errors name the key and layer."""
    if recipe not in RECIPES:
        raise ConfigError(f"recipe: unknown {recipe!r}; known recipes: {', '.join(RECIPES)}")
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"preset: unknown {preset!r}; known presets: {', '.join(PRESETS)}")
    values: dict[str, Any] = {"recipe": recipe, **RECIPE_OVERRIDES[recipe]}
    if preset is not None:
        values.update({"preset": preset, **PRESET_OVERRIDES[preset][recipe]})
    if config_file is not None:
        values.update(_read_config_file(config_file))
        if values.get("recipe") != recipe:
            raise ConfigError(f"{config_file}: recipe is {values.get('recipe')!r} but --recipe is {recipe!r}")
    for item in overrides:
        key, value = parse_override(item)
        values[key] = value
    return _validated(values, "config")


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` -> (key, value) with the value typed for the field; errors name the key."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key=value")
    if key not in TrainConfig.model_fields:
        raise ConfigError(f"--set {key}: {_unknown_key_message(key)}")
    return key, _typed_value(key, raw.strip())


def _typed_value(key: str, raw: str) -> Any:
    """Try the raw string (pydantic coerces '5', '0.1', 'true', paths), then JSON, then an a,b,c list."""
    if raw.lower() in {"null", "none", ""}:
        return None
    candidates: list[Any] = [raw]
    try:
        candidates.append(json.loads(raw))
    except json.JSONDecodeError:
        pass
    if not raw.startswith("["):
        candidates.append([part.strip() for part in raw.split(",")])  # list fields: a,b,c or one value
    probe = _field_adapter(key)
    messages = []
    for candidate in candidates:
        try:
            probe.validate_python(candidate)
            return candidate
        except ValidationError as exc:
            messages.append("; ".join(error["msg"] for error in exc.errors()))
    raise ConfigError(f"--set {key}={raw}: {messages[0]}")  # the raw string's complaint reads best


@functools.cache
def _field_adapter(key: str) -> TypeAdapter:
    """Validates one field's value with its constraints (ge, gt, Literal), without cross-field checks."""
    field = TrainConfig.model_fields[key]
    return TypeAdapter(Annotated[field.annotation, field])


def _read_config_file(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"--config {path}: no such file") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--config {path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of config keys, got {type(data).__name__}")
    unknown = [key for key in data if key not in TrainConfig.model_fields]
    if unknown:
        raise ConfigError(f"--config {path}: {_unknown_key_message(unknown[0])}")
    return data


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")


def load_config(path: Path) -> TrainConfig:
    """The config a run dir recorded; errors name the file."""
    data = _read_config_file(path)
    return _validated(data, str(path))

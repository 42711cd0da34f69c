"""The pretraining config of the embedded generator: `PretrainConfig`, its presets, and overrides.

Overrides come as keyword arguments (`with_overrides`) or as the `key=value` items of
`oal-synth pretrain --set` (`parse_overrides`, typed like the preset's field). No torch here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from oal_shared.errors import ConfigError

__all__ = ["PRESETS", "PretrainConfig", "parse_overrides", "with_overrides"]


@dataclass(frozen=True)
class PretrainConfig:
    """Every size, step count and rate of the three trainings. Use `PretrainConfig.preset(name)`."""

    name: str = "custom"  # the preset it came from
    seed: int = 0
    train_images: int | None = 18_000  # cap on ID train images (evenly per class); None: all 36,000
    # 1. condition encoder
    encoder_widths: tuple[int, ...] = (32, 64)
    embed_dim: int = 64
    temperature: float = 0.1
    encoder_steps: int = 150
    encoder_batch: int = 128
    encoder_lr: float = 3e-3
    # 2. VAE
    vae_widths: tuple[int, ...] = (16, 32, 32)
    vae_steps: int = 130
    vae_batch: int = 128
    vae_lr: float = 2e-3
    kl_weight: float = 1e-4  # per latent element, against the per-pixel MSE in [-1, 1] units
    # 3. UNet
    unet_widths: tuple[int, ...] = (32, 64)
    unet_steps: int = 260
    unet_batch: int = 128
    unet_lr: float = 1e-3
    cond_dropout: float = 0.1  # fraction of conditions zeroed: the unconditional token of CFG
    warmup_steps: int = 10  # linear warm-up of every learning rate, then cosine decay
    eval_images: int = 2000  # ID test images for the accuracy and reconstruction report

    @classmethod
    def preset(cls, name: str) -> PretrainConfig:
        if name not in PRESETS:
            raise ConfigError(f"pretrain preset must be one of {', '.join(PRESETS)}, got {name!r}")
        return PRESETS[name]

    def __post_init__(self) -> None:
        for field in ("encoder_steps", "vae_steps", "unet_steps", "encoder_batch", "vae_batch", "unet_batch"):
            if getattr(self, field) < 1:
                raise ConfigError(f"pretrain config {field} must be >= 1, got {getattr(self, field)}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ConfigError(f"pretrain config cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if self.train_images is not None and self.train_images < 12:
            raise ConfigError(f"pretrain config train_images must be >= 12 (2 per class), got {self.train_images}")

    def to_json(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


PRESETS: dict[str, PretrainConfig] = {
    # Seconds, for tests: small models, few images, a handful of steps. The output means nothing.
    "smoke": PretrainConfig(
        name="smoke",
        train_images=384,
        encoder_widths=(8, 16),
        encoder_steps=4,
        encoder_batch=64,
        vae_widths=(8, 16, 16),
        vae_steps=3,
        vae_batch=32,
        unet_widths=(16, 32),
        unet_steps=3,
        unet_batch=32,
        warmup_steps=1,
        eval_images=64,
    ),
    # The product default: about 4 minutes on 2 idle cores, sized from the step times in docs/BENCHMARKS.md
    # (VAE 1.0 s and UNet 0.9 s per batch-256 step): encoder ~15 s, VAE ~65 s, UNet ~120 s, and
    # embedding / encoding 18,000 images ~15 s.
    "demo": PretrainConfig(name="demo"),
    # Five times the demo's steps on all 36,000 images: about 20 minutes on 2 idle cores.
    "full": PretrainConfig(
        name="full", train_images=None, encoder_steps=600, vae_steps=650, unet_steps=1300, warmup_steps=50
    ),
}


def with_overrides(config: PretrainConfig, **overrides) -> PretrainConfig:
    """A preset with some fields changed (CLI flags), validated again."""
    unknown = sorted(set(overrides) - set(asdict(config)))
    if unknown:
        raise ConfigError(f"unknown pretrain config fields: {unknown}")
    return replace(config, **overrides)


def parse_overrides(config: PretrainConfig, items: list[str]) -> dict:
    """`key=value` items (`--set`) typed like the preset's value of each key; errors name the item."""
    current, overrides = asdict(config), {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value")
        if key not in current:
            raise ConfigError(f"--set {item!r}: unknown pretrain field {key!r}; known: {', '.join(current)}")
        kind = type(current[key]) if current[key] is not None else int
        try:
            if kind is tuple:
                overrides[key] = tuple(type(current[key][0])(part) for part in text.split(","))
            else:
                overrides[key] = (text.lower() in ("1", "true", "yes")) if kind is bool else kind(text)
        except ValueError:
            raise ConfigError(f"--set {item!r}: {key} must be {kind.__name__}") from None
    return overrides

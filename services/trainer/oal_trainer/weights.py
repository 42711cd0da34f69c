"""Weights from a local file into a model: torchvision / timm state dicts, or a run's model.safetensors.

Files are safetensors. Pickled checkpoints (.pth, .pt, .bin, .ckpt) can run code when loaded, so
they are refused unless the config says `allow_pickle_weights=true`, and even then are read with
`torch.load(weights_only=True)`; the error says how to convert them once.

A state dict saved from the plain library model (e.g. `torchvision.models.resnet18(weights=...)`)
is translated to the wrapped layout (`LibraryModel.to_model_key`). What may differ, and is said in
the log: the classifier head (another number of classes: re-initialised, where the caller allows
it), an RGB first convolution loaded into a grey model (summed over its input channels), ViT
position embeddings made for another image size (resampled), a `module.` prefix (a DDP save).
Anything else that does not fit (missing or unexpected tensors, other shapes) is an error naming
the file, the tensor and both shapes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from oal_shared.errors import ConfigError
from oal_trainer.checkpoint import CheckpointError, read_safetensors, sha256_file
from oal_trainer.models import LibraryModel

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
MAX_LISTED = 5  # problems named in one error; the rest are counted
# Where training scripts commonly nest the state dict inside a pickled checkpoint.
NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model")


@dataclass(frozen=True)
class WeightsFit:
    """What loading a weights file did."""

    path: Path
    sha256: str
    tensors: int  # tensors loaded from the file
    head_reinitialised: bool
    adapted: tuple[str, ...]  # what was adapted, in words


def read_state_dict(path: Path, field: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a weights file; errors name `field` and the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{field}: {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        try:
            state, _ = read_safetensors(path)
        except CheckpointError as exc:
            raise ConfigError(f"{field}: {exc}") from exc
        return _strip_ddp_prefix(state, path)
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ConfigError(_pickle_refusal(field, path))
        return _strip_ddp_prefix(_read_pickle(path, field), path)
    raise ConfigError(
        f"{field}: {path}: expected a {SAFETENSORS_SUFFIX} file "
        f"(or {', '.join(PICKLE_SUFFIXES)} with allow_pickle_weights=true)"
    )


def _pickle_refusal(field: str, path: Path) -> str:
    target = path.with_suffix(SAFETENSORS_SUFFIX)
    return (
        f"{field}: {path} is a pickle file; loading a pickle can run code hidden in it. Convert it once: "
        f'python -c "import torch; from safetensors.torch import save_file; '
        f"save_file(torch.load('{path}', weights_only=True), '{target}')\" "
        f"(if it holds a dict with a 'state_dict' entry, save that entry), then point {field} at {target}. "
        "Or set allow_pickle_weights=true to read it with torch.load(weights_only=True)."
    )


def _read_pickle(path: Path, field: str) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError ... for a bad file
        raise ConfigError(f"{field}: {path}: torch.load(weights_only=True) could not read it ({exc})") from exc
    if isinstance(loaded, dict):
        for key in NESTED_STATE_KEYS:
            if isinstance(loaded.get(key), dict):
                logger.info("%s: reading the state dict under %r of %s", field, key, path)
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ConfigError(f"{field}: {path}: holds no state dict (a dict of tensor names to tensors)")
    return loaded


def _strip_ddp_prefix(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    if state and all(key.startswith("module.") for key in state):
        logger.info("%s: tensor names start with 'module.' (a DDP save); reading them without it", path)
        return {key.removeprefix("module."): value for key, value in state.items()}
    return state


def _in_model_layout(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """model key -> file key. A library model's file may be in the library's layout or in ours."""
    if not isinstance(model, LibraryModel) or all(k.startswith(("backbone.", "head.")) for k in state):
        return {key: key for key in state}
    return {model.to_model_key(key): key for key in state}


def _shape(tensor: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if tensor is None else tuple(tensor.shape)


def _mismatch(file_key: str, in_file: torch.Tensor | None, in_model: torch.Tensor) -> str:
    if in_file is None:
        return f"{file_key} is missing from the file (the model has {_shape(in_model)})"
    return f"{file_key} is {_shape(in_file)} in the file, {_shape(in_model)} in the model"


def _grey_first_conv(
    model: nn.Module, key: str, tensor: torch.Tensor, wanted: torch.Tensor
) -> tuple[torch.Tensor, str]:
    """An RGB first convolution (O, 3, k, k) for a grey model (O, 1, k, k): summed over the input channels,
    so the grey model computes what the RGB one computes on the grey image repeated three times."""
    if key != getattr(model, "first_conv_key", None) or tensor.ndim != 4 or wanted.ndim != 4:
        return tensor, ""
    if tensor.shape[1] == 3 and wanted.shape[1] == 1 and tensor.shape[0] == wanted.shape[0]:
        return tensor.sum(
            dim=1, keepdim=True
        ), "the first convolution's RGB weights are summed over their input channels"
    return tensor, ""


def _resampled_positions(
    model: nn.Module, key: str, tensor: torch.Tensor, wanted: torch.Tensor
) -> tuple[torch.Tensor, str]:
    """ViT position embeddings for another patch grid (weights made at 224 px, images of 64): resampled
    to this grid by the library's own function, the class token's kept, as fine-tuning at a new size does."""
    if not isinstance(model, LibraryModel) or key != model.position_key or model.resample_positions is None:
        return tensor, ""
    if tensor.ndim != 3 or tensor.shape == wanted.shape or tensor.shape[::2] != wanted.shape[::2]:
        return tensor, ""
    old_side, new_side = (math.isqrt(n - model.prefix_tokens) for n in (tensor.shape[1], wanted.shape[1]))
    if old_side**2 + model.prefix_tokens != tensor.shape[1] or new_side**2 + model.prefix_tokens != wanted.shape[1]:
        return tensor, ""
    resampled = model.resample_positions(tensor, new_side)
    return resampled, f"position embeddings resampled from a {old_side}x{old_side} to a {new_side}x{new_side} grid"


def fit_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], path: Path, field: str, *, reinit_head: bool
) -> tuple[int, bool, tuple[str, ...]]:
    """Load `state` into `model` in place; returns (tensors loaded, head re-initialised, adaptations).

    `reinit_head`: a head of another size (or none in the file) keeps the model's fresh one; without
    it, the head must fit like every other tensor (a teacher must know this benchmark's classes).
    """
    target = model.state_dict()
    file_keys = _in_model_layout(model, state)  # model key -> file key
    name = getattr(model, "name", type(model).__name__)

    def file_key(model_key: str) -> str:
        if model_key in file_keys:
            return file_keys[model_key]
        return model.to_source_key(model_key) if isinstance(model, LibraryModel) else model_key

    def in_file(model_key: str) -> torch.Tensor | None:
        return state[file_keys[model_key]] if model_key in file_keys else None

    head_keys = sorted(key for key in target if key.startswith("head."))
    head_fits = all(_shape(in_file(key)) == _shape(target[key]) for key in head_keys)
    problems: list[str] = []
    adapted: list[str] = []
    if not head_fits and reinit_head:
        shapes = (
            f"{file_key(k)} {_shape(in_file(k)) or 'absent'} in the file, {_shape(target[k])} here" for k in head_keys
        )
        adapted.append(f"the classifier head does not fit ({', '.join(shapes)}): re-initialised, the rest loaded")
    loaded: dict[str, torch.Tensor] = {}
    for key, wanted in target.items():
        if key in head_keys and not head_fits:
            if not reinit_head:
                problems.append(_mismatch(file_key(key), in_file(key), wanted))
            loaded[key] = wanted  # the fresh initialisation
            continue
        tensor = in_file(key)
        if tensor is None:
            problems.append(_mismatch(file_key(key), None, wanted))
            continue
        for adapt in (_grey_first_conv, _resampled_positions):
            tensor, note = adapt(model, key, tensor, wanted)
            if note:
                adapted.append(note)
        if _shape(tensor) != _shape(wanted):
            problems.append(_mismatch(file_key(key), tensor, wanted))
            continue
        loaded[key] = tensor.to(dtype=wanted.dtype)
    problems += [f"{file_keys[k]} is in the file but not in the model" for k in sorted(file_keys) if k not in target]
    if problems:
        if not head_fits and not reinit_head:
            problems.insert(0, f"the classifier must have been trained on this benchmark's {model.num_classes} classes")
        listed = "; ".join(problems[:MAX_LISTED])
        more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise ConfigError(f"{field}: {path} does not fit {name}: {listed}{more}")
    model.load_state_dict(loaded, strict=True)
    for note in adapted:
        logger.info("%s: %s: %s", field, path, note)
    return len(loaded) - (0 if head_fits else len(head_keys)), not head_fits, tuple(adapted)


def load_weights_file(
    model: nn.Module, path: Path, field: str, *, allow_pickle: bool = False, reinit_head: bool = False
) -> WeightsFit:
    """Read a weights file and load it into `model` (fit_state_dict); errors name `field` and the file."""
    path = Path(path)
    state = read_state_dict(path, field, allow_pickle)
    tensors, head_reinitialised, adapted = fit_state_dict(model, state, path, field, reinit_head=reinit_head)
    logger.info("%s: loaded %d tensors from %s", field, tensors, path)
    return WeightsFit(path, sha256_file(path), tensors, head_reinitialised, adapted)

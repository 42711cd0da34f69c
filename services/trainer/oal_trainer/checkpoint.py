"""Checkpoints and final weights as safetensors, never pickles.

A training checkpoint is ONE safetensors file, so replacing it is atomic (oal_shared.fsio):
- tensors: each module's state dict under "<module>/<name>", each optimiser's per-parameter state
  under "optim/<optimiser>/<param index>/<key>";
- metadata "state": JSON with the scalars (epoch, global step, the optimisers' param groups and
  any non-tensor per-parameter state, the lr schedulers' state dicts, the fp16 GradScaler's state)
  and "resume_key": the config fields a resume must agree on.

Modules are saved by their own state dict: a student compiled in place (`nn.Module.compile`,
config `compile`) has the same keys as an uncompiled one, so either loads the other's checkpoint.

Final weights (`model.safetensors`) hold the bare model state dict; metadata names the architecture.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from oal_shared.errors import OALError
from oal_shared.fsio import atomic_path

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "last.safetensors"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINT_SCHEMA_VERSION = 2  # 2: one optimiser per trained part, lr schedulers saved


class CheckpointError(OALError, ValueError):
    """A checkpoint or weights file is missing, unreadable, or does not fit the run; names the file."""


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """`tensors` (contiguous, unshared) and `metadata` as one safetensors file, replaced atomically.

    A failed write (a full disk) leaves the old file as it was and raises CheckpointError naming `path`:
    safetensors' own error names only the temp file's OS error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot write it ({exc}); the previous file is unchanged") from exc


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; channels_last weights are non-contiguous.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str]) -> Path:
    return save_safetensors(path, _contiguous(model.state_dict()), metadata)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; unreadable -> CheckpointError naming it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def load_weights(model: nn.Module, path: Path) -> dict[str, str]:
    """Load a model's state dict from `path`; a mismatch names the file and the first differing keys."""
    state, metadata = read_safetensors(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model ({str(exc).splitlines()[0]})") from exc
    return metadata


@dataclass(frozen=True)
class TrainingState:
    """Where a run stands after a finished epoch."""

    epoch: int  # epochs completed
    step: int  # optimiser steps taken


def _optimizer_tensors(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{name}/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _restore_optimizer(
    name: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], saved: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"optim/{name}/"
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, field = key[len(prefix) :].split("/", 1)
            state.setdefault(int(index), {})[field] = value
    for index, fields in saved["scalars"].items():
        state.setdefault(int(index), {}).update(fields)
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def save_checkpoint(
    path: Path,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    state: TrainingState,
    resume_key: dict[str, Any],
    schedulers: dict[str, LRScheduler] | None = None,
    grad_scaler: dict[str, Any] | None = None,
) -> Path:
    """One checkpoint file (module docstring); `grad_scaler` is torch.amp.GradScaler.state_dict() (fp16)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        tensors.update({f"{name}/{k}": v for k, v in module.state_dict().items()})
    optim_meta = {}
    for name, optimizer in optimizers.items():
        optim_tensors, optim_meta[name] = _optimizer_tensors(name, optimizer)
        tensors.update(optim_tensors)
    scalars = {
        "epoch": state.epoch,
        "step": state.step,
        "optimizers": optim_meta,
        # Scheduler state dicts are plain numbers (lrs, counters); JSON floats read back bit for bit.
        "schedulers": {name: scheduler.state_dict() for name, scheduler in (schedulers or {}).items()},
        # The scale is a power of two and the rest small ints and factors: JSON holds them exactly.
        "grad_scaler": grad_scaler or {},
    }
    metadata = {
        "schema_version": str(CHECKPOINT_SCHEMA_VERSION),
        "state": json.dumps(scalars),
        "resume_key": json.dumps(resume_key, sort_keys=True),
    }
    save_safetensors(path, _contiguous(tensors), metadata)
    logger.info("Checkpoint saved: epoch %d, step %d -> %s", state.epoch, state.step, path)
    return path


def load_checkpoint(
    path: Path,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    resume_key: dict[str, Any],
    schedulers: dict[str, LRScheduler] | None = None,
    key_defaults: Mapping[str, Any] | None = None,
    runtime_fields: Collection[str] = (),
) -> TrainingState:
    """Restore modules, optimisers and schedulers in place; a config that differs from the checkpoint's is refused.

    A key the checkpoint lacks is accepted when the wanted value is its default in `key_defaults`
    (a field added since), and a key it holds is passed over when it is one of `runtime_fields`
    now (a field that no longer changes what is computed), so a trainer upgrade does not strand a
    run. Build the schedulers before calling this: constructing one resets its optimiser's lr.
    """
    tensors, metadata = read_safetensors(path)
    if metadata.get("schema_version") != str(CHECKPOINT_SCHEMA_VERSION):
        raise CheckpointError(
            f"{path}: schema_version {metadata.get('schema_version')!r} is not supported "
            f"(this trainer writes {CHECKPOINT_SCHEMA_VERSION}); start over in a new --out"
        )
    saved_key = {k: v for k, v in json.loads(metadata["resume_key"]).items() if k not in runtime_fields}
    wanted = json.loads(json.dumps(resume_key, sort_keys=True))
    # A field added to the config after the checkpoint was written computed what its default computes.
    defaults = json.loads(json.dumps(dict(key_defaults or {}), sort_keys=True))
    differing = sorted(
        k
        for k in set(saved_key) | set(wanted)
        if saved_key.get(k) != wanted.get(k) and not (k not in saved_key and k in defaults and wanted[k] == defaults[k])
    )
    if differing:
        detail = ", ".join(f"{k}: {saved_key.get(k)!r} -> {wanted.get(k)!r}" for k in differing[:5])
        raise CheckpointError(
            f"{path}: the run's config changed since this checkpoint ({detail}); start over in a new --out"
        )
    scalars = json.loads(metadata["state"])
    for name, module in modules.items():
        prefix = f"{name}/"
        module_state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(module_state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: {name} does not fit ({str(exc).splitlines()[0]})") from exc
    for kind, wanted_names, saved in (
        ("optimiser", optimizers, scalars["optimizers"]),
        ("scheduler", schedulers or {}, scalars["schedulers"]),
    ):
        missing = sorted(set(wanted_names) - set(saved))
        if missing:
            raise CheckpointError(f"{path}: holds no {kind} state for {', '.join(missing)}")
    for name, optimizer in optimizers.items():
        _restore_optimizer(name, optimizer, tensors, scalars["optimizers"][name])
    for name, scheduler in (schedulers or {}).items():
        scheduler.load_state_dict(scalars["schedulers"][name])
    return TrainingState(epoch=int(scalars["epoch"]), step=int(scalars["step"]))


def read_grad_scaler_state(path: Path) -> dict[str, Any]:
    """The GradScaler state a checkpoint holds; {} when it was saved without loss scaling."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:  # the header only, not the tensors
            metadata = handle.metadata() or {}
        return json.loads(metadata["state"]).get("grad_scaler") or {}
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: no readable training state in its metadata ({exc})") from exc

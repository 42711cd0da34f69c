"""Mixed precision of the fit step (`amp`): autocast around the forward passes, a GradScaler for fp16.

- "off": everything in float32, as before.
- "bf16": the forward passes (student, live teacher, pixel decode) run under `torch.autocast` in
  bfloat16. bf16 has float32's exponent range, so gradients need no scaling; it works on the CPU
  too (slower there unless the CPU has AVX512-BF16/AMX, see docs/GPU.md).
- "fp16": autocast in float16 with a `torch.amp.GradScaler`: the loss is multiplied by a scale
  before backward so small gradients do not flush to zero; a step whose scaled gradients overflow
  is skipped (the optimisers do not step, the scale halves). A skipped step is the scaler working,
  not a broken run: the loss itself is finite, and the loop's finiteness check looks at the loss,
  never at the scaled gradients. The scaler's state is in the checkpoint, so a resumed run scales as
  an uninterrupted one would. CUDA only: fp16 on the CPU is slow or lacks kernels, and bf16 does
  the same job there without a scaler.

The loss terms themselves are computed in float32 in any mode (OALObjective's `full_precision`):
CPU autocast keeps logsumexp, log_softmax and exp in bf16, and the energy term, the CLUB
log-likelihoods and the KD softmaxes lose too much there. Evaluation always runs in float32.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch

from oal_shared.errors import ConfigError

__all__ = ["AMP_MODES", "Precision", "autocast_each", "check_amp_device", "full_precision"]

AmpMode = Literal["off", "bf16", "fp16"]
AMP_MODES: tuple[str, ...] = ("off", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp_device(amp: str, device: torch.device) -> None:
    """Refuse an `amp` the device cannot run, naming the field and what to use instead."""
    if amp not in AMP_MODES:
        raise ConfigError(f"amp: unknown {amp!r}; known: {', '.join(AMP_MODES)}")
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"amp: fp16 needs a CUDA device, the run is on {device} (CPU fp16 kernels are slow or "
            "missing, and fp16 needs loss scaling); use amp=bf16 on the CPU, or amp=off"
        )
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"amp: bf16 is not supported by {torch.cuda.get_device_name(device)}; use amp=fp16")


class Precision:
    """Autocast context, loss scaling and the optimiser step of one run's `amp` mode on `device`.

    The loop calls `backward(loss)` and `step(optimizers)` in place of `loss.backward()` and each
    `optimizer.step()`; with amp off or bf16 they are exactly those calls.
    """

    def __init__(self, amp: AmpMode, device: torch.device):
        if amp not in AMP_MODES:
            raise ConfigError(f"amp: unknown {amp!r}; known: {', '.join(AMP_MODES)}")
        self.amp = amp
        self.device_type = device.type
        self.dtype = _DTYPES.get(amp)
        # Disabled for off/bf16: then scale() returns the loss as is and step() is optimizer.step().
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.skipped_steps = 0  # fp16 steps the scaler skipped (overflowing gradients)
        self._last_scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0

    def autocast(self) -> AbstractContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Step every optimiser (the scaler unscales each one's gradients and skips all of them on an
        overflow), then update the scale once, as torch's multi-optimiser AMP recipe does."""
        if not self.scaler.is_enabled():
            for optimizer in optimizers:
                optimizer.step()
            return
        for optimizer in optimizers:
            # GradScaler.step asserts it saw gradients; an optimiser whose part got none this step
            # is skipped, as its plain step() would change nothing (no gradient, no update).
            if any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
                self.scaler.step(optimizer)
        self.scaler.update()
        # The scale drops only when this step found inf/nan gradients, i.e. was skipped. Reading it
        # is one more host sync; GradScaler.step already made one per optimiser (it reads found_inf).
        scale = self.scaler.get_scale()
        if scale < self._last_scale:
            self.skipped_steps += 1
        self._last_scale = scale

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (scale, growth tracker, factors): plain numbers; {} unless fp16."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not self.scaler.is_enabled():
            return
        if not state:
            raise ConfigError("amp: fp16 run resumed from a checkpoint without GradScaler state")
        self.scaler.load_state_dict(state)
        self._last_scale = self.scaler.get_scale()

    @property
    def not_finite_hint(self) -> str:
        """What the mode may have to do with a non-finite loss (appended to the loop's error)."""
        if self.amp == "fp16":
            return "under amp=fp16 a value may have overflowed (above 65504); amp=bf16 has float32's range"
        if self.amp == "bf16":
            return "under amp=bf16 values round to 8 significant bits; try amp=off to see whether that is the cause"
        return ""

    def record(self) -> dict[str, Any]:
        """What run.json says about the precision the run trained in."""
        record: dict[str, Any] = {"amp": self.amp}
        if self.scaler.is_enabled():
            record.update(skipped_steps=self.skipped_steps, final_scale=self.scaler.get_scale())
        return record


def autocast_each(items: Iterable[Any], precision: Precision) -> Iterator[Any]:
    """Yield `items`, each one produced under `precision.autocast()`.

    The loop's batches come from a generator (Run.batches) that runs the live teacher and the pixel
    decoder; producing each batch inside the autocast context puts those forwards under it too,
    while the loop's own bookkeeping between batches stays outside.
    """
    iterator = iter(items)
    while True:
        with precision.autocast():
            item = next(iterator, _DONE)
        if item is _DONE:
            return
        yield item


_DONE = object()


def full_precision(reference: torch.Tensor) -> AbstractContextManager:
    """Autocast off on `reference`'s device: what runs inside computes in the dtype of its inputs
    (cast them with `.float()`), whatever region the caller is in."""
    return torch.autocast(reference.device.type, enabled=False)

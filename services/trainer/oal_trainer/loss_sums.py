"""The fit loop's numbers kept on the device between log lines: loss sums and the finiteness check.

A `.item()` or an `if` on a device tensor makes the host wait for the device to finish everything
queued so far; doing that each step stops the host from queueing the next step while the device
works. So the loop keeps its sums here, as float64 tensors added in step order (the same floats
the per-step `.item()` sums gave), and reads them, and the finiteness of every step's loss, at
the log interval and the epoch's end (docs/METHOD.md, Stage D).
"""

from __future__ import annotations

import torch

from oal_trainer.objective import StepLosses

__all__ = ["FiniteWatch", "TensorSums", "detached_values"]


class TensorSums:
    """Per-name sums of 0-d loss tensors, kept on their device in float64 until `floats()`."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            value = value.double().reshape(())
            self.sums[name] = self.sums[name] + value if name in self.sums else value

    def floats(self) -> dict[str, float]:
        """The sums as numbers: one transfer (one sync) for all of them."""
        if not self.sums:
            return {}
        numbers = torch.stack(list(self.sums.values())).tolist()
        return dict(zip(self.sums, numbers, strict=True))


class FiniteWatch:
    """The finiteness check of each step's loss, looked at every few steps instead of every step.

    A non-finite loss still stops the run with the step it happened at and that step's terms; the
    steps after it until the check only touch weights that are then never saved or logged."""

    def __init__(self, hint: str = ""):
        self.pending: list[tuple[int, int, StepLosses, torch.Tensor]] = []
        self.hint = hint  # appended to the error, e.g. what the run's amp mode may have to do with it

    def add(self, losses: StepLosses, step: int, epoch: int) -> None:
        self.pending.append((step, epoch, _detached(losses), torch.isfinite(losses.to_backward.detach())))

    def check(self) -> None:
        pending, self.pending = self.pending, []
        if not pending or bool(torch.stack([finite for *_, finite in pending]).all()):
            return
        step, epoch, losses, _ = next(entry for entry in pending if not bool(entry[3]))
        _raise_not_finite(losses, step, epoch, self.hint)


def detached_values(losses: StepLosses) -> dict[str, torch.Tensor]:
    """The numbers a step logs (every term and "loss"), still on the device."""
    return {**{name: value.detach() for name, value in losses.terms.items()}, "loss": losses.loss.detach()}


def _detached(losses: StepLosses) -> StepLosses:
    """The step's losses without their graphs, so keeping them until the check holds no activations."""
    terms = {name: value.detach() for name, value in losses.terms.items()}
    return StepLosses(terms=terms, loss=losses.loss.detach(), q_fit=losses.q_fit.detach())


def _raise_not_finite(losses: StepLosses, step: int, epoch: int, hint: str = "") -> None:
    raise FloatingPointError(
        f"loss is {losses.loss.item()} at step {step} (epoch {epoch}); terms: "
        + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.terms.items())
        + (f"; {hint}" if hint else "")
    )

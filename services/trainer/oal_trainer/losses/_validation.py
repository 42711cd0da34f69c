"""Up-front checks on loss inputs, so a wrong tensor fails with a message that names it."""

from __future__ import annotations

import torch

from oal_shared.errors import OALError


class LossInputError(OALError, ValueError):
    """A loss got a tensor of the wrong rank or shape; the message names the argument."""


def check_matrix(name: str, tensor: torch.Tensor) -> None:
    """Losses work on (B, D) batches; anything else is a caller mistake, not something to broadcast."""
    if tensor.dim() != 2 or tensor.shape[0] == 0:
        raise LossInputError(f"{name} must be a non-empty (B, D) tensor, got shape {tuple(tensor.shape)}")


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    check_matrix(name_a, a)
    check_matrix(name_b, b)
    if a.shape != b.shape:
        raise LossInputError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}")


def check_same_batch(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    check_matrix(name_a, a)
    check_matrix(name_b, b)
    if a.shape[0] != b.shape[0]:
        raise LossInputError(
            f"{name_a} has batch size {a.shape[0]} but {name_b} has {b.shape[0]}; pair them row by row"
        )

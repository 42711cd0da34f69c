"""The trainer's seeded streams: every order and draw is a function of (seed, names, epoch, rank)."""

from __future__ import annotations

import torch

from oal_shared import seeds as shared_seeds


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 63-bit seed for one of the trainer's streams, e.g. derive_seed(seed, "order", epoch)."""
    return shared_seeds.derive_seed("oal-train", seed, *parts)


def seeded_generator(seed: int, *parts: object) -> torch.Generator:
    return shared_seeds.seeded_generator("oal-train", seed, *parts)

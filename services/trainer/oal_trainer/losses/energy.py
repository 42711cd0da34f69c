"""Energy score and the energy-bounded regulariser (Liu et al. 2020, as used by VOS and Dream-OOD).

Liu et al., "Energy-based Out-of-distribution Detection", https://arxiv.org/abs/2010.03759.
Convention: the free energy is E(x) = -T * logsumexp(z / T); ID inputs get LOW energy. The score
we report is its negative, `energy_score = -E = T * logsumexp(z / T)`, so higher = more ID, like
every other score in this project.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oal_trainer.losses._validation import LossInputError, check_matrix

DEFAULT_M_IN = -25.0  # energy margin for ID: E(x_in) above it is penalised
DEFAULT_M_OUT = -7.0  # energy margin for outliers: E(x_out) below it is penalised


def energy_score(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """T * logsumexp(z / T) over classes, (B, K) -> (B,); the negative free energy, higher = more ID."""
    check_matrix("logits", logits)
    if not T > 0:
        raise LossInputError(f"T (energy temperature) must be > 0, got {T}")
    return T * torch.logsumexp(logits / T, dim=1)


def energy_regularizer(
    id_logits: torch.Tensor,
    ood_logits: torch.Tensor,
    m_in: float = DEFAULT_M_IN,
    m_out: float = DEFAULT_M_OUT,
) -> torch.Tensor:
    """Squared hinge on the free energy E = -logsumexp(z) (T = 1), Liu et al. 2020 eq. (8):

        L = mean_in relu(E(x_in) - m_in)^2 + mean_out relu(m_out - E(x_out))^2

    It pulls ID energy below m_in and pushes outlier energy above m_out; m_in < m_out. The paper's
    weight 0.1 is not included: the caller's config weighs it.
    """
    check_matrix("id_logits", id_logits)
    check_matrix("ood_logits", ood_logits)
    if not m_in < m_out:
        raise LossInputError(f"m_in ({m_in}) must be below m_out ({m_out}): ID energy is the lower one")
    energy_in = -torch.logsumexp(id_logits, dim=1)  # (B_in,)
    energy_out = -torch.logsumexp(ood_logits, dim=1)  # (B_out,)
    return (F.relu(energy_in - m_in) ** 2).mean() + (F.relu(m_out - energy_out) ** 2).mean()

"""Knowledge distillation from a frozen teacher: on logits and on penultimate features (docs/METHOD.md, Stage D).

Logit KD (Hinton et al. 2015, https://arxiv.org/abs/1503.02531):

    L_logit = T^2 * KL( softmax(z_t / T) || softmax(z_s / T) ),  averaged over the batch

Feature KD as in the OAL reference (https://arxiv.org/abs/2406.16525): the teacher's features h_t
(D_t) pass a trained adapter DT to the student's width D_s, then

    L_feat = KL( softmax(DT(h_t)) || softmax(h_s) ),  averaged over the batch

Both use `batchmean` (sum over classes/dims, mean over rows), the reduction under which the value is
the true KL divergence per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from oal_trainer.losses._validation import LossInputError, check_matrix, check_same_shape


def _kl_teacher_to_student(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    # KL(p_t || p_s) with both as log-probabilities: exact and stable when p_t has tiny entries.
    return F.kl_div(
        F.log_softmax(student, dim=1), F.log_softmax(teacher, dim=1), reduction="batchmean", log_target=True
    )


def logit_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), batchmean; inputs (B, K). Zero iff the softmaxes agree.

    The T^2 factor keeps the gradient scale independent of T (Hinton et al. 2015). The teacher's
    logits are used as given: pass them detached (the teacher is frozen).
    """
    check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    if not temperature > 0:
        raise LossInputError(f"temperature must be > 0, got {temperature}")
    kl = _kl_teacher_to_student(student_logits / temperature, teacher_logits / temperature)
    return kl * temperature**2


def feature_kd_loss(student_features: torch.Tensor, adapted_teacher_features: torch.Tensor) -> torch.Tensor:
    """KL(softmax(DT(h_t)) || softmax(h_s)), batchmean; inputs (B, D_s).

    The features are treated as logits over their dimensions. Gradients reach both the student and
    the adapter DT (it is trained by this loss); `adapted_teacher_features` = `FeatureAdapter(h_t)`.
    """
    check_same_shape(
        "student_features", student_features, "adapted_teacher_features", adapted_teacher_features
    )
    return _kl_teacher_to_student(student_features, adapted_teacher_features)


class FeatureAdapter(nn.Module):
    """DT of the paper: BatchNorm1d(D_t) -> Linear(D_t, D_s) -> ReLU -> BatchNorm1d(D_s).

    Maps teacher features (B, D_t) to the student's feature width (B, D_s), so the two can be compared.
    """

    def __init__(self, teacher_dim: int, student_dim: int):
        super().__init__()
        for name, value in (("teacher_dim", teacher_dim), ("student_dim", student_dim)):
            if value < 1:
                raise LossInputError(f"FeatureAdapter {name} must be >= 1, got {value}")
        self.teacher_dim = teacher_dim
        self.student_dim = student_dim
        self.net = nn.Sequential(
            nn.BatchNorm1d(teacher_dim),
            nn.Linear(teacher_dim, student_dim),
            nn.ReLU(),
            nn.BatchNorm1d(student_dim),
        )

    def forward(self, teacher_features: torch.Tensor) -> torch.Tensor:
        check_matrix("teacher_features", teacher_features)
        if teacher_features.shape[1] != self.teacher_dim:
            raise LossInputError(
                f"teacher_features has width {teacher_features.shape[1]}, "
                f"FeatureAdapter expects teacher_dim={self.teacher_dim}"
            )
        return self.net(teacher_features)  # (B, D_s)

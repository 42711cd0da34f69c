"""The per-step objective of Stage D (docs/METHOD.md, Stage D): one batch in, the named loss terms out.

With B ID images (x, y) and B_o outliers (v, z0):

    L = w_ce CE(z_s, y)
      + w_logit_kd KL(softmax(z_t/T) || softmax(z_s/T)) T^2        teacher logits z_t (cached or live)
      + w_feature_kd KL(softmax(DT(h_t)) || softmax(h_s))          DT: trained adapter
      + w_club_emb CLUB(v, h_s) + w_club_latent CLUB(f_ood, h_s)   f_ood = reduce(z0)
      + w_energy Energy(z_s, z_ood) + w_oe OE(z_ood)
    z_ood = head(P(f_ood)) for latent outliers, or the student's logits on decoded images (pixel).

A term is computed only when its weight is > 0 (CE always: it is logged even at w_ce = 0). With
club_mode "alternating" each CLUB also yields its q-fit NLL ("club_emb_q", "club_latent_q"):
`club_step_losses` routes that gradient to the q-network alone, so it joins the backward pass but not
L, and the bound in L leaves q untouched. The batch arrives ready (teacher outputs looked up or
computed, outliers decoded); where it comes from is the run's business (oal_trainer.run). Under mixed
precision (config `amp`) the student's forward runs in the caller's autocast, the terms in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from oal_trainer.data import reduce_latents, reduced_latent_dim
from oal_trainer.distributed import unwrap
from oal_trainer.losses import (
    CLUB,
    FeatureAdapter,
    LossInputError,
    club_step_losses,
    energy_regularizer,
    feature_kd_loss,
    logit_kd_loss,
    outlier_exposure_loss,
)
from oal_trainer.models import OutlierProjector
from oal_trainer.precision import full_precision
from oal_trainer.recipes import TrainConfig

Q_FIT_SUFFIX = "_q"  # names of the CLUB q-fit terms: "<club term>_q"


@dataclass(frozen=True, eq=False)
class StepBatch:
    """What one optimiser step sees, on the training device. Absent parts are None."""

    images: torch.Tensor  # (B, C, H, W) ID images, augmented
    labels: torch.Tensor  # (B,) int64
    teacher_logits: torch.Tensor | None = None  # (B, K) z_t, no gradient
    teacher_features: torch.Tensor | None = None  # (B, D_t) h_t, no gradient
    outlier_embeddings: torch.Tensor | None = None  # (B_o, D_v) v
    outlier_latents: torch.Tensor | None = None  # (B_o, C, H, W) z0, unscaled as stored
    outlier_images: torch.Tensor | None = None  # (B_o, C, H, W) z0 decoded to pixels (pixel space)

    @property
    def has_outliers(self) -> bool:
        return self.outlier_latents is not None


@dataclass(frozen=True, eq=False)
class StepLosses:
    """One step's loss terms, unweighted and by name, with the student's objective L and the q-fit."""

    terms: dict[str, torch.Tensor]
    loss: torch.Tensor  # L: the weighted sum of the terms other than q-fits (logged as "loss")
    q_fit: torch.Tensor  # sum of the q-fit NLLs; 0 without alternating CLUB

    @property
    def to_backward(self) -> torch.Tensor:
        """What one backward pass needs: L for the student and DT, the q-fits for the q-networks."""
        return self.loss + self.q_fit

    def values(self) -> dict[str, float]:
        """The numbers a step logs: every term and "loss"."""
        return {**{name: value.item() for name, value in self.terms.items()}, "loss": self.loss.item()}


def loss_weights(config: TrainConfig) -> dict[str, float]:
    """The weight w_<name> of each term of L, by term name."""
    return {
        "ce": config.w_ce,
        "logit_kd": config.w_logit_kd,
        "feature_kd": config.w_feature_kd,
        "club_emb": config.w_club_emb,
        "club_latent": config.w_club_latent,
        "energy": config.w_energy,
        "oe": config.w_oe,
    }


class TrainModules(nn.Module):
    """Everything trained besides the student: adapter DT, CLUB q-nets, outlier projector P.

    One container so checkpoints, the optimisers and the gradient all-reduce treat them alike.
    """

    def __init__(self):
        super().__init__()
        self.adapter: nn.Module | None = None
        self.club_emb: nn.Module | None = None
        self.club_latent: nn.Module | None = None
        self.projector: nn.Module | None = None

    @classmethod
    def for_config(
        cls,
        config: TrainConfig,
        feature_dim: int,
        teacher_dim: int | None = None,
        embed_dim: int | None = None,
        latent_shape: tuple[int, int, int] | None = None,
    ) -> TrainModules:
        """The modules `config`'s terms need: DT with a teacher, q-nets and P with outliers.

        Built in a fixed order (DT, CLUB(v), CLUB(f_ood), P), so their initial weights follow the seed.
        """
        modules = cls()
        if config.w_feature_kd > 0 and teacher_dim is not None:
            modules.adapter = FeatureAdapter(teacher_dim, feature_dim)
        if embed_dim is not None and latent_shape is not None:
            f_ood_dim = reduced_latent_dim(latent_shape, config.latent_reduce)
            if config.w_club_emb > 0:
                modules.club_emb = CLUB(embed_dim, feature_dim, config.club_hidden)
            if config.w_club_latent > 0:
                modules.club_latent = CLUB(f_ood_dim, feature_dim, config.club_hidden)
            if config.outlier_space == "latent" and (config.w_energy > 0 or config.w_oe > 0):
                modules.projector = OutlierProjector(f_ood_dim, feature_dim)
        return modules

    def named_parts(self) -> list[tuple[str, nn.Module]]:
        """The modules present, in the order above."""
        parts = (
            ("adapter", self.adapter),
            ("club_emb", self.club_emb),
            ("club_latent", self.club_latent),
            ("projector", self.projector),
        )
        return [(name, module) for name, module in parts if module is not None]


class OALObjective(nn.Module):
    """L of the module docstring for one `StepBatch`; holds the student (maybe DDP-wrapped) and its aids."""

    def __init__(self, model: nn.Module, aux: TrainModules, config: TrainConfig):
        super().__init__()
        self.model = model
        self.aux = aux
        self.config = config
        self.weights = loss_weights(config)

    def forward(self, batch: StepBatch) -> StepLosses:
        self._check(batch)
        logits, h_s, ood_logits = self._student(batch)  # under the caller's autocast, if any
        # The terms in float32 whatever the amp mode (oal_trainer.precision): CPU autocast would keep
        # logsumexp (energy), exp (CLUB's variances) and log_softmax (KD) in bf16.
        with full_precision(logits):
            logits, h_s = logits.float(), h_s.float()
            ood_logits = ood_logits.float() if ood_logits is not None else None
            terms = {"ce": F.cross_entropy(logits, batch.labels)}
            terms.update(self._distillation(logits, h_s, batch))
            if batch.has_outliers:
                f_ood = reduce_latents(batch.outlier_latents.float(), self.config.latent_reduce)  # (B_o, F)
                terms.update(self._micl(h_s, batch.outlier_embeddings.float(), f_ood))
                if self.aux.projector is not None:
                    ood_logits = unwrap(self.model).head(self.aux.projector(f_ood))  # (B_o, K)
                if ood_logits is not None:
                    terms.update(self._outlier_logits(logits, ood_logits))
            return self._combine(terms)

    def _check(self, batch: StepBatch) -> None:
        config = self.config
        if (config.w_logit_kd > 0 or self.aux.adapter is not None) and (
            batch.teacher_logits is None or batch.teacher_features is None
        ):
            raise LossInputError("batch has no teacher outputs, but w_logit_kd or w_feature_kd > 0")
        if config.uses_outliers and (not batch.has_outliers or batch.outlier_embeddings is None):
            raise LossInputError("batch has no outliers, but an outlier term (CLUB, energy or OE) has weight > 0")

    def _student(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Student logits (B, K) and features (B, D_s) of the ID images, and logits of decoded outliers."""
        x = batch.images
        if batch.outlier_images is None:
            logits, h_s = self.model(x, return_feature=True)
            return logits, h_s, None
        # Outlier exposure style: ID and outlier images in one forward (BatchNorm sees both).
        logits_all, h_all = self.model(torch.cat([x, batch.outlier_images]), return_feature=True)
        return logits_all[: len(x)], h_all[: len(x)], logits_all[len(x) :]

    def _distillation(self, logits: torch.Tensor, h_s: torch.Tensor, batch: StepBatch) -> dict[str, torch.Tensor]:
        terms = {}
        if self.config.w_logit_kd > 0:
            terms["logit_kd"] = logit_kd_loss(logits, batch.teacher_logits.float(), self.config.kd_temperature)
        if self.aux.adapter is not None:
            terms["feature_kd"] = feature_kd_loss(h_s, self.aux.adapter(batch.teacher_features.float()))
        return terms

    def _micl(self, h_s: torch.Tensor, v: torch.Tensor, f_ood: torch.Tensor) -> dict[str, torch.Tensor]:
        """The CLUB terms, each with its q-fit under alternating mode (see `club_step_losses`)."""
        terms = {}
        for name, club, x_club in (("club_emb", self.aux.club_emb, v), ("club_latent", self.aux.club_latent, f_ood)):
            if club is not None:
                bound, q_fit = club_step_losses(club, x_club, h_s, self.config.club_mode)
                terms[name] = bound
                if q_fit is not None:
                    terms[name + Q_FIT_SUFFIX] = q_fit
        return terms

    def _outlier_logits(self, logits: torch.Tensor, ood_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = {}
        if self.config.w_energy > 0:
            terms["energy"] = energy_regularizer(logits, ood_logits, self.config.energy_m_in, self.config.energy_m_out)
        if self.config.w_oe > 0:
            terms["oe"] = outlier_exposure_loss(ood_logits)
        return terms

    def _combine(self, terms: dict[str, torch.Tensor]) -> StepLosses:
        loss = sum(self.weights[name] * value for name, value in terms.items() if not name.endswith(Q_FIT_SUFFIX))
        q_fit = sum(value for name, value in terms.items() if name.endswith(Q_FIT_SUFFIX))
        if not isinstance(q_fit, torch.Tensor):
            q_fit = torch.zeros((), device=terms["ce"].device)
        return StepLosses(terms=terms, loss=loss, q_fit=q_fit)

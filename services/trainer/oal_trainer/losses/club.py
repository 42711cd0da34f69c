"""CLUB: a contrastive log-ratio upper bound on mutual information, used as the MICL term (docs/METHOD.md, Stage D).

Cheng et al. 2020, "CLUB: A Contrastive Log-ratio Upper Bound of Mutual Information",
https://arxiv.org/abs/2006.12013. With a variational q(y|x) = N(mu(x), diag(exp(lv(x)))), the bound is

    I(x; y) <= mean_i [ log q(y_i|x_i) - mean_j log q(y_j|x_i) ]
             = mean_i [ -||mu_i - y_i||^2 / (2 e^{lv_i}) + mean_j ||y_j - mu_i||^2 / (2 e^{lv_i}) ]

(squares and divisions per dimension, then summed over dimensions; the log-variance terms cancel).
In OAL (https://arxiv.org/abs/2406.16525) x are outlier embeddings or latents and y the student's
ID features; minimising the bound pushes ID features away from what outliers predict.

club_mode (how q and the student share the work):
- "joint" (the OAL reference code): the bound is minimised with respect to the student AND the
  q-networks, in one optimiser. q is then not fitted to the data, so the bound may not bound anything.
- "alternating" (the CLUB paper): q is fitted by maximum likelihood on detached inputs, and the bound
  is minimised with respect to the student only, with q frozen. `club_step_losses` returns both losses
  with the gradients already routed, so the caller may add them and call backward once.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

from oal_trainer.losses._validation import LossInputError, check_same_batch

ClubMode = Literal["joint", "alternating"]
CLUB_MODES: tuple[str, ...] = ("joint", "alternating")
_LOG_2PI = math.log(2 * math.pi)


class CLUB(nn.Module):
    """q(y|x) = N(mu(x), exp(lv(x))) with mu = MLP and lv = tanh(MLP), one hidden layer each.

    `forward(x, y)` is the CLUB upper bound; `log_likelihood` and `learning_loss` fit q.
    x: (B, x_dim), y: (B, y_dim), rows paired (sample i of x goes with sample i of y).
    """

    def __init__(self, x_dim: int, y_dim: int, hidden_dim: int):
        super().__init__()
        for name, value in (("x_dim", x_dim), ("y_dim", y_dim), ("hidden_dim", hidden_dim)):
            if value < 1:
                raise LossInputError(f"CLUB {name} must be >= 1, got {value}")
        self.x_dim = x_dim
        self.y_dim = y_dim
        self.mu_net = nn.Sequential(nn.Linear(x_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, y_dim))
        # tanh keeps the log-variance in (-1, 1): the reference's guard against a collapsing variance.
        self.logvar_net = nn.Sequential(
            nn.Linear(x_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, y_dim), nn.Tanh()
        )

    def mu_logvar(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu_net(x), self.logvar_net(x)  # (B, y_dim) each

    def _check(self, x: torch.Tensor, y: torch.Tensor) -> None:
        check_same_batch("x", x, "y", y)
        if x.shape[1] != self.x_dim:
            raise LossInputError(f"x has width {x.shape[1]}, CLUB was built for x_dim={self.x_dim}")
        if y.shape[1] != self.y_dim:
            raise LossInputError(f"y has width {y.shape[1]}, CLUB was built for y_dim={self.y_dim}")

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The CLUB upper bound (scalar), see the module docstring.

        The all-pairs term is computed without the (B, B, D) tensor:
        mean_j (y_jd - mu_id)^2 = var_d(y) + (mean(y)_d - mu_id)^2 with the population variance.
        """
        self._check(x, y)
        mu, logvar = self.mu_logvar(x)  # (B, D)
        inv_two_var = 0.5 * torch.exp(-logvar)  # (B, D)
        positive = -((mu - y) ** 2 * inv_two_var).sum(dim=1)  # (B,)
        y_mean = y.mean(dim=0, keepdim=True)  # (1, D)
        y_var = y.var(dim=0, correction=0, keepdim=True)  # (1, D)
        all_pairs = ((y_var + (y_mean - mu) ** 2) * inv_two_var).sum(dim=1)  # (B,)
        return (positive + all_pairs).mean()

    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """mean_i log N(y_i; mu(x_i), exp(lv(x_i))), the full Gaussian log-density summed over dims.

        The reference code's `loglikeli` is 2x this minus constants (it drops the 1/2 and log 2pi);
        the optimum is the same, its gradient twice as large.
        """
        self._check(x, y)
        mu, logvar = self.mu_logvar(x)  # (B, D)
        per_dim = -0.5 * ((y - mu) ** 2 * torch.exp(-logvar) + logvar + _LOG_2PI)  # (B, D)
        return per_dim.sum(dim=1).mean()

    def learning_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood: what fitting q minimises."""
        return -self.log_likelihood(x, y)


def club_step_losses(
    club: CLUB, x: torch.Tensor, y: torch.Tensor, mode: ClubMode
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step's CLUB losses with the gradients routed for `mode`: (bound_for_student, q_fit_loss or None).

    - "joint": (bound, None); the bound's gradient reaches the q-networks and the producers of x, y.
    - "alternating": the bound is evaluated with q's parameters detached (gradient only to x, y),
      and q_fit = learning_loss(x.detach(), y.detach()) (gradient only to q). Their gradients never
      overlap, so `(w * bound + q_fit).backward()` with one optimiser over both is the paper's two
      steps, except that the bound sees q from before this step's update (one step of lag).
      Call backward before any optimiser step: the frozen view shares storage with q's weights.
    """
    if mode == "joint":
        return club(x, y), None
    if mode == "alternating":
        q_fit = club.learning_loss(x.detach(), y.detach())
        frozen = {name: param.detach() for name, param in club.named_parameters()}
        bound = functional_call(club, frozen, (x, y))
        return bound, q_fit
    raise LossInputError(f"club mode must be one of {CLUB_MODES}, got {mode!r}")

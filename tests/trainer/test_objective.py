"""The per-step objective on its own: tiny models, hand-built batches, no data, no loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from oal_trainer.losses import LossInputError
from oal_trainer.models import build_model
from oal_trainer.objective import OALObjective, StepBatch, TrainModules
from oal_trainer.recipes import RECIPES, TrainConfig, resolve_config

torch.set_num_threads(1)

NUM_CLASSES = 6
TEACHER_DIM = 16
EMBED_DIM = 5
LATENT_SHAPE = (2, 2, 3)
# Loss terms each recipe computes (and the fit loop logs): proof that its weights reach the objective.
RECIPE_TERMS = {
    "ce": {"ce"},
    "kd": {"ce", "logit_kd", "feature_kd"},
    "oal": {"ce", "logit_kd", "feature_kd", "club_emb", "club_latent", "club_emb_q", "club_latent_q"},
    "oal-energy": {"ce", "logit_kd", "feature_kd", "club_emb", "club_latent", "club_emb_q", "club_latent_q", "energy"},
    "latent-energy": {"ce", "energy"},
    "pixel-oe": {"ce", "oe", "energy"},
}


def _config(recipe: str, *overrides: str) -> TrainConfig:
    needs = ["teacher_run=/t", "init_from=/c", "shards=/s", "generator_dir=/g", "club_hidden=8"]
    return resolve_config(recipe, overrides=[*needs, *overrides])


def _objective(config: TrainConfig, seed: int = 0) -> OALObjective:
    torch.manual_seed(seed)
    student = build_model("resnet_tiny", NUM_CLASSES, 1)
    aux = TrainModules.for_config(
        config, student.feature_dim, teacher_dim=TEACHER_DIM, embed_dim=EMBED_DIM, latent_shape=LATENT_SHAPE
    )
    return OALObjective(student, aux, config).train()


def _batch(config: TrainConfig, seed: int = 1, with_outliers: bool = True) -> StepBatch:
    """B = 8 ID images with teacher outputs, and 8 outliers (as images too, in pixel space)."""
    generator = torch.Generator().manual_seed(seed)
    outliers = {}
    if with_outliers:
        outliers = {
            "outlier_embeddings": torch.randn(8, EMBED_DIM, generator=generator),
            "outlier_latents": torch.randn(8, *LATENT_SHAPE, generator=generator),
        }
        if config.outlier_space == "pixel":
            outliers["outlier_images"] = torch.randn(8, 1, 28, 28, generator=generator)
    return StepBatch(
        images=torch.randn(8, 1, 28, 28, generator=generator),
        labels=torch.arange(8) % NUM_CLASSES,
        teacher_logits=torch.randn(8, NUM_CLASSES, generator=generator),
        teacher_features=torch.randn(8, TEACHER_DIM, generator=generator),
        **outliers,
    )


def _grads_of(module: torch.nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def _untouched(module: torch.nn.Module) -> bool:
    return all(g is None or torch.count_nonzero(g) == 0 for g in _grads_of(module))


def _reached(module: torch.nn.Module) -> bool:
    return any(g is not None and torch.count_nonzero(g) > 0 for g in _grads_of(module))


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_computes_exactly_its_terms(recipe):
    config = _config(recipe)
    losses = _objective(config)(_batch(config))
    assert set(losses.terms) == RECIPE_TERMS[recipe]
    assert all(value.dim() == 0 and torch.isfinite(value) for value in losses.terms.values())
    assert set(losses.values()) == RECIPE_TERMS[recipe] | {"loss"}


@pytest.mark.parametrize("recipe", ["oal-energy", "pixel-oe"])
def test_the_total_is_the_weighted_sum_and_q_fits_stay_out_of_it(recipe):
    config = _config(recipe)
    losses = _objective(config)(_batch(config))
    weights = {name: getattr(config, f"w_{name}") for name in ("ce", "logit_kd", "feature_kd", "energy", "oe")}
    weights |= {"club_emb": config.w_club_emb, "club_latent": config.w_club_latent}
    expected = sum(weights[name] * value for name, value in losses.terms.items() if not name.endswith("_q"))
    q_fits = sum((value for name, value in losses.terms.items() if name.endswith("_q")), torch.tensor(0.0))
    assert losses.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses.q_fit.item() == pytest.approx(q_fits.item(), rel=1e-6)
    assert losses.to_backward.item() == pytest.approx(expected.item() + q_fits.item(), rel=1e-6)


def test_a_zero_weight_removes_its_term_and_its_module():
    config = _config("oal-energy", "w_club_latent=0", "w_logit_kd=0", "w_energy=0")
    objective = _objective(config)
    assert objective.aux.club_latent is None and objective.aux.projector is None
    losses = objective(_batch(config))
    assert set(losses.terms) == {"ce", "feature_kd", "club_emb", "club_emb_q"}


def test_ce_alone_on_a_batch_without_outliers_is_the_cross_entropy():
    config = _config("ce")
    objective = _objective(config)
    batch = _batch(config, with_outliers=False)
    losses = objective(batch)
    assert set(losses.terms) == {"ce"} and losses.q_fit.item() == 0.0
    expected = F.cross_entropy(objective.model(batch.images), batch.labels)
    assert losses.loss.item() == pytest.approx(config.w_ce * expected.item(), rel=1e-6)


def test_known_answers_with_a_student_that_knows_nothing():
    # A zero head gives all-zero logits on ID and decoded outliers alike: CE = OE = log K, and
    # logsumexp = log K, so the free energy is -log K on both sides of the energy hinge.
    config = _config("pixel-oe", "w_logit_kd=1", "teacher_run=/t")
    objective = _objective(config)
    torch.nn.init.zeros_(objective.model.head.weight)
    torch.nn.init.zeros_(objective.model.head.bias)
    batch = _batch(config)
    batch = StepBatch(**{**batch.__dict__, "teacher_logits": torch.full((8, NUM_CLASSES), 3.0)})  # uniform too
    terms = objective(batch).terms
    log_k = math.log(NUM_CLASSES)
    assert terms["ce"].item() == pytest.approx(log_k, rel=1e-6)
    assert terms["oe"].item() == pytest.approx(log_k, rel=1e-6)
    assert terms["logit_kd"].item() == pytest.approx(0.0, abs=1e-7)
    id_hinge = max(0.0, -log_k - config.energy_m_in) ** 2
    ood_hinge = max(0.0, config.energy_m_out + log_k) ** 2
    assert terms["energy"].item() == pytest.approx(id_hinge + ood_hinge, rel=1e-6)


def test_alternating_club_the_student_step_leaves_the_q_nets_alone():
    config = _config("oal", "club_mode=alternating")
    objective = _objective(config)
    losses = objective(_batch(config))
    losses.loss.backward(retain_graph=True)  # L: what the student (and DT) minimise
    assert _reached(objective.model)
    assert _reached(objective.aux.adapter), "feature KD trains DT"
    assert _untouched(objective.aux.club_emb) and _untouched(objective.aux.club_latent)

    objective.zero_grad(set_to_none=True)
    losses.q_fit.backward()  # the q-fit NLLs: the q-networks only
    assert _reached(objective.aux.club_emb) and _reached(objective.aux.club_latent)
    assert _untouched(objective.model) and _untouched(objective.aux.adapter)


def test_joint_club_the_bound_trains_the_q_nets_with_the_student():
    config = _config("oal", "club_mode=joint")
    objective = _objective(config)
    losses = objective(_batch(config))
    assert "club_emb_q" not in losses.terms and losses.q_fit.item() == 0.0
    losses.to_backward.backward()
    assert _reached(objective.model) and _reached(objective.aux.club_emb) and _reached(objective.aux.club_latent)


def test_the_club_bound_is_clubs_own_value_on_the_student_features():
    config = _config("oal")
    objective = _objective(config)
    batch = _batch(config)
    losses = objective(batch)
    _, h_s = objective.model(batch.images, return_feature=True)  # train mode: the same batch statistics
    f_ood = batch.outlier_latents.flatten(1)
    with torch.no_grad():
        assert losses.terms["club_emb"].item() == pytest.approx(
            objective.aux.club_emb(batch.outlier_embeddings, h_s).item(), rel=1e-5
        )
        assert losses.terms["club_latent"].item() == pytest.approx(
            objective.aux.club_latent(f_ood, h_s).item(), rel=1e-5
        )


def test_latent_outliers_reach_the_energy_term_through_the_projector_and_head():
    # Small random logits have free energy near -log K: m_out above it keeps the outlier hinge active.
    config = _config("oal-energy", "energy_m_out=5")
    objective = _objective(config)
    objective(_batch(config)).loss.backward()
    assert _reached(objective.aux.projector)
    assert objective.model.head.weight.grad is not None


def test_missing_teacher_outputs_or_outliers_are_named():
    config = _config("oal")
    objective = _objective(config)
    batch = _batch(config)
    with pytest.raises(LossInputError, match="no teacher outputs"):
        objective(StepBatch(**{**batch.__dict__, "teacher_logits": None}))
    with pytest.raises(LossInputError, match="no outliers"):
        objective(_batch(config, with_outliers=False))


def test_latent_energy_is_oal_energy_without_teacher_or_micl():
    # The full study ran this recipe as an oal-energy cell with those weights zeroed (docs/RESULTS.md).
    zeroed = ("w_logit_kd=0", "w_feature_kd=0", "w_club_emb=0", "w_club_latent=0")
    named = resolve_config("latent-energy", "demo", overrides=["init_from=/c", "shards=/s"])
    cell = resolve_config("oal-energy", "demo", overrides=["init_from=/c", "shards=/s", *zeroed])
    assert named.model_dump(exclude={"recipe"}) == cell.model_dump(exclude={"recipe"})
    assert not named.uses_teacher and named.w_energy > 0

"""PNG figures of evaluation results and reports.

Figures are built with `matplotlib.figure.Figure`, not pyplot: no global state, no GUI backend
(the Agg canvas renders them), so library code can draw from any thread or headless machine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from oal_trainer.metrics import RECALL_LEVEL

_DPI = 120


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=_DPI)
    return path


def plot_roc_curves(
    id_scores: np.ndarray, ood_scores: Mapping[str, np.ndarray], path: Path, *, title: str
) -> Path:
    """One ROC curve per OOD set with OOD as the positive class (OpenOOD): TPR = OOD caught,
    FPR = ID flagged; the dotted line marks the 95% TPR where FPR@95 (OOD positive) is read."""
    figure = Figure(figsize=(5.5, 5))
    axes = figure.add_subplot()
    for name, scores in ood_scores.items():
        is_ood = np.concatenate([np.zeros(len(id_scores)), np.ones(len(scores))])
        fpr, tpr, _ = roc_curve(is_ood, -np.concatenate([id_scores, scores]))
        axes.plot(fpr, tpr, label=name)
    axes.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
    axes.axhline(RECALL_LEVEL, color="black", linewidth=0.8, linestyle=":")
    axes.set(xlabel="FPR: ID flagged as OOD", ylabel="TPR: OOD caught", title=title)
    axes.set(xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    return _save(figure, path)


def plot_score_histograms(
    id_scores: np.ndarray, groups: Mapping[str, np.ndarray], path: Path, *, title: str, score_label: str
) -> Path:
    """Overlaid density histograms of the ID scores and of each OOD group, on shared bins."""
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    everything = np.concatenate([id_scores, *groups.values()])
    bins = np.linspace(everything.min(), everything.max(), 50) if np.ptp(everything) > 0 else 10
    axes.hist(id_scores, bins=bins, density=True, alpha=0.5, label="ID")
    for name, scores in groups.items():
        axes.hist(scores, bins=bins, density=True, alpha=0.5, label=name)
    axes.set(xlabel=f"{score_label} (higher = more ID)", ylabel="density", title=title)
    axes.legend(fontsize="small")
    figure.tight_layout()
    return _save(figure, path)


def plot_grouped_bars(
    categories: Sequence[str],
    series: Mapping[str, Sequence[float]],
    path: Path,
    *,
    title: str,
    ylabel: str,
    errors: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """One group of bars per category, one bar per series (e.g. per run); NaN leaves a gap.

    `errors`, per series, draws symmetric error bars of that half-width (e.g. a 95% interval)."""
    figure = Figure(figsize=(max(6.0, 1.2 * len(categories) * max(1, len(series)) / 2), 4.5))
    axes = figure.add_subplot()
    positions = np.arange(len(categories))
    width = 0.8 / max(1, len(series))
    for index, (name, values) in enumerate(series.items()):
        yerr = None if errors is None else np.nan_to_num(np.asarray(errors[name], dtype=float), nan=0.0)
        axes.bar(
            positions + (index - (len(series) - 1) / 2) * width, values, width, label=name, yerr=yerr, capsize=3
        )
    axes.set_xticks(positions, list(categories), rotation=20, ha="right", fontsize="small")
    axes.set(ylabel=ylabel, title=title)
    axes.legend(fontsize="small")
    figure.tight_layout()
    return _save(figure, path)

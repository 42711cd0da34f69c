"""TensorBoard event files of a run, written beside its JSONL log (which stays the format of record).

`tensorboard_hooks(run_dir, ...)` gives the FitHooks that write, into the run dir itself, so that
`tensorboard --logdir runs/` names each run by its folder (a sweep's `OUT/<cell>/seed-<s>/` runs
side by side):

- every step: `loss/<term>` (unweighted terms and `loss`, the weighted total), `train/lr`,
  `train/samples_per_s`;
- every epoch: `epoch/<term>`, the epoch's mean losses;
- after the evaluation, from the run's metrics.json and scores.csv: `ood/<scorer>/<set>/<metric>`
  for every OOD set and the near/far means, `ood/id_accuracy`, one `scores/<scorer>/<set>` histogram
  per image set, a `pr/<scorer>/<set>` curve per OOD set (ID positive), and the run's roc.png and
  score_hist.png as images `eval/roc`, `eval/score_hist`.

The step is the optimiser step (the evaluation's at the last step). A resumed run purges what an
interrupted one wrote after its checkpoint, so curves never double back. Without the `tensorboard`
package nothing is written and the run says so once in its log.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from oal_trainer.fit import FitHooks, FitResult, StepInfo

logger = logging.getLogger(__name__)

_FLUSH_SECS = 30


def open_writer(run_dir: Path, start_step: int):
    """A SummaryWriter into `run_dir`, or None (logged) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch's module needs the tensorboard package
        logger.info("TensorBoard logging off: %s (pip install 'oal-ood[tensorboard]')", exc)
        return None
    purge = start_step if start_step > 0 else None
    return SummaryWriter(log_dir=str(run_dir), purge_step=purge, flush_secs=_FLUSH_SECS)


class TensorBoardLog:
    """The writer's side of the fit loop; one instance per run, on rank 0 only."""

    def __init__(self, run_dir: Path, every: int = 1):
        self.run_dir = Path(run_dir)
        self.every = max(1, every)  # the run's log_interval: reading a step's losses syncs the device
        self.writer = None
        self.step = 0

    def on_start(self, start_step: int, total_steps: int) -> None:
        self.writer = open_writer(self.run_dir, start_step)
        self.step = start_step

    def on_step(self, info: StepInfo) -> None:
        self.step = info.step
        if self.writer is None or info.step % self.every:
            return
        for name, value in info.losses.items():
            self.writer.add_scalar(f"loss/{name}", value, info.step)
        self.writer.add_scalar("train/lr", info.lr, info.step)
        self.writer.add_scalar("train/samples_per_s", info.samples_per_s, info.step)

    def on_epoch_end(self, epoch: int, means: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in means.items():
            self.writer.add_scalar(f"epoch/{name}", value, self.step)
        self.writer.flush()

    def on_finish(self, result: FitResult) -> None:
        if self.writer is None:
            return
        try:
            if result.metrics is not None:
                write_evaluation(self.writer, self.run_dir, result.metrics, self.step)
        finally:
            self.writer.close()
            self.writer = None


def write_evaluation(writer, run_dir: Path, metrics: dict[str, Any], step: int) -> None:
    """The OOD metrics, per-set score histograms, PR curves and the evaluation figures of `run_dir`."""
    from oal_trainer.evaluate_outputs import ROC_FILE, SCORE_HIST_FILE, SCORES_FILE

    writer.add_scalar("ood/id_accuracy", metrics["id_accuracy"], step)
    for scorer, per_set in metrics["scores"].items():
        for dataset, values in per_set.items():
            for metric, value in values.items():
                writer.add_scalar(f"ood/{scorer}/{dataset}/{metric}", value, step)
    scores_path = run_dir / SCORES_FILE
    if scores_path.is_file():
        by_set = _read_scores(scores_path)
        for scorer in metrics["scores"]:
            id_scores = next(values[scorer] for kind, values in by_set.values() if kind == "id")
            for dataset, (kind, values) in by_set.items():
                writer.add_histogram(f"scores/{scorer}/{dataset}", values[scorer], step)
                if kind != "id":
                    labels = np.concatenate([np.ones(len(id_scores)), np.zeros(len(values[scorer]))])
                    predictions = _unit_interval(np.concatenate([id_scores, values[scorer]]))
                    writer.add_pr_curve(f"pr/{scorer}/{dataset}", labels, predictions, step)
    for tag, name in (("eval/roc", ROC_FILE), ("eval/score_hist", SCORE_HIST_FILE)):
        if (run_dir / name).is_file():
            from matplotlib.image import imread

            writer.add_image(tag, imread(run_dir / name)[..., :3], step, dataformats="HWC")


def _read_scores(path: Path) -> dict[str, tuple[str, dict[str, np.ndarray]]]:
    """scores.csv -> {dataset: (kind, {scorer: (N,) scores})}, in file order."""
    rows: dict[str, tuple[str, dict[str, list[float]]]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            _, columns = rows.setdefault(row["dataset"], (row["kind"], {}))
            for key, value in row.items():
                if key.startswith("score_"):
                    columns.setdefault(key[len("score_") :], []).append(float(value))
    return {name: (kind, {k: np.asarray(v) for k, v in cols.items()}) for name, (kind, cols) in rows.items()}


def _unit_interval(scores: np.ndarray) -> np.ndarray:
    """PR curves take "probabilities": a monotone map of the scores to [0, 1] (rank order kept)."""
    low, high = float(scores.min()), float(scores.max())
    return (scores - low) / (high - low) if high > low else np.full_like(scores, 0.5)


def tensorboard_hooks(run_dir: Path, hooks: FitHooks, every: int = 1) -> FitHooks:
    """`hooks` with a TensorBoardLog called after each of them; step scalars every `every` steps."""
    from oal_trainer.fit import FitHooks

    log = TensorBoardLog(run_dir, every)

    def chain(first, second):
        if first is None:
            return second

        def both(*args):
            first(*args)
            second(*args)

        return both

    return FitHooks(
        on_start=chain(hooks.on_start, log.on_start),
        on_step=chain(hooks.on_step, log.on_step),
        on_epoch_end=chain(hooks.on_epoch_end, log.on_epoch_end),
        on_finish=chain(hooks.on_finish, log.on_finish),
    )


def read_tags(run_dir: Path) -> dict[str, list[str]]:
    """The tags of the event files in `run_dir` by kind (scalars, histograms, images, ...): for checks."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    accumulator.Reload()
    return {kind: sorted(tags) for kind, tags in accumulator.Tags().items() if isinstance(tags, list)}


def scalar_values(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar tag of the event files in `run_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]

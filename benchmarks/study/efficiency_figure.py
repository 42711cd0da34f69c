"""Outlier efficiency of a sweep: a metric against the number of outliers each cell was fed.

    python benchmarks/study/efficiency_figure.py runs/study/full \
        --curve oal-energy=oal-energy-n60,oal-energy-n150,oal-energy,oal-energy-n2400 \
        --curve pixel-oe=pixel-oe-n60,pixel-oe-n150,pixel-oe,pixel-oe-n2400 \
        --baseline ce-ft --baseline kd --out docs/img/outlier-efficiency.png

Each cell of a curve is one point; its outlier count is the `num_samples` of the manifest its `shards`
config names (resolved from the folder the sweep ran in, `--root`). Points are the
mean over seeds with the 95% t interval (oal_trainer.stats); the baselines are drawn as bands. Also
writes a JSON and a Markdown table beside the figure: per point, the mean, the interval and the paired
difference against each baseline.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from oal_shared.shards import load_manifest  # noqa: E402
from oal_trainer.metrics import AUROC, FPR95_OOD_POSITIVE  # noqa: E402
from oal_trainer.stats import paired_difference, summarise  # noqa: E402
from oal_trainer.sweep_report import CellResults, load_cells  # noqa: E402

METRICS = (f"near_{FPR95_OOD_POSITIVE}", f"near_{AUROC}", "id_accuracy")
BAND_COLOURS = ("grey", "tab:brown", "tab:purple", "tab:olive")
LABELS = {METRICS[0]: "near-OOD FPR@95 (OOD+), %", METRICS[1]: "near-OOD AUROC, %", METRICS[2]: "ID accuracy, %"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="sweep folder (holds sweep.json)")
    parser.add_argument("--curve", action="append", required=True, help="NAME=cell,cell,...: one curve")
    parser.add_argument("--baseline", action="append", default=[], help="cell drawn as a band and paired against")
    parser.add_argument("--root", type=Path, default=Path("."), help="folder the sweep ran in (relative shards)")
    parser.add_argument("--scorer", default="energy")
    parser.add_argument("--out", type=Path, required=True, help="figure path (.png); .json and .md beside it")
    return parser.parse_args()


def outlier_count(sweep: Path, root: Path, cell: str) -> int:
    record = json.loads((sweep / "sweep.json").read_text(encoding="utf-8"))
    shards = next(run["config"].get("shards") for run in record["runs"] if run["cell"] == cell)
    if not shards:
        raise SystemExit(f"cell {cell} trains on no outliers (no shards in its config)")
    path = Path(shards) if Path(shards).is_absolute() else root / shards
    return load_manifest(path).num_samples


def point(cell: CellResults, baselines: dict[str, CellResults]) -> dict:
    seeds = sorted(cell.values)
    entry: dict = {"cell": cell.name, "seeds": seeds}
    for key in METRICS:
        summary = summarise([100 * cell.values[s][key] for s in seeds])
        entry[key] = {"mean": summary.mean, "ci": [summary.ci_low, summary.ci_high]}
        for name, base in baselines.items():
            shared = [s for s in seeds if s in base.values]
            diff = paired_difference(
                [100 * cell.values[s][key] for s in shared], [100 * base.values[s][key] for s in shared]
            )
            entry[key][f"minus_{name}"] = {"mean": diff.mean, "ci": [diff.ci_low, diff.ci_high], "n": diff.n}
    return entry


def main() -> int:
    args = parse_args()
    cells = {cell.name: cell for cell in load_cells(args.sweep, args.scorer) if cell.values}
    baselines = {name: cells[name] for name in args.baseline}
    curves: dict[str, list[dict]] = {}
    for curve in args.curve:
        name, _, members = curve.partition("=")
        for cell_name in filter(None, members.split(",")):
            if cell_name not in cells:
                print(f"--curve {name}: {cell_name} has no finished run in {args.sweep}; left out")
                continue
            count = outlier_count(args.sweep, args.root, cell_name)
            curves.setdefault(name, []).append({"outliers": count, **point(cells[cell_name], baselines)})
    for points in curves.values():
        points.sort(key=lambda p: p["outliers"])
    if not curves:
        raise SystemExit(f"no finished cell of {args.curve} in {args.sweep}")

    figure, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    for ax, key in zip(axes, METRICS, strict=True):
        for (name, base), colour in zip(baselines.items(), BAND_COLOURS, strict=False):
            summary = summarise([100 * v[key] for v in base.values.values()])
            ax.axhspan(summary.ci_low, summary.ci_high, color=colour, alpha=0.2, label=f"{name} (95% CI)")
        for recipe, points in curves.items():
            xs = [p["outliers"] for p in points]
            means = [p[key]["mean"] for p in points]
            errors = [
                [m - p[key]["ci"][0] for m, p in zip(means, points, strict=True)],
                [p[key]["ci"][1] - m for m, p in zip(means, points, strict=True)],
            ]
            ax.errorbar(xs, means, yerr=errors, marker="o", capsize=4, label=recipe)
        ax.set_xscale("log")
        ax.set_xlabel("outliers synthesised (one job each)")
        ax.set_ylabel(LABELS[key])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"Outlier efficiency ({args.sweep.name}; mean and 95% t interval over seeds)")
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)
    args.out.with_suffix(".json").write_text(json.dumps(curves, indent=2) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(markdown(curves, list(baselines)), encoding="utf-8")
    print(markdown(curves, list(baselines)))
    return 0


def markdown(curves: dict[str, list[dict]], baselines: list[str]) -> str:
    def fmt(value: dict) -> str:
        return f"{value['mean']:+.2f} [{value['ci'][0]:+.2f}, {value['ci'][1]:+.2f}]"

    header = ["recipe", "outliers", "seeds", *(LABELS[k] for k in METRICS)]
    header += [f"{LABELS[k].split(',')[0]} - {b}" for b in baselines for k in METRICS[:2]]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for recipe, points in curves.items():
        for p in points:
            row = [recipe, str(p["outliers"]), str(len(p["seeds"]))]
            row += [f"{p[k]['mean']:.2f} ± {(p[k]['ci'][1] - p[k]['ci'][0]) / 2:.2f}" for k in METRICS]
            row += [fmt(p[k][f"minus_{b}"]) for b in baselines for k in METRICS[:2]]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

"""`oal-train`: fit a recipe into a run dir, re-evaluate a run, compare runs.

    oal-train fit --recipe oal --out runs/oal --preset demo --set teacher_run=runs/teacher ...
    oal-train eval runs/oal
    oal-train report runs/ce runs/oal --out runs
    oal-train sweep benchmarks/sweeps/ablation.toml --out runs/ablation --lanes 2
    oal-train report runs/ablation --baseline ce --baseline kd   (statistics over seeds)
    oal-train config --recipe oal --preset demo       (print the resolved config)

Under torchrun: `torchrun --nproc_per_node 2 -m oal_trainer.cli fit ...`; only rank 0 logs.
Exit codes: 0 done, 1 a data/shard/checkpoint error, 2 a usage or config error, 130 interrupted.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from oal_shared.errors import ConfigError, OALError

logger = logging.getLogger(__name__)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train and evaluate OOD classifiers (OAL).")
err_console = Console(stderr=True)
out_console = Console()

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _print_error(exc: Exception) -> None:
    # Text, not markup: messages hold brackets (lists, shapes) that rich would read as tags.
    err_console.print(Text("error: ", style="bold red") + Text(str(exc)), highlight=False, soft_wrap=True)


def cli_errors(command):
    """Turn the errors a person can act on into one line on stderr and an exit code, no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ConfigError as exc:
            _print_error(exc)
            raise typer.Exit(EXIT_USAGE) from exc
        except OALError as exc:
            _print_error(exc)
            raise typer.Exit(EXIT_ERROR) from exc
        except KeyboardInterrupt as exc:
            err_console.print("interrupted; `oal-train fit` with the same --out resumes from the last epoch")
            raise typer.Exit(EXIT_INTERRUPTED) from exc

    return wrapper


class ProgressBar:
    """FitHooks that draw a tqdm bar with the loss and samples/s (rank 0, terminals only)."""

    def __init__(self, description: str, refresh_every: int = 10):
        self.description = description
        self.refresh_every = max(1, refresh_every)
        self.bar = None

    def on_start(self, start_step: int, total_steps: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc=self.description, unit="step", disable=None)

    def on_step(self, info) -> None:
        if self.bar is None:
            return
        if info.step % self.refresh_every == 0:  # reading the loss syncs the device: not every step
            loss = info.losses["loss"]
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{info.lr:.2e}", sps=f"{info.samples_per_s:.0f}")
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


RecipeOption = Annotated[
    str, typer.Option("--recipe", "-r", help="ce, kd, oal, oal-energy, latent-energy or pixel-oe.")
]
OutOption = Annotated[Path, typer.Option("--out", "-o", help="Run directory (resumed if it holds a checkpoint).")]
ConfigOption = Annotated[Path | None, typer.Option("--config", help="JSON file of config keys.")]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="key=value override; repeatable.")]
PresetOption = Annotated[str | None, typer.Option("--preset", help="smoke, demo or full.")]


@app.command()
@cli_errors
def fit(
    recipe: RecipeOption,
    out: OutOption,
    config: ConfigOption = None,
    set_: SetOption = None,
    preset: PresetOption = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar (terminals only).")] = True,
) -> None:
    """Train a recipe into --out, then evaluate it there."""
    from oal_trainer.evaluate_outputs import metrics_table
    from oal_trainer.fit import FitHooks
    from oal_trainer.fit import fit as run_fit
    from oal_trainer.recipes import resolve_config

    train_config = resolve_config(recipe, preset, config, set_ or [])
    bar = ProgressBar(f"{recipe} ({out.name})") if progress and _is_main_rank() else None
    hooks = FitHooks(on_start=bar.on_start, on_step=bar.on_step) if bar else FitHooks()
    try:
        result = run_fit(train_config, out, hooks=hooks)
    finally:
        if bar:
            bar.close()
    if not _is_main_rank():
        return
    if result.metrics is not None:
        out_console.print(metrics_table(result.metrics))
    out_console.print(f"run dir: {out} ({result.epochs} epochs, {result.steps} steps)")


@app.command("eval")
@cli_errors
def eval_run(
    run_dir: Annotated[Path, typer.Argument(help="A finished run dir (config.json + model.safetensors).")],
    eval_subset: Annotated[int | None, typer.Option(help="Images per set; default: the run's own.")] = None,
    scorer: Annotated[
        list[str] | None,
        typer.Option(
            "--scorer",
            help="OOD score to evaluate besides the run's eval_scorers, repeatable (energy, msp, max_logit; "
            "with the detectors extra: vim, knn, mahalanobis, react, ash, dice, odin).",
        ),
    ] = None,
) -> None:
    """Load a run's model and config and re-run its evaluation (overwrites metrics.json and friends)."""
    from oal_shared.data.benchmark import load_benchmark
    from oal_trainer.checkpoint import CONFIG_FILE
    from oal_trainer.distributed import resolve_device
    from oal_trainer.evaluate_outputs import metrics_table
    from oal_trainer.fit import evaluate_run
    from oal_trainer.recipes import load_config
    from oal_trainer.scorers import DEFAULT_SCORER
    from oal_trainer.teacher import load_run_model

    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise ConfigError(f"run dir {run_dir}: no {CONFIG_FILE}; is it a run dir?")
    config = load_config(config_path)
    if eval_subset is not None:
        config = config.model_copy(update={"eval_subset": eval_subset})
    if scorer:
        from oal_trainer.scorers import get_scorer

        for name in scorer:
            get_scorer(name)  # an unknown or uninstalled scorer fails before the model loads
        config = config.model_copy(update={"eval_scorers": tuple(dict.fromkeys([*config.eval_scorers, *scorer]))})
    benchmark = load_benchmark(config.benchmark)
    loaded = load_run_model(run_dir, "run dir", benchmark.num_classes, benchmark.in_channels)
    metrics, _ = evaluate_run(loaded.model, benchmark, config, resolve_device(config.device), run_dir)
    shown = DEFAULT_SCORER if DEFAULT_SCORER in config.eval_scorers else config.eval_scorers[0]
    out_console.print(metrics_table(metrics, shown))


@app.command()
@cli_errors
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Finished run dirs to compare, or one sweep folder.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write report.md and report.png here.")] = None,
    scorer: Annotated[str, typer.Option(help="Which OOD score to compare.")] = "energy",
    baseline: Annotated[
        list[str] | None, typer.Option("--baseline", help="Sweep cell to pair the others against; repeatable.")
    ] = None,
    cell: Annotated[
        list[str] | None, typer.Option("--cell", help="Sweep cell to report (default: all); repeatable.")
    ] = None,
) -> None:
    """Put runs side by side (report.md, report.png); for a sweep folder, statistics over seeds."""
    from oal_trainer.sweep_report import build_sweep_report, is_sweep_dir

    if len(run_dirs) == 1 and is_sweep_dir(run_dirs[0]):
        result = build_sweep_report(run_dirs[0], baseline or [], scorer=scorer, out_dir=out, only=cell or [])
    else:
        if baseline or cell:
            raise ConfigError("--baseline, --cell: only for a sweep folder (one made by `oal-train sweep`)")
        from oal_trainer.report import build_report

        result = build_report(run_dirs, out, scorer=scorer)
    out_console.print(result.markdown, markup=False, highlight=False)
    for path in result.paths.values():
        out_console.print(f"wrote {path}")


@app.command()
@cli_errors
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Finished run dirs and/or sweep folders.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write compare.md and compare.csv here.")] = None,
    scorer: Annotated[str, typer.Option(help="Which of our OOD scores to show.")] = "energy",
    benchmark: Annotated[
        list[str] | None, typer.Option("--benchmark", help="Published rows of cifar10 and/or cifar100; repeatable.")
    ] = None,
) -> None:
    """Our runs beside published OpenOOD v1.5 rows (OAL, OE, VOS, NPOS, CE on CIFAR), sources cited."""
    from oal_trainer.compare import build_comparison
    from oal_trainer.published import PUBLISHED_BENCHMARKS

    result = build_comparison(run_dirs, out, scorer=scorer, benchmarks=tuple(benchmark or PUBLISHED_BENCHMARKS))
    out_console.print(result.markdown, markup=False, highlight=False)
    for path in result.paths.values():
        out_console.print(f"wrote {path}")


@app.command()
@cli_errors
def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="TOML or JSON sweep file (cells, seeds, overrides).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Sweep folder; a re-run skips finished runs.")],
    lanes: Annotated[int, typer.Option(help="Runs at once, each its own process.")] = 2,
    threads: Annotated[int, typer.Option(help="Torch threads per lane.")] = 1,
) -> None:
    """Run a grid of recipes x seeds x overrides into one folder, resumably; then `oal-train report OUT`."""
    from oal_trainer.sweep import run_sweep

    result = run_sweep(sweep_file, out, lanes=lanes, threads=threads, console=err_console)
    done = sum(state in ("done", "skipped") for state in result.states.values())
    out_console.print(f"sweep {result.out}: {done}/{len(result.states)} runs finished")
    if result.failed:
        for cell, seed in result.failed:
            out_console.print(
                f"  {result.states[(cell, seed)]}: {cell}/seed-{seed} (log: {result.out / cell}/seed-{seed}.log)"
            )
        raise typer.Exit(EXIT_ERROR)


@app.command("config")
@cli_errors
def show_config(
    recipe: RecipeOption,
    config: ConfigOption = None,
    set_: SetOption = None,
    preset: PresetOption = None,
) -> None:
    """Print the resolved config as JSON (what `fit` would record in config.json)."""
    from oal_trainer.recipes import resolve_config

    resolved = resolve_config(recipe, preset, config, set_ or [])
    out_console.print_json(json.dumps(resolved.model_dump(mode="json")))


@app.command()
@cli_errors
def embed(
    generator: Annotated[Path, typer.Option(help="A Stable Diffusion diffusers folder (text_encoder/, tokenizer/).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Embedding-set file to write (.safetensors).")],
    benchmark: Annotated[str, typer.Option(help="Benchmark whose ID images are embedded.")] = "fmnist-osr",
    method: Annotated[str, typer.Option(help="text-aligned (train an image encoder) or projected (--run).")] = (
        "text-aligned"
    ),
    run: Annotated[Path | None, typer.Option(help="projected: a finished classifier run dir.")] = None,
    class_name: Annotated[
        list[str] | None, typer.Option(help="Class word of each ID class, in label order (repeat).")
    ] = None,
    model: Annotated[str, typer.Option(help="text-aligned: the encoder (a model name of oal-train).")] = "resnet_small",
    per_class: Annotated[int, typer.Option(help="ID train images per class put into the set.")] = 500,
    train_per_class: Annotated[int, typer.Option(help="ID train images per class to train on; 0: all.")] = 1000,
    eval_per_class: Annotated[int, typer.Option(help="Held-out ID test images per class for the accuracy.")] = 200,
    epochs: Annotated[int | None, typer.Option(help="Default: 5 (text-aligned), 30 (projected).")] = None,
    lr: Annotated[float, typer.Option(help="AdamW peak learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Images (or features) per step.")] = 128,
    temperature: Annotated[float, typer.Option(help="tau of the cosine logits.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seeds the subsets, the initial weights and the order.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    threads: Annotated[int, typer.Option(help="Torch threads; 0: OAL_TORCH_THREADS or torch's default.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar (terminals only).")] = True,
) -> None:
    """Make an embedding set in an SD folder's token space from the benchmark's ID images (Stage A)."""
    import torch

    from oal_shared.embeddings import save_embedding_set
    from oal_shared.settings import get_settings
    from oal_trainer.embed import EmbedConfig, make_embedding_set

    config = EmbedConfig(
        generator=generator,
        benchmark=benchmark,
        method=method,
        run=run,
        class_names=tuple(class_name or ()),
        model=model,
        per_class=per_class,
        train_per_class=train_per_class or None,
        eval_per_class=eval_per_class,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        temperature=temperature,
        seed=seed,
        device=device,
    )
    if threads or get_settings().torch_threads:
        torch.set_num_threads(threads or get_settings().torch_threads)
    result = make_embedding_set(config, progress=progress)
    save_embedding_set(result.embedding_set, out)
    record = result.record
    out_console.print(
        f"wrote {out}: {len(result.embedding_set)} vectors of dim {result.embedding_set.dim}, space {record['space']}\n"
        f"nearest-row accuracy on {record['held_out_images']} held-out images: {record['nearest_row_accuracy']:.3f} "
        f"(chance {record['chance']:.3f}); {result.seconds:.1f} s",
        highlight=False,
        soft_wrap=True,
    )


def main() -> None:
    level = logging.INFO if _is_main_rank() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()

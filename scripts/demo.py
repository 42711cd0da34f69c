"""`make demo`: the whole pipeline on the embedded default, as real processes.

client -> API -> Redis queue -> worker -> shards -> trainer -> runs/demo/

Steps, run in parallel lanes (scripts/demo_schedule.py), each after the steps it needs:
  pretrain generator -> synthesise outliers (API + worker, one job over REST) -> decode outlier grid
  train teacher (a larger `ce` model), train ce (the student's start)
  train kd, oal, oal-energy (need teacher, ce and the outliers), latent-energy and pixel-oe (ce and
  the outliers), ce-ft (ce alone: the fair baseline, the same extra epoch with cross-entropy)
  -> compare the recipes
The generator, teacher and ce student are reused from an earlier run when finished (--fresh
retrains them); the rest is repeated. Each step's output goes to OUT/logs/<step>.log, the step
table and the total wall time to the terminal and OUT/timings.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from demo_output import last_line, step_table, write_timings
from demo_schedule import Lanes, Step, StepFailed, StepRecord, check_graph, run_steps
from demo_services import background, submit_and_follow, wait_ready
from rich.console import Console
from rich.live import Live

from oal_trainer.recipes import RECIPE_OVERRIDES, TrainConfig

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Fine-tunes of the `ce` student, one epoch each. latent-energy is the recipe the full study supports
# (docs/RESULTS.md); ce-ft is `ce` trained that extra epoch at the fine-tuning lr, the fair baseline.
STUDENT_RECIPES = ("ce-ft", "kd", "oal", "oal-energy", "latent-energy", "pixel-oe")
RUN_RECIPE = {"ce-ft": "ce"}  # run name -> recipe, where they differ
RUN_SETS = {"ce-ft": ["epochs=1", "lr=0.005", "augment=false"]}  # as the fine-tuning recipes train
# Each step's seconds in the sequential 2-thread demo on 2 idle cores (README, Timings, 2026-11-28;
# ce-ft and latent-energy were added later: estimates). Only the order of ready steps uses them:
# the longest remaining chain (the teacher's) goes first.
COSTS = {"pretrain generator": 157, "train teacher": 331, "train ce": 59, "synthesise outliers": 31}
COSTS |= {"train kd": 59, "train oal": 41, "train oal-energy": 42, "train pixel-oe": 61}
COSTS |= {"train ce-ft": 30, "train latent-energy": 35}
console = Console()


def parse_args() -> argparse.Namespace:
    cores = len(os.sched_getaffinity(0))
    lanes = max(1, min(4, cores))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo", help="output directory")
    parser.add_argument(
        "--artifacts", type=Path, default=REPO / "artifacts", help="generators and trainer caches (OAL_ARTIFACT_DIR)"
    )
    parser.add_argument("--preset", default="demo", help="trainer and pretrain preset (smoke|demo|full)")
    parser.add_argument(
        "--num-outliers",
        type=int,
        default=600,
        help="outliers the job synthesises (600: 100 per class, the paper's select x keep)",
    )
    parser.add_argument("--port", type=int, default=0, help="API port (0: a free one)")
    parser.add_argument("--fresh", action="store_true", help="retrain everything instead of reusing")
    parser.add_argument("--lanes", type=int, default=lanes, help=f"steps run at once (default here: {lanes})")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores / lanes)")
    args = parser.parse_args()
    if args.lanes < 1 or args.threads < 0:
        parser.error(f"--lanes must be >= 1 and --threads >= 0, got {args.lanes} and {args.threads}")
    args.threads = args.threads or max(1, cores // args.lanes)
    return args


def _recipe_defaults(run: str) -> TrainConfig:
    return TrainConfig.model_construct(**RECIPE_OVERRIDES[RUN_RECIPE.get(run, run)])


def distils(run: str) -> bool:
    """Whether the run learns from the teacher (kd, oal, oal-energy); the others do not wait for it."""
    return _recipe_defaults(run).uses_teacher


def uses_outliers(run: str) -> bool:
    return _recipe_defaults(run).uses_outliers


def demo_steps() -> list[Step]:
    def needs(run: str) -> tuple[str, ...]:
        return (
            *(("train teacher",) if distils(run) else ()),
            "train ce",
            *(("synthesise outliers",) if uses_outliers(run) else ()),
        )

    students = [Step(f"train {r}", needs(r), COSTS[f"train {r}"]) for r in STUDENT_RECIPES]
    return [
        Step("pretrain generator", (), COSTS["pretrain generator"], reusable=True),
        Step("train teacher", (), COSTS["train teacher"], reusable=True),
        Step("train ce", (), COSTS["train ce"], reusable=True),
        Step("synthesise outliers", ("pretrain generator",), COSTS["synthesise outliers"]),
        Step("decode outlier grid", ("synthesise outliers",)),
        *students,
        Step("compare the recipes", ("decode outlier grid", *(s.name for s in students))),
    ]


def thread_env(base: dict[str, str], threads: int) -> dict[str, str]:
    """Every torch and BLAS pool of a child sized to `threads`, so lanes do not oversubscribe the cores."""
    pools = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OAL_TORCH_THREADS")
    return {**base, **{name: str(threads) for name in pools}}


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out: Path = args.out.resolve()
        artifacts = args.artifacts.resolve()
        self.generator_dir = artifacts / "generators" / "fmnist-ldm"
        self.shard_root = self.out / "shards"
        self.logs = self.out / "logs"
        base = {
            **os.environ,
            "OAL_ARTIFACT_DIR": str(artifacts),
            "OAL_GENERATOR_ROOT": str(artifacts / "generators"),
            "OAL_SHARD_ROOT": str(self.shard_root),
        }
        self.env = thread_env(base, args.threads)
        self.lanes = Lanes()
        self.shard_dir: Path | None = None
        self.train = [str(BIN / "oal-train"), "fit", "--preset", args.preset, "--no-progress"]

    def finished_before(self, step: str) -> bool:
        if step == "pretrain generator":
            return (self.generator_dir / "oal_generator.json").exists()
        return (self.out / step.removeprefix("train ") / "metrics.json").exists()

    def log(self, step: str) -> Path:
        return self.logs / f"{step.replace(' ', '-')}.log"

    def actions(self) -> dict:
        acts = {
            "pretrain generator": lambda r: self.lanes.run(
                [str(BIN / "oal-synth"), "pretrain", "--preset", self.args.preset, "--out", str(self.generator_dir)],
                self.env,
                self.log("pretrain generator"),
            ),
            "train teacher": lambda r: self.fit("teacher", "ce", ["--set", "model=resnet_wide"]),
            "train ce": lambda r: self.fit("ce", "ce", []),
            "synthesise outliers": self.synthesise,
            "decode outlier grid": lambda r: self.lanes.run(
                [sys.executable, "-m", "oal_trainer.outlier_grid", str(self.shard_dir), "--generator-dir"]
                + [str(self.generator_dir), "--out", str(self.out / "outliers.png")],
                self.env,
                self.log("decode outlier grid"),
            ),
            "compare the recipes": self.report,
        }
        for recipe in STUDENT_RECIPES:
            acts[f"train {recipe}"] = lambda r, recipe=recipe: self.student(recipe)
        return acts

    def fit(self, name: str, recipe: str, extra: list[str]) -> None:
        argv = [*self.train, "--recipe", recipe, "--out", str(self.out / name), *extra]
        self.lanes.run(argv, self.env, self.log(f"train {name}"))

    def student(self, recipe: str) -> None:
        shutil.rmtree(self.out / recipe, ignore_errors=True)  # a fine-tune is always repeated
        extra = ["--set", f"teacher_run={self.out / 'teacher'}"] if distils(recipe) else []
        extra += ["--set", f"init_from={self.out / 'ce'}"]
        if uses_outliers(recipe):
            extra += ["--set", f"shards={self.shard_dir}", "--set", f"generator_dir={self.generator_dir}"]
        for item in RUN_SETS.get(recipe, []):
            extra += ["--set", item]
        self.fit(recipe, RUN_RECIPE.get(recipe, recipe), extra)

    def synthesise(self, record: StepRecord) -> None:
        port = self.args.port or _free_port()
        base_url = f"http://127.0.0.1:{port}"
        say = console.log
        with background("api", [str(BIN / "oal-synth"), "serve", "--port", str(port)], self.env, self.logs, say) as api:
            with background("worker", [str(BIN / "oal-synth"), "worker"], self.env, self.logs, say):
                wait_ready(base_url, api, self.lanes.stop)
                spec = {
                    "generator": "fmnist-ldm",
                    "embeddings": {"benchmark": "fmnist-osr"},
                    "num_outliers": self.args.num_outliers,
                    "seed": 0,
                    "diffusion": {"steps": 25, "guidance_scale": 3.0},
                }

                def progress(done: int, total: int | None) -> None:
                    record.detail = f"{done}/{total or '?'} outliers"

                job = submit_and_follow(base_url, spec, self.lanes.stop, progress)
        self.shard_dir = self.shard_root / job["id"]
        record.detail = f"job {job['id']}"

    def report(self, record: StepRecord) -> None:
        runs = [self.out / r for r in ("ce", *STUDENT_RECIPES)]
        for run_dir in runs:
            shutil.copy2(self.shard_dir / "manifest.json", run_dir / "outlier-manifest.json")
            shutil.copy2(self.out / "outliers.png", run_dir / "outliers.png")
        argv = [str(BIN / "oal-train"), "report", *map(str, runs), "--out", str(self.out)]
        self.lanes.run(argv, self.env, self.log("compare the recipes"))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # the same orderly stop as Ctrl-C: every running step's process ends


def main() -> int:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    args = parse_args()
    demo = Demo(args)
    steps = check_graph(demo_steps())
    if args.fresh and demo.out.exists():
        shutil.rmtree(demo.out)
    demo.out.mkdir(parents=True, exist_ok=True)
    records = {name: StepRecord() for name in steps}
    for name, step in steps.items():
        if step.reusable and not args.fresh and demo.finished_before(name):
            records[name].state, records[name].detail = "reused", "finished by an earlier run"
    load_start = os.getloadavg()
    console.log(
        f"{len(os.sched_getaffinity(0))} cores, {args.lanes} lanes x {args.threads} torch threads, "
        f"preset {args.preset}, load average {load_start[0]:.2f}; logs: {demo.logs}"
    )

    def log_of(name: str) -> str:
        return demo.log(name).name

    def changed(name: str, record: StepRecord) -> None:
        if record.state == "running":
            record.detail = log_of(name)
            console.log(f"lane {record.lane}: started {name}")
        else:
            console.log(f"lane {record.lane}: {name} {record.state} in {record.seconds:.0f} s")

    started = time.perf_counter()
    failure: StepFailed | None = None
    interrupted = False
    with Live(
        step_table(records, log_of, demo.logs, console.width), console=console, refresh_per_second=2, transient=True
    ) as live:

        def tick() -> None:
            for name, record in records.items():
                if record.state == "running" and name != "synthesise outliers":
                    record.detail = last_line(demo.log(name)) or record.detail
            live.update(step_table(records, log_of, demo.logs, console.width))

        try:
            run_steps(steps, demo.actions(), records, args.lanes, demo.lanes, changed, tick)
        except StepFailed as exc:
            failure = exc
        except KeyboardInterrupt:
            interrupted = True
    total_s = time.perf_counter() - started
    console.print(step_table(records, log_of, demo.logs, console.width, total_s))
    write_timings(demo.out / "timings.json", args, records, total_s, load_start)
    if failure is not None:
        console.print(f"[red]{failure}[/]")
        return 1
    if interrupted:
        console.print("[red]stopped by a signal[/]; a re-run reuses the finished generator, teacher and ce")
        return 130
    console.print(f"report: {demo.out / 'report.md'}  timings: {demo.out / 'timings.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

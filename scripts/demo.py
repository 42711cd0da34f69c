"""`make demo`: the whole pipeline on the embedded default, as real processes.

client -> API -> Redis queue -> worker -> shards -> trainer -> runs/demo/

Steps (each reuses what an earlier run left, so a re-run takes minutes, not the full time):
 1. start an API server and a synthesis worker (Redis is started by `make`)
 2. pretrain the embedded generator (fmnist-ldm)
 3. train the teacher (a larger `ce` model) and the `ce` student
 4. submit an outlier job over REST and follow its progress
 5. train kd, oal, oal-energy and pixel-oe from the same budget
 6. put the runs side by side (report.md, report.png) and stop every process started here
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STUDENT_RECIPES = ("kd", "oal", "oal-energy", "pixel-oe")
console = Console()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo", help="output directory")
    parser.add_argument("--preset", default="demo", help="trainer and pretrain preset (smoke|demo|full)")
    parser.add_argument(
        "--num-outliers",
        type=int,
        default=600,
        help="outliers the job synthesises (600: 100 per class, the paper's select x keep)",
    )
    parser.add_argument("--port", type=int, default=0, help="API port (0: a free one)")
    parser.add_argument("--fresh", action="store_true", help="retrain everything instead of reusing")
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def background(name: str, argv: list[str], env: dict[str, str], log_dir: Path):
    """Runs a service process for the duration of the block; its output goes to log_dir/name.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        console.log(f"started {name} (pid {proc.pid}), log: {log_path}")
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        console.log(f"stopped {name}")


def run_step(title: str, argv: list[str], env: dict[str, str]) -> float:
    """Runs one CLI step in the foreground (its own progress bars show); returns seconds taken."""
    console.rule(title)
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True)
    return time.perf_counter() - started


def wait_ready(base_url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the API process exited with code {proc.returncode}; see its log")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the API at {base_url} was not ready after {timeout_s:.0f} s")


def submit_and_follow(base_url: str, spec: dict) -> dict:
    response = httpx.post(f"{base_url}/v1/jobs", json=spec, timeout=30)
    if response.status_code != 202:
        raise SystemExit(f"job refused ({response.status_code}): {response.text}")
    job = response.json()
    console.log(f"job {job['id']} accepted: {spec['num_outliers']} outliers from {spec['generator']}")
    columns = (TextColumn("synthesis"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("job", total=spec["num_outliers"])
        while job["status"] not in {"finished", "failed", "canceled", "stopped"}:
            time.sleep(1)
            job = httpx.get(f"{base_url}/v1/jobs/{job['id']}", timeout=30).json()
            progress.update(task, completed=job["progress"]["done"], total=job["progress"]["total"] or None)
    if job["status"] != "finished":
        raise SystemExit(f"job {job['id']} ended {job['status']}: {job.get('error')}")
    return job


def main() -> int:
    args = parse_args()
    out: Path = args.out.resolve()
    artifacts = REPO / "artifacts"
    generator_root = artifacts / "generators"
    generator_dir = generator_root / "fmnist-ldm"
    shard_root = out / "shards"
    env = {
        **os.environ,
        "OAL_ARTIFACT_DIR": str(artifacts),
        "OAL_GENERATOR_ROOT": str(generator_root),
        "OAL_SHARD_ROOT": str(shard_root),
    }
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    train = [str(BIN / "oal-train"), "fit", "--preset", args.preset]

    if not (generator_dir / "oal_generator.json").exists() or args.fresh:
        timings["pretrain generator"] = run_step(
            "pretrain the embedded generator",
            [str(BIN / "oal-synth"), "pretrain", "--preset", args.preset, "--out", str(generator_dir)],
            env,
        )
    for name, extra in (("teacher", ["--set", "model=resnet_wide"]), ("ce", [])):
        if not (out / name / "metrics.json").exists():
            timings[f"train {name}"] = run_step(
                f"train {name}", [*train, "--recipe", "ce", "--out", str(out / name), *extra], env
            )

    port = args.port or free_port()
    base_url = f"http://127.0.0.1:{port}"
    with ExitStack() as stack:
        api = stack.enter_context(
            background("api", [str(BIN / "oal-synth"), "serve", "--port", str(port)], env, out / "logs")
        )
        stack.enter_context(background("worker", [str(BIN / "oal-synth"), "worker"], env, out / "logs"))
        wait_ready(base_url, api)
        console.rule("synthesise outliers over REST")
        t0 = time.perf_counter()
        job = submit_and_follow(
            base_url,
            {
                "generator": "fmnist-ldm",
                "embeddings": {"benchmark": "fmnist-osr"},
                "num_outliers": args.num_outliers,
                "seed": 0,
                "diffusion": {"steps": 25, "guidance_scale": 3.0},
            },
        )
        timings["synthesise outliers"] = time.perf_counter() - t0
    shard_dir = shard_root / job["id"]

    teacher = ["--set", f"teacher_run={out / 'teacher'}", "--set", f"init_from={out / 'ce'}"]
    for recipe in STUDENT_RECIPES:
        run_dir = out / recipe
        if run_dir.exists():
            shutil.rmtree(run_dir)
        extra = [*teacher, "--set", f"shards={shard_dir}", "--set", f"generator_dir={generator_dir}"]
        timings[f"train {recipe}"] = run_step(
            f"train {recipe}", [*train, "--recipe", recipe, "--out", str(run_dir), *extra], env
        )
    console.rule("decode a grid of outliers")
    grid = out / "outliers.png"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "oal_trainer.outlier_grid",
            str(shard_dir),
            "--generator-dir",
            str(generator_dir),
            "--out",
            str(grid),
        ],
        env=env,
        check=True,
    )
    for run_dir in (out / r for r in ("ce", *STUDENT_RECIPES)):
        shutil.copy2(shard_dir / "manifest.json", run_dir / "outlier-manifest.json")
        shutil.copy2(grid, run_dir / "outliers.png")

    run_step(
        "compare the recipes",
        [str(BIN / "oal-train"), "report", *(str(out / r) for r in ("ce", *STUDENT_RECIPES)), "--out", str(out)],
        env,
    )
    timings["total"] = time.perf_counter() - started
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    console.print({k: f"{v:.0f} s" for k, v in timings.items()})
    console.print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

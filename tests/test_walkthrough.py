"""README's "Harden your own classifier", run as written: its fenced blocks are the commands.

The bash block is parsed from README.md and every line runs as a real process (the installed
`oal-train` / `oal-synth`, `curl`), in a fresh working folder holding a few hundred generated PNGs
(tests/utils/walkthrough_data.py) and the tiny-random SD pipeline as `generators/my-sd`. The only
changes are smaller sizes (appended `--set`/options, which override the README's), the test's
port and Redis queue, and the two placeholders the reader fills in (`<set-id>`, `<job-id>`),
taken from the previous commands' answers. Then every artifact is checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from oal_shared.embeddings import load_embedding_set
from oal_shared.shards import list_shards, read_manifest
from tests.conftest import TEST_REDIS_URL
from tests.utils.live_server import wait_until
from tests.utils.tiny_sd import tiny_sd_folder
from tests.utils.walkthrough_data import WALKTHROUGH_CLASSES, write_walkthrough_benchmark

pytestmark = [pytest.mark.redis, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
SECTION = (REPO / "README.md").read_text(encoding="utf-8").split("## Harden your own classifier\n", 1)[1]
SECTION = SECTION.split("\n## ", 1)[0]
BIN = Path(sys.executable).parent
COMMAND_TIMEOUT_S = 240

# Smoke sizes: one epoch, small models, a small evaluation subset. Appended after the README's own
# arguments, so they win (`--set` is applied in order).
FIT_TINY = ["--preset", "smoke", "--set", "eval_subset=48", "--set", "batch_size=32", "--set", "tensorboard=false"]
TINY_MODELS = {"runs/teacher": "resnet_small", "runs/ce": "resnet_tiny", "runs/oal": "resnet_tiny"}
EMBED_TINY = ["--per-class", "20", "--eval-per-class", "20", "--epochs", "10", "--batch-size", "32", "--no-progress"]
JOB_TINY = {
    "num_outliers": 12,
    "sampler": {"k": 5, "select": 4, "n_candidates": 16, "keep": 2},
    "diffusion": {"steps": 3, "batch_size": 4, "guidance_scale": 2.0},
    "shards": {"max_samples": 6},
}


def readme_commands() -> list[str]:
    """The bash block's commands: continuation lines joined, comments dropped."""
    block = re.search(r"```bash\n(.*?)```", SECTION, flags=re.DOTALL).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [" ".join(line.split()) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def readme_job_spec() -> dict:
    return json.loads(re.search(r"```json\n(.*?)```", SECTION, flags=re.DOTALL).group(1))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def merged(base: dict, override: dict) -> dict:
    return {
        k: merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        for k, v in {**base, **override}.items()
    }


class Walkthrough:
    """Runs README lines in `folder`, remembering what a reader would read off the screen."""

    def __init__(self, folder: Path, env: dict[str, str], port: int):
        self.folder, self.env, self.port = folder, env, port
        self.background: list[subprocess.Popen] = []
        self.outputs: dict[str, str] = {}
        self.values: dict[str, str] = {}

    def argv(self, command: str) -> list[str]:
        command = command.replace("http://127.0.0.1:8000", f"http://127.0.0.1:{self.port}")
        command = command.replace("--port 8000", f"--port {self.port}")
        for placeholder, value in self.values.items():
            command = command.replace(placeholder, value)
        assert "<" not in command, f"a placeholder is left in {command!r}"
        argv = shlex.split(command.rstrip(" &"))
        if argv[0] in ("oal-train", "oal-synth"):
            argv[0] = str(BIN / argv[0])
        return argv + self.tiny(argv)

    def tiny(self, argv: list[str]) -> list[str]:
        if argv[1:2] == ["fit"]:
            out = argv[argv.index("--out") + 1]
            return [*FIT_TINY, "--set", f"model={TINY_MODELS[out]}"]
        if argv[1:2] == ["embed"]:
            return EMBED_TINY
        return []

    def run(self, command: str) -> str:
        if command.startswith("export "):
            self.env.update(item.split("=", 1) for item in shlex.split(command)[1:])
            return ""
        argv = self.argv(command)
        if command.endswith("&"):
            with open(self.log_path(argv), "wb") as log:  # the child keeps its own copy of the descriptor
                self.background.append(
                    subprocess.Popen(
                        argv,
                        cwd=self.folder,
                        env=self.env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            return ""
        done = subprocess.run(
            argv, cwd=self.folder, env=self.env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{output[-4000:]}{self.background_logs()}"
        self.outputs[command] = output
        return done.stdout

    def log_path(self, argv: list[str]) -> Path:
        return self.folder / f"{Path(argv[0]).name}-{argv[1]}.log"

    def background_logs(self) -> str:
        """The tails of the service processes' logs, for a failing command's message."""
        tails = [
            f"\n--- {proc.args[1]}\n" + self.log_path(proc.args).read_text(errors="replace")[-2000:]
            for proc in self.background
        ]
        return "".join(tails)

    def stop(self) -> None:
        for proc in self.background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.background:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def test_the_readme_walkthrough_runs_as_written_and_leaves_every_artifact(redis_conn, tmp_path, tmp_path_factory):
    folder = tmp_path / "work"
    write_walkthrough_benchmark(folder / "data")
    # A user's SD folder has no oal_generator.json until `register-sd` writes it.
    shutil.copytree(
        tiny_sd_folder(tmp_path_factory.getbasetemp()),
        folder / "generators" / "my-sd",
        ignore=shutil.ignore_patterns("oal_generator.json"),
    )
    (folder / "job.json").write_text(json.dumps(merged(readme_job_spec(), JOB_TINY)), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OAL_")}
    env.update(
        OAL_REDIS_URL=TEST_REDIS_URL,
        OAL_QUEUE_NAME="oal-walkthrough",
        OAL_JOB_RETRIES="0",
        OAL_TORCH_THREADS="1",
        COLUMNS="500",
        OAL_ID_STREAM_WORKERS="1",
    )
    walk = Walkthrough(folder, env, free_port())
    api = f"http://127.0.0.1:{walk.port}"
    commands = readme_commands()
    started = time.monotonic()
    try:
        for command in commands:
            if command.startswith("curl") and "/v1/embedding-sets" in command:
                wait_until(lambda: _answers(api + "/readyz"), timeout=60, what="the API to be ready")
                uploaded = json.loads(walk.run(command))
                assert "id" in uploaded, uploaded
                walk.values["<set-id>"] = uploaded["id"]
            elif command.startswith("oal-synth submit"):
                stdout = walk.run(command)
                manifest_path = Path(re.search(r"(\S*manifest\.json)", stdout).group(1))
                walk.values["<job-id>"] = manifest_path.parent.name
            else:
                walk.run(command)
        generators = httpx.get(api + "/v1/generators", timeout=10).json()
        job = httpx.get(f"{api}/v1/jobs/{walk.values['<job-id>']}", timeout=10).json()
    finally:
        walk.stop()
    elapsed = time.monotonic() - started

    # The benchmark file was accepted: class names from the folders, both OOD folders evaluated.
    for run in ("runs/teacher", "runs/ce", "runs/oal"):
        run_dir = folder / run
        assert (run_dir / "model.safetensors").stat().st_size > 0, run
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["benchmark"] == "photos"
        assert set(metrics["datasets"]) == {"photos-test", "photos-near", "photos-noise"}
        assert 0.0 <= metrics["id_accuracy"] <= 1.0
    # The generator was registered and the set lives in its space.
    listed = {g["id"]: g for g in generators["generators"]}["my-sd"]
    registered = json.loads((folder / "generators" / "my-sd" / "oal_generator.json").read_text())
    embedding_set = load_embedding_set(folder / "sets" / "photos-sd.safetensors")
    assert embedding_set.space == listed["space"] == registered["space"] == uploaded["space"]
    assert embedding_set.space.startswith("sd-token:")
    assert tuple(embedding_set.class_names) == WALKTHROUGH_CLASSES
    assert json.loads(embedding_set.source)["method"] == "projected"
    # The job finished, with a manifest whose sha256s are the shards' own.
    assert job["status"] == "finished", job.get("error")
    job_dir = folder / "artifacts" / "shards" / walk.values["<job-id>"]
    assert manifest_path.resolve() == (job_dir / "manifest.json").resolve()
    manifest = read_manifest(job_dir)
    assert manifest["num_samples"] == JOB_TINY["num_outliers"]
    assert manifest["embeddings"]["space"] == embedding_set.space
    shards = list_shards(job_dir)
    assert len(shards) == len(manifest["shards"]) >= 2
    for entry in manifest["shards"]:
        assert hashlib.sha256((job_dir / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]
    # The oal run trained on that job, from the ce run, with the teacher.
    run_json = json.loads((folder / "runs" / "oal" / "run.json").read_text())
    assert run_json["outliers"]["shards"] == f"artifacts/shards/{walk.values['<job-id>']}"
    assert run_json["outliers"]["job_spec"]["embeddings"] == {"set_id": uploaded["id"]}
    assert run_json["outliers"]["samples_read"] > 0 and run_json["outliers"]["skipped"] == 0
    assert (run_json["teacher"]["run_dir"], run_json["init_from"]["run_dir"]) == ("runs/teacher", "runs/ce")
    assert json.loads((folder / "runs" / "oal" / "config.json").read_text())["recipe"] == "oal"
    # The report sets the two side by side.
    report = (folder / "runs" / "report.md").read_text()
    assert "| ce | ce |" in report and "| oal | oal |" in report
    assert (folder / "runs" / "report.png").stat().st_size > 0
    print(f"walkthrough: {len(commands)} commands in {elapsed:.0f} s")  # noqa: T201 - the test's timing


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False

"""The demo's schedule (scripts/demo_schedule.py): each step once, after its needs, in parallel lanes.

The graph functions are checked on the demo's real step graph without training; `run_steps` with
real child processes; one smoke run of the whole demo (marked slow) checks the parallel demo end to
end and that a re-run reuses the generator, teacher and ce student.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import demo  # noqa: E402 - scripts/ is not a package; the demo imports its siblings the same way
from demo_schedule import (  # noqa: E402
    Lanes,
    Step,
    StepFailed,
    StepRecord,
    check_graph,
    next_steps,
    remaining_path,
    run_steps,
    simulate,
    topological_order,
)

DEMO = check_graph(demo.demo_steps())
SECONDS = {name: demo.COSTS.get(name, 1.0) for name in DEMO}


def assert_needs_respected(steps, spans):
    for name, (start, _) in spans.items():
        for need in steps[name].needs:
            if need in spans:
                assert spans[need][1] <= start, f"{name} started before {need} ended"


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([Step("a"), Step("a")], "'a' is defined twice"),
        ([Step("a", ("b",))], "'a' needs 'b', which is not a step"),
        ([Step("a", ("b",)), Step("b", ("a",))], "need each other in a cycle"),
    ],
)
def test_a_bad_graph_names_the_step(steps, message):
    with pytest.raises(ValueError, match=message):
        check_graph(steps)


def test_the_demo_graph_orders_every_step_after_its_needs():
    order = topological_order(DEMO.values())
    assert sorted(order) == sorted(DEMO)
    for name in order:
        assert all(order.index(need) < order.index(name) for need in DEMO[name].needs)
    assert order[-1] == "compare the recipes"
    for recipe in ("oal", "oal-energy"):  # they distil from the teacher and train on outliers
        assert set(DEMO[f"train {recipe}"].needs) == {"train teacher", "train ce", "synthesise outliers"}
    assert set(DEMO["train kd"].needs) == {"train teacher", "train ce"}
    for recipe in ("latent-energy", "pixel-oe"):  # outliers, no teacher
        assert set(DEMO[f"train {recipe}"].needs) == {"train ce", "synthesise outliers"}
    assert set(DEMO["train ce-ft"].needs) == {"train ce"}  # the fair baseline: no teacher, no outliers


def test_the_teacher_and_the_generator_start_first_on_two_lanes():
    path = remaining_path(DEMO)
    assert path["train teacher"] > path["pretrain generator"] > path["train ce"]
    assert next_steps(DEMO, set(), set(), 2) == ["train teacher", "pretrain generator"]
    assert next_steps(DEMO, set(), {"train teacher", "pretrain generator"}, 0) == []
    # with the generator done, the ce student (longer chain) goes before the synthesis
    assert next_steps(DEMO, {"pretrain generator"}, {"train teacher"}, 1) == ["train ce"]


def test_two_lanes_run_each_step_once_after_its_needs_and_overlap():
    spans = simulate(DEMO, SECONDS, lanes=2)
    assert set(spans) == set(DEMO)
    assert_needs_respected(DEMO, spans)
    wall = max(end for _, end in spans.values())
    assert wall < sum(SECONDS.values())
    # the chain pretrain -> ce -> synthesis -> the teacher-free fine-tunes runs beside the teacher;
    # the distilling ones start when it ends, the first of them at once
    teacher_start, teacher_end = spans["train teacher"]
    assert teacher_start == 0
    assert all(spans[f"train {r}"][0] < teacher_end for r in ("latent-energy", "pixel-oe"))
    starts = sorted(spans[f"train {r}"][0] for r in ("kd", "oal", "oal-energy"))
    assert starts[0] == teacher_end and starts[2] > teacher_end


def test_one_lane_is_the_sequential_demo():
    spans = simulate(DEMO, SECONDS, lanes=1)
    assert_needs_respected(DEMO, spans)
    assert max(end for _, end in spans.values()) == pytest.approx(sum(SECONDS.values()))


def test_reused_steps_are_not_scheduled_again():
    reused = {"pretrain generator", "train teacher", "train ce"}
    spans = simulate(DEMO, SECONDS, lanes=2, finished=reused)
    assert set(spans) == set(DEMO) - reused
    assert spans["synthesise outliers"][0] == 0


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_run_steps_runs_real_processes_once_in_dependency_order(tmp_path):
    steps = check_graph([Step("a", cost=3), Step("b", cost=2), Step("c", ("a", "b")), Step("d", ("c",))])
    lanes = Lanes(poll_s=0.05)
    events: list[str] = []
    lock = threading.Lock()

    def action(name):
        def run(record: StepRecord) -> None:
            with lock:
                events.append(f"start {name}")
            marker = tmp_path / f"{name}.done"
            lanes.run(_python(f"open({str(marker)!r}, 'a').write('x')"), os.environ, tmp_path / f"{name}.log")
            with lock:
                events.append(f"end {name}")

        return run

    records = {name: StepRecord() for name in steps}
    run_steps(steps, {name: action(name) for name in steps}, records, 2, lanes)
    assert all((tmp_path / f"{name}.done").read_text() == "x" for name in steps)
    assert all(record.state == "done" and record.lane in (1, 2) for record in records.values())
    for name in steps:
        assert events.count(f"start {name}") == 1
        for need in steps[name].needs:
            assert events.index(f"end {need}") < events.index(f"start {name}")

    # a re-run with every step finished runs nothing
    rerun = {name: StepRecord(state="reused") for name in steps}
    run_steps(steps, {name: action(name) for name in steps}, rerun, 2, Lanes(poll_s=0.05))
    assert all(events.count(f"start {name}") == 1 for name in steps)


def test_a_failed_step_stops_the_others_and_starts_nothing_after_it(tmp_path):
    steps = check_graph([Step("slow", cost=5), Step("bad", cost=4), Step("after", ("bad",))])
    lanes = Lanes(poll_s=0.05)
    pid_file = tmp_path / "slow.pid"
    actions = {
        "slow": lambda r: lanes.run(
            _python(f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"),
            os.environ,
            tmp_path / "slow.log",
        ),
        "bad": lambda r: lanes.run(_python("raise SystemExit(3)"), os.environ, tmp_path / "bad.log"),
        "after": lambda r: pytest.fail("a step after a failed one started"),
    }
    records = {name: StepRecord() for name in steps}
    with pytest.raises(StepFailed, match="'bad' failed: .*exited with code 3"):
        run_steps(steps, actions, records, 2, lanes)
    assert records["bad"].state == "failed"
    assert records["slow"].state == "stopped"
    assert records["after"].state == "waiting"
    if pid_file.exists():  # the sleeping child was terminated, not left behind
        pid = int(pid_file.read_text())
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.timeout(900)
def test_the_smoke_demo_runs_end_to_end_and_a_rerun_would_reuse(tmp_path, redis_conn):
    """One real smoke demo in 2 lanes (minutes: ten child processes); the re-run's reuse is read off its folder."""
    from tests.conftest import TEST_REDIS_URL

    env = {**os.environ, "OAL_REDIS_URL": TEST_REDIS_URL, "OAL_QUEUE_NAME": "oal-test-demo"}
    out, artifacts = tmp_path / "demo", tmp_path / "artifacts"
    argv = [sys.executable, str(REPO / "scripts" / "demo.py"), "--preset", "smoke", "--num-outliers", "96"]
    argv += ["--out", str(out), "--artifacts", str(artifacts), "--lanes", "2"]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=850)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    timings = json.loads((out / "timings.json").read_text())
    assert {name: step["state"] for name, step in timings["steps"].items()} == dict.fromkeys(DEMO, "done")
    assert timings["lanes"] == 2 and timings["threads_per_process"] >= 1 and timings["total_s"] > 0
    assert {step["lane"] for step in timings["steps"].values()} == {1, 2}
    assert (out / "report.md").is_file() and "make demo" in result.stdout
    for recipe in ("ce", *demo.STUDENT_RECIPES):
        assert (out / recipe / "outlier-manifest.json").is_file()

    args = demo.argparse.Namespace(out=out, artifacts=artifacts, preset="smoke", threads=1, port=0)
    again = demo.Demo(args)
    reused = {name for name, step in DEMO.items() if step.reusable and again.finished_before(name)}
    assert reused == {"pretrain generator", "train teacher", "train ce"}

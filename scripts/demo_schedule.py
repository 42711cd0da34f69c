"""The demo's step graph and the lanes that run it: each step once, after the steps it needs.

On a 2-core machine two one-thread processes finish more work than one two-thread process, and a
two-thread process collapses when anything else runs beside it (docs/BENCHMARKS.md). So the demo
runs its steps in `lanes` parallel slots, each process pinned to `threads` torch threads, and
starts, whenever a slot frees, the ready step with the longest remaining path (by each step's
`cost`, a relative size used only for this order): the teacher, the longest chain, starts first.

The graph functions are pure (tests check them without training); `run_steps` executes a graph
with real callables in threads, one per lane, and stops every running step when one fails.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Step:
    name: str
    needs: tuple[str, ...] = ()
    cost: float = 1.0  # relative size; orders ready steps, never measures anything
    reusable: bool = False  # a finished result from an earlier run is kept (generator, teacher, ce)


class StepFailed(RuntimeError):
    def __init__(self, name: str, cause: BaseException):
        super().__init__(f"step {name!r} failed: {cause}")
        self.name = name
        self.cause = cause


def check_graph(steps: Iterable[Step]) -> dict[str, Step]:
    """The steps by name; a duplicate name, an unknown need or a cycle is a ValueError naming the step."""
    by_name: dict[str, Step] = {}
    for step in steps:
        if step.name in by_name:
            raise ValueError(f"step {step.name!r} is defined twice")
        by_name[step.name] = step
    for step in by_name.values():
        for need in step.needs:
            if need not in by_name:
                raise ValueError(f"step {step.name!r} needs {need!r}, which is not a step")
    topological_order(by_name.values())
    return by_name


def topological_order(steps: Iterable[Step]) -> list[str]:
    """Names in an order where each step follows its needs (ties keep the given order)."""
    steps = list(steps)
    placed: list[str] = []
    left = {step.name: step for step in steps}
    while left:
        ready = [name for name, step in left.items() if all(need not in left for need in step.needs)]
        if not ready:
            raise ValueError(f"steps {sorted(left)} need each other in a cycle")
        for name in ready:
            placed.append(name)
            del left[name]
    return placed


def remaining_path(steps: Mapping[str, Step]) -> dict[str, float]:
    """Each step's cost plus the costliest chain of steps that need it, down to the last step."""
    users: dict[str, list[str]] = {name: [] for name in steps}
    for step in steps.values():
        for need in step.needs:
            users[need].append(step.name)
    path: dict[str, float] = {}
    for name in reversed(topological_order(steps.values())):
        path[name] = steps[name].cost + max((path[user] for user in users[name]), default=0.0)
    return path


def next_steps(steps: Mapping[str, Step], finished: set[str], running: set[str], free_lanes: int) -> list[str]:
    """The steps to start now: ready (needs finished, not started), longest remaining path first."""
    if free_lanes <= 0:
        return []
    path = remaining_path(steps)
    order = {name: i for i, name in enumerate(steps)}
    ready = [
        name
        for name, step in steps.items()
        if name not in finished and name not in running and all(need in finished for need in step.needs)
    ]
    ready.sort(key=lambda name: (-path[name], order[name]))
    return ready[:free_lanes]


def simulate(steps: Mapping[str, Step], seconds: Mapping[str, float], lanes: int, finished: Iterable[str] = ()):
    """The schedule `run_steps` would follow if each step took `seconds[name]`: {name: (start, end)}."""
    done = set(finished)
    clock, running, spans = 0.0, {}, {}
    while len(done) < len(steps):
        for name in next_steps(steps, done, set(running), lanes - len(running)):
            running[name] = clock + seconds[name]
            spans[name] = (clock, running[name])
        clock = min(running.values())
        for name in [n for n, end in running.items() if end == clock]:
            del running[name]
            done.add(name)
    return spans


@dataclass
class StepRecord:
    state: str = "waiting"  # waiting, running, done, reused, failed, stopped
    start_s: float | None = None  # seconds after the schedule began
    seconds: float | None = None
    lane: int | None = None
    detail: str = ""  # a short progress line a step may set while it runs


# Looked up once here, not in the forked child, where loading a library could wait on a lock that
# another thread held at the fork.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """In the child before exec: Linux sends it SIGTERM when the demo dies, even by SIGKILL."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@dataclass
class Lanes:
    """What a running step can use: a stop flag, and a way to run a child process that honours it."""

    stop: threading.Event = field(default_factory=threading.Event)
    poll_s: float = 0.5

    def run(self, argv: list[str], env: Mapping[str, str], log_path: Path) -> None:
        """Runs argv to the end with its output in log_path; terminated when the schedule stops."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:  # this run's output only
            # The lane's thread forks it and outlives it, so the death signal follows the demo process.
            proc = subprocess.Popen(
                argv, env=dict(env), stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
            )
        while proc.poll() is None:
            if self.stop.wait(self.poll_s):
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                raise RuntimeError("stopped")
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} exited with code {proc.returncode}; see {log_path}")


def run_steps(
    steps: Mapping[str, Step],
    actions: Mapping[str, Callable[[StepRecord], None]],
    records: dict[str, StepRecord],
    lanes: int,
    context: Lanes,
    on_change: Callable[[str, StepRecord], None] = lambda name, record: None,
    on_tick: Callable[[], None] = lambda: None,
) -> None:
    """Runs every step whose record is not done/reused, at most `lanes` at a time; StepFailed on the first failure."""
    finished = {name for name, record in records.items() if record.state in ("done", "reused")}
    started = time.perf_counter()
    free = list(range(1, lanes + 1))
    running: dict[Future, str] = {}
    failure: StepFailed | None = None
    with ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="demo-lane") as pool:
        try:
            while True:
                if failure is None and not context.stop.is_set():
                    for name in next_steps(steps, finished, set(running.values()), len(free)):
                        record = records[name]
                        record.state, record.lane = "running", free.pop(0)
                        record.start_s = time.perf_counter() - started
                        running[pool.submit(actions[name], record)] = name
                        on_change(name, record)
                if not running:
                    break
                done, _ = wait(running, timeout=context.poll_s, return_when=FIRST_COMPLETED)
                for future in done:
                    name = running.pop(future)
                    record = records[name]
                    record.seconds = time.perf_counter() - started - record.start_s
                    free.append(record.lane)
                    free.sort()
                    error = future.exception()
                    if error is None:
                        record.state = "done"
                        finished.add(name)
                    else:
                        record.state = "stopped" if context.stop.is_set() and failure is not None else "failed"
                        if failure is None:
                            failure = StepFailed(name, error)
                            context.stop.set()
                    on_change(name, record)
                on_tick()
        except BaseException:  # Ctrl-C or SIGTERM: stop the running steps' processes before leaving
            context.stop.set()
            wait(running)
            for name in running.values():
                record = records[name]
                record.state, record.seconds = "stopped", time.perf_counter() - started - record.start_s
                on_change(name, record)
            raise
    if failure is not None:
        raise failure

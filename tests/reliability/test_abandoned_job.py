"""A worker killed mid-job while another sits idle: the idle one picks the job up within the promise.

The case from the field: worker B is idle on the queue, started (and through its start-up
maintenance) before worker A dies, so its first registry cleanup ran while A's heartbeat was still
fresh. An idle rq worker blocks on the queue for its dequeue timeout (405 s by default) before it
runs maintenance again; the worker module promises pick-up within about
`ABANDON_AFTER_BEATS * heartbeat + maintenance interval` instead. Both workers are real processes on
a private Redis; small heartbeat and maintenance settings keep the test to seconds.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from oal_shared.shards import list_shards, read_manifest
from oal_synth.queue import enqueue_synthesis, fetch_job, job_view, synthesis_queue
from oal_synth.spec import JobSpec
from oal_synth.worker import ABANDON_AFTER_BEATS
from tests.reliability.conftest import (
    FAST_HEARTBEAT_S,
    FAST_MAINTENANCE_S,
    FAST_WORKER_OPTIONS,
    WORKER_START_S,
    idle_workers,
    pid_of_worker,
    prepare_tiny_service,
    tiny_job_spec,
)
from tests.utils.live_server import wait_until, worker_process

pytestmark = [pytest.mark.redis, pytest.mark.slow]

#: What the worker promises between a kill and the retry (seconds).
PROMISED_PICKUP_S = ABANDON_AFTER_BEATS * FAST_HEARTBEAT_S + FAST_MAINTENANCE_S
#: Room for the survivor to dequeue, load tiny-random and write the remaining shards (seconds).
REST_OF_JOB_S = 20


def test_idle_survivor_takes_over_a_killed_workers_job_within_the_promise(private_queue, tmp_path, tmp_path_factory):
    settings, connection = private_queue.settings, private_queue.connection
    logs = {"one": tmp_path / "worker-one.log", "two": tmp_path / "worker-two.log"}

    with (
        worker_process(*FAST_WORKER_OPTIONS, log_path=logs["one"]) as one,
        worker_process(*FAST_WORKER_OPTIONS, log_path=logs["two"]) as two,
    ):
        service = prepare_tiny_service(settings, tmp_path_factory.getbasetemp() / "tiny-random-cache")
        # Both idle before the job exists: both ran their start-up maintenance long before the kill.
        wait_until(lambda: len(idle_workers(connection)) == 2, timeout=WORKER_START_S, what="two idle workers")
        pids = {one.pid: one, two.pid: two}

        spec = JobSpec.model_validate({**tiny_job_spec(service.set_id, num_outliers=60), "shards": {"max_samples": 6}})
        job = enqueue_synthesis(synthesis_queue(connection, settings), spec, settings)

        def view() -> dict:
            return job_view(fetch_job(connection, job.id))

        wait_until(lambda: view()["shards"], timeout=60, what="the first shard")
        holder = fetch_job(connection, job.id).worker_name
        victim = pids[pid_of_worker(connection, holder)]
        survivor = next(proc for pid, proc in pids.items() if pid != victim.pid)
        assert view()["status"] == "started"
        os.killpg(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        victim.wait(timeout=10)
        shards_before = len(list_shards(settings.shard_root / job.id))
        assert shards_before < 10, "the job finished before the kill; make it longer"

        finished = wait_until(
            lambda: (state := view())["status"] in {"finished", "failed"} and state,
            timeout=PROMISED_PICKUP_S + REST_OF_JOB_S,
            interval=0.1,
            what=f"the survivor to finish the abandoned job (promised pick-up {PROMISED_PICKUP_S} s)",
        )
        recovered_s = time.monotonic() - killed_at

        assert finished["status"] == "finished", (finished["error"], logs["two"].read_text())
        assert fetch_job(connection, job.id).worker_name != holder
        assert survivor.poll() is None
    manifest = read_manifest(settings.shard_root / job.id)
    assert manifest["num_samples"] == 60 and len(manifest["shards"]) == 10
    assert finished["progress"] == {"done": 60, "total": 60}
    assert finished["retries_left"] == settings.job_retries - 1
    print(f"abandoned job finished {recovered_s:.1f} s after the kill ({shards_before} shards were on disk)")  # noqa: T201

"""One job delivered to two workers at once: no duplicate keys, one consistent manifest.

How it happens in production: a worker stalls (a frozen VM, a long GC pause, a network partition)
long enough to miss its heartbeats, the other worker's maintenance retries the job, and then the
first one wakes up and carries on. Here worker A is frozen with SIGSTOP mid-job, worker B takes the
job over, and A is thawed with SIGCONT while B is still writing: both attempts then write the same
folder at the same time. The two workers run with different torch thread counts, so like two
different GPUs they do not produce the same bytes for the same shard; whichever attempt finishes
last, the manifest must list every shard once with the sha256 of the file on disk.
"""

from __future__ import annotations

import os
import signal

import pytest

from oal_shared.shards import iter_outlier_samples, list_shards, load_manifest, verify_shards
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

NUM_OUTLIERS = 120
SHARD_SIZE = 6


def test_a_job_run_by_two_workers_at_once_ends_with_one_consistent_manifest(private_queue, tmp_path, tmp_path_factory):
    settings, connection = private_queue.settings, private_queue.connection
    logs = [tmp_path / "worker-1-thread.log", tmp_path / "worker-2-threads.log"]

    with (
        worker_process(*FAST_WORKER_OPTIONS, log_path=logs[0], env={"OAL_TORCH_THREADS": "1"}) as one,
        worker_process(*FAST_WORKER_OPTIONS, log_path=logs[1], env={"OAL_TORCH_THREADS": "2"}) as two,
    ):
        service = prepare_tiny_service(settings, tmp_path_factory.getbasetemp() / "tiny-random-cache")
        wait_until(lambda: len(idle_workers(connection)) == 2, timeout=WORKER_START_S, what="two idle workers")
        processes = {one.pid: one, two.pid: two}
        spec = JobSpec.model_validate(
            {**tiny_job_spec(service.set_id, num_outliers=NUM_OUTLIERS), "shards": {"max_samples": SHARD_SIZE}}
        )
        job = enqueue_synthesis(synthesis_queue(connection, settings), spec, settings)
        folder = settings.shard_root / job.id

        def view() -> dict:
            return job_view(fetch_job(connection, job.id))

        wait_until(lambda: view()["shards"], timeout=60, what="the first shard")
        first = fetch_job(connection, job.id).worker_name
        frozen = processes[pid_of_worker(connection, first)]
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            # The other worker retries the job once the frozen one's heartbeats have lapsed...
            wait_until(
                lambda: fetch_job(connection, job.id).worker_name not in (None, first),
                timeout=ABANDON_AFTER_BEATS * FAST_HEARTBEAT_S + FAST_MAINTENANCE_S + 15,
                what="the second worker to take the job over",
            )
            taken_over_with = len(list_shards(folder))
            wait_until(lambda: len(list_shards(folder)) >= taken_over_with + 2, timeout=30, what="2 more shards")
        finally:
            os.kill(frozen.pid, signal.SIGCONT)  # ...and the first one wakes up and carries on
        assert len(list_shards(folder)) < NUM_OUTLIERS // SHARD_SIZE, "the job ended before both ran it"

        # Both attempts run to their end: each logs its summary line for the job.
        summary = f"job {job.id}: {NUM_OUTLIERS} samples"
        wait_until(lambda: all(summary in log.read_text() for log in logs), timeout=60, what="both attempts to end")
        wait_until(lambda: len(idle_workers(connection)) == 2, timeout=30, what="both workers idle again")
        assert view()["status"] == "finished", view()["error"]
        assert one.poll() is None and two.poll() is None

    manifest = load_manifest(folder)
    names = [info.name for info in manifest.shards]
    assert names == [path.name for path in list_shards(folder)]  # each shard once, none left out
    verify_shards(folder)  # every sha256 is the file's on disk
    samples = list(iter_outlier_samples(manifest.shard_paths))
    assert len({sample.key for sample in samples}) == len(samples) == manifest.num_samples == NUM_OUTLIERS
    assert [sample.meta["index"] for sample in samples] == list(range(NUM_OUTLIERS))

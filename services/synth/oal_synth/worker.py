"""The synthesis worker: a long-lived RQ worker that keeps generators loaded between jobs.

Why not RQ's forking `Worker`: a fork per job would reload torch and the model every job (seconds
on a CPU, longer on a GPU) and must not happen after CUDA is initialised. `SynthesisWorker` is a
`SimpleWorker` (jobs run in this process) with three additions:

- Heartbeats while a job runs. RQ's SimpleWorker registers a running job in the
  StartedJobRegistry for the job's whole timeout (6 h by default) and never refreshes it, so a
  worker killed mid-job leaves its job "started" for hours. Here a thread refreshes the entry
  every `heartbeat_s`, with a TTL of `ABANDON_AFTER_BEATS * heartbeat_s`.
- Abandoned jobs (read from rq 3.0 `StartedJobRegistry.cleanup`): any worker's maintenance
  (at start-up and every `maintenance_interval`) finds entries whose TTL ran out while the job is
  still STARTED, and calls `job.retry()` when `retries_left > 0` (else moves it to failed). The job
  then runs again on some worker and resumes from the shards already on disk. So a killed worker's
  job is picked up within about `3 * heartbeat_s + maintenance_interval` seconds by any idle worker.
  RQ runs maintenance only between two blocking waits on the queue, and an idle worker waits
  `worker_ttl - 15` s (405 s by default) per block; `dequeue_timeout` is bounded by the
  maintenance interval here so that an idle worker keeps the promise too.
- Graceful stop and cooperative cancel. SIGTERM (first signal) asks the running job to stop at
  its next batch; the worker puts it back at the front of the queue (no retry is used up) and
  exits. A job whose cancel flag is set stops at its next batch and ends STOPPED, not retried.
  Errors that a retry cannot fix (bad spec, space mismatch, missing data) fail at once.
- Redis restarted empty (or flushed). The running job finds its record gone at its next batch and
  stops (`JobLost`); the worker then writes none of RQ's end-of-job bookkeeping, which would leave
  fragments of a job Redis no longer knows, but a "lost" note the API reports. A worker whose own
  record is gone registers again at its next heartbeat, so dashboards and /readyz see it.
- Job metrics. Each attempt's duration, outcome and outliers go to Redis once RQ is done with it,
  and the API's /metrics exposes them (`oal_synth.worker_metrics` says why not a port per worker).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import redis.exceptions
from redis import Redis
from rq import SimpleWorker, worker_registration
from rq.job import Job
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from oal_shared.errors import (
    ConfigError,
    DataNotFoundError,
    EmbeddingSetError,
    SpaceMismatchError,
    UnsafePathError,
)
from oal_shared.settings import Settings
from oal_synth.job_context import clear_stop_request, request_stop
from oal_synth.queue import (
    JobCanceled,
    JobInterrupted,
    connect,
    job_record_exists,
    note_lost_job,
    retry_interval_s,
    synthesis_queue,
)
from oal_synth.worker_metrics import JobAttempt, generator_label, record_job_attempt

logger = logging.getLogger(__name__)

#: Seconds between heartbeats of a running job.
DEFAULT_HEARTBEAT_S = 10
#: A running job whose worker missed this many heartbeats counts as abandoned.
ABANDON_AFTER_BEATS = 3
#: Seconds between registry maintenance runs (where abandoned jobs are found); RQ's default is 600.
DEFAULT_MAINTENANCE_S = 60
#: Longest pause between two attempts to reach Redis at start-up (seconds).
REDIS_WAIT_MAX_PAUSE_S = 10.0
#: Failures a retry cannot fix: the job fails at once instead of using its retries.
PERMANENT_ERRORS = (ConfigError, SpaceMismatchError, EmbeddingSetError, DataNotFoundError, UnsafePathError)


class SynthesisWorker(SimpleWorker):
    """A SimpleWorker with job heartbeats, cooperative cancel and requeue-on-shutdown."""

    def __init__(
        self,
        queues: Sequence[Queue | str],
        *args,
        heartbeat_s: int = DEFAULT_HEARTBEAT_S,
        **kwargs,
    ):
        if heartbeat_s < 1:
            raise ConfigError(f"heartbeat_s must be >= 1 second, got {heartbeat_s}")
        kwargs.setdefault("serializer", JSONSerializer)
        kwargs.setdefault("job_monitoring_interval", heartbeat_s)
        kwargs.setdefault("maintenance_interval", DEFAULT_MAINTENANCE_S)
        super().__init__(queues, *args, **kwargs)
        self.heartbeat_s = heartbeat_s
        self._beats_stop = threading.Event()
        self._beats: threading.Thread | None = None
        self._requeue_job_id: str | None = None
        self._lost_job_id: str | None = None
        self._attempt_outcome: str | None = None  # how the running attempt ended, for the job metrics
        self.push_exc_handler(self._sort_failure)

    # -- maintenance while idle ----------------------------------------------------------------

    @property
    def dequeue_timeout(self) -> int:
        # RQ blocks an idle worker on the queue for this long before its loop checks whether
        # maintenance is due; never longer than the maintenance interval, or abandoned jobs wait.
        return max(1, min(super().dequeue_timeout, int(self.maintenance_interval)))

    # -- heartbeats ---------------------------------------------------------------------------

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return ABANDON_AFTER_BEATS * self.heartbeat_s

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        self._start_beats(job, execution)
        try:
            self.perform_job(job, queue, execution)
        finally:
            self._stop_beats()
        self.set_state(WorkerStatus.IDLE)

    def perform_job(self, job: Job, queue: Queue, execution) -> bool:
        self._attempt_outcome = None
        started = time.monotonic()
        try:
            return super().perform_job(job, queue, execution)
        finally:
            # After RQ's bookkeeping of the attempt, so nothing here can change how the job ended.
            self._record_attempt(job, queue, time.monotonic() - started)

    def _record_attempt(self, job: Job, queue: Queue, seconds: float) -> None:
        if self._attempt_outcome is None:
            return  # RQ's own handling failed before an outcome was known; its log says why
        try:
            # RQ leaves the attempt's return value on the job in this process (rq 3.0 `_finalize_success`);
            # reading it back from Redis instead would depend on the result TTL.
            summary = getattr(job, "_result", None) if self._attempt_outcome == "finished" else None
            outliers = summary.get("denoised_samples", 0) if isinstance(summary, dict) else 0
            attempt = JobAttempt(
                generator_label(job.args[0] if job.args else None), self._attempt_outcome, seconds, outliers
            )
        except Exception as exc:  # noqa: BLE001 - a metrics failure never touches the job
            self.log.warning("Worker %s: no metrics for job %s: %s", self.name, job.id, exc)
            return
        record_job_attempt(self.connection, queue.name, attempt)

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        # The job has returned or raised: stop beating before RQ removes its execution records,
        # so a late beat cannot recreate them.
        self._stop_beats()
        if self._is_lost(job):
            self._lost_job_id = job.id  # success and failure handling both forget it instead
            return
        super().handle_execution_ended(job, queue, heartbeat_ttl)

    def _start_beats(self, job: Job, execution) -> None:
        self._beats_stop.clear()
        self._beats = threading.Thread(
            target=self._beat, args=(job, execution), name=f"heartbeat-{job.id[:8]}", daemon=True
        )
        self._beats.start()

    def _stop_beats(self) -> None:
        self._beats_stop.set()
        if self._beats is not None and self._beats is not threading.current_thread():
            self._beats.join(timeout=10)
        self._beats = None

    def _beat(self, job: Job, execution) -> None:
        while not self._beats_stop.wait(self.heartbeat_s):
            try:
                if not job_record_exists(self.connection, job.id):
                    # A beat now would write fragments of a job Redis no longer has.
                    self.log.error(
                        "Worker %s: Redis lost job %s (restarted empty or flushed?); heartbeats stop, "
                        "the job stops at its next batch",
                        self.name,
                        job.id,
                    )
                    return
                self.maintain_heartbeats(job, execution)
            except redis.exceptions.RedisError as exc:  # the next beat tries again
                self.log.warning("Worker %s: heartbeat of job %s failed: %s", self.name, job.id, exc)

    # -- Redis restarted empty ----------------------------------------------------------------

    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:
        if pipeline is None:
            self._register_again_if_forgotten()
        super().heartbeat(timeout, pipeline)

    def _register_again_if_forgotten(self) -> None:
        """Register again when Redis lost this worker's record, or dropped it from the worker list.

        The first happens when Redis restarts empty or is flushed; the second when the worker
        stalled past its TTL (another worker's maintenance then drops it). Either way dashboards
        and /readyz would no longer see a worker that is in fact working.
        """
        with self.connection.pipeline() as check:
            check.hexists(self.key, "birth")
            check.sismember(worker_registration.REDIS_WORKER_KEYS, self.key)
            has_record, listed = check.execute()
        if has_record and listed:
            return
        self.log.warning(
            "Worker %s: Redis no longer %s this worker (restarted empty, flushed, or a stall past its TTL); "
            "registering again",
            self.name,
            "lists" if has_record else "knows",
        )
        if has_record:
            worker_registration.register(self)
            return
        self.connection.delete(self.key)  # fragments; register_birth refuses a live-looking record
        self.register_birth()
        self.set_state(self.get_state())

    def _is_lost(self, job: Job) -> bool:
        try:
            return not job_record_exists(self.connection, job.id)
        except redis.exceptions.RedisError:
            return False  # out of reach, not lost: RQ's own handling goes on

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry, execution) -> None:
        if self._lost_job_id == job.id:
            return self._forget_lost_job(job, execution)
        self._attempt_outcome = "finished"
        return super().handle_job_success(job, queue, started_job_registry, execution)

    def _forget_lost_job(self, job: Job, execution) -> None:
        self._lost_job_id = None
        self._attempt_outcome = "lost"
        with self.connection.pipeline() as pipeline:
            self.cleanup_execution(job, pipeline=pipeline, execution=execution)
            pipeline.delete(job.key)  # what the job's last progress update wrote
            pipeline.execute()
        note_lost_job(self.connection, job, self.name)
        progress = job.meta.get("progress") or {}
        self.log.error(
            "Worker %s: job %s was lost by Redis while it ran; stopped at %s/%s outliers, noted as lost",
            self.name,
            job.id,
            progress.get("done", "?"),
            progress.get("total", "?"),
        )

    # -- shutdown, cancel, failures -----------------------------------------------------------

    def handle_warm_shutdown_request(self) -> None:
        super().handle_warm_shutdown_request()
        request_stop()

    def _sort_failure(self, job: Job, exc_type, exc_value, traceback) -> bool:
        """Exception handler: decide stop / requeue / fail-now, and record the error for the API."""
        if self._lost_job_id == job.id:
            return True  # nothing to record in a Redis that forgot the job
        if isinstance(exc_value, JobCanceled):
            self._stopped_job_id = job.id  # RQ then marks it STOPPED and never retries it
        elif isinstance(exc_value, JobInterrupted):
            self._requeue_job_id = job.id
            return True
        elif isinstance(exc_value, PERMANENT_ERRORS):
            job.retries_left = 0
        code = "canceled" if isinstance(exc_value, JobCanceled) else (exc_type.__name__ if exc_type else "error")
        job.meta["error"] = {"code": code, "message": str(exc_value)}
        try:
            job.save_meta()
        except redis.exceptions.RedisError as exc:
            self.log.warning("Worker %s: could not record the error of job %s: %s", self.name, job.id, exc)
        return True

    def handle_job_failure(self, job: Job, queue: Queue, started_job_registry=None, exc_string="", execution=None):
        if self._lost_job_id == job.id:
            return self._forget_lost_job(job, execution)
        if self._requeue_job_id != job.id:
            self._attempt_outcome = _failure_outcome(job, stopped=self._stopped_job_id == job.id)
            return super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)
        self._requeue_job_id = None
        self._attempt_outcome = "stopped"
        # Queued first, execution records removed second: should this process die in between, the
        # stale registry entry finds the job queued (not started) and leaves it alone.
        queue.enqueue_job(job, at_front=True)
        with self.connection.pipeline() as pipeline:
            self.cleanup_execution(job, pipeline=pipeline, execution=execution)
            pipeline.execute()
        self.log.info("Worker %s: job %s put back in %s; it resumes on the next worker", self.name, job.id, queue.name)


def _failure_outcome(job: Job, stopped: bool) -> str:
    # RQ's own rule (rq 3.0 `handle_job_failure`): a job stopped on request is never retried.
    if stopped:
        return "stopped"
    return "retried" if job.should_retry else "failed"


# ---------------------------------------------------------------------------- running one


def wait_for_redis(connection: Redis, max_wait_s: float | None = None) -> None:
    """Block until Redis answers PING, logging each failed try; ConnectionError after `max_wait_s`."""
    started, pause, attempt = time.monotonic(), 0.5, 1
    while True:
        try:
            connection.ping()
            if attempt > 1:
                logger.info("Redis answers after %d attempts", attempt)
            return
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            waited = time.monotonic() - started
            if max_wait_s is not None and waited + pause > max_wait_s:
                raise redis.exceptions.ConnectionError(
                    f"Redis did not answer within {max_wait_s:.0f} s ({attempt} attempts): {exc}"
                ) from exc
            logger.warning(
                "Redis not reachable (attempt %d, %.0f s so far): %s; retrying in %.1f s",
                attempt,
                waited,
                exc,
                pause,
            )
            time.sleep(pause)
            pause, attempt = min(pause * 2, REDIS_WAIT_MAX_PAUSE_S), attempt + 1


def run_worker(
    settings: Settings,
    queue_names: Sequence[str] | None = None,
    burst: bool = False,
    heartbeat_s: int = DEFAULT_HEARTBEAT_S,
    maintenance_s: int = DEFAULT_MAINTENANCE_S,
    redis_wait_s: float | None = None,
    logging_level: str = "INFO",
) -> bool:
    """Work on the synthesis queue(s) until stopped (or, with `burst`, until they are empty).

    Returns whether any job was processed.
    """
    if settings.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.torch_threads)
    # Import the job's code now, not at the first job: import errors show at start-up, and the
    # first job does not pay seconds of imports. No CUDA is touched here.
    from diffusers import StableDiffusionPipeline  # noqa: F401 - every generator kind loads through it

    clear_stop_request()
    connection = connect(settings)
    wait_for_redis(connection, redis_wait_s)
    queues = [synthesis_queue(connection, settings, name) for name in (queue_names or [settings.queue_name])]
    worker = SynthesisWorker(queues, connection=connection, heartbeat_s=heartbeat_s, maintenance_interval=maintenance_s)
    # Retries with an interval are scheduled jobs, which need RQ's scheduler; it forks now, before
    # any job could initialise CUDA.
    with_scheduler = retry_interval_s(settings) > 0
    logger.info(
        "Worker %s: listening on %s (burst=%s, heartbeat %d s)",
        worker.name,
        ", ".join(q.name for q in queues),
        burst,
        heartbeat_s,
    )
    return worker.work(burst=burst, logging_level=logging_level, with_scheduler=with_scheduler)

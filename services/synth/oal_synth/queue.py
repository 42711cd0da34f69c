"""Job state in Redis: how the API enqueues synthesis jobs and reads them back, without torch.

Jobs are plain RQ jobs on `settings.queue_name`, serialised as JSON (RQ's default is pickle, which
this project never uses). What a client sees of a job (`job_view`) comes from RQ's own status word
and the job's meta, which the worker updates: `progress` {done, total}, `shards` (one ShardInfo as
JSON per written shard), `error` {code, message}, `output_dir`, `manifest_path`.

Cancelling a running job is cooperative: the API sets a flag in its own Redis key (one builder per
key name, like rq's `Job.key`) and the job looks at it between batches.

Redis restarted empty (or flushed) while a job runs: the job finds its record gone at its next
batch and stops (`JobLost`); its worker leaves a "lost" note under its own key instead of RQ's
bookkeeping (which would write fragments of a job Redis no longer knows), and a lookup of the job
raises `JobLostError`, a JobNotFoundError whose message says the queue lost it.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from oal_shared.errors import OALError
from oal_shared.settings import Settings
from oal_synth.spec import JobSpec

logger = logging.getLogger(__name__)

#: Dotted path RQ imports in the worker; the API never imports the module itself (it imports torch).
SYNTHESIS_JOB_FUNC = "oal_synth.synthesis.run_synthesis_job"
#: RQ job ids we hand out are uuid4 hex; anything else cannot be one of ours.
JOB_ID_PATTERN = re.compile(r"^[a-f0-9]{32}$")
#: Seconds between retries of a failed job; 0 requeues at once (no RQ scheduler needed).
#: Seconds a cancel flag outlives the job timeout, so a retried job still sees it.
CANCEL_FLAG_MARGIN_S = 3600
#: Statuses after which a job never runs again.
TERMINAL_STATUSES = frozenset({JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.STOPPED})
#: Seconds a "lost" note is kept when the job has no failure_ttl of its own (RQ's failure default).
LOST_NOTE_TTL_S = 7 * 24 * 3600
#: Statuses in which RQ's own cancel still prevents the job from ever starting.
WAITING_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.CREATED})


class JobControlError(OALError):
    """Base of the errors about a job's lifecycle (lookup, cancel, interruption)."""


class JobNotFoundError(JobControlError, LookupError):
    """No job with this id (never submitted, or its record expired)."""


class JobLostError(JobNotFoundError):
    """The queue lost the job: Redis was restarted empty or flushed after it was submitted."""


class JobStateError(JobControlError):
    """The job is in a state where the operation makes no sense (cancel a finished job, ...)."""


class JobCanceled(JobControlError):
    """Raised inside a running job when its cancel flag is set; the worker marks the job stopped."""


class JobInterrupted(JobControlError):
    """Raised inside a running job when its worker shuts down; the worker puts the job back in the queue."""


class JobLost(JobControlError):
    """Raised inside a running job whose record Redis no longer holds; the worker notes it lost."""


# ---------------------------------------------------------------------------- Redis keys and handles


def cancel_flag_key(job_id: str) -> str:
    """Redis key whose existence asks the running job `job_id` to stop at its next batch."""
    return f"oal:synth:cancel:{job_id}"


def lost_note_key(job_id: str) -> str:
    """Redis key of the note a worker leaves when Redis lost job `job_id` while it ran."""
    return f"oal:synth:lost:{job_id}"


def connect(settings: Settings) -> Redis:
    """A Redis client for `settings.redis_url` that fails fast instead of hanging when Redis is away.

    No connection is opened here; redis-py opens (and reopens) one per command, so a process that
    saw Redis go away recovers by itself when it is back.
    """
    return Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=10)


def synthesis_queue(connection: Redis, settings: Settings, name: str | None = None) -> Queue:
    return Queue(name or settings.queue_name, connection=connection, serializer=JSONSerializer)


def retry_interval_s(settings: Settings) -> int:
    return settings.job_retry_interval_s


def new_job_id() -> str:
    return uuid.uuid4().hex


# ---------------------------------------------------------------------------- submit, look up, cancel


def enqueue_synthesis(queue: Queue, spec: JobSpec, settings: Settings, job_id: str | None = None) -> Job:
    """Put one synthesis job on `queue`; the caller has validated `spec` and its limits."""
    spec_json = spec.model_dump(mode="json")
    retry = Retry(max=settings.job_retries, interval=retry_interval_s(settings)) if settings.job_retries > 0 else None
    job = queue.enqueue_call(
        func=SYNTHESIS_JOB_FUNC,
        args=(spec_json,),
        job_id=job_id or new_job_id(),
        timeout=settings.job_timeout_s,
        result_ttl=settings.result_ttl_s,
        failure_ttl=settings.failure_ttl_s,
        retry=retry,
        description=f"synthesise {spec.num_outliers} outliers with {spec.generator}",
        meta={"progress": {"done": 0, "total": spec.num_outliers}, "shards": []},
    )
    logger.info("job %s queued on %s: %s", job.id, queue.name, job.description)
    return job


def enqueue_within_limit(queue: Queue, spec: JobSpec, settings: Settings) -> Job | None:
    """Enqueue unless that leaves more than `settings.max_queued_jobs` waiting; None when the queue is full.

    Counting before enqueueing lets concurrent submissions past the limit together. Redis orders the
    pushes, so a job's position right after its own push is exact: one that landed at or beyond the
    limit is deleted again before its id is handed out. (No position: a worker took it already.)
    """
    job = enqueue_synthesis(queue, spec, settings)
    position = queue.get_job_position(job.id)
    if position is not None and position >= settings.max_queued_jobs:
        job.delete()
        logger.info("job %s withdrawn: it landed at position %d of %s, over the limit", job.id, position, queue.name)
        return None
    return job


def fetch_job(connection: Redis, job_id: str) -> Job:
    """The RQ job `job_id`; JobNotFoundError when the id is malformed, unknown or expired."""
    if not JOB_ID_PATTERN.match(job_id):
        raise JobNotFoundError(f"no job {job_id!r}: job ids are 32 lowercase hex characters")
    try:
        return Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    except NoSuchJobError:
        pass
    note = connection.get(lost_note_key(job_id))
    if note is not None:
        raise JobLostError(_lost_message(job_id, json.loads(note)))
    if connection.exists(Job.key_for(job_id)):  # a worker's late write, not a job RQ can read
        raise JobLostError(
            f"job {job_id} was lost by the queue: Redis holds only fragments of its record "
            "(restarted empty or flushed while a worker ran it); submit it again"
        )
    raise JobNotFoundError(
        f"no job {job_id!r}: never submitted, its record expired, or Redis was restarted empty since"
    )


def job_record_exists(connection: Redis, job_id: str) -> bool:
    """Whether Redis still holds the job as RQ enqueued it (its `data` field), not just fragments."""
    return bool(connection.hexists(Job.key_for(job_id), "data"))


def note_lost_job(connection: Redis, job: Job, worker_name: str) -> None:
    """Leave the note `fetch_job` turns into JobLostError, from what the worker still knows of `job`."""
    meta = job.meta or {}
    note = {
        "lost_at": datetime.now(UTC).isoformat(),
        "worker": worker_name,
        "progress": meta.get("progress"),
        "output_dir": meta.get("output_dir"),
    }
    connection.set(lost_note_key(job.id), json.dumps(note), ex=job.failure_ttl or LOST_NOTE_TTL_S)


def _lost_message(job_id: str, note: dict) -> str:
    progress = note.get("progress") or {}
    where = f" in {note['output_dir']}" if note.get("output_dir") else ""
    return (
        f"job {job_id} was lost by the queue: Redis was restarted empty (or flushed) while worker "
        f"{note.get('worker', '?')} ran it, at {note.get('lost_at', '?')}; the worker stopped it after "
        f"{progress.get('done', '?')}/{progress.get('total', '?')} outliers (finished shards stay{where}); "
        "submit it again"
    )


def job_status(job: Job) -> JobStatus:
    status = job.get_status(refresh=False)
    return JobStatus(status) if status is not None else JobStatus.CREATED


def request_cancel(connection: Redis, job: Job, settings: Settings) -> Job:
    """Cancel `job`: RQ's cancel while it waits, a cooperative flag once a worker has it.

    The flag is set in every case first, so a job a worker picks up between our status read and
    RQ's cancel still stops at its first check. Cancelling a cancelled or stopped job again is a
    no-op; a finished or failed job raises JobStateError.
    """
    status = job_status(job)
    if status in (JobStatus.CANCELED, JobStatus.STOPPED):
        return job
    if status in TERMINAL_STATUSES:
        raise JobStateError(f"job {job.id} is already {status.value}; there is nothing left to cancel")
    connection.set(cancel_flag_key(job.id), "1", ex=settings.job_timeout_s + CANCEL_FLAG_MARGIN_S)
    if status in WAITING_STATUSES:
        try:
            job.cancel()
        except InvalidJobOperation:  # cancelled by someone else in between: same outcome
            pass
        logger.info("job %s canceled while %s", job.id, status.value)
    else:
        logger.info("job %s asked to stop (it is %s)", job.id, status.value)
    job.refresh()
    return job


def is_cancel_requested(connection: Redis, job_id: str) -> bool:
    return bool(connection.exists(cancel_flag_key(job_id)))


def queued_count(queue: Queue) -> int:
    """Jobs waiting on the queue (not those running); the API's admission limit counts these."""
    return queue.count


# ---------------------------------------------------------------------------- what a client sees


def job_view(job: Job) -> dict[str, Any]:
    """The JSON body of GET /v1/jobs/{id}: RQ's status word, progress, shards, error and the spec."""
    status = job_status(job)
    meta = job.get_meta(refresh=False) or {}
    spec = job.args[0] if job.args else None
    total = (spec or {}).get("num_outliers", 0)
    return {
        "id": job.id,
        "status": status.value,
        "progress": meta.get("progress") or {"done": 0, "total": total},
        "shards": meta.get("shards") or [],
        "error": _error_of(job, status, meta),
        "spec": spec,
        "output_dir": meta.get("output_dir"),
        "manifest_path": meta.get("manifest_path") if status == JobStatus.FINISHED else None,
        "retries_left": job.retries_left,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "ended_at": _iso(job.ended_at),
    }


def _error_of(job: Job, status: JobStatus, meta: dict) -> dict[str, str] | None:
    if status == JobStatus.CANCELED:
        return {"code": "canceled", "message": "canceled on request before a worker started it"}
    if status == JobStatus.STOPPED:
        return {"code": "stopped", "message": "stopped on request while running; finished shards are kept"}
    if status != JobStatus.FAILED:
        return None
    if meta.get("error"):
        return meta["error"]
    # No error in meta: the job died without raising (killed worker, timeout); RQ kept a traceback.
    result = job.latest_result()
    last_line = (result.exc_string or "").strip().splitlines()[-1:] if result is not None else []
    return {
        "code": "failed",
        "message": last_line[0] if last_line else "the job failed without an error message",
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None

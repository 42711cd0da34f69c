"""The running job's line to its queue: progress, cancel, a record Redis lost, the worker's stop.

No torch here: the worker imports it at start-up, and a job run directly (no RQ) gets a context
that reports nowhere.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import redis.exceptions
from redis import Redis
from rq import get_current_job
from rq.job import Job

from oal_shared.errors import ConfigError
from oal_synth.queue import JobCanceled, JobInterrupted, JobLost, is_cancel_requested, job_record_exists

__all__ = ["JobContext", "clear_stop_request", "request_stop"]

logger = logging.getLogger(__name__)

_stop_requested = threading.Event()


# ---------------------------------------------------------------------------- process-wide controls


def request_stop() -> None:
    """Ask the running job to stop at its next batch and be requeued (the worker's SIGTERM)."""
    _stop_requested.set()


def clear_stop_request() -> None:
    _stop_requested.clear()


# ---------------------------------------------------------------------------- the job and its context


@dataclass
class JobContext:
    """Where the job reports to: its RQ job (progress meta, cancel flag) or nothing when run directly."""

    job_id: str
    rq_job: Job | None = None

    @property
    def connection(self) -> Redis | None:
        return self.rq_job.connection if self.rq_job is not None else None

    @classmethod
    def current(cls, job_id: str | None) -> JobContext:
        rq_job = get_current_job()
        if rq_job is not None:
            return cls(job_id=rq_job.id, rq_job=rq_job)
        if job_id is None:
            raise ConfigError("job_id: needed when run_synthesis_job runs outside an RQ worker")
        return cls(job_id=job_id)

    def check_interrupts(self) -> None:
        """Raise JobLost when Redis no longer holds the job, JobCanceled when the API asked to cancel,
        JobInterrupted when the worker stops. Redis out of reach for a moment: ask again next batch."""
        if self.connection is not None:
            try:
                lost = not job_record_exists(self.connection, self.job_id)
                canceled = not lost and is_cancel_requested(self.connection, self.job_id)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                logger.warning("job %s: Redis out of reach (%s); going on, asking again next batch", self.job_id, exc)
                lost = canceled = False
            if lost:
                raise JobLost(f"job {self.job_id}: Redis no longer holds its record (restarted empty or flushed)")
            if canceled:
                raise JobCanceled(f"job {self.job_id} canceled on request")
        if _stop_requested.is_set():
            raise JobInterrupted(f"job {self.job_id} interrupted: its worker is shutting down; it will resume")

    def update(self, **fields: Any) -> None:
        if self.rq_job is None:
            return
        self.rq_job.meta.update(fields)
        try:
            self.rq_job.save_meta()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            # Progress is news, not state: the next update carries it all again.
            logger.warning("job %s: progress not saved, Redis out of reach (%s)", self.job_id, exc)

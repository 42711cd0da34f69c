"""Synthesis jobs: submit, read, cancel, and the manifest of a finished job."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from oal_shared.errors import ManifestError
from oal_shared.paths import safe_join
from oal_shared.shards import read_manifest
from oal_synth.api.deps import Authorized, MetricsDep, QueueDep, RedisDep, SettingsDep, StoreDep
from oal_synth.api.errors import QUEUE_FULL_RETRY_AFTER_S, APIError, validation_error
from oal_synth.api.schemas import ErrorOut, JobOut
from oal_synth.queue import (
    enqueue_within_limit,
    fetch_job,
    job_status,
    job_view,
    queued_count,
    request_cancel,
)
from oal_synth.spec import JobSpec
from oal_synth.validation import check_submission

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_ERRORS = {
    400: {"model": ErrorOut, "description": "The body cannot be decoded (JSON that is not UTF-8)"},
    401: {"model": ErrorOut, "description": "OAL_API_TOKEN is set and the bearer token is missing or wrong"},
    413: {"model": ErrorOut, "description": "Body larger than OAL_MAX_BODY_BYTES"},
    422: {"model": ErrorOut, "description": "The spec is invalid; `error.field` names the field"},
    429: {"model": ErrorOut, "description": "Too many queued jobs; retry after `Retry-After` seconds"},
    503: {"model": ErrorOut, "description": "Redis is unreachable; retry after `Retry-After` seconds"},
}


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    dependencies=[Authorized],
    responses=_ERRORS,
    summary="Submit a synthesis job",
)
def submit_job(
    spec: JobSpec,
    response: Response,
    settings: SettingsDep,
    queue: QueueDep,
    store: StoreDep,
    metrics: MetricsDep,
) -> dict:
    # What the schema cannot check (limits, generator, embeddings), in the worker's words too.
    problems = check_submission(spec, settings, store)
    if problems:
        raise validation_error(problems)
    # The count spares the queue a push when it is clearly full; enqueue_within_limit is exact.
    job = enqueue_within_limit(queue, spec, settings) if queued_count(queue) < settings.max_queued_jobs else None
    if job is None:
        raise APIError(
            429,
            "queue_full",
            f"{settings.max_queued_jobs} jobs are already waiting (OAL_MAX_QUEUED_JOBS); "
            f"retry in {QUEUE_FULL_RETRY_AFTER_S} s",
            headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)},
        )
    metrics.count_job_submitted()
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_view(job)


@router.get(
    "/{job_id}",
    response_model=JobOut,
    responses={404: {"model": ErrorOut}, 410: {"model": ErrorOut, "description": "The queue lost the job"}},
    summary="Read a job",
)
def get_job(job_id: str, connection: RedisDep) -> dict:
    return job_view(fetch_job(connection, job_id))


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    dependencies=[Authorized],
    responses={401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 409: {"model": ErrorOut}},
    summary="Cancel a job (queued: at once; running: at its next batch)",
)
def cancel_job(job_id: str, connection: RedisDep, settings: SettingsDep) -> dict:
    job = fetch_job(connection, job_id)
    return job_view(request_cancel(connection, job, settings))


@router.get(
    "/{job_id}/manifest",
    responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut, "description": "The job has not finished"}},
    summary="The manifest of a finished job: spec, shards with counts and sha256",
)
def get_manifest(job_id: str, connection: RedisDep, settings: SettingsDep) -> dict:
    job = fetch_job(connection, job_id)
    state = job_status(job)
    if state.value != "finished":
        progress = (job.get_meta(refresh=False) or {}).get("progress") or {}
        raise APIError(
            409,
            "not_finished",
            f"job {job_id} is {state.value} ({progress.get('done', 0)}/{progress.get('total', '?')} "
            "outliers); the manifest exists once it is finished",
        )
    try:
        return read_manifest(safe_join(settings.shard_root, job_id))
    except ManifestError as exc:
        raise APIError(
            404, "manifest_missing", f"job {job_id} finished, but its manifest is unreadable: {exc}"
        ) from None

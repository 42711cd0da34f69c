"""Job metrics of the workers, kept in Redis and exposed by the API's `/metrics`.

Why through Redis and not a metrics port per worker: with `docker compose up --scale worker=N`
the workers have no stable address for Prometheus to scrape (it would need Docker service
discovery and one port per replica), and a worker's in-process counters vanish when it restarts
or is killed, which is exactly when a dashboard matters. So each worker adds its observations to
one Redis hash per queue after every job attempt, in one MULTI transaction, and the API's
collector (`JobMetricsCollector`, registered by `oal_synth.api.metrics.ApiMetrics`) reads that hash
at scrape time: one scrape target for any number of workers, totals that survive worker
restarts. Redis restarted empty resets the totals; Prometheus treats that as a counter reset.

Recording never fails a job: the worker records after RQ has finished its own bookkeeping of the
attempt, and every error here is logged and dropped.

Families (docs/METRICS.md lists them with their units):
`oal_job_duration_seconds{generator,outcome}` (histogram of job attempts),
`oal_outliers_synthesized_total{generator}` (outliers denoised by finished jobs) and
`oal_job_outliers_per_second{generator}` (the throughput of the latest finished job).
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from redis import Redis

__all__ = [
    "DURATION_BUCKETS",
    "OUTCOMES",
    "JobAttempt",
    "JobMetricsCollector",
    "job_metrics_key",
    "read_job_metrics",
    "record_job_attempt",
]

logger = logging.getLogger(__name__)

#: Upper bounds (seconds) of the job duration buckets: a tiny CPU job takes a second, a
#: Stable Diffusion job of thousands of outliers hours.
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, math.inf)
#: How one attempt of a job ended. "retried": it failed with retries left; "stopped": canceled on
#: request or put back in the queue by a stopping worker; "lost": Redis forgot the job meanwhile.
OUTCOMES = ("finished", "failed", "retried", "stopped", "lost")
#: Label of a job whose spec names no generator (it fails before loading one).
UNKNOWN_GENERATOR = "unknown"
#: Longest generator label kept: ids are short folder names; anything longer is cut, not a new series each.
MAX_LABEL_CHARS = 100

# Hash field kinds; a field is the JSON array [kind, generator, ...] so any generator id is safe in it.
_BUCKET, _SUM, _OUTLIERS, _RATE = "duration_bucket", "duration_sum", "outliers", "outliers_per_second"


def job_metrics_key(queue_name: str) -> str:
    """The Redis hash holding the job metrics of the workers of one queue."""
    return f"oal:synth:metrics:{queue_name}"


@dataclass(frozen=True)
class JobAttempt:
    """One job attempt as the worker saw it: who ran it, how it ended, how long it took."""

    generator: str
    outcome: str
    seconds: float
    outliers: int = 0  # outliers denoised by this attempt (finished attempts only)

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome: expected one of {', '.join(OUTCOMES)}, got {self.outcome!r}")


def generator_label(spec_json: object) -> str:
    """The generator label of a job from its spec as queued (no parsing: a bad spec still counts)."""
    generator = spec_json.get("generator") if isinstance(spec_json, dict) else None
    if not isinstance(generator, str) or not generator:
        return UNKNOWN_GENERATOR
    return generator[:MAX_LABEL_CHARS]


def _bucket_bound(seconds: float) -> float:
    return next(bound for bound in DURATION_BUCKETS if seconds <= bound)


def _field(*parts: object) -> str:
    return json.dumps(parts, separators=(",", ":"))


def record_job_attempt(connection: Redis, queue_name: str, attempt: JobAttempt) -> bool:
    """Add one attempt to the queue's job metrics; returns whether Redis took it. Never raises."""
    try:
        seconds = max(0.0, float(attempt.seconds))
        gen, outcome = attempt.generator, attempt.outcome
        key = job_metrics_key(queue_name)
        with connection.pipeline(transaction=True) as pipe:  # a scrape sees all of an attempt or none
            # Buckets are stored one per bound (not cumulative); the collector sums them up.
            pipe.hincrby(key, _field(_BUCKET, gen, outcome, floatToGoString(_bucket_bound(seconds))), 1)
            pipe.hincrbyfloat(key, _field(_SUM, gen, outcome), seconds)
            if outcome == "finished" and attempt.outliers > 0:
                pipe.hincrby(key, _field(_OUTLIERS, gen), int(attempt.outliers))
                if seconds > 0:
                    pipe.hset(key, _field(_RATE, gen), repr(attempt.outliers / seconds))
            pipe.execute()
        return True
    except Exception as exc:  # noqa: BLE001 - metrics are news: whatever went wrong, the job stays as it ended
        logger.warning("job metrics not recorded (%s: %s)", type(exc).__name__, exc)
        return False


@dataclass
class JobMetrics:
    """The job metrics of one queue as read from Redis: per (generator, outcome) and per generator."""

    buckets: dict[tuple[str, str], dict[float, int]]  # non-cumulative count per upper bound
    sums: dict[tuple[str, str], float]
    outliers: dict[str, int]
    outliers_per_second: dict[str, float]


def read_job_metrics(connection: Redis, queue_name: str) -> JobMetrics:
    """Everything recorded for the queue; fields this version does not understand are skipped."""
    metrics = JobMetrics(buckets=defaultdict(dict), sums={}, outliers={}, outliers_per_second={})
    for raw_field, raw_value in connection.hgetall(job_metrics_key(queue_name)).items():
        try:
            kind, *labels = json.loads(raw_field)
            value = float(raw_value)
            if kind == _BUCKET:
                gen, outcome, bound = labels
                metrics.buckets[(gen, outcome)][float(bound)] = int(value)
            elif kind == _SUM:
                metrics.sums[tuple(labels)] = value
            elif kind == _OUTLIERS:
                metrics.outliers[labels[0]] = int(value)
            elif kind == _RATE:
                metrics.outliers_per_second[labels[0]] = value
        except (ValueError, TypeError):
            logger.debug("job metrics: skipping field %r", raw_field)
    return metrics


class JobMetricsCollector(Collector):
    """The workers' job metrics of one queue, read from Redis at each scrape (nothing when it fails)."""

    def __init__(self, connection: Redis, queue_name: str):
        self.connection = connection
        self.queue_name = queue_name

    def describe(self) -> Iterator[Metric]:
        # Naming the families here keeps `register` from calling collect(), i.e. Redis, at start-up.
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        try:
            metrics = read_job_metrics(self.connection, self.queue_name)
        except Exception as exc:  # noqa: BLE001 - `oal_redis_up 0` tells the dashboard; the scrape still answers
            logger.warning("metrics without job metrics, Redis did not answer: %s", exc)
            return
        durations, outliers, rates = self._families()
        for (gen, outcome), counts in sorted(metrics.buckets.items()):
            cumulative, buckets = 0, []
            for bound in sorted(set(DURATION_BUCKETS) | set(counts)):
                cumulative += counts.get(bound, 0)
                buckets.append((floatToGoString(bound), cumulative))
            durations.add_metric([gen, outcome], buckets, metrics.sums.get((gen, outcome), 0.0))
        for gen, count in sorted(metrics.outliers.items()):
            outliers.add_metric([gen], count)
        for gen, rate in sorted(metrics.outliers_per_second.items()):
            rates.add_metric([gen], rate)
        yield from (durations, outliers, rates)

    @staticmethod
    def _families() -> tuple[HistogramMetricFamily, CounterMetricFamily, GaugeMetricFamily]:
        return (
            HistogramMetricFamily(
                "oal_job_duration_seconds",
                "Wall time of synthesis job attempts on the workers, by generator and outcome.",
                labels=["generator", "outcome"],
            ),
            CounterMetricFamily(
                "oal_outliers_synthesized",
                "Outliers denoised by finished jobs (resumed shards not counted), by generator.",
                labels=["generator"],
            ),
            GaugeMetricFamily(
                "oal_job_outliers_per_second",
                "Outliers denoised per second of wall time by the latest finished job, by generator.",
                labels=["generator"],
            ),
        )

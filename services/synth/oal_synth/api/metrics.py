"""Prometheus metrics of one API process, with prometheus_client.

Each app has its own `CollectorRegistry` (not the library's global one), so two apps in one
process (the tests) count apart. Request counters and latency histograms are labelled by route
template (`/v1/jobs/{job_id}`), never by raw path, so a scan of random ids adds no series. Queue
depths are read from Redis at scrape time by a custom collector; when Redis does not answer the
scrape still succeeds, with `oal_redis_up 0` and no depth series. The workers' job metrics
(durations, outliers per second) are read from Redis the same way (`oal_synth.worker_metrics`
says why they travel through Redis), so this one endpoint serves the whole deployment.

Metric names (dashboards rely on them): `oal_http_requests_total{method,route,status}`,
`oal_http_request_duration_seconds{method,route}`, `oal_jobs_submitted_total`,
`oal_queue_jobs{state}`, `oal_redis_up`, and from the workers `oal_job_duration_seconds{generator,outcome}`,
`oal_outliers_synthesized_total{generator}`, `oal_job_outliers_per_second{generator}`
(docs/METRICS.md has them all).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import redis.exceptions
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from rq import Queue

from oal_synth.worker_metrics import JobMetricsCollector

logger = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Route label of requests no route matched (404s of unknown paths): one series for all of them.
UNMATCHED_ROUTE = "unmatched"
#: Latency buckets in seconds: reads take milliseconds, uploads of large sets up to seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Methods counted by name; any other (a client may send any token) is counted as "other".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class QueueDepthCollector(Collector):
    """`oal_queue_jobs{state}` and `oal_redis_up`, read from the queue's registries at each scrape."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def describe(self) -> Iterator[Metric]:
        # Naming the families here keeps `register` from calling collect(), i.e. Redis, at start-up.
        yield self._depths()
        yield self._redis_up()

    def collect(self) -> Iterator[Metric]:
        depths = self._read_depths()
        up = self._redis_up()
        up.add_metric([], 0 if depths is None else 1)
        yield up
        if depths is not None:
            family = self._depths()
            for state, depth in depths.items():
                family.add_metric([state], depth)
            yield family

    def _read_depths(self) -> dict[str, int] | None:
        # cleanup=False: a scrape only reads; registry maintenance is the workers' job.
        queue = self.queue
        try:
            return {
                "queued": queue.count,
                "started": queue.started_job_registry.get_job_count(cleanup=False),
                "scheduled": queue.scheduled_job_registry.get_job_count(cleanup=False),
                "failed": queue.failed_job_registry.get_job_count(cleanup=False),
                "finished": queue.finished_job_registry.get_job_count(cleanup=False),
            }
        except redis.exceptions.RedisError as exc:  # away, refusing us, or failing: the scrape still answers
            logger.warning("metrics without queue depths, Redis did not answer: %s", exc)
            return None

    @staticmethod
    def _depths() -> GaugeMetricFamily:
        return GaugeMetricFamily("oal_queue_jobs", "Jobs in each state of the synthesis queue.", labels=["state"])

    @staticmethod
    def _redis_up() -> GaugeMetricFamily:
        return GaugeMetricFamily("oal_redis_up", "Whether Redis answered this scrape (1) or not (0).")


class ApiMetrics:
    """The metrics of one app: its registry, the request and submission counters, the queue collector."""

    def __init__(self, queue: Queue | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "oal_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "oal_http_request_duration_seconds",
            "Time from request to the end of the answer, by method and route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.jobs_submitted = Counter(
            "oal_jobs_submitted", "Synthesis jobs accepted by this API process.", registry=self.registry
        )
        if queue is not None:
            self.registry.register(QueueDepthCollector(queue))
            self.registry.register(JobMetricsCollector(queue.connection, queue.name))

    def count_request(self, method: str, route: str | None, status: int, seconds: float) -> None:
        route = route or UNMATCHED_ROUTE
        method = method if method in KNOWN_METHODS else "other"
        self.requests.labels(method=method, route=route, status=str(status)).inc()
        self.latency.labels(method=method, route=route).observe(seconds)

    def count_job_submitted(self) -> None:
        self.jobs_submitted.inc()

    def render(self) -> bytes:
        """The text exposition of everything in this app's registry (queue depths read now)."""
        return generate_latest(self.registry)

"""Prometheus text exposition, hand-written (prometheus_client is not a dependency).

Counters live in this process (one API process = one scrape target, as Prometheus expects);
queue depths are read from Redis at scrape time.
"""

from __future__ import annotations

import threading
from collections import Counter

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ApiMetrics:
    """Request and submission counters of one API process; safe to update from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str, str]] = Counter()
        self._jobs_submitted = 0

    def count_request(self, method: str, route: str, status: int) -> None:
        with self._lock:
            self._requests[(method, route, str(status))] += 1

    def count_job_submitted(self) -> None:
        with self._lock:
            self._jobs_submitted += 1

    def render(self, queue_depths: dict[str, int] | None) -> str:
        """The exposition text; `queue_depths` None means Redis did not answer (oal_redis_up 0)."""
        with self._lock:
            requests = sorted(self._requests.items())
            submitted = self._jobs_submitted
        lines = [
            "# HELP oal_http_requests_total HTTP requests answered, by method, route template and status.",
            "# TYPE oal_http_requests_total counter",
        ]
        for (method, route, status), count in requests:
            labels = _labels(method=method, route=route, status=status)
            lines.append(f"oal_http_requests_total{{{labels}}} {count}")
        lines += [
            "# HELP oal_jobs_submitted_total Synthesis jobs accepted by this API process.",
            "# TYPE oal_jobs_submitted_total counter",
            f"oal_jobs_submitted_total {submitted}",
            "# HELP oal_redis_up Whether Redis answered this scrape (1) or not (0).",
            "# TYPE oal_redis_up gauge",
            f"oal_redis_up {0 if queue_depths is None else 1}",
        ]
        if queue_depths is not None:
            lines += [
                "# HELP oal_queue_jobs Jobs in each state of the synthesis queue.",
                "# TYPE oal_queue_jobs gauge",
            ]
            for state, depth in sorted(queue_depths.items()):
                lines.append(f"oal_queue_jobs{{{_labels(state=state)}}} {depth}")
        return "\n".join(lines) + "\n"


def _labels(**values: str) -> str:
    return ",".join(f'{key}="{_escape(value)}"' for key, value in values.items())


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

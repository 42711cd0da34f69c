"""The example Grafana dashboard: valid JSON whose every query names metrics the service exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from rq import Queue
from rq.serializers import JSONSerializer

from oal_synth.api.metrics import ApiMetrics
from oal_synth.worker_metrics import OUTCOMES, JobAttempt, record_job_attempt

pytestmark = pytest.mark.redis

DASHBOARD = Path(__file__).resolve().parents[2] / "docker" / "grafana" / "oal-dashboard.json"
#: PromQL functions and aggregations the dashboard may use; any other name must be an exported metric.
PROMQL_WORDS = frozenset({"sum", "max", "min", "avg", "rate", "increase", "histogram_quantile", "by", "without"})


def exported_sample_names(redis_conn) -> set[str]:
    """Every sample name a live API registry shows once each kind of metric has been fed."""
    queue = Queue("dashboard-test", connection=redis_conn, serializer=JSONSerializer)
    metrics = ApiMetrics(queue)
    metrics.count_request("GET", "/v1/jobs/{job_id}", 200, 0.01)
    metrics.count_job_submitted()
    for outcome in OUTCOMES:
        assert record_job_attempt(redis_conn, queue.name, JobAttempt("gen", outcome, 2.0, outliers=4))
    return {sample.name for family in metrics.registry.collect() for sample in family.samples}


def metric_names(expr: str) -> set[str]:
    """The metric names of a PromQL expression: what is left without strings, matchers, ranges, groupings."""
    bare = re.sub(r'"[^"]*"', "", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without)\s*\([^)]*\)", "", bare)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare))
    return words - PROMQL_WORDS


def test_every_panel_queries_exported_metrics(redis_conn):
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_sample_names(redis_conn)
    assert {"oal_job_duration_seconds_bucket", "oal_outliers_synthesized_total", "oal_queue_jobs"} <= exported

    panels = dashboard["panels"]
    assert panels and len({p["id"] for p in panels}) == len(panels)
    used = set()
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, f"panel {panel['title']!r}: no metric in {target['expr']!r}"
            unknown = names - exported
            assert not unknown, f"panel {panel['title']!r} queries {sorted(unknown)}, not exported"
            used |= names
    # The panels the dashboard promises: requests, latency, queue, durations, throughput, failures.
    for family in ("oal_http_requests_total", "oal_http_request_duration_seconds_bucket", "oal_queue_jobs"):
        assert family in used
    assert {
        "oal_job_duration_seconds_bucket",
        "oal_job_duration_seconds_count",
        "oal_outliers_synthesized_total",
    } <= used


def test_metric_names_sees_through_promql():
    expr = 'histogram_quantile(0.95, sum by (route, le) (rate(oal_x_bucket{status=~"5..", a="b c"}[5m])))'
    assert metric_names(expr) == {"oal_x_bucket"}
    assert metric_names("max by (state) (oal_queue_jobs) * 3600") == {"oal_queue_jobs"}

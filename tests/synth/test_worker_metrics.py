"""The workers' job metrics: recorded in Redis by a real worker, scraped from the API's /metrics."""

from __future__ import annotations

import math
import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from oal_synth.api.app import create_app
from oal_synth.api.metrics import ApiMetrics
from oal_synth.queue import enqueue_synthesis, synthesis_queue
from oal_synth.spec import JobSpec
from oal_synth.store import EmbeddingSetStore
from oal_synth.worker_metrics import (
    DURATION_BUCKETS,
    JobAttempt,
    JobMetricsCollector,
    job_metrics_key,
    record_job_attempt,
)
from tests.synth.test_api_health import scrape
from tests.synth.test_worker import make_spec
from tests.utils.live_server import (
    LiveServer,
    embedding_set_bytes,
    install_tiny_random,
    run_burst_worker,
    wait_until,
    worker_process,
)

pytestmark = pytest.mark.redis

GENERATOR = "tiny-random"


def tiny_spec(set_id: str, num_outliers: int) -> JobSpec:
    return make_spec(set_id, num_outliers=num_outliers, shard_size=num_outliers)


def absent_set_id(set_id: str) -> str:
    """An id of the right form that no stored set has: the job passes the queue and fails on the worker."""
    return set_id[:-1] + ("0" if set_id[-1] != "0" else "1")


def job_summary(redis_conn: Redis, job_id: str) -> dict:
    return Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer).return_value()


def histogram(samples: dict, name: str, **labels: str) -> dict[str, float]:
    """One histogram series of a scrape: {"count", "sum", "le=<bound>": cumulative count}."""
    picked = {}
    for (sample, sample_labels), value in samples.items():
        found = dict(sample_labels)
        le = found.pop("le", None)
        if found != labels:
            continue
        if sample == f"{name}_bucket":
            picked[f"le={le}"] = value
        elif sample in (f"{name}_count", f"{name}_sum"):
            picked[sample.rsplit("_", 1)[1]] = value
    return picked


@pytest.mark.slow
def test_worker_process_jobs_show_in_api_metrics(oal_env, redis_conn, tmp_path, tmp_path_factory):
    with worker_process("--heartbeat", "1", log_path=tmp_path / "worker.log"):
        info = install_tiny_random(oal_env.generator_root, tmp_path_factory.getbasetemp() / "tiny-random-cache")
        set_id = EmbeddingSetStore.from_settings(oal_env).put_bytes(embedding_set_bytes(info.space, info.embed_dim))[
            "id"
        ]
        with LiveServer(create_app(oal_env)) as server, server.client() as client:
            submitted = client.post("/v1/jobs", json=tiny_spec(set_id, num_outliers=6).model_dump(mode="json"))
            assert submitted.status_code == 202, submitted.text
            good = submitted.json()["id"]
            queue = synthesis_queue(redis_conn, oal_env)
            bad = enqueue_synthesis(queue, tiny_spec(absent_set_id(set_id), 6), oal_env).id

            def status(job_id: str) -> str:
                return client.get(f"/v1/jobs/{job_id}").json()["status"]

            wait_until(
                lambda: status(good) in {"finished", "failed"} and status(bad) in {"finished", "failed"},
                timeout=120,
                what=f"both jobs to end (worker log: {tmp_path / 'worker.log'})",
            )
            assert (status(good), status(bad)) == ("finished", "failed")
            # A canceled job: stopped at its next batch, its denoised outliers not counted.
            long = client.post("/v1/jobs", json=make_spec(set_id, 400, 20).model_dump(mode="json")).json()["id"]
            wait_until(lambda: client.get(f"/v1/jobs/{long}").json()["shards"], timeout=60, what="a first shard")
            assert client.delete(f"/v1/jobs/{long}").status_code == 202
            wait_until(lambda: status(long) == "stopped", timeout=60, what="the canceled job to stop")
            samples = scrape(client)

    summary = job_summary(redis_conn, good)
    finished = histogram(samples, "oal_job_duration_seconds", generator=GENERATOR, outcome="finished")
    assert finished["count"] == 1
    # The worker times the attempt around the job body, which timed itself (rounded to ms).
    assert finished["sum"] >= summary["seconds"] - 0.001
    for bound in DURATION_BUCKETS:
        label = "le=+Inf" if math.isinf(bound) else f"le={bound}"
        assert finished[label] == (1 if finished["sum"] <= bound else 0), (label, finished)

    outliers = samples[("oal_outliers_synthesized_total", (("generator", GENERATOR),))]
    assert outliers == summary["denoised_samples"] == summary["num_samples"]  # nothing resumed
    rate = samples[("oal_job_outliers_per_second", (("generator", GENERATOR),))]
    assert rate == pytest.approx(outliers / finished["sum"], rel=1e-9)

    failed = histogram(samples, "oal_job_duration_seconds", generator=GENERATOR, outcome="failed")
    assert failed["count"] == 1 and failed["sum"] > 0
    outcomes = {dict(labels).get("outcome") for name, labels in samples if name == "oal_job_duration_seconds_count"}
    assert outcomes == {"finished", "failed", "stopped"}  # the missing set fails at once: no "retried" attempt
    stopped = histogram(samples, "oal_job_duration_seconds", generator=GENERATOR, outcome="stopped")
    assert stopped["count"] == 1 and stopped["sum"] > 0


@pytest.mark.slow
def test_metrics_failure_never_fails_the_job(oal_env, redis_conn, tmp_path_factory):
    info = install_tiny_random(oal_env.generator_root, tmp_path_factory.getbasetemp() / "tiny-random-cache")
    set_id = EmbeddingSetStore.from_settings(oal_env).put_bytes(embedding_set_bytes(info.space, info.embed_dim))["id"]
    queue = synthesis_queue(redis_conn, oal_env)
    key = job_metrics_key(queue.name)
    redis_conn.set(key, "not a hash")  # every HINCRBY on it fails with WRONGTYPE
    job = enqueue_synthesis(queue, tiny_spec(set_id, num_outliers=4), oal_env)

    assert run_burst_worker(oal_env)

    job.refresh()
    assert job.get_status() == "finished"
    assert redis_conn.get(key) == b"not a hash"
    with LiveServer(create_app(oal_env)) as server, server.client() as client:
        samples = scrape(client)
    assert samples[("oal_redis_up", ())] == 1
    assert not any(name.startswith("oal_job_") for name, _ in samples)  # unreadable, left out


def test_recorded_attempts_add_up_per_generator_and_outcome(redis_conn):
    attempts = [
        JobAttempt("gen-a", "finished", 0.4, outliers=10),
        JobAttempt("gen-a", "finished", 42.0, outliers=50),
        JobAttempt("gen-a", "retried", 7.0),
        JobAttempt("gen b/ü", "lost", 1e9),  # past the last finite bound; any id is a safe field
    ]
    for attempt in attempts:
        assert record_job_attempt(redis_conn, "q", attempt)
    metrics = ApiMetrics(Queue("q", connection=redis_conn, serializer=JSONSerializer))
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}

    series = {}
    for sample in families["oal_job_duration_seconds"].samples:
        labels = dict(sample.labels)
        series.setdefault((labels.pop("generator"), labels.pop("outcome")), {})[(sample.name, labels.get("le"))] = (
            sample.value
        )
    assert set(series) == {(a.generator, a.outcome) for a in attempts}
    for (gen, outcome), values in series.items():
        seconds = [a.seconds for a in attempts if (a.generator, a.outcome) == (gen, outcome)]
        assert values[("oal_job_duration_seconds_count", None)] == len(seconds)
        assert values[("oal_job_duration_seconds_sum", None)] == pytest.approx(sum(seconds))
        for (name, le), value in values.items():
            if name.endswith("_bucket"):
                assert value == sum(s <= float(le) for s in seconds), (gen, outcome, le)

    finished = [a for a in attempts if a.outcome == "finished"]
    outliers = {s.labels["generator"]: s.value for s in families["oal_outliers_synthesized"].samples}
    assert outliers == {"gen-a": sum(a.outliers for a in finished)}
    rates = {s.labels["generator"]: s.value for s in families["oal_job_outliers_per_second"].samples}
    assert rates == {"gen-a": pytest.approx(finished[-1].outliers / finished[-1].seconds)}  # the latest job's


def test_redis_out_of_reach_neither_raises_nor_breaks_the_scrape():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    away = Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    assert record_job_attempt(away, "q", JobAttempt(GENERATOR, "finished", 1.0, outliers=3)) is False
    assert list(JobMetricsCollector(away, "q").collect()) == []
    with pytest.raises(ValueError, match="outcome"):
        JobAttempt(GENERATOR, "exploded", 1.0)

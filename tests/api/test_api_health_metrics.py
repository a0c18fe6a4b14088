"""Health, readiness and the Prometheus metrics (tm_ series)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from fastapi.testclient import TestClient

from server.api import create_app
from server.metrics import TTBC_BUCKETS, Metrics
from tests.api.api_fakes import AUTH, FakeBackend, make_settings, session_body


def sample(text: str, series: str) -> float:
    """The value of one exposition line, e.g. 'tm_ttbc_seconds_bucket{le="0.775"}'."""
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match, f"{series} not in metrics"
    return float(match.group(1))


def test_healthz_answers_ok(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_flips_when_the_backend_reports_not_ready(client: TestClient, backend: FakeBackend) -> None:
    assert client.get("/readyz").json() == {"ready": True, "reason": "warmed up"}
    backend.ready_state = (False, "score worker rank 1 died (exit code -9)")
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"ready": False, "reason": "score worker rank 1 died (exit code -9)"}
    backend.ready_state = (True, "warmed up")
    assert client.get("/readyz").status_code == 200


def test_readyz_is_503_at_the_session_limit(backend: FakeBackend) -> None:
    with TestClient(create_app(backend, make_settings(max_sessions=1))) as client:
        client.post("/v1/sessions", json=session_body(), headers=AUTH)
        response = client.get("/readyz")
    assert response.status_code == 503
    assert "1 of 1 sessions" in response.json()["reason"]


def test_readyz_is_503_when_the_backend_raises(client: TestClient, backend: FakeBackend) -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("control group timed out")

    backend.ready = broken  # type: ignore[method-assign]
    response = client.get("/readyz")
    assert response.status_code == 503
    assert "control group timed out" in response.json()["reason"]


def test_metrics_expose_the_observed_chunk_values(client: TestClient, metrics: Metrics) -> None:
    metrics.observe_chunk(0.70, {"score": 0.4, "decode": 0.2}, deadline_s=0.75)
    metrics.observe_chunk(0.80, {"score": 0.5, "transfer": 0.01, "publish": 0.02}, deadline_s=0.75)
    metrics.observe_first_frame(1.25)
    metrics.set_av_offset(-0.02)
    metrics.session_started("s-1")
    metrics.set_buffer("s-1", 0.75)
    text = client.get("/metrics").text
    assert sample(text, "tm_ttbc_seconds_count") == 2
    assert sample(text, "tm_ttbc_seconds_sum") == pytest.approx(1.5)
    assert sample(text, 'tm_ttbc_seconds_bucket{le="0.7"}') == 1
    assert sample(text, 'tm_ttbc_seconds_bucket{le="0.775"}') == 1
    assert sample(text, 'tm_ttbc_seconds_bucket{le="0.8"}') == 2
    assert sample(text, "tm_deadline_misses_total") == 1
    assert sample(text, 'tm_stage_seconds_sum{stage="score"}') == pytest.approx(0.9)
    assert sample(text, 'tm_stage_seconds_count{stage="decode"}') == 1
    assert sample(text, 'tm_stage_seconds_count{stage="prepare"}') == 0
    assert sample(text, "tm_first_frame_latency_seconds_sum") == 1.25
    assert sample(text, "tm_av_offset_seconds") == -0.02
    assert sample(text, 'tm_av_offset_observed_seconds_bucket{le="-0.015625"}') == 1
    assert sample(text, "tm_active_sessions") == 1
    assert sample(text, "tm_playout_buffer_min_seconds") == 0.75


def test_metrics_name_no_session_by_default(client: TestClient, metrics: Metrics) -> None:
    """/metrics is open: by default no series carries a session id (issue 20: ids were label values)."""
    for session, seconds in (("s-secret-1", 0.5), ("s-secret-2", 1.25)):
        metrics.session_started(session)
        metrics.set_buffer(session, seconds)
    text = client.get("/metrics").text
    assert "s-secret" not in text and "session=" not in text
    assert sample(text, "tm_playout_buffer_min_seconds") == 0.5  # the session nearest to running dry
    metrics.session_ended("s-secret-1")
    assert sample(client.get("/metrics").text, "tm_playout_buffer_min_seconds") == 1.25


def test_per_session_labels_and_a_key_for_metrics_are_settings(backend: FakeBackend) -> None:
    settings = make_settings(metrics_session_labels=True, metrics_require_key=True)
    app = create_app(backend, settings)
    app.state.metrics.session_started("s-1")
    app.state.metrics.set_buffer("s-1", 0.75)
    with TestClient(app) as client:
        refused = client.get("/metrics")
        text = client.get("/metrics", headers=AUTH).text
    assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
    assert sample(text, 'tm_playout_buffer_seconds{session="s-1"}') == 0.75


def test_ttbc_buckets_are_25ms_apart_around_the_chunk_duration() -> None:
    dense = [b for b in TTBC_BUCKETS if 0.6 <= b <= 0.9]
    assert dense == pytest.approx(list(np.arange(0.6, 0.9001, 0.025)))
    assert TTBC_BUCKETS[0] == 0.1 and TTBC_BUCKETS[-1] == 5.0


def test_ending_a_session_drops_its_buffer_series_and_counts_once() -> None:
    metrics = Metrics(session_labels=True)
    metrics.session_started("s-1")
    metrics.session_started("s-1")
    metrics.set_buffer("s-1", 0.5)
    metrics.session_ended("s-1")
    metrics.session_ended("s-1")
    text = metrics.render()[0].decode()
    assert sample(text, "tm_active_sessions") == 0
    assert 'session="s-1"' not in text


def test_an_unknown_stage_is_rejected_naming_the_stages() -> None:
    with pytest.raises(ValueError, match="score, transfer, decode, publish"):
        Metrics().observe_chunk(0.7, {"denoise": 0.3})


def test_audio_accepted_by_the_api_is_counted(client: TestClient, metrics: Metrics) -> None:
    session_id = client.post("/v1/sessions", json=session_body(), headers=AUTH).json()["id"]
    headers = {**AUTH, "Content-Type": "audio/pcm; rate=16000"}
    client.post(f"/v1/sessions/{session_id}/audio", content=b"\0\0" * 8000, headers=headers)
    text = client.get("/metrics").text
    assert sample(text, 'tm_audio_received_seconds_total{transport="http"}') == 0.5


def test_each_app_has_its_own_registry(backend: FakeBackend) -> None:
    first, second = Metrics(), Metrics()
    first.observe_first_frame(2.0)
    with TestClient(create_app(backend, make_settings(), second)) as client:
        assert sample(client.get("/metrics").text, "tm_first_frame_latency_seconds_count") == 0

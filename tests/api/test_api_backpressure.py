"""Bounded audio queues (issue 20, item 4) at the API: a session's pending audio (accepted, not yet played)
never passes its cap; HTTP pushes past it get 429 with Retry-After and nothing partial; the audio WebSocket
slows a fast sender (``wait``: it stops reading; ``credit``: acks grant credit, frames past it are refused
with a message), gathers tiny frames into few pushes, and reports what became of its audio
(``playback_finished``).

The backend is the recording fake with a real ``AudioLedger`` per session (the same accounting the speech
feed keeps); its playout clock is the test's: nothing plays unless the test calls ``backend.play``, so no
assertion depends on timing. Before this work every push was taken whole (25 × 60 s in 0.2 s), a WebSocket
at 10x real time was accepted whole, and 1-sample frames were pushed one by one.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from server.api import create_app
from server.metrics import Metrics
from tests.api.api_fakes import AUTH, FakeBackend, make_settings, session_body
from tests.api.test_api_health_metrics import sample

RATE = 16_000
CAP_S = 1.0
FRAME_S = 0.1


def tone(seconds: float) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2")


def pcm_headers() -> dict[str, str]:
    return {**AUTH, "Content-Type": f"audio/pcm; rate={RATE}; channels=1"}


@pytest.fixture(autouse=True)
def fail_instead_of_hanging() -> Iterator[None]:
    """A server that never sends an awaited message (acks, playback_finished) fails the test within 30 s
    instead of blocking it forever (the test client's receive has no timeout)."""

    def expire(*_: object) -> None:
        raise TimeoutError("no answer from the server within 30 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 30, 5)  # then every 5 s, until the test is out of every wait
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def capped() -> FakeBackend:
    return FakeBackend(max_pending_s=CAP_S)


@pytest.fixture
def app_client(capped: FakeBackend, metrics: Metrics) -> Any:
    with TestClient(create_app(capped, make_settings(), metrics)) as client:
        yield client


@pytest.fixture
def sid(app_client: TestClient) -> str:
    return app_client.post("/v1/sessions", json=session_body(), headers=AUTH).json()["id"]


def pending_s(backend: FakeBackend, session_id: str) -> float:
    return backend.ledger(session_id).account().pending_s


# ---- HTTP -------------------------------------------------------------------------------------------------


def test_an_http_push_past_the_cap_is_429_with_retry_after_and_the_session_takes_audio_again(
    app_client: TestClient, capped: FakeBackend, sid: str, metrics: Metrics
) -> None:
    url = f"/v1/sessions/{sid}/audio"
    first = app_client.post(url, content=tone(0.8).tobytes(), headers=pcm_headers())
    assert first.status_code == 200
    assert first.json()["pending_s"] == pytest.approx(0.8) and first.json()["max_pending_s"] == CAP_S

    refused = app_client.post(url, content=tone(0.7).tobytes(), headers=pcm_headers())
    assert refused.status_code == 429
    # 0.8 + 0.7 - 1.0 = 0.5 s must play first: rounded up to whole seconds.
    assert refused.headers["Retry-After"] == "1"
    body = refused.json()
    assert body["code"] == "audio_backlog_full"
    assert body["pending_s"] == pytest.approx(0.8) and body["max_pending_s"] == CAP_S
    assert "cap of 1 s" in body["detail"]
    assert capped.pushed(sid).size == round(0.8 * RATE)  # nothing of the refused push was taken
    assert sample(app_client.get("/metrics").text, 'tm_audio_refused_total{transport="http"}') == 1.0

    # The session is healthy; once the audio played, the same push is taken.
    assert app_client.get(f"/v1/sessions/{sid}", headers=AUTH).json()["state"] == "running"
    capped.play(sid, 0.5)
    again = app_client.post(url, content=tone(0.7).tobytes(), headers=pcm_headers())
    assert again.status_code == 200, again.text
    assert again.json()["pending_s"] == pytest.approx(1.0)


def test_retry_after_counts_the_seconds_that_must_play(app_client: TestClient, sid: str) -> None:
    url = f"/v1/sessions/{sid}/audio"
    assert app_client.post(url, content=tone(1.0).tobytes(), headers=pcm_headers()).status_code == 200
    refused = app_client.post(url, content=tone(0.75).tobytes(), headers=pcm_headers())
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"  # 0.75 s → 1


def test_one_push_longer_than_the_cap_is_413_not_429(
    app_client: TestClient, capped: FakeBackend, sid: str
) -> None:
    response = app_client.post(
        f"/v1/sessions/{sid}/audio", content=tone(1.5).tobytes(), headers=pcm_headers()
    )
    assert response.status_code == 413
    assert response.json()["code"] == "audio_too_long" and response.json()["max_pending_s"] == CAP_S
    assert capped.pushes == []


# ---- WebSocket: credit ------------------------------------------------------------------------------------


def _credit_ws(client: TestClient, session_id: str) -> Any:
    return client.websocket_connect(
        f"/v1/sessions/{session_id}/audio?sample_rate={RATE}&flow_control=credit", headers=AUTH
    )


def _player(backend: FakeBackend, session_id: str, stop: threading.Event) -> threading.Thread:
    """The playout clock: 0.1 s of pending audio plays every 20 ms of wall time, until ``stop``."""

    def play() -> None:
        while not stop.is_set():
            backend.play(session_id, FRAME_S)
            time.sleep(0.02)

    thread = threading.Thread(target=play, daemon=True)
    thread.start()
    return thread


def test_a_credit_client_at_10x_real_time_is_throttled_and_all_its_acked_audio_is_played(
    app_client: TestClient, capped: FakeBackend, sid: str
) -> None:
    frame = tone(FRAME_S).tobytes()
    total_s, sent = 3.0, 0.0
    acks: list[dict[str, Any]] = []
    stop = threading.Event()
    with _credit_ws(app_client, sid) as ws:
        ready = ws.receive_json()
        assert ready["type"] == "ready" and ready["flow_control"] == "credit"
        assert ready["credit_s"] == CAP_S and ready["max_pending_s"] == CAP_S
        window = ready["accepted_s"] + ready["credit_s"]
        player = _player(capped, sid, stop)
        while sent < total_s - 1e-9:
            if sent + FRAME_S <= window + 1e-9:
                ws.send_bytes(frame)
                sent += FRAME_S
                continue
            message = ws.receive_json()
            assert message["type"] == "ack", message  # a client within its credit is never refused
            acks.append(message)
            window = message["accepted_s"] + message["credit_s"]
        ws.send_json({"type": "end"})
        while (message := ws.receive_json())["type"] == "ack":
            acks.append(message)
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    stop.set()
    player.join()
    assert closed.value.code == 1000
    # The client had to wait for credit: it could never hold more than the cap unplayed.
    assert acks and max(a["pending_s"] for a in acks) <= CAP_S + FRAME_S
    assert message == {
        "type": "playback_finished",
        "accepted_s": pytest.approx(total_s),
        "played_s": pytest.approx(total_s),
        "dropped_s": 0.0,
        "interrupted": False,
    }
    account = capped.ledger(sid).account()
    assert account.accepted == account.played == round(total_s * RATE)


def test_a_frame_past_the_credit_is_refused_with_a_message_and_the_connection_goes_on(
    app_client: TestClient, capped: FakeBackend, sid: str, metrics: Metrics
) -> None:
    with _credit_ws(app_client, sid) as ws:
        ws.receive_json()
        for _ in range(10):  # exactly the 1 s of credit
            ws.send_bytes(tone(FRAME_S).tobytes())
        ws.send_bytes(tone(FRAME_S).tobytes())  # past it
        while (message := ws.receive_json())["type"] == "ack":
            pass
        assert message["type"] == "refused" and message["code"] == "credit_exceeded"
        assert message["refused_s"] == pytest.approx(FRAME_S) and message["credit_s"] == pytest.approx(0.0)
        assert message["retry_after_s"] == pytest.approx(FRAME_S)
        capped.play(sid, FRAME_S)
        ws.send_bytes(tone(FRAME_S).tobytes())  # within the credit again
        ws.send_json({"type": "flush"})
        while (message := ws.receive_json())["type"] == "ack":
            pass
    assert message["type"] == "flushed" and message["samples"] == round(1.1 * RATE)
    # The refused frame was neither taken nor dropped silently: the client was told.
    assert capped.pushed(sid).size == round(1.1 * RATE)
    assert sample(app_client.get("/metrics").text, 'tm_audio_refused_total{transport="websocket"}') == 1.0


def test_delete_with_pending_audio_reports_it_dropped_on_the_websocket(
    app_client: TestClient, capped: FakeBackend, sid: str
) -> None:
    with _credit_ws(app_client, sid) as ws:
        ws.receive_json()
        for _ in range(8):
            ws.send_bytes(tone(FRAME_S).tobytes())
        ws.send_json({"type": "flush"})
        while ws.receive_json()["type"] != "flushed":
            pass
        capped.play(sid, 0.3)
        assert app_client.delete(f"/v1/sessions/{sid}", headers=AUTH).status_code == 200
        while (message := ws.receive_json())["type"] == "ack":
            pass
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == 4409
    assert message["type"] == "playback_finished" and message["interrupted"] is True
    assert message["played_s"] == pytest.approx(0.3) and message["dropped_s"] == pytest.approx(0.5)
    assert message["accepted_s"] == pytest.approx(0.8)
    assert "session ended" in message["reason"]


# ---- WebSocket: wait (the default) ------------------------------------------------------------------------


def test_a_default_client_at_10x_real_time_is_held_at_the_cap_until_audio_plays(
    app_client: TestClient, capped: FakeBackend, sid: str
) -> None:
    total_s = 3.0
    with app_client.websocket_connect(f"/v1/sessions/{sid}/audio?sample_rate={RATE}", headers=AUTH) as ws:
        assert ws.receive_json() == {"type": "ready", "sample_rate": RATE}  # the messages of old clients
        for _ in range(round(total_s / FRAME_S)):  # all at once: far faster than real time
            ws.send_bytes(tone(FRAME_S).tobytes())
        ws.send_json({"type": "flush"})
        deadline = time.monotonic() + 20
        highest = 0.0
        while capped.ledger(sid).account().accepted < round(total_s * RATE) and time.monotonic() < deadline:
            time.sleep(0.05)  # the server takes frames only as room appears
            highest = max(highest, pending_s(capped, sid))
            capped.play(sid, FRAME_S)
        assert ws.receive_json() == {"type": "flushed", "samples": round(total_s * RATE)}
    assert highest <= CAP_S + 1e-9
    assert capped.pushed(sid).size == round(total_s * RATE)  # nothing refused or lost


# ---- tiny frames ------------------------------------------------------------------------------------------


def test_one_sample_frames_are_gathered_into_few_pushes_and_none_is_lost(
    client: TestClient, backend: FakeBackend, session_id: str
) -> None:
    pcm = tone(0.2)
    with client.websocket_connect(f"/v1/sessions/{session_id}/audio?sample_rate={RATE}", headers=AUTH) as ws:
        ws.receive_json()
        for value in pcm:
            ws.send_bytes(value.tobytes())
        ws.send_json({"type": "flush"})
        assert ws.receive_json() == {"type": "flushed", "samples": pcm.size}
    np.testing.assert_array_equal(backend.pushed(session_id), pcm.astype(np.float32) / 32768)
    # 3200 frames; pushes of at least 20 ms (320 samples): 10, plus at most one remainder.
    assert len(backend.pushes) <= pcm.size // 320 + 1


def test_a_remainder_shorter_than_a_push_is_pushed_when_frames_stop(
    client: TestClient, backend: FakeBackend, session_id: str
) -> None:
    with client.websocket_connect(f"/v1/sessions/{session_id}/audio?sample_rate={RATE}", headers=AUTH) as ws:
        ws.receive_json()
        ws.send_bytes(tone(0.005).tobytes())  # 80 samples, under one push's 320
        deadline = time.monotonic() + 5
        while backend.pushed(session_id).size < 80 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert backend.pushed(session_id).size == 80  # no flush, no disconnect: pushed by the reporter


def test_an_unknown_flow_control_is_refused(client: TestClient, session_id: str) -> None:
    with client.websocket_connect(
        f"/v1/sessions/{session_id}/audio?sample_rate={RATE}&flow_control=fast", headers=AUTH
    ) as ws:
        error = ws.receive_json()
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == 4422 and "wait, credit" in error["detail"]


def test_the_first_message_may_ask_for_credit(client: TestClient, session_id: str) -> None:
    with client.websocket_connect(f"/v1/sessions/{session_id}/audio") as ws:
        ws.send_text(json.dumps({"sample_rate": RATE, "api_key": "test-key", "flow_control": "credit"}))
        ready = ws.receive_json()
    assert ready["flow_control"] == "credit" and ready["credit_s"] == 30.0

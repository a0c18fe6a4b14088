"""Bounded audio queues on the real server (issue 20, item 4): ``python -m server.cli serve`` (uvicorn, the
real backend and speech feed, tiny preset at 32x32, one process) with ``--max-pending-audio-s 3``.

Before: 25 × 60 s pushed to one session were all accepted, a WebSocket at 10x real time was accepted whole,
and a DELETE discarded the unplayed audio without a word. Now: pushes past the cap get 429 with
Retry-After (and the session takes audio again once it played), a credit WebSocket at 10x is held at the
cap by its acks and hears ``playback_finished`` for all of it, and a DELETE reports what it dropped.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.serve.conftest import AUTH, ServeProcess, portrait_base64, start_serve
from tests.serve.ws_client import WsClient

CAP_S = 3.0
CHUNK_S = 0.75  # a later chunk of the tiny preset at 16 fps: the tolerance of what plays meanwhile
RATE = 16_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("serve-backpressure")
    out = tmp / "out"
    out.mkdir()
    server = start_serve(
        tmp,
        "--decoder",
        "colocated",
        "--resolution",
        "32x32",
        "--max-pending-audio-s",
        str(CAP_S),
        api={"file_output_dir": str(out)},
    )
    yield server
    server.stop()


@pytest.fixture
def http(server: ServeProcess) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def _create(http: httpx.Client, tmp: str) -> str:
    body = {
        "image": portrait_base64(),
        "output": {"type": "file", "path": f"{tmp}-{time.monotonic_ns()}.mp4"},
    }
    created = http.post("/v1/sessions", json=body)
    assert created.status_code == 201, created.text
    return created.json()["id"]


def _tone(seconds: float) -> bytes:
    t = np.arange(round(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes()


def _push(http: httpx.Client, session_id: str, seconds: float) -> httpx.Response:
    headers = {"Content-Type": f"audio/pcm; rate={RATE}; channels=1"}
    return http.post(f"/v1/sessions/{session_id}/audio", content=_tone(seconds), headers=headers)


def test_pushes_past_the_cap_get_429_with_retry_after_and_the_session_takes_audio_again(
    server: ServeProcess, http: httpx.Client
) -> None:
    session_id = _create(http, "http")
    pending = 0.0
    for _ in range(10):  # 1 s pushes back to back: the cap is reached long before 10 s play
        response = _push(http, session_id, 1.0)
        if response.status_code != 200:
            break
        pending = response.json()["pending_s"]
        assert pending <= CAP_S
    assert response.status_code == 429, response.text
    body = response.json()
    assert body["code"] == "audio_backlog_full" and body["max_pending_s"] == CAP_S
    assert body["pending_s"] + 1.0 > CAP_S
    retry = int(response.headers["Retry-After"])
    assert retry >= 1
    assert http.get(f"/v1/sessions/{session_id}").json()["state"] == "running"
    # The pending audio plays at real time: the push is taken again after Retry-After (a loaded machine may
    # play more slowly than real time, so a few more waits are allowed).
    deadline = time.monotonic() + 30
    while (again := _push(http, session_id, 1.0)).status_code == 429 and time.monotonic() < deadline:
        time.sleep(int(again.headers["Retry-After"]))
    assert again.status_code == 200, again.text
    audio = http.get(f"/v1/sessions/{session_id}").json()["audio"]
    assert audio["played_s"] > 0 and audio["pending_s"] <= CAP_S
    assert audio["accepted_s"] == pytest.approx(audio["played_s"] + audio["pending_s"], abs=1e-6)
    http.delete(f"/v1/sessions/{session_id}")


def test_delete_reports_the_pending_audio_as_dropped(server: ServeProcess, http: httpx.Client) -> None:
    session_id = _create(http, "delete")
    pushed = _push(http, session_id, 2.5)
    assert pushed.status_code == 200
    started = time.monotonic()
    deleted = http.delete(f"/v1/sessions/{session_id}")
    elapsed = time.monotonic() - started
    assert deleted.status_code == 200
    audio = deleted.json()["audio"]
    assert audio["accepted_s"] == pytest.approx(2.5) and audio["pending_s"] == 0.0
    assert audio["played_s"] + audio["dropped_s"] == pytest.approx(2.5, abs=1e-6)
    # What was pending when the DELETE came is what it dropped: at most what was pending at the push, less
    # what could play between the push and the end (the request's time plus one chunk).
    assert pushed.json()["pending_s"] - elapsed - CHUNK_S <= audio["dropped_s"] <= pushed.json()["pending_s"]
    assert http.get(f"/v1/sessions/{session_id}").json()["audio"] == audio


def test_a_credit_websocket_at_10x_real_time_is_held_at_the_cap_and_hears_all_of_it_played(
    server: ServeProcess, http: httpx.Client
) -> None:
    session_id = _create(http, "ws")
    ws = WsClient(
        "127.0.0.1",
        server.port,
        f"/v1/sessions/{session_id}/audio?sample_rate={RATE}&flow_control=credit",
        headers=[("authorization", AUTH["Authorization"])],
    )
    frame_s, total_s = 0.1, 5.0
    frame = _tone(frame_s)
    try:
        ready = ws.recv_json()
        assert ready["type"] == "ready" and ready["max_pending_s"] == CAP_S
        window, sent, acks = ready["accepted_s"] + ready["credit_s"], 0.0, []
        while sent < total_s - 1e-9:
            if sent + frame_s <= window + 1e-9:
                ws.send_bytes(frame)
                sent += frame_s
                time.sleep(frame_s / 10)  # 10x real time
                continue
            message = ws.recv_json(timeout=30)
            assert message["type"] == "ack", message
            acks.append(message)
            window = message["accepted_s"] + message["credit_s"]
        ws.send_text(json.dumps({"type": "end"}))
        while (message := ws.recv_json(timeout=60))["type"] == "ack":
            acks.append(message)
        closed = ws.recv()
    finally:
        ws.close()
        http.delete(f"/v1/sessions/{session_id}")
    assert max(a["pending_s"] for a in acks) <= CAP_S + frame_s
    assert min(a["credit_s"] for a in acks) < frame_s  # it did run out of credit: it was throttled
    assert message["type"] == "playback_finished" and message["accepted_s"] == pytest.approx(total_s)
    assert message["played_s"] + message["dropped_s"] == pytest.approx(total_s, abs=1e-6)
    assert message["played_s"] == pytest.approx(total_s) and message["interrupted"] is False
    assert closed[:2] == ("close", 1000)


def test_metrics_count_played_dropped_and_refused_audio_without_session_labels(
    server: ServeProcess, http: httpx.Client
) -> None:
    text = http.get("/metrics").text
    played = float(re.search(r"^tm_audio_played_seconds_total (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
    refused = float(
        re.search(r'^tm_audio_refused_total\{transport="http"\} (\S+)$', text, re.M).group(1)  # type: ignore[union-attr]
    )
    assert played > 0 and refused >= 1  # the tests above ran on this server
    assert 'tm_audio_dropped_seconds_total{reason="session_end"}' in text
    assert "session=" not in text


def test_a_cap_below_what_a_real_time_stream_holds_is_refused_at_start(tmp_path: Path) -> None:
    from server.serve import parse_serve_options

    with pytest.raises(ValueError, match="--max-pending-audio-s 1 is below 3"):
        parse_serve_options(
            ["--max-pending-audio-s", "1", "--device", "cpu", "--resolution", "32x32"], check_memory=False
        )

"""The HTTP API of ``talkingmachines serve`` against the real backend and a real 1 + 1 serving group.

One server (``python -m server.cli serve --decoder dedicated --score-workers 1``: the master process plus a
score-worker process it spawned) serves the whole module; a file-output session is driven through every
endpoint, and the last test kills the score worker to check that the server fails its sessions with a reason,
turns unready and stays up. Tests run in file order (the kill is last).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import pytest

from tests.serve.conftest import SPEECH, ServeProcess, portrait_base64, worker_pids


@pytest.fixture(scope="module")
def http(dedicated_server: ServeProcess) -> Iterator[httpx.Client]:
    with dedicated_server.client() as client:
        yield client


@pytest.fixture(scope="module")
def session(http: httpx.Client) -> dict[str, Any]:
    response = http.post(
        "/v1/sessions", json={"image": portrait_base64(), "output": {"type": "file", "path": "call.mp4"}}
    )
    assert response.status_code == 201, response.text
    return response.json()


def _wait_for(http: httpx.Client, session_id: str, predicate: Any, timeout_s: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    info = http.get(f"/v1/sessions/{session_id}").json()
    while not predicate(info) and time.monotonic() < deadline:
        time.sleep(0.2)
        info = http.get(f"/v1/sessions/{session_id}").json()
    return info


def test_create_returns_a_running_session_with_its_detected_face(session: dict[str, Any]) -> None:
    assert session["state"] == "running"
    assert [f["source"] for f in session["faces"]] == ["detected"]
    assert session["speaking"] == [0]


def test_idle_session_generates_silence_chunks_about_one_chunk_ahead(
    http: httpx.Client, session: dict[str, Any]
) -> None:
    info = _wait_for(http, session["id"], lambda i: i["chunks_generated"] >= 4)
    assert info["chunks_generated"] >= 4
    # Below --ahead when a chunk is started, plus the chunks the pipelined engine may have in flight by then
    # (the request for t+1 goes out before chunk t is published: at most two 0.75 s chunks).
    assert 0.0 < info["playout_buffer_s"] <= 0.5 + 2 * 0.75 + 0.1
    assert info["ttbc"]["count"] == info["chunks_generated"] - 1  # between publishes: the first has none
    assert info["ttbc"]["deadline_s"] == 0.75


def test_a_second_session_shares_the_group_and_both_keep_playing_in_real_time(
    http: httpx.Client, session: dict[str, Any]
) -> None:
    second = http.post(
        "/v1/sessions", json={"image": portrait_base64(), "output": {"type": "file", "path": "second.mp4"}}
    ).json()
    first_before = http.get(f"/v1/sessions/{session['id']}").json()["chunks_generated"]
    time.sleep(3.0)
    infos = [http.get(f"/v1/sessions/{s['id']}").json() for s in (session, second)]
    http.delete(f"/v1/sessions/{second['id']}")
    # 3 s of playout is 4 chunks of 0.75 s: each session got its share, neither was starved.
    assert infos[0]["chunks_generated"] - first_before >= 3
    assert infos[1]["chunks_generated"] >= 4
    assert all(i["playout_buffer_s"] > 0 for i in infos)


def test_audio_post_is_accepted_and_reaches_the_video(http: httpx.Client, session: dict[str, Any]) -> None:
    response = http.post(
        f"/v1/sessions/{session['id']}/audio",
        content=SPEECH.read_bytes(),
        headers={"Content-Type": "audio/wav"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["samples"] == 76451
    info = _wait_for(http, session["id"], lambda i: i["first_frame_latency_s"] is not None)
    print(f"\nHTTP audio -> first frame played: {info['first_frame_latency_s']:.2f} s")
    assert 0.0 < info["first_frame_latency_s"] < 5.0


def test_speakers_switch_to_listening_and_reject_unknown_characters(
    http: httpx.Client, session: dict[str, Any]
) -> None:
    assert http.post(f"/v1/sessions/{session['id']}/speakers", json={"speaking": []}).json()["speaking"] == []
    refused = http.post(f"/v1/sessions/{session['id']}/speakers", json={"speaking": [3]})
    assert refused.status_code == 422
    assert "3" in refused.json()["detail"]
    assert http.post(f"/v1/sessions/{session['id']}/speakers", json={"speaking": [0]}).json()["speaking"] == [
        0
    ]


def test_clear_drops_the_unplayed_buffer_and_the_session_goes_on(
    http: httpx.Client, session: dict[str, Any]
) -> None:
    before = http.get(f"/v1/sessions/{session['id']}").json()["chunks_generated"]
    assert http.post(f"/v1/sessions/{session['id']}/clear").status_code == 204
    info = _wait_for(http, session["id"], lambda i: i["chunks_generated"] > before + 1)
    assert info["state"] == "running"
    assert info["chunks_generated"] > before + 1


def test_unknown_session_is_404(http: httpx.Client) -> None:
    for response in (
        http.get("/v1/sessions/nope"),
        http.post("/v1/sessions/nope/clear"),
        http.delete("/v1/sessions/nope"),
    ):
        assert response.status_code == 404
        assert response.json()["code"] == "unknown_session"


def test_delete_ends_the_session_and_leaves_a_playable_mp4(
    http: httpx.Client, session: dict[str, Any], serve_tmp: Path
) -> None:
    info = http.delete(f"/v1/sessions/{session['id']}").json()
    assert info["state"] == "ended"
    late = http.post(
        f"/v1/sessions/{session['id']}/audio",
        content=SPEECH.read_bytes(),
        headers={"Content-Type": "audio/wav"},
    )
    assert late.status_code == 409
    with av.open(str(serve_tmp / "out" / "call.mp4")) as container:
        kinds = sorted(s.type for s in container.streams)
        video = container.streams.video[0]
        assert (video.width, video.height) == (64, 64)  # the trained tiny default's size
    assert kinds == ["audio", "video"]


def test_killed_worker_fails_sessions_with_the_rank_and_readyz_turns_false(
    http: httpx.Client, dedicated_server: ServeProcess
) -> None:
    live = http.post(
        "/v1/sessions", json={"image": portrait_base64(), "output": {"type": "file", "path": "killed.mp4"}}
    ).json()
    assert httpx.get(f"{dedicated_server.url}/readyz").status_code == 200
    (pid,) = worker_pids(dedicated_server)
    os.kill(pid, signal.SIGKILL)
    info = _wait_for(http, live["id"], lambda i: i["state"] == "failed", timeout_s=10)
    print(f"\nsession after the kill: {info['state']}: {info['reason']}")
    assert info["state"] == "failed"
    assert "rank 1" in info["reason"]
    ready = httpx.get(f"{dedicated_server.url}/readyz")
    assert ready.status_code == 503
    assert "rank 1" in ready.json()["reason"]
    refused = http.post(
        "/v1/sessions", json={"image": portrait_base64(), "output": {"type": "file", "path": "late.mp4"}}
    )
    assert refused.status_code == 503
    assert httpx.get(f"{dedicated_server.url}/healthz").status_code == 200  # the master stays up
    assert dedicated_server.proc.poll() is None


def test_sigterm_stops_the_server_with_exit_code_0_and_no_rank_left(dedicated_server: ServeProcess) -> None:
    assert dedicated_server.stop() == 0
    assert worker_pids(dedicated_server) == []
    assert "received SIGTERM; draining" in dedicated_server.log()

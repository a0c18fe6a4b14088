"""Graceful drain of ``talkingmachines serve`` (SIGTERM), on the real process tree.

A 1 + 1 group (master + one score-worker process) with ``drain_timeout_s = 4`` and one live file session gets
SIGTERM; the fixture records what the API says during the drain and how the process ends, and each test
checks one promise: readiness turns 503 "draining" at once, new sessions get 503 with Retry-After, the live
call keeps generating until the timeout, then the session ends, its MP4 is finalised and the process exits 0
with no rank left. A second server checks the two short cuts: the drain ends as soon as the last call ends,
and a second SIGTERM ends it at once.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import httpx
import pytest

from tests.serve.conftest import AUTH, ServeProcess, portrait_base64, start_serve, worker_pids

DRAIN_TIMEOUT_S = 4.0


@dataclass
class DrainRecord:
    """What one drained server did, observed from outside."""

    server: ServeProcess
    mp4: Path
    session_id: str
    chunks_at_sigterm: int
    readyz_after_sigterm: httpx.Response
    refused_session: httpx.Response
    chunks_during_drain: list[tuple[float, int]] = field(default_factory=list)  # (s after SIGTERM, chunks)
    states_during_drain: list[str] = field(default_factory=list)
    exit_code: int | None = None
    exit_after_s: float = 0.0
    ranks_left: list[int] = field(default_factory=list)


def _file_session(http: httpx.Client, path: str) -> dict:
    body = {"image": portrait_base64(), "output": {"type": "file", "path": path}}
    response = http.post("/v1/sessions", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def _wait_chunks(http: httpx.Client, session_id: str, at_least: int, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        chunks = http.get(f"/v1/sessions/{session_id}").json()["chunks_generated"]
        if chunks >= at_least:
            return chunks
        time.sleep(0.1)
    raise AssertionError(f"session {session_id} made fewer than {at_least} chunks in {timeout_s} s")


def _wait_exit(server: ServeProcess, timeout_s: float) -> int:
    try:
        return server.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        server.stop()
        message = f"serve did not exit within {timeout_s} s of the drain:\n{server.log()}"
        raise AssertionError(message) from None


@pytest.fixture(scope="module")
def drained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DrainRecord]:
    tmp = tmp_path_factory.mktemp("drain")
    out = tmp / "out"
    out.mkdir()
    server = start_serve(
        tmp,
        "--decoder",
        "dedicated",
        "--score-workers",
        "1",
        api={"file_output_dir": str(out), "drain_timeout_s": str(DRAIN_TIMEOUT_S), "retry_after_s": "7"},
    )
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
            session = _file_session(http, "call.mp4")
            chunks = _wait_chunks(http, session["id"], at_least=2)
            server.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            record = DrainRecord(
                server=server,
                mp4=out / "call.mp4",
                session_id=session["id"],
                chunks_at_sigterm=chunks,
                readyz_after_sigterm=_poll_readyz_until_refused(server),
                refused_session=http.post(
                    "/v1/sessions",
                    json={"image": portrait_base64(), "output": {"type": "file", "path": "late.mp4"}},
                ),
            )
            while server.proc.poll() is None and time.monotonic() - sent < DRAIN_TIMEOUT_S + 20:
                try:
                    info = http.get(f"/v1/sessions/{session['id']}", timeout=2).json()
                except httpx.HTTPError:
                    break  # the server has stopped listening: the drain is over
                record.chunks_during_drain.append((time.monotonic() - sent, info["chunks_generated"]))
                record.states_during_drain.append(info["state"])
                time.sleep(0.25)
            record.exit_code = _wait_exit(server, timeout_s=DRAIN_TIMEOUT_S + 30)
            record.exit_after_s = time.monotonic() - sent
            record.ranks_left = worker_pids(server)
        yield record
    finally:
        server.stop()


def _poll_readyz_until_refused(server: ServeProcess, timeout_s: float = 2.0) -> httpx.Response:
    """/readyz right after the signal (the handler runs between two bytecodes of the main thread, so allow
    a moment for it to be delivered)."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = httpx.get(f"{server.url}/readyz", timeout=2)
        if response.status_code != 200 or time.monotonic() > deadline:
            return response
        time.sleep(0.02)


def test_readyz_turns_503_draining_right_after_sigterm(drained: DrainRecord) -> None:
    assert drained.readyz_after_sigterm.status_code == 503
    body = drained.readyz_after_sigterm.json()
    assert body["ready"] is False
    assert body["reason"].startswith("draining")


def test_new_sessions_get_503_with_retry_after_while_draining(drained: DrainRecord) -> None:
    refused = drained.refused_session
    assert refused.status_code == 503, refused.text
    assert refused.headers["Retry-After"] == "7"
    assert refused.json()["code"] == "no_capacity"
    assert "draining" in refused.json()["detail"]


def test_the_live_session_keeps_generating_until_the_drain_timeout(drained: DrainRecord) -> None:
    late = [chunks for at_s, chunks in drained.chunks_during_drain if at_s >= DRAIN_TIMEOUT_S - 1.5]
    assert late, f"no observation near the end of the drain: {drained.chunks_during_drain}"
    assert max(late) > drained.chunks_at_sigterm + 2  # 0.75 s chunks, paced by playout: ~1.3 per second
    assert "running" in drained.states_during_drain


def test_the_process_exits_0_after_the_drain_timeout_with_no_rank_left(drained: DrainRecord) -> None:
    assert drained.exit_code == 0, drained.server.log()
    assert DRAIN_TIMEOUT_S <= drained.exit_after_s < DRAIN_TIMEOUT_S + 20
    assert drained.ranks_left == []
    log = drained.server.log()
    assert "received SIGTERM; draining" in log
    assert "drain timeout of 4 s reached; closing every session" in log


def test_the_drained_session_ends_with_a_finalised_playable_mp4(drained: DrainRecord) -> None:
    with av.open(str(drained.mp4)) as container:
        assert sorted(s.type for s in container.streams) == ["audio", "video"]
        fps = container.streams.video[0].average_rate
        frames = sum(1 for _ in container.decode(video=0))
    # The file is written at playout time: it covers the call before SIGTERM plus the whole drain, so it
    # lasts longer than the drain timeout (a session cut at SIGTERM would hold ~2 s); a file whose trailer
    # was never written would not open or decode at all.
    assert frames / fps > DRAIN_TIMEOUT_S


@pytest.fixture
def short_cut_server(tmp_path: Path) -> Iterator[ServeProcess]:
    out = tmp_path / "out"
    out.mkdir()
    server = start_serve(
        tmp_path, "--decoder", "colocated", api={"file_output_dir": str(out), "drain_timeout_s": "120"}
    )
    yield server
    server.stop()


def test_the_drain_ends_as_soon_as_the_last_call_ends(short_cut_server: ServeProcess) -> None:
    with httpx.Client(base_url=short_cut_server.url, headers=AUTH, timeout=30) as http:
        session = _file_session(http, "short.mp4")
        _wait_chunks(http, session["id"], at_least=1)
        short_cut_server.proc.send_signal(signal.SIGTERM)
        assert _poll_readyz_until_refused(short_cut_server).status_code == 503
        assert http.get(f"/v1/sessions/{session['id']}").json()["state"] == "running"
        ended = time.monotonic()
        assert http.delete(f"/v1/sessions/{session['id']}").status_code == 200
    assert _wait_exit(short_cut_server, timeout_s=20) == 0
    assert time.monotonic() - ended < 20  # far below the 120 s drain timeout
    assert "drain done: no live session left" in short_cut_server.log()


def test_a_second_sigterm_ends_the_drain_at_once(short_cut_server: ServeProcess) -> None:
    with httpx.Client(base_url=short_cut_server.url, headers=AUTH, timeout=30) as http:
        session = _file_session(http, "cut.mp4")
        _wait_chunks(http, session["id"], at_least=1)
        short_cut_server.proc.send_signal(signal.SIGTERM)
        assert _poll_readyz_until_refused(short_cut_server).status_code == 503
        second = time.monotonic()
        short_cut_server.proc.send_signal(signal.SIGTERM)
    assert _wait_exit(short_cut_server, timeout_s=20) == 0
    assert time.monotonic() - second < 20
    assert "second SIGTERM while draining; closing every session now" in short_cut_server.log()

"""Issue 20 against the real server: ``python -m server.cli serve`` (uvicorn, the real backend, tiny preset at
32x32, one process) started from the runtime dependency set.

*Runtime set*: the server's ``PYTHONPATH`` puts a ``websockets`` package first that refuses to import, so
uvicorn (``ws="auto"``) cannot use the test extras' WebSocket library if one is installed and must serve the
audio WebSocket with a runtime dependency. What is asserted:

- the runtime dependencies of pyproject.toml (the closure of ``[project].dependencies`` over the installed
  packages' own requirements, no extras) contain a WebSocket library uvicorn supports (wsproto);
- that uvicorn then serves ``WS /v1/sessions/{id}/audio`` end to end (ready, PCM frames, flush, flushed) with
  a real session behind it — it answered 405 "No supported WebSocket library" before wsproto was a runtime
  dependency;
- the hardening holds over real sockets: no key → 401 from the headers alone (the body is never waited
  for), an idle unauthenticated WebSocket is closed at ``ws_auth_timeout_s``, bad inputs are 4xx on the real
  backend (they were 500 or 201-then-failed), ``/metrics`` names no session, and no secret put in a URL
  reaches the server's log.
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, requires
from typing import Any

import httpx
import numpy as np
import pytest
from packaging.requirements import Requirement
from PIL import Image

from tests.serve.conftest import API_KEY, AUTH, REPO, ServeProcess, portrait_base64, start_serve
from tests.serve.ws_client import WsClient

WS_AUTH_TIMEOUT_S = 1.0
UVICORN_WS_LIBRARIES = {"websockets", "wsproto"}


def _runtime_closure() -> set[str]:
    """Names of the packages the runtime dependencies pull in (no extras), from the installed metadata."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    todo = [Requirement(r).name for r in pyproject["project"]["dependencies"]]
    seen: set[str] = set()
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


@pytest.fixture(scope="module")
def runtime_only(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment whose PYTHONPATH hides ``websockets`` (the test extras' WebSocket library)."""
    blocker = tmp_path_factory.mktemp("runtime-only")
    (blocker / "websockets").mkdir()
    (blocker / "websockets" / "__init__.py").write_text(
        'raise ImportError("websockets is not a runtime dependency of talkingmachines")\n'
    )
    return {"PYTHONPATH": f"{blocker}:{REPO}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, runtime_only: dict[str, str]) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("serve-hardening")
    out = tmp / "out"
    (out / "folder.mp4").mkdir(parents=True)
    api = {"file_output_dir": str(out), "ws_auth_timeout_s": str(WS_AUTH_TIMEOUT_S), "max_sessions": "3"}
    server = start_serve(tmp, "--decoder", "colocated", "--resolution", "32x32", api=api, env=runtime_only)
    yield server
    server.stop()


def _request(server: ServeProcess, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request on a connection of its own (a refused body closes its connection)."""
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        return client.request(method, path, **kwargs)


def _create(server: ServeProcess, path: str, **extra: Any) -> httpx.Response:
    body = {"image": portrait_base64(), "output": {"type": "file", "path": path}, **extra}
    return _request(server, "POST", "/v1/sessions", json=body)


@pytest.fixture
def session(server: ServeProcess) -> Iterator[str]:
    created = _create(server, f"ws-{time.monotonic_ns()}.mp4")
    assert created.status_code == 201, created.text
    yield created.json()["id"]
    _request(server, "DELETE", f"/v1/sessions/{created.json()['id']}")


def test_the_runtime_dependencies_bring_a_websocket_library_uvicorn_uses(
    runtime_only: dict[str, str],
) -> None:
    closure = _runtime_closure()
    assert "uvicorn" in closure
    assert closure & UVICORN_WS_LIBRARIES == {"wsproto"}, sorted(closure & UVICORN_WS_LIBRARIES)
    # With websockets hidden, uvicorn's automatic choice is wsproto (not None, which answers 405).
    probe = (
        "import uvicorn.protocols.websockets.auto as a, uvicorn.protocols.websockets.wsproto_impl as w; "
        "assert a.AutoWebSocketsProtocol is w.WSProtocol, a.AutoWebSocketsProtocol"
    )
    run = subprocess.run([sys.executable, "-c", probe], env=runtime_only, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    blocked = subprocess.run(
        [sys.executable, "-c", "import websockets"], env=runtime_only, capture_output=True
    )
    assert blocked.returncode != 0  # the server below really runs without it


def test_the_audio_websocket_works_on_the_real_uvicorn(server: ServeProcess, session: str) -> None:
    ws = WsClient(
        "127.0.0.1",
        server.port,
        f"/v1/sessions/{session}/audio?sample_rate=16000",
        [("Authorization", f"Bearer {API_KEY}")],
    )
    try:
        assert ws.recv_json() == {"type": "ready", "sample_rate": 16000}
        tone = (np.sin(np.arange(8000) / 8) * 8000).astype("<i2").tobytes()  # 0.5 s at 16 kHz
        ws.send_bytes(tone[:8000])
        ws.send_bytes(tone[8000:])
        ws.send_text(json.dumps({"type": "flush"}))
        assert ws.recv_json() == {"type": "flushed", "samples": 8000}
    finally:
        ws.close()
    assert _request(server, "GET", f"/v1/sessions/{session}").json()["state"] == "running"


def test_a_websocket_that_never_authenticates_is_closed_at_the_deadline(
    server: ServeProcess, session: str
) -> None:
    ws = WsClient("127.0.0.1", server.port, f"/v1/sessions/{session}/audio?sample_rate=16000")
    started = time.monotonic()
    error = ws.recv_json(timeout=WS_AUTH_TIMEOUT_S + 10)  # today: nothing, ever
    closed = ws.recv(timeout=5)
    ws.close()
    assert error["code"] == "unauthorized"
    assert closed[:2] == ("close", 4401)
    assert WS_AUTH_TIMEOUT_S - 0.1 <= time.monotonic() - started < WS_AUTH_TIMEOUT_S + 3


def test_without_a_key_the_server_answers_401_from_the_headers_alone(server: ServeProcess) -> None:
    # Headers of a chunked upload, and no body byte: the answer must not wait for the body.
    for path in ("/v1/sessions", "/v1/call/token"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Transfer-Encoding: chunked\r\n\r\n".encode()
            )
            started = time.monotonic()
            answer = sock.recv(4096).decode(errors="replace")
        assert answer.startswith("HTTP/1.1 401"), answer
        assert time.monotonic() - started < 2.0


def _jpeg_claiming(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (128, 128, 128)).save(buffer, format="JPEG")
    full = buffer.getvalue()
    start_of_scan = full.index(b"\xff\xda")
    return full[: start_of_scan + 14] + b"\xff\xd9"


@pytest.mark.parametrize(
    ("path", "extra", "status"),
    [
        ("p.mp4", {"prompt": "x" * 3000}, 422),  # today 500 (the backend's Prompt(text=...) raised)
        ("a\x00b.mp4", {}, 422),  # today 500 (embedded null byte)
        ("missing/x.mp4", {}, 422),  # today 500 (the MP4 publisher's FileNotFoundError)
        ("folder.mp4", {}, 422),  # today 201, then the session failed: Is a directory
        ("x" * 300 + ".mp4", {}, 422),  # today 201, then the session failed: File name too long
    ],
    ids=["long-prompt", "nul", "missing-folder", "a-folder", "name-too-long"],
)
def test_bad_session_inputs_are_4xx_on_the_real_backend(
    server: ServeProcess, path: str, extra: dict[str, Any], status: int
) -> None:
    response = _create(server, path, **extra)
    assert response.status_code == status, response.text
    assert response.json()["detail"]
    assert _request(server, "GET", "/readyz").status_code == 200


def test_two_live_sessions_never_share_a_recording(server: ServeProcess) -> None:
    first = _create(server, "same.mp4")
    second = _create(server, "same.mp4")
    _request(server, "DELETE", f"/v1/sessions/{first.json()['id']}")
    assert first.status_code == 201
    assert second.status_code == 409, second.text  # today: 201 201, one recording silently lost


def test_a_tiny_jpeg_claiming_4000x4000_is_refused_at_once(server: ServeProcess) -> None:
    image = base64.b64encode(_jpeg_claiming(4000, 4000)).decode()
    started = time.monotonic()
    response = _request(
        server, "POST", "/v1/sessions", json={"image": image, "output": {"type": "file", "path": "b.mp4"}}
    )
    assert response.status_code == 422, response.text  # today: 201 after ~1 s of decoding
    assert "per byte" in response.json()["detail"]
    assert time.monotonic() - started < 1.0


def test_metrics_name_no_session(server: ServeProcess, session: str) -> None:
    time.sleep(1.0)  # a few chunks: the playout buffer is set
    text = httpx.get(f"{server.url}/metrics").text
    assert session not in text and "session=" not in text
    assert re.search(r"^tm_playout_buffer_min_seconds [0-9.e+-]+$", text, re.MULTILINE)


def test_no_secret_in_a_url_reaches_the_log(server: ServeProcess, session: str) -> None:
    page = httpx.get(f"{server.url}/call?room=demo&key=SECRET-IN-PAGE-URL")
    assert page.status_code == 400 and page.json()["code"] == "key_in_url"
    ws = WsClient(
        "127.0.0.1", server.port, f"/v1/sessions/{session}/audio?sample_rate=16000&api_key=SECRET-IN-WS-URL"
    )
    ws.recv(timeout=WS_AUTH_TIMEOUT_S + 5)
    ws.close()
    httpx.get(f"{server.url}/healthz?token=SECRET-IN-QUERY")
    time.sleep(0.3)
    log = server.log()
    assert "GET /call?room=demo&key=REDACTED" in log  # the access line is there, its secret is not
    assert "SECRET-IN" not in log and API_KEY not in log

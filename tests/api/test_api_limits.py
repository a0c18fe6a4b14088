"""What a request costs before it is refused (issue 20, item 1): the key is checked before any of the body is
read, and every route's body limit holds while the body streams, with or without Content-Length.

The app is driven as plain ASGI with a body that arrives in 64 KiB chunks and is counted as the app pulls
it, so "bytes read" is exactly what the server would have taken off the socket for the app.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import pytest

from proto.api import SessionInfo, SessionState
from server.api import DEFAULT_BODY_LIMIT, create_app
from server.settings import ApiSettings
from tests.api.api_fakes import API_KEY, AUTH, FakeBackend, make_settings

CHUNK = 64 * 1024


@dataclass
class Outcome:
    status: int
    body: dict[str, Any]
    bytes_read: int
    seconds: float


async def _drive(
    app: Any, method: str, path: str, headers: dict[str, str], total: int, declare: bool
) -> Outcome:
    chunks = (total + CHUNK - 1) // CHUNK
    raw = [
        (k.lower().encode(), v.encode()) for k, v in {"content-type": "application/json", **headers}.items()
    ]
    raw.append((b"content-length", str(total).encode()) if declare else (b"transfer-encoding", b"chunked"))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": raw,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    pulled, read = 0, 0
    status, body = 0, b""

    async def receive() -> dict[str, Any]:
        nonlocal pulled, read
        if pulled >= chunks:
            await asyncio.sleep(3600)  # the client has nothing more; a disconnect would come later
        size = min(CHUNK, total - pulled * CHUNK)
        pulled += 1
        read += size
        return {"type": "http.request", "body": b"x" * size, "more_body": pulled < chunks}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, body
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body += message.get("body", b"")

    started = time.perf_counter()
    await asyncio.wait_for(app(scope, receive, send), 30)
    try:
        parsed = json.loads(body or b"{}")
    except ValueError:
        parsed = {"text": body.decode(errors="replace")}
    return Outcome(
        status, parsed if isinstance(parsed, dict) else {"json": parsed}, read, time.perf_counter() - started
    )


def _backend() -> FakeBackend:
    """A fake backend with one live session, ``s-1`` (so its routes get as far as reading their body)."""
    backend = FakeBackend()
    backend.sessions["s-1"] = SessionInfo(id="s-1", state=SessionState.running)
    return backend


def drive(
    settings: ApiSettings, method: str, path: str, total: int, *, key: str | None, declare: bool
) -> Outcome:
    app = create_app(_backend(), settings)
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return asyncio.run(_drive(app, method, path, headers, total, declare))


@pytest.mark.parametrize("declare", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("key", [None, "wrong-key"], ids=["no-key", "wrong-key"])
@pytest.mark.parametrize("path", ["/v1/sessions", "/v1/call/token", "/v1/sessions/s-1/audio"])
def test_without_a_valid_key_no_body_byte_is_read(path: str, key: str | None, declare: bool) -> None:
    # Today: /v1/sessions read 22 MB and /v1/call/token an unbounded chunked body before the key check.
    outcome = drive(make_settings(), "POST", path, 20 * 1024 * 1024, key=key, declare=declare)
    assert outcome.status == 401, outcome
    assert outcome.body["code"] == "unauthorized"
    assert outcome.bytes_read == 0
    assert outcome.seconds < 0.5  # headers only (a few ms; generous for a loaded CI machine)


SMALL = make_settings(max_image_bytes=3000, max_audio_bytes=100_000, call_access_key="call-key")
LIMITS = [
    ("POST", "/v1/sessions", SMALL.max_session_body_bytes),
    ("POST", "/v1/sessions/s-1/audio", SMALL.max_audio_bytes),
    ("POST", "/v1/sessions/s-1/speakers", DEFAULT_BODY_LIMIT),
    ("POST", "/v1/sessions/s-1/clear", DEFAULT_BODY_LIMIT),
    ("POST", "/v1/call/token", DEFAULT_BODY_LIMIT),
    ("POST", "/v1/call/link", DEFAULT_BODY_LIMIT),
]


@pytest.mark.parametrize("declare", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize(("method", "path", "limit"), LIMITS)
def test_every_route_stops_reading_at_its_limit(method: str, path: str, limit: int, declare: bool) -> None:
    total = limit + 40 * CHUNK
    outcome = drive(SMALL, method, path, total, key=API_KEY, declare=declare)
    if outcome.bytes_read == 0 and outcome.status != 413:
        return  # a route that never reads its body (GET, DELETE) is refused or answered without it
    assert outcome.status == 413, outcome
    assert outcome.body["code"] in ("too_large", "http_error")
    assert str(limit) in outcome.body["detail"]
    # Declared: refused from the header. Streamed: the chunk that crosses the limit is the last one read.
    assert outcome.bytes_read <= (0 if declare else limit + CHUNK)


def test_a_chunked_session_body_over_the_limit_is_cut_at_the_limit() -> None:
    # Today the whole 22 MB session limit is read first; here the limit is 68 KB, the body 40 MB.
    outcome = drive(SMALL, "POST", "/v1/sessions", 40 * 1024 * 1024, key=API_KEY, declare=False)
    assert outcome.status == 413
    assert outcome.bytes_read <= SMALL.max_session_body_bytes + CHUNK


@pytest.mark.parametrize("declare", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize(
    ("method", "path", "key"),
    [
        ("GET", "/healthz", None),
        ("GET", "/readyz", None),
        ("GET", "/metrics", None),
        ("GET", "/call", None),
        ("GET", "/openapi.json", None),
        ("GET", "/v1/sessions", API_KEY),
        ("DELETE", "/v1/sessions/s-1", API_KEY),
    ],
)
def test_routes_that_take_no_body_refuse_one_unread(
    method: str, path: str, key: str | None, declare: bool
) -> None:
    outcome = drive(make_settings(), method, path, 10 * 1024 * 1024, key=key, declare=declare)
    assert outcome.status == 413, outcome
    assert outcome.bytes_read == 0 and "takes no request body" in outcome.body["detail"]


def test_a_key_for_the_call_routes_opens_them_but_not_the_api(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(call_access_key="call-key")
    outcome = drive(settings, "POST", "/v1/sessions", 1000, key="call-key", declare=True)
    assert outcome.status == 401 and outcome.bytes_read == 0
    outcome = drive(settings, "POST", "/v1/call/token", 1000, key="call-key", declare=True)
    assert outcome.status == 422  # past the key check: the body (not JSON) is read and refused


def test_auth_disabled_still_caps_bodies() -> None:
    settings = ApiSettings(auth_disabled=True, max_audio_bytes=100_000)
    outcome = drive(settings, "POST", "/v1/sessions/s-1/audio", 10 * 1024 * 1024, key=None, declare=False)
    assert outcome.status == 413 and outcome.bytes_read <= 100_000 + CHUNK


def test_a_cors_preflight_needs_no_key() -> None:
    app = create_app(FakeBackend(), make_settings(cors_origins=("https://app.example",)))
    headers = {"origin": "https://app.example", "access-control-request-method": "POST"}
    outcome = asyncio.run(_drive(app, "OPTIONS", "/v1/sessions", headers, 0, True))
    assert outcome.status == 200


def test_the_real_auth_header_still_works_end_to_end() -> None:
    outcome = drive(make_settings(), "GET", "/v1/sessions", 0, key=AUTH["Authorization"][7:], declare=True)
    assert outcome.status == 200 and [s["id"] for s in outcome.body["sessions"]] == ["s-1"]

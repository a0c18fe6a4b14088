"""An audio WebSocket that never authenticates is closed within ``ws_auth_timeout_s`` (issue 20: five such
connections were still open after 70 s). Driven as plain ASGI: the client connects, then sends nothing."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from proto.api import SessionInfo, SessionState
from server.api import create_app
from server.api_errors import WS_INVALID, WS_UNAUTHORIZED
from tests.api.api_fakes import AUTH, FakeBackend, make_settings

TIMEOUT_S = 0.3


async def _silent_client(app: Any, query: str, headers: dict[str, str]) -> tuple[list[dict[str, Any]], float]:
    """Connect and then say nothing; returns what the server sent and when it closed (seconds)."""
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": "/v1/sessions/s-1/audio",
        "raw_path": b"/v1/sessions/s-1/audio",
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "subprotocols": [],
    }
    connected = False
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal connected
        if not connected:
            connected = True
            return {"type": "websocket.connect"}
        await asyncio.sleep(3600)  # an idle client
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    started = time.perf_counter()
    await asyncio.wait_for(app(scope, receive, send), TIMEOUT_S + 5)  # today: never returns
    return sent, time.perf_counter() - started


def _app() -> Any:
    backend = FakeBackend()
    backend.sessions["s-1"] = SessionInfo(id="s-1", state=SessionState.running)
    return create_app(backend, make_settings(ws_auth_timeout_s=TIMEOUT_S))


@pytest.mark.parametrize(
    ("query", "headers", "close_code", "error_code"),
    [
        ("sample_rate=16000", {}, WS_UNAUTHORIZED, "unauthorized"),  # no key: must send it first
        ("", AUTH, WS_INVALID, "invalid_request"),  # a key but no rate: must send the rate first
    ],
    ids=["no-key", "key-without-rate"],
)
def test_a_websocket_that_sends_no_first_message_is_closed_at_the_deadline(
    query: str, headers: dict[str, str], close_code: int, error_code: str
) -> None:
    sent, seconds = asyncio.run(_silent_client(_app(), query, headers))
    assert TIMEOUT_S <= seconds < TIMEOUT_S + 1.0
    error = json.loads(next(m["text"] for m in sent if m["type"] == "websocket.send"))
    assert error["code"] == error_code and f"{TIMEOUT_S:g} s" in error["detail"]
    assert sent[-1]["type"] == "websocket.close" and sent[-1]["code"] == close_code


def test_the_deadline_is_a_setting_with_a_short_default() -> None:
    assert 0 < make_settings().ws_auth_timeout_s <= 10


def test_an_oversized_first_message_is_refused_not_parsed() -> None:
    # A wrong key in a 5 KB hello: refused as not the handshake (4422) before the key is even compared.
    with TestClient(_app()) as client, client.websocket_connect("/v1/sessions/s-1/audio") as ws:
        ws.send_text(json.dumps({"sample_rate": 16000, "api_key": "x", "pad": "p" * 5000}))
        error = ws.receive_json()
        closed = ws.receive()
    assert error["code"] == "invalid_request"
    assert closed["type"] == "websocket.close" and closed["code"] == WS_INVALID

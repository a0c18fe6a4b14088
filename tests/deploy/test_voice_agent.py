"""The example voice agent's glue: the load it reports to LiveKit dispatch and the avatar request it builds
(the conversation itself needs a cloud LLM and is not run here)."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from deploy.agent import voice_agent


@contextmanager
def _readyz(status: int) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/readyz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("status", "load"), [(200, 0.0), (503, 1.0)])
def test_load_follows_the_groups_readiness(status: int, load: float, monkeypatch: pytest.MonkeyPatch) -> None:
    with _readyz(status) as url:
        monkeypatch.setenv("TALKINGMACHINES_API_URL", url)
        assert voice_agent.group_load() == load


def test_an_unreachable_group_counts_as_full(monkeypatch: pytest.MonkeyPatch) -> None:
    with _readyz(200) as url:
        pass  # closed again: nothing listens there now
    monkeypatch.setenv("TALKINGMACHINES_API_URL", url)
    assert voice_agent.group_load() == 1.0


def test_session_request_carries_the_portrait_and_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    portrait = tmp_path / "face.png"
    portrait.write_bytes(b"\x89PNG fake bytes")
    monkeypatch.setenv("AVATAR_IMAGE", str(portrait))
    monkeypatch.setenv("AVATAR_PROMPT", "a calm person")
    request = voice_agent.avatar_session_request()
    assert base64.b64decode(request["image"]) == portrait.read_bytes()
    assert request["prompt"] == "a calm person"
    assert "output" not in request  # AvatarSession fills it in


def test_session_request_names_a_missing_portrait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVATAR_IMAGE", "/nonexistent/face.png")
    with pytest.raises(RuntimeError, match="AVATAR_IMAGE"):
        voice_agent.avatar_session_request()

"""An in-memory ``SessionBackend`` that records every call, and app/client fixtures around it.

A test double is right here: these tests specify the HTTP layer (status codes, bodies, what reaches the
backend), not the runtime behind it.
"""

from __future__ import annotations

import base64
import io
import itertools
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from proto.api import Face, SessionCreate, SessionInfo, SessionState
from server.audio_ledger import AudioAccount, AudioLedger
from server.backend import InvalidRequest, NoCapacity, SessionEnded, UnknownSession
from server.settings import ApiSettings

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


class FakeBackend:
    """Sessions in a dict; records (session, pushed samples), speakers and clears."""

    def __init__(self, max_pending_s: float | None = 30.0) -> None:
        """max_pending_s: each session's cap on pending audio (its ``AudioLedger``, as the real feed keeps
        one); the fake plays nothing unless a test calls ``play``."""
        self.max_pending_s = max_pending_s
        self.ledgers: dict[str, AudioLedger] = {}
        self.sessions: dict[str, SessionInfo] = {}
        self.created: list[tuple[SessionCreate, np.ndarray, list[Face]]] = []
        self.pushes: list[tuple[str, np.ndarray]] = []
        self.speakers: list[tuple[str, list[int]]] = []
        self.clears: list[str] = []
        self.closed: list[str] = []
        self.ready_state: tuple[bool, str] = (True, "warmed up")
        self.no_capacity_retry_s: float | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def _live(self, session_id: str) -> SessionInfo:
        info = self.get(session_id)
        if info.state in (SessionState.ended, SessionState.failed):
            raise SessionEnded(session_id, info.reason)
        return info

    def create_session(self, spec: SessionCreate, image: np.ndarray, faces: Sequence[Face]) -> SessionInfo:
        if self.no_capacity_retry_s is not None:
            raise NoCapacity(self.no_capacity_retry_s)
        with self._lock:
            session_id = f"s-{next(self._ids)}"
            identity = spec.output.identity if spec.output.type == "livekit" else None
            info = SessionInfo(
                id=session_id,
                state=SessionState.running,
                faces=list(faces),
                speaking=spec.speaking,
                livekit_identity=identity,
            )
            self.sessions[session_id] = info
            self.ledgers[session_id] = AudioLedger(self.max_pending_s, name=session_id)
            self.created.append((spec, image, list(faces)))
        return info

    def get(self, session_id: str) -> SessionInfo:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise UnknownSession(session_id) from None

    def list_sessions(self) -> list[SessionInfo]:
        return list(self.sessions.values())

    def push_audio(self, session_id: str, pcm: np.ndarray, source: str | None = None) -> AudioAccount:
        self._live(session_id)
        assert pcm.dtype == np.float32 and pcm.ndim == 1
        account = self.ledger(session_id).admit(int(pcm.size), source)
        self.pushes.append((session_id, pcm.copy()))
        return account

    def ledger(self, session_id: str) -> AudioLedger:
        """The session's ledger (one is made for sessions a test put in ``sessions`` by hand)."""
        if session_id not in self.ledgers:
            self.ledgers[session_id] = AudioLedger(self.max_pending_s, name=session_id)
        return self.ledgers[session_id]

    def audio_ledger(self, session_id: str) -> AudioLedger:
        self._live(session_id)
        return self.ledger(session_id)

    def play(self, session_id: str, seconds: float) -> None:
        """The test's playout clock: ``seconds`` of the oldest pending audio play."""
        self.ledger(session_id).played(round(seconds * 16000))

    def set_speakers(self, session_id: str, speaking: Sequence[int]) -> SessionInfo:
        info = self._live(session_id)
        if any(i >= len(info.faces) for i in speaking):
            raise InvalidRequest(f"speaker index beyond the session's {len(info.faces)} character(s)")
        self.speakers.append((session_id, list(speaking)))
        self.sessions[session_id] = info.model_copy(update={"speaking": list(speaking)})
        return self.sessions[session_id]

    def clear(self, session_id: str) -> None:
        self._live(session_id)
        self.clears.append(session_id)

    def close(self, session_id: str) -> SessionInfo:
        info = self.get(session_id)
        self.closed.append(session_id)
        self.ledger(session_id).end("closed by client")
        self.sessions[session_id] = info.model_copy(
            update={"state": SessionState.ended, "reason": "closed by client"}
        )
        return self.sessions[session_id]

    def ready(self) -> tuple[bool, str]:
        return self.ready_state

    def fail(self, session_id: str, reason: str) -> None:
        """What the runtime does when a worker dies: the session fails with a reason."""
        self.ledger(session_id).end(reason)
        self.sessions[session_id] = self.sessions[session_id].model_copy(
            update={"state": SessionState.failed, "reason": reason}
        )

    def pushed(self, session_id: str) -> np.ndarray:
        parts = [pcm for sid, pcm in self.pushes if sid == session_id]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def png_base64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def blank_image(height: int = 96, width: int = 128) -> np.ndarray:
    return np.full((height, width, 3), 128, dtype=np.uint8)


def session_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "image": png_base64(blank_image()),
        "prompt": "a friendly face",
        "output": {
            "type": "livekit",
            "url": "ws://127.0.0.1:7880",
            "room": "call-1",
            "identity": "tm-avatar",
            "agent_identity": "agent-1",
            "token": "jwt-from-the-agent",
        },
    }
    body.update(overrides)
    return body


def make_settings(**overrides: Any) -> ApiSettings:
    values: dict[str, Any] = {"api_key": API_KEY}
    values.update(overrides)
    return ApiSettings(**values)

"""The contract between the HTTP control plane (``server.api``) and whatever runs sessions (the master).

The API validates and decodes every input (image, faces, audio, speakers) before it calls a backend, so a
backend only ever sees well-formed data. Methods are synchronous and are called from the API's worker
threads (several may run at once): implementations must be thread-safe. Only ``create_session`` may block
for long (session set-up: image encode, cache allocation); the others must return promptly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from proto.api import Face, SessionCreate, SessionInfo

if TYPE_CHECKING:
    from server.audio_ledger import AudioAccount, AudioLedger


class BackendError(Exception):
    """Base of the errors a backend raises; the API maps each to an HTTP status."""


class UnknownSession(BackendError):
    """No session with this id (never created, or closed and forgotten). → 404"""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"no session {session_id!r}; create one with POST /v1/sessions")
        self.session_id = session_id


class SessionEnded(BackendError):
    """The session exists but has ended or failed, so it takes no more audio or commands. → 409"""

    def __init__(self, session_id: str, reason: str | None) -> None:
        why = f": {reason}" if reason else ""
        super().__init__(f"session {session_id!r} has ended{why} — create a new session")
        self.session_id = session_id
        self.reason = reason


class NoCapacity(BackendError):
    """No room for another session right now. → 503 with ``Retry-After``"""

    def __init__(self, retry_after_s: float, reason: str = "the serving group is at capacity") -> None:
        super().__init__(f"{reason}; retry in {retry_after_s:g} s")
        self.retry_after_s = retry_after_s
        self.reason = reason


class BackendFailed(BackendError):
    """The backend cannot serve (a worker died, warm-up failed); the reason says which. → 503"""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AudioBacklogFull(BackendError):
    """The session's pending audio (accepted, not yet played) plus this push would pass its cap; nothing of
    the push was taken. It fits once ``retry_after_s`` more seconds of audio have played. → 429"""

    def __init__(self, seconds: float, pending_s: float, max_pending_s: float, retry_after_s: float) -> None:
        super().__init__(
            f"{pending_s:.2f} s of audio are pending (accepted, not yet played) and this push of "
            f"{seconds:.2f} s would pass the session's cap of {max_pending_s:g} s; nothing was taken — "
            f"retry in {retry_after_s:.2f} s, when enough has played, or send at real time"
        )
        self.seconds = seconds
        self.pending_s = pending_s
        self.max_pending_s = max_pending_s
        self.retry_after_s = retry_after_s


class AudioTooLong(BackendError):
    """One push longer than the session's cap on pending audio: it can never be taken whole. → 413"""

    def __init__(self, seconds: float, max_pending_s: float) -> None:
        super().__init__(
            f"this push of {seconds:.2f} s of audio is longer than the session's cap of {max_pending_s:g} s "
            "of pending audio; send it in pieces of at most that"
        )
        self.seconds = seconds
        self.max_pending_s = max_pending_s


class InvalidRequest(BackendError):
    """Well-formed but not applicable to this session (e.g. a speaker index beyond its characters). → 422"""


@runtime_checkable
class SessionBackend(Protocol):
    """What the control plane needs from the session runtime."""

    def create_session(self, spec: SessionCreate, image: np.ndarray, faces: Sequence[Face]) -> SessionInfo:
        """Start a session.

        Args:
            spec: the validated request. For a LiveKit output, ``spec.output.token`` is always set (the API
                mints one when the caller did not); for a file output, ``spec.output.path`` is an absolute
                path inside the server's output directory.
            image: the reference image, ``[H, W, 3]`` uint8 RGB.
            faces: the face regions to animate, one per character (given, detected, or one central
                fallback); ``spec.speaking`` indexes into them.

        Returns:
            the new session's info (state ``starting`` or ``running``).

        Raises:
            NoCapacity: no room now. BackendFailed: cannot serve at all. InvalidRequest: e.g. an unknown
            embedding name.
        """
        ...

    def get(self, session_id: str) -> SessionInfo:
        """Current info; ended and failed sessions stay visible (with their reason) for a while.
        Raises UnknownSession."""
        ...

    def list_sessions(self) -> list[SessionInfo]:
        """Every session the backend still knows, in any state."""
        ...

    def push_audio(self, session_id: str, pcm: np.ndarray, source: str | None = None) -> AudioAccount:
        """Append speech to the session's audio: ``[N]`` float32 in [-1, 1] at 16 kHz, for the characters that
        are speaking; all of it or none (``server.audio_ledger``). ``source`` names the pusher (an audio
        WebSocket connection) so the account counts its own audio. Returns the session's audio account after
        the push. Raises UnknownSession, SessionEnded, AudioBacklogFull (pending audio would pass the cap),
        AudioTooLong (longer than the cap by itself)."""
        ...

    def audio_ledger(self, session_id: str) -> AudioLedger:
        """The session's audio accounting (thread-safe; it stays readable after the session ended).
        Raises UnknownSession, SessionEnded."""
        ...

    def set_speakers(self, session_id: str, speaking: Sequence[int]) -> SessionInfo:
        """The characters (indices into the session's faces) that speak from now on; the others are silent.
        Raises UnknownSession, SessionEnded, InvalidRequest (an index beyond the session's characters)."""
        ...

    def clear(self, session_id: str) -> None:
        """Barge-in: drop the audio not yet generated and the video not yet played; the session goes on.
        Raises UnknownSession, SessionEnded."""
        ...

    def close(self, session_id: str) -> SessionInfo:
        """End the session and free its caches; returns its final info. Closing an ended session returns its
        info unchanged. Raises UnknownSession."""
        ...

    def ready(self) -> tuple[bool, str]:
        """``(True, "...")`` when workers are warmed up and a session can start; else ``(False, reason)``."""
        ...

"""Errors and API-key checks shared by the HTTP routes (``server.api``) and the audio WebSocket
(``server.audio_ws``): one error shape, the same status for the same problem on both."""

from __future__ import annotations

import hmac
import math
from collections.abc import Iterable
from typing import Any

from server.backend import (
    AudioBacklogFull,
    AudioTooLong,
    BackendError,
    BackendFailed,
    InvalidRequest,
    NoCapacity,
    SessionEnded,
    UnknownSession,
)
from server.settings import ApiSettings

# WebSocket close codes: 4000 + the HTTP status the same problem gets over HTTP.
WS_UNAUTHORIZED = 4401
WS_UNKNOWN_SESSION = 4404
WS_SESSION_ENDED = 4409
WS_TOO_LARGE = 4413
WS_INVALID = 4422
WS_TOO_MANY = 4429
WS_BACKEND_FAILED = 4503


class ApiError(Exception):
    """An error answer with its status, code and message (and headers, e.g. Retry-After)."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        headers: dict[str, str] | None = None,
        extra: dict[str, float] | None = None,
    ) -> None:
        """extra: more fields of the error body (``ErrorResponse``'s optional ones, e.g. ``pending_s``)."""
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra or {}
        self.retry_after_s = float(self.headers["Retry-After"]) if "Retry-After" in self.headers else None


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds - 1e-9)))


def backend_error(exc: BackendError) -> ApiError:
    if isinstance(exc, UnknownSession):
        return ApiError(404, "unknown_session", str(exc))
    if isinstance(exc, SessionEnded):
        return ApiError(409, "session_ended", str(exc))
    if isinstance(exc, NoCapacity):
        return ApiError(503, "no_capacity", str(exc), {"Retry-After": retry_after(exc.retry_after_s)})
    if isinstance(exc, AudioBacklogFull):
        extra = {"pending_s": round(exc.pending_s, 4), "max_pending_s": exc.max_pending_s}
        return ApiError(
            429, "audio_backlog_full", str(exc), {"Retry-After": retry_after(exc.retry_after_s)}, extra
        )
    if isinstance(exc, AudioTooLong):
        return ApiError(413, "audio_too_long", str(exc), extra={"max_pending_s": exc.max_pending_s})
    if isinstance(exc, BackendFailed):
        return ApiError(503, "backend_failed", exc.reason)
    if isinstance(exc, InvalidRequest):
        return ApiError(422, "invalid_request", str(exc))
    return ApiError(500, "backend_error", str(exc))


def key_matches(settings: ApiSettings, presented: str | None) -> bool:
    if settings.auth_disabled:
        return True
    assert settings.api_key is not None  # ApiSettings guarantees a key unless auth is disabled
    return key_in(presented, [settings.api_key])


def key_in(presented: str | None, keys: Iterable[Any]) -> bool:
    """Whether ``presented`` is one of ``keys`` (``SecretStr``s), each compared in constant time."""
    if presented is None:
        return False
    given = presented.encode(errors="surrogateescape")
    # Every key is compared (no early exit), so the time does not say which one matched.
    matches = [hmac.compare_digest(given, k.get_secret_value().encode()) for k in keys]
    return any(matches)


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None

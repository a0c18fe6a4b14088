"""What every HTTP request passes before the app sees it (``RequestGuard``, a pure-ASGI middleware), and the
log filter that keeps secrets out of uvicorn's access and WebSocket logs (``RedactQueryFilter``).

The guard makes an unauthenticated request cost headers only:

1. **Key first.** A route that needs a key (``needs_key(method, path)`` names the keys it takes) is answered
   401 from its headers alone when the ``Authorization: Bearer`` key is missing or wrong — before one byte
   of its body is read.
2. **Declared size.** A ``Content-Length`` over the route's limit, or any body on a GET, HEAD, DELETE or
   OPTIONS request (none of them takes one), is answered 413 at once.
3. **Streamed size.** The body is counted as it arrives (with or without ``Content-Length``, chunked or
   not); the chunk that crosses the route's limit is never handed to the app, which answers 413 instead.

WebSocket scopes pass through: ``server.audio_ws`` authenticates within ``ws_auth_timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl, quote

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from proto.api import ErrorResponse
from server.api_errors import bearer, key_in

Scope = dict[str, Any]
KeysFor = Callable[[str, str], Iterable[Any] | None]


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body crosses its route's limit. An ``HTTPException`` so that
    FastAPI's body reading re-raises it (it turns other errors into 400) and the app answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than this endpoint's limit of {limit} bytes")
        self.limit = limit


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(code=code, detail=detail).model_dump(exclude_none=True)
    # The body was not read: the connection cannot be reused for another request.
    return JSONResponse(body, status_code=status, headers={**(headers or {}), "Connection": "close"})


BODILESS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


class RequestGuard:
    """Key check before the body, then a size limit enforced while the body streams (module docstring).

    Args:
        app: the ASGI app.
        limit_for: ``(method, path) -> bytes``, the largest body the route takes.
        keys_for: ``(method, path) -> keys`` (``SecretStr``s, or any object with ``get_secret_value``) that
            the route accepts, or None when it needs none (auth disabled, open routes).
        extra_check: ``(presented, method, path) -> bool``, another credential the route takes (the call
            page's signed tickets), tried when no key matched; None for none.
    """

    def __init__(
        self, app: Any, limit_for: Callable[[str, str], int], keys_for: KeysFor, extra_check: Any = None
    ) -> None:
        self.app = app
        self.limit_for = limit_for
        self.keys_for = keys_for
        self.extra_check = extra_check

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        headers = dict(scope["headers"])
        keys = self.keys_for(method, path)
        if keys is not None and scope["method"] != "OPTIONS":  # CORS preflights carry no credentials
            raw = headers.get(b"authorization")
            presented = bearer(raw.decode("latin-1")) if raw is not None else None
            if not key_in(presented, keys) and not (
                self.extra_check is not None and presented and self.extra_check(presented, method, path)
            ):
                what = "is missing" if presented is None else "is wrong"
                error = _error(
                    401,
                    "unauthorized",
                    f"the API key {what}; send Authorization: Bearer <api_key>",
                    {"WWW-Authenticate": "Bearer"},
                )
                await error(scope, receive, send)
                return
        limit = self.limit_for(method, path)
        declared = headers.get(b"content-length")
        if method in BODILESS and (b"transfer-encoding" in headers or (declared or b"0").strip() != b"0"):
            # No route of these methods reads a body; refusing it here also keeps it from a streamed
            # response's disconnect listener (GET /call), which would read it concurrently.
            error = _error(413, "too_large", f"{method} {path} takes no request body")
            await error(scope, receive, send)
            return
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            error = _error(
                413,
                "too_large",
                f"request body of {int(declared)} bytes is larger than this endpoint's limit of "
                f"{limit} bytes",
            )
            await error(scope, receive, send)
            return
        received = 0
        started = False

        async def counted_receive() -> Any:
            nonlocal received
            if received > limit:
                # The response is under way (a streamed response listening for the client's disconnect):
                # read no more; the task waiting here is cancelled when the response is done.
                await asyncio.Event().wait()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if not started:
                        raise BodyTooLarge(limit)
                    return {"type": "http.request", "body": b"", "more_body": True}
            return message

        async def tracked_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge as exc:  # the app let it through (a route that reads the body itself)
            if started:
                raise
            await _error(413, "too_large", str(exc.detail))(scope, receive, send)


# Query parameters whose values may be logged; every other value is replaced (keys, tokens, tickets and
# whatever a client puts in a URL by mistake never reach a log).
LOGGABLE_QUERY = frozenset({"sample_rate", "room", "name", "autojoin", "livekit"})
_PATH_WITH_QUERY = re.compile(r"^/[^\s?]*\?\S*$")


def redact_query(text: str) -> str:
    """``/path?a=1&key=s`` → ``/path?a=1&key=REDACTED``, keeping the values of ``LOGGABLE_QUERY`` only."""
    path, sep, query = text.partition("?")
    if not sep:
        return text
    pairs = parse_qsl(query, keep_blank_values=True)
    if not pairs and query:
        return f"{path}?REDACTED"
    shown = [f"{quote(k)}={quote(v) if k in LOGGABLE_QUERY else 'REDACTED'}" for k, v in pairs]
    return f"{path}?{'&'.join(shown)}"


class RedactQueryFilter(logging.Filter):
    """Rewrites any ``/path?query`` argument of a log record (uvicorn's access line, its WebSocket
    "[accepted]" lines) with ``redact_query``."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(isinstance(a, str) and _PATH_WITH_QUERY.match(a) for a in args):
            record.args = tuple(
                redact_query(a) if isinstance(a, str) and _PATH_WITH_QUERY.match(a) else a for a in args
            )
        return True


REDACTED_LOGGERS = ("uvicorn.access", "uvicorn.error")


def install_log_redaction() -> None:
    """Add ``RedactQueryFilter`` to uvicorn's loggers (once; filters survive uvicorn's logging config)."""
    for name in REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactQueryFilter) for f in logger.filters):
            logger.addFilter(RedactQueryFilter())

"""The browser call page: a FaceTime-style page that joins a LiveKit room with the avatar, and the token it
needs.

Routes (added to the control-plane app by ``server.api.create_app``):

- ``GET /call`` — the page (``web/`` built into ``server/static/call/`` by ``deploy/build_web.sh``). Query
  parameters fill its form: ``room``, ``name``, ``livekit`` (the LiveKit URL, when the server has no
  ``livekit_public_url``), ``autojoin=1`` (join without a click). When the page was not built, 503 with
  the command that builds it.
- ``GET /call/assets/{file}`` — the page's script and style sheet.
- ``POST /v1/call/token`` (JSON ``CallTokenRequest``) → ``CallToken``: a LiveKit token for a *human*
  participant (kind standard; publish camera and microphone, subscribe), signed with the server's
  ``livekit_api_key``/``livekit_api_secret``. Authorization: ``Bearer <call_access_key>`` — a key meant
  to be handed to callers, separate from the API key, which is accepted as well — or ``Bearer <ticket>``
  of a call link for the same room, or nothing when the server runs with ``auth_disabled``. 422 when the
  server has no LiveKit credentials.
- ``POST /v1/call/link`` (JSON ``CallLinkRequest``; the API key or ``call_access_key``) → ``CallLink``: a
  page address ``/call?room=R#ticket=T`` carrying a short-lived signed ticket (``CallTickets``) that gets
  call tokens for that room only, until it expires (``call_link_ttl_s`` at most). The ticket rides in the
  URL *fragment*, which browsers never send to a server: it appears in no request line and no log. Keys
  never go in URLs: ``GET /call?key=...`` is refused (400).

The page itself is static and public; only the token endpoint grants anything.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from livekit import api
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from proto.api import ErrorResponse
from server.api_errors import bearer, key_in
from server.settings import ApiSettings

STATIC_DIR = Path(__file__).resolve().parent / "static" / "call"
BUILD_COMMAND = "deploy/build_web.sh"
CALL_TOKEN_TTL = timedelta(hours=2)
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
_ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".map": "application/json"}


class CallTokenRequest(BaseModel):
    """Who joins which room. ``room`` and ``identity``: 1-128 of ``A-Z a-z 0-9 _ . -``, starting with a letter
    or digit."""

    model_config = ConfigDict(extra="forbid")

    room: str = Field(pattern=_NAME_PATTERN, description="the LiveKit room of the call")
    name: str = Field(default="", max_length=64, description="display name; default: the identity")
    identity: str | None = Field(
        default=None, pattern=_NAME_PATTERN, description="participant identity; default: user-<random>"
    )


class CallToken(BaseModel):
    url: str | None = Field(description="LiveKit URL for browsers (livekit_public_url), null when unset")
    token: str = Field(description="LiveKit access token (JWT), valid for two hours")
    room: str
    identity: str


class CallLinkRequest(BaseModel):
    """Which room a call link opens; ``ttl_s`` defaults to (and is capped by) the server's
    ``call_link_ttl_s``."""

    model_config = ConfigDict(extra="forbid")

    room: str = Field(pattern=_NAME_PATTERN, description="the LiveKit room of the call")
    name: str = Field(default="", max_length=64, description="display name to pre-fill on the page")
    ttl_s: int | None = Field(default=None, ge=1, description="seconds the link works; default the maximum")


class CallLink(BaseModel):
    url: str = Field(description="the call page's address on this server, with the ticket in its fragment")
    ticket: str = Field(description="signed, room-bound bearer credential for POST /v1/call/token")
    room: str
    expires_at: int = Field(description="Unix time (seconds) after which the ticket is refused")


class CallTickets:
    """Short-lived, room-bound credentials for the call page: ``v1.<payload>.<signature>`` with the payload
    ``{"room", "exp"}`` (base64url JSON) signed with HMAC-SHA256.

    The signing key is derived from the server's API key (so replicas sharing a key accept each other's
    tickets, and rotating the key revokes them all); without one (``auth_disabled``) a random per-process key.
    """

    _CONTEXT = b"talkingmachines call ticket v1"
    _MAX_CHARS = 1024

    def __init__(self, settings: ApiSettings) -> None:
        base = settings.api_key.get_secret_value().encode() if settings.api_key else secrets.token_bytes(32)
        self._key = hmac.new(base, self._CONTEXT, hashlib.sha256).digest()
        self.max_ttl_s = settings.call_link_ttl_s

    def _sign(self, payload: bytes) -> str:
        return _b64(hmac.new(self._key, payload, hashlib.sha256).digest())

    def mint(self, room: str, ttl_s: float | None = None, now: float | None = None) -> tuple[str, int]:
        """A ticket for ``room`` and its expiry (Unix seconds); ``ttl_s`` is capped at ``max_ttl_s``."""
        ttl = self.max_ttl_s if ttl_s is None else min(float(ttl_s), self.max_ttl_s)
        expires = int((time.time() if now is None else now) + ttl)
        payload = json.dumps({"room": room, "exp": expires}, separators=(",", ":")).encode()
        return f"v1.{_b64(payload)}.{self._sign(payload)}", expires

    def room_of(self, ticket: str, now: float | None = None) -> str | None:
        """The room a valid, unexpired ticket is for; None for anything else (cheap: one HMAC)."""
        if len(ticket) > self._MAX_CHARS or ticket.count(".") != 2:
            return None
        version, body, signature = ticket.split(".")
        try:
            payload = _unb64(body)
        except ValueError:
            return None
        if version != "v1" or not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            claims = json.loads(payload)
            room, expires = claims["room"], claims["exp"]
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(room, str) or not isinstance(expires, int):
            return None
        return room if (time.time() if now is None else now) < expires else None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError("not base64url") from exc


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(code=code, detail=detail).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status, headers=headers)


def call_keys(settings: ApiSettings) -> list[SecretStr]:
    """The keys that open the call routes: the API key and the ``call_access_key``."""
    return [k for k in (settings.api_key, settings.call_access_key) if k is not None]


def _authorized(settings: ApiSettings, header: str | None) -> bool:
    return settings.auth_disabled or key_in(bearer(header), call_keys(settings))


def mint_user_token(settings: ApiSettings, request: CallTokenRequest) -> CallToken:
    """A token for a human caller in ``request.room``. Raises ValueError without LiveKit credentials."""
    if settings.livekit_api_key is None or settings.livekit_api_secret is None:
        raise ValueError(
            "this server has no LiveKit API key and secret to sign call tokens; set livekit_api_key and "
            "livekit_api_secret (TALKINGMACHINES_LIVEKIT_API_KEY / _SECRET)"
        )
    identity = request.identity or f"user-{secrets.token_hex(4)}"
    grants = api.VideoGrants(
        room_join=True,
        room=request.room,
        can_publish=True,
        can_subscribe=True,
        can_publish_data=True,
        can_publish_sources=["camera", "microphone"],
    )
    key, secret = settings.livekit_api_key.get_secret_value(), settings.livekit_api_secret.get_secret_value()
    token = (
        api.AccessToken(key, secret)
        .with_identity(identity)
        .with_name(request.name.strip() or identity)
        .with_grants(grants)
        .with_ttl(CALL_TOKEN_TTL)
        .to_jwt()
    )
    return CallToken(url=settings.livekit_public_url, token=token, room=request.room, identity=identity)


def _not_built() -> HTMLResponse:
    return HTMLResponse(
        "<!doctype html><meta charset=utf-8><title>Call page not built</title>"
        "<h1>The call page is not built</h1>"
        f"<p>Run <code>{BUILD_COMMAND}</code> in the repository (Node.js 20 and npm), then reload.</p>",
        status_code=503,
    )


_UNAUTHORIZED_DETAIL = (
    "the call access key or ticket is missing or wrong; send Authorization: Bearer <call_access_key>, or "
    "open the page from a call link (POST /v1/call/link)"
)


def add_call_routes(
    app: FastAPI, settings: ApiSettings, static_dir: Path = STATIC_DIR, tickets: CallTickets | None = None
) -> CallTickets:
    """Add the page, its assets and the token and link endpoints to ``app`` (see the module docstring).
    Returns the ``CallTickets`` the routes sign and check tickets with (``tickets``, or a new one)."""
    tickets = tickets or CallTickets(settings)

    def unauthorized() -> JSONResponse:
        return _error(401, "unauthorized", _UNAUTHORIZED_DETAIL, {"WWW-Authenticate": "Bearer"})

    @app.get("/call", response_class=HTMLResponse, tags=["call"], include_in_schema=False)
    async def call_page(request: Request) -> Response:
        if "key" in request.query_params:
            return _error(
                400,
                "key_in_url",
                "keys never go in URLs (they end up in logs and browser history): open the page without "
                "?key= and type the access key into the form, or open a call link from POST /v1/call/link",
            )
        index = static_dir / "index.html"
        if not index.is_file():
            return _not_built()
        return FileResponse(index, media_type="text/html", headers={"Cache-Control": "no-cache"})

    @app.get("/call/assets/{name}", tags=["call"], include_in_schema=False)
    async def call_asset(name: str) -> Response:
        path = static_dir / "assets" / name
        kind = _ASSET_TYPES.get(path.suffix)
        # Only plain names of built files: no sub-paths, no hidden files, known types.
        if kind is None or "/" in name or name.startswith(".") or not path.is_file():
            if not (static_dir / "index.html").is_file():
                return _not_built()
            return _error(404, "not_found", f"no call page asset {name!r}")
        return FileResponse(path, media_type=kind, headers={"Cache-Control": "no-cache"})

    @app.post(
        "/v1/call/token",
        response_model=CallToken,
        responses={status: {"model": ErrorResponse} for status in (401, 403, 422)},
        tags=["call"],
    )
    async def call_token(body: CallTokenRequest, request: Request) -> Response:
        """A LiveKit token for a person joining a call (the call page asks for it)."""
        header = request.headers.get("authorization")
        if not _authorized(settings, header):
            presented = bearer(header)
            room = tickets.room_of(presented) if presented else None
            if room is None:
                return unauthorized()
            if room != body.room:
                return _error(403, "forbidden", f"this call link is for room {room!r}, not {body.room!r}")
        try:
            token = mint_user_token(settings, body)
        except ValueError as exc:
            return _error(422, "invalid_request", str(exc))
        return JSONResponse(token.model_dump())

    @app.post(
        "/v1/call/link",
        response_model=CallLink,
        responses={status: {"model": ErrorResponse} for status in (401, 422)},
        tags=["call"],
    )
    async def call_link(body: CallLinkRequest, request: Request) -> Response:
        """A call page address with a short-lived ticket for one room (hand it to the person who calls)."""
        if not _authorized(settings, request.headers.get("authorization")):
            return unauthorized()
        ticket, expires = tickets.mint(body.room, body.ttl_s)
        query = urlencode({"room": body.room, **({"name": body.name} if body.name else {})})
        url = f"/call?{query}#ticket={ticket}"
        link = CallLink(url=url, ticket=ticket, room=body.room, expires_at=expires)
        return JSONResponse(link.model_dump())

    return tickets

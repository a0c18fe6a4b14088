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
  to be handed to callers, separate from the API key, which is accepted as well — or nothing when the
  server runs with ``auth_disabled``. 422 when the server has no LiveKit credentials.

The page itself is static and public; only the token endpoint grants anything.
"""

from __future__ import annotations

import hmac
import secrets
from datetime import timedelta
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from livekit import api
from pydantic import BaseModel, ConfigDict, Field

from proto.api import ErrorResponse
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


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(code=code, detail=detail).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status, headers=headers)


def _authorized(settings: ApiSettings, header: str | None) -> bool:
    if settings.auth_disabled:
        return True
    scheme, _, presented = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return False
    keys = [k for k in (settings.api_key, settings.call_access_key) if k is not None]
    given = presented.strip().encode()
    return any(hmac.compare_digest(given, k.get_secret_value().encode()) for k in keys)


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


def add_call_routes(app: FastAPI, settings: ApiSettings, static_dir: Path = STATIC_DIR) -> None:
    """Add the page, its assets and the token endpoint to ``app`` (see the module docstring)."""

    @app.get("/call", response_class=HTMLResponse, tags=["call"], include_in_schema=False)
    async def call_page() -> Response:
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
        responses={status: {"model": ErrorResponse} for status in (401, 422)},
        tags=["call"],
    )
    async def call_token(body: CallTokenRequest, request: Request) -> Response:
        """A LiveKit token for a person joining a call (the call page asks for it)."""
        if not _authorized(settings, request.headers.get("authorization")):
            return _error(
                401,
                "unauthorized",
                "the call access key is missing or wrong; send Authorization: Bearer <call_access_key>",
                {"WWW-Authenticate": "Bearer"},
            )
        try:
            token = mint_user_token(settings, body)
        except ValueError as exc:
            return _error(422, "invalid_request", str(exc))
        return JSONResponse(token.model_dump())

"""The HTTP control plane: a FastAPI app over a ``SessionBackend``.

Endpoints (OpenAPI at ``/openapi.json``, docs at ``/docs``):

- ``POST /v1/sessions`` (JSON ``SessionCreate``, image base64) → 201 ``SessionInfo``.
- ``GET /v1/sessions``, ``GET /v1/sessions/{id}`` → ``SessionList`` / ``SessionInfo``.
- ``POST /v1/sessions/{id}/audio`` → ``AudioAccepted``. The body is either an audio file (WAV, FLAC or OGG,
  any channel count; sniffed from the bytes, any ``Content-Type`` but ``audio/pcm``) or raw little-endian
  int16 PCM declared as ``Content-Type: audio/pcm; rate=16000; channels=1`` (``rate`` required, ``channels``
  1 or 2, default 1). The rate must be one of ``allowed_audio_rates``; audio is resampled to 16 kHz mono.
- ``WS /v1/sessions/{id}/audio``: streaming speech, see ``audio_websocket``.
- ``POST /v1/sessions/{id}/speakers`` (``SpeakersUpdate``) → ``SessionInfo``.
- ``POST /v1/sessions/{id}/clear`` → 204 (barge-in). ``DELETE /v1/sessions/{id}`` → final ``SessionInfo``.
- ``GET /call`` (the browser call page) and ``POST /v1/call/token``: see ``server.call_page``.
- ``GET /healthz`` (the process answers), ``GET /readyz`` (503 with the reason when not ready),
  ``GET /metrics``.

Every ``/v1`` route needs ``Authorization: Bearer <api_key>`` unless the settings disable authentication;
health, readiness, metrics (unless ``metrics_require_key``) and the OpenAPI document are open (put them
behind the network policy). ``server.http_guard.RequestGuard`` checks the key from the headers before any
of the body is read, and caps each route's body while it streams.
Errors are ``ErrorResponse`` bodies: 401 no/wrong key, 404 unknown session, 409 session ended or output file
in use by a live session, 413 body or audio over the limits (or one push longer than the session's cap on
pending audio), 422 malformed image/audio/request, unusable output path or unsupported sample rate, 429 the
session's pending audio (accepted, not yet played) would pass its cap (``Retry-After``: whole seconds until
enough has played; nothing of the push was taken), 503 no room (with ``Retry-After``) or backend failed, 507
no space left for the output file.
"""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import soundfile as sf
from fastapi import Depends, FastAPI, Request, Response, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY

from frontends.audio_io import TARGET_SAMPLE_RATE, AudioDecodeError, load_audio, resample
from frontends.faces import resolve_faces
from frontends.image_io import ImageDecodeError, load_image
from proto.api import (
    LIVE_STATES,
    AudioAccepted,
    ErrorResponse,
    FileOutput,
    LiveKitOutput,
    Readiness,
    SessionCreate,
    SessionInfo,
    SessionList,
    SpeakersUpdate,
)
from server.api_errors import ApiError, backend_error, key_matches
from server.audio_ws import serve_audio_websocket
from server.backend import (
    BackendError,
    SessionBackend,
    SessionEnded,
)
from server.call_page import CallTickets, add_call_routes, call_keys
from server.http_guard import RequestGuard, install_log_redaction
from server.livekit.token import mint_avatar_token
from server.metrics import Metrics
from server.pcm_stream import PcmFormatError, decode_pcm16
from server.settings import ApiSettings

log = logging.getLogger(__name__)

DEFAULT_BODY_LIMIT = 64 * 1024  # bytes, for the small JSON bodies (speakers, clear)
PCM_MEDIA_TYPE = "audio/pcm"

# Module level: endpoint annotations are strings (postponed evaluation) resolved in this module's globals.
_BEARER = HTTPBearer(auto_error=False, description="the server's API key")
_Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (401, 404, 409, 413, 422, 503)
}
_AUDIO_RESPONSES: dict[int | str, dict[str, Any]] = {
    **_ERROR_RESPONSES,
    429: {"model": ErrorResponse, "description": "the session's pending audio is at its cap (Retry-After)"},
}
_STATUS_CODES = {
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "session_ended",
    413: "too_large",
    422: "invalid_input",
    429: "too_many_requests",
    503: "unavailable",
    507: "insufficient_storage",
}


def _error_response(error: ApiError) -> JSONResponse:
    body = ErrorResponse(
        code=error.code,
        detail=error.detail,
        retry_after_s=error.retry_after_s,
        **error.extra,  # type: ignore[arg-type]
    )
    return JSONResponse(body.model_dump(exclude_none=True), status_code=error.status, headers=error.headers)


def _parse_media_type(header: str) -> tuple[str, dict[str, str]]:
    kind, *params = (part.strip() for part in header.split(";"))
    parsed = {}
    for param in params:
        key, _, value = param.partition("=")
        parsed[key.strip().lower()] = value.strip().strip('"')
    return kind.lower(), parsed


class _Ingest:
    """Validation and decoding of audio and session inputs against the settings (no I/O of its own)."""

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings

    def check_rate(self, rate: int) -> None:
        if rate not in self.settings.allowed_audio_rates:
            allowed = ", ".join(str(r) for r in self.settings.allowed_audio_rates)
            raise ApiError(
                422,
                "unsupported_sample_rate",
                f"sample rate {rate} Hz is not supported; use one of {allowed} Hz",
            )

    def check_duration(self, seconds: float) -> None:
        limit = self.settings.max_audio_seconds
        if seconds > limit:
            raise ApiError(
                413,
                "audio_too_long",
                f"audio lasts {seconds:.2f} s, more than the limit of {limit:g} s per "
                "request — send it in shorter pieces",
            )

    def decode_http_audio(self, body: bytes, content_type: str) -> np.ndarray:
        """A request body → ``[N]`` float32 at 16 kHz."""
        if not body:
            raise ApiError(
                422, "invalid_audio", "the request body is empty; send a WAV file or audio/pcm samples"
            )
        kind, params = _parse_media_type(content_type or "application/octet-stream")
        if kind == PCM_MEDIA_TYPE:
            return self._decode_pcm(body, params)
        try:
            info = sf.info(io.BytesIO(body))
        except (sf.LibsndfileError, RuntimeError, TypeError):
            info = None  # load_audio below gives the decoding error its full message
        if info is not None:
            self.check_rate(int(info.samplerate))
            self.check_duration(info.frames / info.samplerate)
        try:
            return load_audio(body, max_seconds=self.settings.max_audio_seconds)
        except AudioDecodeError as exc:
            raise ApiError(422, "invalid_audio", str(exc)) from exc

    def _decode_pcm(self, body: bytes, params: dict[str, str]) -> np.ndarray:
        try:
            rate = int(params["rate"])
            channels = int(params.get("channels", "1"))
        except (KeyError, ValueError) as exc:
            raise ApiError(
                422,
                "invalid_audio",
                "audio/pcm needs integer parameters: Content-Type: audio/pcm; rate=16000; channels=1",
            ) from exc
        if channels not in (1, 2):
            raise ApiError(
                422, "invalid_audio", f"audio/pcm with {channels} channels; send 1 (mono) or 2 (stereo)"
            )
        self.check_rate(rate)
        self.check_duration(len(body) / (2 * channels * rate))
        try:
            samples = decode_pcm16(body, channels)
        except PcmFormatError as exc:
            raise ApiError(422, "invalid_audio", str(exc)) from exc
        return resample(samples, rate, TARGET_SAMPLE_RATE)

    def resolve_output(self, spec: SessionCreate) -> SessionCreate:
        """The request with its output made concrete: a LiveKit token minted when absent, a file path made
        absolute inside ``file_output_dir``."""
        output = spec.output
        if isinstance(output, LiveKitOutput):
            if output.token is not None:
                return spec
            if self.settings.livekit_api_key is None or self.settings.livekit_api_secret is None:
                raise ApiError(
                    422,
                    "invalid_request",
                    "output.token is missing and this server has no LiveKit API key and "
                    "secret to mint one — send a token minted for output.identity (kind agent, "
                    "lk.publish_on_behalf = output.agent_identity) or configure livekit_api_key and "
                    "livekit_api_secret",
                )
            try:
                token = mint_avatar_token(
                    api_key=self.settings.livekit_api_key.get_secret_value(),
                    api_secret=self.settings.livekit_api_secret.get_secret_value(),
                    room=output.room,
                    identity=output.identity,
                    name=output.name,
                    agent_identity=output.agent_identity,
                )
            except ValueError as exc:
                raise ApiError(422, "invalid_request", f"no avatar token can be minted: {exc}") from exc
            return spec.model_copy(update={"output": output.model_copy(update={"token": SecretStr(token)})})
        assert isinstance(output, FileOutput)
        root = self.settings.file_output_dir
        if root is None:
            raise ApiError(
                422,
                "invalid_request",
                "file outputs are disabled on this server; set file_output_dir in its "
                "settings, or use a livekit output",
            )
        target = _writable_target(root, output.path)
        return spec.model_copy(update={"output": output.model_copy(update={"path": str(target)})})


def _invalid_output(path: str, problem: str) -> ApiError:
    return ApiError(422, "invalid_output", f"output.path {path!r} {problem}")


def _writable_target(root: Path, path: str) -> Path:
    """``path`` (relative, from the request) as an absolute path inside ``root`` that this server can write
    an MP4 to now: its folder exists and is writable, it is not a folder itself, no name is too long.

    Raises:
        ApiError: 422 naming the problem.
    """
    if "\0" in path:
        raise _invalid_output(path, "contains a NUL byte")
    try:
        root = root.resolve()
        target = (root / path).resolve()
    except (OSError, ValueError, RuntimeError) as exc:
        raise _invalid_output(path, f"cannot be used as a file name ({exc})") from exc
    if not target.is_relative_to(root) or target == root or Path(path).is_absolute():
        raise _invalid_output(
            path, "must be a relative path inside the output directory (no '..', not absolute)"
        )
    if target.suffix.lower() != ".mp4":
        raise _invalid_output(path, "must end in .mp4")
    parent = target.parent
    try:
        name_max = os.pathconf(root, "PC_NAME_MAX")
        path_max = os.pathconf(root, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    too_long = [part for part in target.relative_to(root).parts if len(part.encode()) > name_max]
    if too_long:
        raise _invalid_output(path, f"has a name longer than {name_max} bytes ({too_long[0][:40]!r}...)")
    if len(str(target).encode()) >= path_max:
        raise _invalid_output(path, f"is longer than the {path_max}-byte limit of a path on this server")
    if not parent.is_dir():
        where = parent.relative_to(root)
        raise _invalid_output(
            path, f"is in folder {str(where)!r}, which does not exist in the output directory"
        )
    if target.exists() and not target.is_file():
        raise _invalid_output(path, "names a folder or another non-file; give a file name ending in .mp4")
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise _invalid_output(
            path, "is not writable by the server (check the output directory's permissions)"
        )
    return target


def create_app(backend: SessionBackend, settings: ApiSettings, metrics: Metrics | None = None) -> FastAPI:
    """The control-plane app over ``backend``.

    Args:
        backend: runs the sessions (the master, or a test double).
        settings: limits, authentication, CORS.
        metrics: the recorder whose registry ``/metrics`` serves; share it with the runtime so its chunk
            timings appear. A fresh one is made when absent.
    """
    metrics = metrics or Metrics(session_labels=settings.metrics_session_labels)
    ingest = _Ingest(settings)
    create_lock = asyncio.Lock()
    # File outputs of the sessions created here (absolute path -> session id): two live sessions never write
    # one file.
    file_outputs: dict[str, str] = {}
    install_log_redaction()

    async def authorize(credentials: _Credentials) -> None:
        if not key_matches(settings, credentials.credentials if credentials else None):
            what = "is missing" if credentials is None else "is wrong"
            raise ApiError(
                401,
                "unauthorized",
                f"the API key {what}; send Authorization: Bearer <api_key>",
                {"WWW-Authenticate": "Bearer"},
            )

    async def call(fn: Any, *args: Any) -> Any:
        try:
            return await run_in_threadpool(fn, *args)
        except BackendError as exc:
            raise backend_error(exc) from exc

    app = FastAPI(
        title="talkingmachines",
        version="v1",
        summary="Real-time audio-driven avatar video sessions, published to LiveKit rooms or files.",
    )
    app.state.backend = backend
    app.state.settings = settings
    app.state.metrics = metrics

    def body_limit(method: str, path: str) -> int:
        if method == "POST" and path.rstrip("/") == "/v1/sessions":
            return settings.max_session_body_bytes
        if method == "POST" and path.startswith("/v1/sessions/") and path.endswith("/audio"):
            return settings.max_audio_bytes
        return DEFAULT_BODY_LIMIT

    tickets = CallTickets(settings)

    def keys_for(method: str, path: str) -> list[Any] | None:
        """The keys a route takes (checked by the guard before its body is read); None: open."""
        if settings.auth_disabled:
            return None
        assert settings.api_key is not None
        if path.startswith("/v1/call/"):
            return call_keys(settings)
        if path.startswith("/v1/") or path == "/v1" or (path == "/metrics" and settings.metrics_require_key):
            return [settings.api_key]
        return None

    def ticket_ok(presented: str, method: str, path: str) -> bool:
        return method == "POST" and path == "/v1/call/token" and tickets.room_of(presented) is not None

    app.add_middleware(RequestGuard, limit_for=body_limit, keys_for=keys_for, extra_check=ticket_ok)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if exc.status_code == 413 and MAX_BODY_SIZE_SCOPE_KEY in request.scope:
            limit = request.scope[MAX_BODY_SIZE_SCOPE_KEY]
            detail = f"request body is larger than this endpoint's limit of {limit} bytes"
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        return _error_response(ApiError(exc.status_code, code, detail, dict(exc.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return _error_response(ApiError(422, "invalid_request", problems))

    v1 = [Depends(authorize)]

    @app.post(
        "/v1/sessions",
        status_code=201,
        response_model=SessionInfo,
        responses=_ERROR_RESPONSES,
        dependencies=v1,
        max_body_size=settings.max_session_body_bytes,
        tags=["sessions"],
    )
    async def create_session(spec: SessionCreate) -> SessionInfo:
        """Start a session: decode the image, settle its faces, resolve the output, hand it to the backend."""
        data = spec.image_bytes()
        if len(data) > settings.max_image_bytes:
            raise ApiError(
                413,
                "image_too_large",
                f"the image is {len(data)} bytes, more than the limit of "
                f"{settings.max_image_bytes} bytes — send a smaller PNG/JPEG",
            )
        try:
            image = await run_in_threadpool(load_image, data, max_pixels=settings.max_image_pixels)
        except ImageDecodeError as exc:
            raise ApiError(422, "invalid_image", str(exc)) from exc
        try:
            faces = await run_in_threadpool(resolve_faces, image, spec.characters)
        except ValueError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from exc
        beyond = [i for i in spec.speaking if i >= len(faces)]
        if beyond:
            raise ApiError(
                422,
                "invalid_request",
                f"speaking indices {beyond} name characters that do not exist; the "
                f"session has {len(faces)} character(s), indices 0..{len(faces) - 1}",
            )
        resolved = ingest.resolve_output(spec)
        out_path = resolved.output.path if isinstance(resolved.output, FileOutput) else None
        # The check and the start are one step, so two concurrent requests cannot both take the last slot.
        async with create_lock:
            sessions = await call(backend.list_sessions)
            live_ids = {s.id for s in sessions if s.state in LIVE_STATES}
            for path, owner in list(file_outputs.items()):
                if owner not in live_ids:
                    del file_outputs[path]
            if out_path is not None and out_path in file_outputs:
                raise ApiError(
                    409,
                    "output_in_use",
                    f"output.path {spec.output.path!r} is being written by live session "  # type: ignore[union-attr]
                    f"{file_outputs[out_path]}; use another path or end that session first",
                )
            live = len(live_ids)
            if live >= settings.max_sessions:
                raise ApiError(
                    503,
                    "no_capacity",
                    f"{live} of {settings.max_sessions} sessions are live; retry later or end "
                    "one with DELETE /v1/sessions/{id}",
                    {"Retry-After": str(settings.retry_after_s)},
                )
            try:
                info: SessionInfo = await call(backend.create_session, resolved, image, faces)
            except OSError as exc:
                if out_path is None:
                    raise
                # Checked above; a folder removed or a disk filled since then still gets a 4xx.
                status = 507 if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 422
                raise ApiError(status, "invalid_output", f"output.path cannot be written: {exc}") from exc
            if out_path is not None:
                file_outputs[out_path] = info.id
        log.info("session %s created (%s output, %d face(s))", info.id, resolved.output.type, len(faces))
        return info

    @app.get(
        "/v1/sessions",
        response_model=SessionList,
        responses=_ERROR_RESPONSES,
        dependencies=v1,
        tags=["sessions"],
    )
    async def list_sessions() -> SessionList:
        return SessionList(sessions=await call(backend.list_sessions))

    @app.get(
        "/v1/sessions/{session_id}",
        response_model=SessionInfo,
        responses=_ERROR_RESPONSES,
        dependencies=v1,
        tags=["sessions"],
    )
    async def get_session(session_id: str) -> SessionInfo:
        return await call(backend.get, session_id)

    @app.post(
        "/v1/sessions/{session_id}/audio",
        response_model=AudioAccepted,
        responses=_AUDIO_RESPONSES,
        dependencies=v1,
        max_body_size=settings.max_audio_bytes,
        tags=["audio"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "audio/wav": {"schema": {"type": "string", "format": "binary"}},
                    "audio/pcm; rate=16000; channels=1": {"schema": {"type": "string", "format": "binary"}},
                },
            }
        },
    )
    async def push_audio(session_id: str, request: Request) -> AudioAccepted:
        """Append speech: an audio file, or raw int16 PCM with its rate in the Content-Type. All of it is
        taken or none: past the session's cap on pending audio the answer is 429 with Retry-After."""
        info: SessionInfo = await call(backend.get, session_id)
        if info.state not in LIVE_STATES:
            raise backend_error(SessionEnded(session_id, info.reason))
        body = await request.body()
        pcm = await run_in_threadpool(ingest.decode_http_audio, body, request.headers.get("content-type", ""))
        try:
            account = await call(backend.push_audio, session_id, pcm)
        except ApiError as exc:
            if exc.status == 429:
                metrics.observe_audio_refused("http")
            raise
        seconds = pcm.size / TARGET_SAMPLE_RATE
        metrics.observe_audio("http", seconds)
        return AudioAccepted(
            samples=int(pcm.size),
            seconds=seconds,
            pending_s=account.pending_s,
            max_pending_s=account.max_pending_s,
        )

    @app.websocket("/v1/sessions/{session_id}/audio")
    async def audio_websocket(
        websocket: WebSocket, session_id: str, sample_rate: int | None = None, flow_control: str | None = None
    ) -> None:
        """Streaming speech over a WebSocket (``server.audio_ws``), ``flow_control`` wait or credit."""
        await serve_audio_websocket(
            websocket, session_id, sample_rate, backend=backend, settings=settings, metrics=metrics,
            check_rate=ingest.check_rate, call=call, flow_control=flow_control,
        )  # fmt: skip

    @app.post(
        "/v1/sessions/{session_id}/speakers",
        response_model=SessionInfo,
        responses=_ERROR_RESPONSES,
        dependencies=v1,
        max_body_size=DEFAULT_BODY_LIMIT,
        tags=["sessions"],
    )
    async def set_speakers(session_id: str, update: SpeakersUpdate) -> SessionInfo:
        """Which characters speak from now on; the others listen (silence embedding)."""
        return await call(backend.set_speakers, session_id, update.speaking)

    @app.post(
        "/v1/sessions/{session_id}/clear",
        status_code=204,
        responses=_ERROR_RESPONSES,
        dependencies=v1,
        max_body_size=DEFAULT_BODY_LIMIT,
        tags=["sessions"],
    )
    async def clear(session_id: str) -> Response:
        """Barge-in: drop queued audio and unplayed video; the session goes on."""
        await call(backend.clear, session_id)
        return Response(status_code=204)

    @app.delete(
        "/v1/sessions/{session_id}",
        response_model=SessionInfo,
        responses=_ERROR_RESPONSES,
        dependencies=v1,
        tags=["sessions"],
    )
    async def close_session(session_id: str) -> SessionInfo:
        """End the call and free its caches."""
        info: SessionInfo = await call(backend.close, session_id)
        log.info("session %s closed", session_id)
        return info

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is up and answering."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}}, tags=["health"])
    async def readyz() -> JSONResponse:
        """Ready when the backend has warmed up and there is room for another session."""
        try:
            ok, reason = await run_in_threadpool(backend.ready)
            if ok:
                sessions = await run_in_threadpool(backend.list_sessions)
                live = sum(1 for s in sessions if s.state in LIVE_STATES)
                if live >= settings.max_sessions:
                    ok, reason = False, f"at capacity: {live} of {settings.max_sessions} sessions are live"
        except Exception as exc:  # readiness must answer even when the backend is broken
            log.exception("readiness check failed")
            ok, reason = False, f"readiness check failed: {exc}"
        return JSONResponse(Readiness(ready=ok, reason=reason).model_dump(), status_code=200 if ok else 503)

    @app.get(
        "/metrics",
        tags=["health"],
        response_class=Response,
        dependencies=v1 if settings.metrics_require_key else [],
    )
    async def metrics_text() -> Response:
        """Prometheus exposition of the tm_ series."""
        body, content_type = metrics.render()
        return Response(content=body, media_type=content_type)

    # The browser call page and its token endpoint (GET /call, POST /v1/call/token): server.call_page.
    add_call_routes(app, settings, tickets=tickets)
    return app

"""``WS /v1/sessions/{id}/audio``: streaming speech over a WebSocket (registered by ``create_app``).

``call`` runs a backend method off the event loop and turns backend errors into ``ApiError``s (the app's);
``check_rate`` refuses sample rates the ingest does not take.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import WebSocket

from frontends.audio_io import TARGET_SAMPLE_RATE
from proto.api import LIVE_STATES, SessionInfo
from server.api_errors import (
    WS_INVALID,
    WS_TOO_LARGE,
    WS_UNAUTHORIZED,
    ApiError,
    backend_error,
    bearer,
    key_matches,
)
from server.backend import SessionBackend, SessionEnded
from server.metrics import Metrics
from server.pcm_stream import PcmFormatError, StreamResampler, decode_pcm16
from server.settings import ApiSettings

log = logging.getLogger("server.api")

_MAX_HELLO_CHARS = 4096  # the first message is a small JSON object, never audio


async def serve_audio_websocket(
    websocket: WebSocket,
    session_id: str,
    sample_rate: int | None,
    *,
    backend: SessionBackend,
    settings: ApiSettings,
    metrics: Metrics,
    check_rate: Callable[[int], None],
    call: Callable[..., Awaitable[Any]],
) -> None:
    """Streaming speech over a WebSocket.

    Protocol: connect with ``Authorization: Bearer <key>`` and ``?sample_rate=R``, or send as the first
    (text) message ``{"sample_rate": R, "api_key": "<key>"}`` (either field as needed; browsers cannot set
    headers) within ``ws_auth_timeout_s`` of connecting, or the connection is closed (4401 without a key).
    The server answers ``{"type": "ready", "sample_rate": R}``. Then send binary frames of little-endian
    int16 mono PCM at R Hz, whole samples per frame; each frame is resampled (continuously
    across frames) and pushed as it arrives. ``{"type": "flush"}`` ends a segment: the resampler's tail
    is pushed and ``{"type": "flushed", "samples": total}`` answers (16 kHz samples pushed so far).
    On any error the server sends ``{"type": "error", "code", "detail"}`` and closes with 4000 + the HTTP
    status (4401, 4404, 4409, 4413, 4422, 4503). When the client disconnects, everything it sent is
    pushed, and the session goes on.
    """
    await websocket.accept()
    pushed = 0

    async def fail(close_code: int, error: ApiError) -> None:
        await websocket.send_json({"type": "error", "code": error.code, "detail": error.detail})
        reason = error.detail.encode()[:123].decode(
            errors="ignore"
        )  # a close reason is at most 123 bytes
        await websocket.close(code=close_code, reason=reason)

    async def push(samples: np.ndarray) -> None:
        nonlocal pushed
        if samples.size:
            await call(backend.push_audio, session_id, samples)
            pushed += samples.size
            metrics.observe_audio("websocket", samples.size / TARGET_SAMPLE_RATE)

    presented = bearer(websocket.headers.get("authorization"))
    authorized = key_matches(settings, presented)
    if presented is not None and not authorized:
        await fail(WS_UNAUTHORIZED, ApiError(401, "unauthorized", "the API key is wrong"))
        return
    if not authorized or sample_rate is None:
        # The first message is the handshake: a connection that sends none is closed, not left idle.
        try:
            message = await asyncio.wait_for(websocket.receive(), settings.ws_auth_timeout_s)
        except TimeoutError:
            await fail(
                WS_UNAUTHORIZED if not authorized else WS_INVALID,
                ApiError(
                    401 if not authorized else 422,
                    "unauthorized" if not authorized else "invalid_request",
                    f"no first message within {settings.ws_auth_timeout_s:g} s; send "
                    '{"sample_rate": 16000, "api_key": "..."} right after connecting',
                ),
            )
            return
        if message["type"] == "websocket.disconnect":
            return
        if len(message.get("text") or message.get("bytes") or b"") > _MAX_HELLO_CHARS:
            message = {"text": ""}  # refused below as not the expected JSON
        try:
            hello = json.loads(message.get("text") or "")
            if not isinstance(hello, dict):
                raise ValueError("not an object")
        except ValueError:
            await fail(
                WS_INVALID,
                ApiError(
                    422,
                    "invalid_request",
                    'the first message must be JSON text: {"sample_rate": 16000, "api_key": "..."}',
                ),
            )
            return
        if not authorized and not key_matches(settings, hello.get("api_key")):
            await fail(
                WS_UNAUTHORIZED,
                ApiError(
                    401,
                    "unauthorized",
                    "the API key is missing or wrong; send it in the Authorization header or the first "
                    "message's api_key",
                ),
            )
            return
        sample_rate = sample_rate if sample_rate is not None else hello.get("sample_rate")
    if not isinstance(sample_rate, int) or isinstance(sample_rate, bool):
        await fail(
            WS_INVALID,
            ApiError(
                422,
                "unsupported_sample_rate",
                "declare an integer sample_rate (query parameter or first message)",
            ),
        )
        return
    try:
        check_rate(sample_rate)
        info: SessionInfo = await call(backend.get, session_id)
        if info.state not in LIVE_STATES:
            raise backend_error(SessionEnded(session_id, info.reason))
    except ApiError as exc:
        await fail(4000 + exc.status, exc)
        return
    await websocket.send_json({"type": "ready", "sample_rate": sample_rate})
    max_frame_bytes = int(settings.max_audio_seconds * sample_rate) * 2
    resampler = StreamResampler(sample_rate)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            data = message.get("bytes")
            if data is not None:
                if len(data) > max_frame_bytes:
                    await fail(
                        WS_TOO_LARGE,
                        ApiError(
                            413,
                            "too_large",
                            f"a frame of {len(data)} bytes is over the limit of {max_frame_bytes} bytes "
                            f"({settings.max_audio_seconds:g} s)",
                        ),
                    )
                    break
                samples = decode_pcm16(data)
                await push(resampler.push(samples))
                continue
            try:
                command = json.loads(message.get("text") or "")
            except ValueError:
                command = None
            if not isinstance(command, dict) or command.get("type") != "flush":
                await fail(
                    WS_INVALID,
                    ApiError(
                        422,
                        "invalid_request",
                        'text messages after the first must be {"type": "flush"}; audio goes in binary '
                        "frames",
                    ),
                )
                break
            await push(resampler.flush())
            resampler = StreamResampler(sample_rate)
            await websocket.send_json({"type": "flushed", "samples": pushed})
    except PcmFormatError as exc:
        await fail(WS_INVALID, ApiError(422, "invalid_audio", str(exc)))
    except ApiError as exc:
        await fail(4000 + exc.status, exc)
    finally:
        # Whatever the client sent before leaving is accepted: push the resampler's held-back tail.
        try:
            await push(resampler.flush())
        except ApiError as exc:
            log.info(
                "session %s: audio tail after the WebSocket closed not pushed: %s", session_id, exc.detail
            )

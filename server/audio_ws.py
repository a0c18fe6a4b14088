"""``WS /v1/sessions/{id}/audio``: streaming speech over a WebSocket (registered by ``create_app``), with
flow control against the session's cap on pending audio (``server.audio_ledger``).

``call`` runs a backend method off the event loop and turns backend errors into ``ApiError``s (the app's);
``check_rate`` refuses sample rates the ingest does not take.

Protocol (the README's "Streaming audio over a WebSocket" has an example client):

1. Connect with ``Authorization: Bearer <key>`` and ``?sample_rate=R``, or send as the first (text) message
   ``{"sample_rate": R, "api_key": "<key>"}`` (browsers cannot set headers) within ``ws_auth_timeout_s``, or
   the connection is closed (4401 without a key). ``flow_control`` (query parameter or first-message field)
   picks how a sender that is too fast is slowed: ``wait`` (the default) or ``credit``.
2. The server answers ``{"type": "ready", "sample_rate": R}`` (with ``credit``: also ``flow_control``,
   ``max_pending_s`` and the first ``ack`` fields). Then the client sends binary frames of little-endian
   int16 mono PCM at R Hz, whole samples per frame, at most ``max_audio_seconds`` and at most the session's
   ``max_pending_s`` each (else 4413). Frames are gathered into pushes of at least ``_COALESCE_S`` (so a
   stream of tiny frames costs one push per 20 ms, not one per frame; a remainder is pushed within
   ``_TICK_S`` once frames stop), resampled continuously across frames, and pushed to the session.
3. Flow control. *Pending* audio is the session's accepted audio not yet played; it never passes
   ``max_pending_s`` (``serve --max-pending-audio-s``):

   - ``wait``: a frame that would pass the cap is held and the server stops reading the socket until enough
     has played (TCP backpressure: the client's sends block). Nothing is refused; the messages are those of
     the protocol before flow control, so clients written for it work unchanged. Keep frames short (≤ 1 s):
     a held frame waits for as long as it lasts.
   - ``credit``: the server grants credit and the client keeps within it. ``ack`` messages,
     ``{"type": "ack", "accepted_samples", "accepted_s", "played_s", "dropped_s", "pending_s", "credit_s",
     "max_pending_s"}``, come at most every ``_TICK_S`` while something changed; ``accepted_*``,
     ``played_s`` and ``dropped_s`` count this connection's own audio (16 kHz), ``pending_s`` is the
     session's. The client may send audio as long as the seconds it has sent stay within ``accepted_s +
     credit_s`` of the latest ack. A frame past that is refused whole, ``{"type": "refused", "code":
     "credit_exceeded", "detail", "refused_s", "credit_s", "retry_after_s"}``, and the connection goes on.
4. ``{"type": "flush"}`` ends a segment: the resampler's tail is pushed and ``{"type": "flushed",
   "samples": total}`` answers (16 kHz samples this connection pushed so far; with ``credit`` also the ack
   fields).
5. ``{"type": "end"}``: no more audio from this client. The server pushes what it holds, waits until all
   of this connection's accepted audio has played or was dropped, answers ``{"type":
   "playback_finished", "accepted_s", "played_s", "dropped_s", "interrupted"}`` (``interrupted``: some of
   it was dropped) and closes with 1000.
6. When the session ends (DELETE, a failure, the server stopping) while connected, the server sends the
   same ``playback_finished`` (what was pending then is dropped, and ``reason`` says why) and closes with
   4409. When the client just disconnects, everything it sent is pushed and the session goes on.

On any error the server sends ``{"type": "error", "code", "detail"}`` and closes with 4000 + the HTTP
status (4401, 4404, 4409, 4413, 4422, 4503).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import WebSocket

from frontends.audio_io import TARGET_SAMPLE_RATE
from proto.api import LIVE_STATES, SessionInfo
from server.api_errors import (
    WS_INVALID,
    WS_SESSION_ENDED,
    WS_TOO_LARGE,
    WS_UNAUTHORIZED,
    ApiError,
    backend_error,
    bearer,
    key_matches,
)
from server.audio_ledger import AudioAccount, AudioLedger
from server.backend import SessionBackend, SessionEnded
from server.metrics import Metrics
from server.pcm_stream import PcmFormatError, StreamResampler, decode_pcm16
from server.settings import ApiSettings

log = logging.getLogger("server.api")

_MAX_HELLO_CHARS = 4096  # the first message is a small JSON object, never audio
FLOW_CONTROLS = ("wait", "credit")
_COALESCE_S = 0.02  # frames are gathered into pushes of at least this much audio
_TICK_S = 0.1  # the connection's reporter: acks, the pushing of a held remainder, the session's end
_WAIT_SLICE_S = 0.05  # how often a held frame looks for room
_TAIL_WAIT_S = 5.0  # after a disconnect, how long the last pieces may wait for room


def _close_reason(text: str) -> str:
    return text.encode()[:123].decode(errors="ignore")  # a close reason is at most 123 bytes


class _SessionOver(Exception):
    """The session ended while this connection was open."""


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
    flow_control: str | None = None,
) -> None:
    """Streaming speech over a WebSocket (the protocol is the module docstring's)."""
    await websocket.accept()

    async def fail(close_code: int, error: ApiError) -> None:
        await websocket.send_json({"type": "error", "code": error.code, "detail": error.detail})
        reason = error.detail.encode()[:123].decode(errors="ignore")  # a close reason is at most 123 bytes
        await websocket.close(code=close_code, reason=reason)

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
        flow_control = flow_control if flow_control is not None else hello.get("flow_control")
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
    mode = "wait" if flow_control is None else flow_control
    if mode not in FLOW_CONTROLS:
        await fail(
            WS_INVALID,
            ApiError(
                422,
                "invalid_request",
                f"flow_control {flow_control!r} is not one of {', '.join(FLOW_CONTROLS)} (default wait)",
            ),
        )
        return
    try:
        check_rate(sample_rate)
        info: SessionInfo = await call(backend.get, session_id)
        if info.state not in LIVE_STATES:
            raise backend_error(SessionEnded(session_id, info.reason))
        ledger: AudioLedger = await call(backend.audio_ledger, session_id)
    except ApiError as exc:
        await fail(4000 + exc.status, exc)
        return
    stream = _AudioStream(
        websocket, session_id, sample_rate, mode == "credit", ledger, backend, call, metrics
    )
    await stream.run(settings.max_audio_seconds)


class _AudioStream:
    """One authenticated audio connection after ``ready``: frames in, pushes out, flow control, reports."""

    def __init__(
        self,
        websocket: WebSocket,
        session_id: str,
        rate: int,
        credit: bool,
        ledger: AudioLedger,
        backend: SessionBackend,
        call: Callable[..., Awaitable[Any]],
        metrics: Metrics,
    ) -> None:
        self.ws = websocket
        self.session_id = session_id
        self.rate = rate
        self.credit = credit
        self.ledger = ledger
        self.backend = backend
        self.call = call
        self.metrics = metrics
        self.source = f"ws-{uuid.uuid4().hex[:12]}"  # this connection's audio in the session's ledger
        self.resampler = StreamResampler(rate)
        self.held = bytearray()  # received int16 bytes not yet pushed (gathered into one push)
        self.coalesce_bytes = max(2, round(_COALESCE_S * rate) * 2)
        self.received = 0  # input samples taken (not refused)
        self.pushed = 0  # 16 kHz samples the session accepted from this connection
        self.last_frame_at = 0.0
        self.push_lock = asyncio.Lock()  # pushes stay in order whichever task makes them
        self.send_lock = asyncio.Lock()
        self.last_ack: tuple[int, int, int, int] | None = None
        self.finished = False  # playback_finished sent, closed

    # ---- accounting --------------------------------------------------------------------------------------

    def in_pipe(self) -> float:
        """16 kHz samples taken from the client but not yet accepted by the session (held bytes, the
        resampler's look-ahead)."""
        return max(0.0, self.received * TARGET_SAMPLE_RATE / self.rate - self.pushed)

    def credit_samples(self, account: AudioAccount) -> float | None:
        """How far past ``accepted`` (this connection's) the client may send, 16 kHz samples."""
        return None if account.room is None else float(account.room)

    def ack_fields(self, account: AudioAccount | None = None) -> dict[str, Any]:
        account = account or self.ledger.account(self.source)
        own = account.source
        rate = account.sample_rate
        credit = self.credit_samples(account)
        return {
            "accepted_samples": self.pushed,
            "accepted_s": self.pushed / rate,
            "played_s": (own.played if own else 0) / rate,
            "dropped_s": (own.dropped if own else 0) / rate,
            "pending_s": account.pending_s,
            "credit_s": None if credit is None else credit / rate,
            "max_pending_s": account.max_pending_s,
        }

    async def send(self, message: dict[str, Any]) -> None:
        async with self.send_lock:
            if not self.finished:
                await self.ws.send_json(message)

    async def fail(self, close_code: int, error: ApiError) -> None:
        """The error message, then the close (unless the connection was finished already)."""
        async with self.send_lock:
            if self.finished:
                return
            self.finished = True
            await self.ws.send_json({"type": "error", "code": error.code, "detail": error.detail})
            await self.ws.close(code=close_code, reason=_close_reason(error.detail))

    async def ack_if_changed(self) -> None:
        account = self.ledger.account(self.source)
        own = account.source
        key = (self.pushed, account.pending, own.played if own else 0, own.dropped if own else 0)
        if key != self.last_ack:
            self.last_ack = key
            await self.send({"type": "ack", **self.ack_fields(account)})

    # ---- pushing -----------------------------------------------------------------------------------------

    def take_held(self, final: bool) -> np.ndarray:
        """The held bytes resampled (and, when ``final``, the resampler's tail): the next push."""
        samples = decode_pcm16(bytes(self.held))
        self.held.clear()
        out = self.resampler.push(samples) if samples.size else np.zeros(0, np.float32)
        if final:
            out = np.concatenate([out, self.resampler.flush()])
            self.resampler = StreamResampler(self.rate)
        return out

    async def push_held(self, final: bool = False, wait_s: float | None = None) -> None:
        """Push the held audio. It was admitted frame by frame, so it fits unless another pusher (HTTP)
        filled the cap meanwhile: then it waits for room (at most ``wait_s``)."""
        pcm = self.take_held(final)
        async with self.push_lock:
            if pcm.size == 0:
                return
            waited = 0.0
            while True:
                try:
                    await self.call(self.backend.push_audio, self.session_id, pcm, self.source)
                    break
                except ApiError as exc:
                    if exc.status == 409 or self.ledger.ended:
                        raise _SessionOver from exc
                    if exc.status != 429 or (wait_s is not None and waited >= wait_s):
                        raise
                await asyncio.sleep(_WAIT_SLICE_S)
                waited += _WAIT_SLICE_S
            self.pushed += pcm.size
            self.metrics.observe_audio("websocket", pcm.size / TARGET_SAMPLE_RATE)

    async def admit_frame(self, samples: int) -> bool:
        """Whether a frame of ``samples`` (at the client's rate) may be taken now. ``wait``: hold it until it
        fits (the socket is not read meanwhile). ``credit``: refuse it when it is past the credit."""
        need = samples * TARGET_SAMPLE_RATE / self.rate
        while True:
            if self.ledger.ended:
                raise _SessionOver
            account = self.ledger.account()
            room = account.room
            if room is None or self.in_pipe() + need <= room + 1:  # one sample of rounding
                return True
            if self.credit:
                self.metrics.observe_audio_refused("websocket")
                credit = room - self.in_pipe()
                await self.send(
                    {
                        "type": "refused",
                        "code": "credit_exceeded",
                        "detail": f"a frame of {need / TARGET_SAMPLE_RATE:.3f} s is past this connection's "
                        f"credit of {max(credit, 0) / TARGET_SAMPLE_RATE:.3f} s (the session holds "
                        f"{account.pending_s:.2f} s of pending audio, its cap is {account.max_pending_s:g} "
                        "s); it was not taken — send it again within the credit of the next ack",
                        "refused_s": need / TARGET_SAMPLE_RATE,
                        "credit_s": max(credit, 0) / TARGET_SAMPLE_RATE,
                        "retry_after_s": (self.in_pipe() + need - room) / TARGET_SAMPLE_RATE,
                    }
                )
                return False
            if self.held:  # what is held was admitted: push it, so it starts to play
                await self.push_held()
            await asyncio.sleep(_WAIT_SLICE_S)

    # ---- reports -----------------------------------------------------------------------------------------

    async def playback_finished(self, close_code: int, reason: str | None) -> None:
        """The final report of this connection's audio, then the close."""
        account = self.ledger.account(self.source)
        own = account.source
        rate = account.sample_rate
        played = (own.played if own else 0) / rate
        dropped = (own.dropped if own else 0) / rate
        message: dict[str, Any] = {
            "type": "playback_finished",
            "accepted_s": self.pushed / rate,
            "played_s": played,
            "dropped_s": dropped,
            "interrupted": dropped > 0,
        }
        if reason is not None:
            message["reason"] = reason
        async with self.send_lock:
            if self.finished:
                return
            self.finished = True
            await self.ws.send_json(message)
            await self.ws.close(code=close_code, reason=_close_reason(reason or ""))

    async def session_over(self) -> None:
        why = self.ledger.end_reason or "the session ended"
        await self.playback_finished(WS_SESSION_ENDED, f"session ended: {why}")

    async def reporter(self) -> None:
        """Every ``_TICK_S``: push a held remainder once frames stopped, send acks (``credit``), and report
        the session's end."""
        loop = asyncio.get_running_loop()
        try:
            while not self.finished:
                await asyncio.sleep(_TICK_S)
                if self.ledger.ended:
                    await self.session_over()
                    return
                if self.held and loop.time() - self.last_frame_at >= _TICK_S:
                    await self.push_held()
                if self.credit:
                    await self.ack_if_changed()
        except _SessionOver:
            await self.session_over()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a gone client or a failed push: the receiving loop meets it and answers
            log.debug("session %s: audio WebSocket reporter stopped: %s", self.session_id, exc)

    async def until_played(self) -> None:
        """Wait until every sample this connection pushed has played or was dropped."""
        while True:
            own = self.ledger.account(self.source).source
            if self.ledger.ended or own is None or own.pending <= 0:
                return
            await asyncio.sleep(_WAIT_SLICE_S)

    # ---- the connection ----------------------------------------------------------------------------------

    async def run(self, max_frame_s: float) -> None:
        ready: dict[str, Any] = {"type": "ready", "sample_rate": self.rate}
        if self.credit:
            ready.update(flow_control="credit", **self.ack_fields())
            self.last_ack = (0, self.ledger.account().pending, 0, 0)
        await self.send(ready)
        max_frame_bytes = int(max_frame_s * self.rate) * 2
        cap = self.ledger.max_pending
        loop = asyncio.get_running_loop()
        reporter = asyncio.create_task(self.reporter())
        try:
            while not self.finished:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("bytes")
                if data is not None:
                    if len(data) > max_frame_bytes or (
                        cap is not None and len(data) // 2 * TARGET_SAMPLE_RATE / self.rate > cap
                    ):
                        limit = (
                            f"{max_frame_bytes} bytes ({max_frame_s:g} s)"
                            if len(data) > max_frame_bytes
                            else f"the session's cap of {cap / TARGET_SAMPLE_RATE:g} s of pending audio"
                        )
                        await self.fail(
                            WS_TOO_LARGE,
                            ApiError(413, "too_large", f"a frame of {len(data)} bytes is over {limit}"),
                        )
                        break
                    if len(data) % 2:
                        decode_pcm16(data)  # raises PcmFormatError with the reason
                    if not await self.admit_frame(len(data) // 2):
                        continue
                    self.held += data
                    self.received += len(data) // 2
                    self.last_frame_at = loop.time()
                    if len(self.held) >= self.coalesce_bytes:
                        await self.push_held()
                    continue
                try:
                    command = json.loads(message.get("text") or "")
                except ValueError:
                    command = None
                kind = command.get("type") if isinstance(command, dict) else None
                if kind == "flush":
                    await self.push_held(final=True)
                    flushed: dict[str, Any] = {"type": "flushed", "samples": self.pushed}
                    if self.credit:
                        flushed.update(self.ack_fields())
                    await self.send(flushed)
                elif kind == "end":
                    await self.push_held(final=True)
                    await self.until_played()
                    if self.ledger.ended:
                        raise _SessionOver
                    await self.playback_finished(1000, None)
                else:
                    await self.fail(
                        WS_INVALID,
                        ApiError(
                            422,
                            "invalid_request",
                            'text messages after the first must be {"type": "flush"} or {"type": "end"}; '
                            "audio goes in binary frames",
                        ),
                    )
                    break
        except _SessionOver:
            await self.session_over()
        except PcmFormatError as exc:
            await self.fail(WS_INVALID, ApiError(422, "invalid_audio", str(exc)))
        except ApiError as exc:
            await self.fail(4000 + exc.status, exc)
        finally:
            reporter.cancel()
            await self._push_rest()

    async def _push_rest(self) -> None:
        """Whatever the client sent before leaving is pushed: the held bytes and the resampler's tail."""
        try:
            await self.push_held(final=True, wait_s=_TAIL_WAIT_S)
        except (ApiError, _SessionOver) as exc:
            detail = exc.detail if isinstance(exc, ApiError) else "the session ended"
            log.info(
                "session %s: audio tail after the WebSocket closed not pushed: %s", self.session_id, detail
            )

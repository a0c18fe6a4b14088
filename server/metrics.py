"""Prometheus metrics of the master (prefix ``tm_``) and the small recorder API the runtime calls.

Each ``Metrics`` owns its own ``CollectorRegistry``, so several apps (tests, embedded servers) never collide
in the process-global default registry. ``GET /metrics`` serves ``Metrics.render()``.

Series:

- ``tm_ttbc_seconds`` (histogram): time between consecutive published chunks. Buckets are dense (every
  25 ms) from 0.6 s to 0.9 s around the 0.75 s chunk duration, where "just real-time" and "just late" must be
  told apart, and coarse elsewhere.
- ``tm_deadline_misses_total`` (counter): chunks whose TTBC exceeded their deadline (the chunk's duration).
- ``tm_chunks_total`` (counter): published chunks that were timed.
- ``tm_stage_seconds{stage}`` (histogram): per-chunk time of each pipeline stage (prepare, score, transfer,
  decode, publish).
- ``tm_first_frame_latency_seconds`` (histogram): audio in → first frame published.
- ``tm_playout_buffer_min_seconds`` (gauge): generated video not yet played, of the live session with the
  least (the one nearest to running dry); 0 without live sessions.
- ``tm_playout_buffer_seconds{session}`` (gauge): the same per live session, only with ``session_labels``
  (the ``metrics_session_labels`` setting): session ids are then visible to whoever reads ``/metrics``.
- ``tm_active_sessions`` (gauge).
- ``tm_av_offset_seconds`` (gauge, last value) and ``tm_av_offset_observed_seconds`` (histogram): audio time
  minus video time at the publisher; positive = audio ahead.
- ``tm_audio_received_seconds_total{transport}`` (counter): speech accepted by the API (http, websocket).
- ``tm_degraded_chunks_total{mode}`` (counter): chunks generated at reduced quality (``engine.degrade``;
  mode ``steps``: fewer denoising steps), no session label.
- ``tm_degraded_sessions`` (gauge): live sessions whose latest chunk was degraded.
- ``tm_engine_info{...}`` (info, once ``set_engine_info`` is called at start-up): how the score model runs,
  e.g. ``attention_backend`` (the backend ``--attention-backend`` resolved to) and ``cuda_graphs``.
- ``tm_audio_played_seconds_total`` (counter): accepted speech whose video frames played.
- ``tm_audio_dropped_seconds_total{reason}`` (counter): accepted speech that never played: dropped by a
  barge-in (``clear``) or because its session ended first (``session_end``).
- ``tm_audio_refused_total{transport}`` (counter): pushes refused because the session's pending audio was at
  its cap (HTTP 429; WebSocket frames past the client's credit).

No audio series has a session label.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

STAGES = ("prepare", "score", "transfer", "decode", "publish")
TRANSPORTS = ("http", "websocket")
DEGRADE_MODES = ("steps",)  # engine.degrade's modes other than off
DROP_REASONS = ("clear", "session_end")
CHUNK_SECONDS = 0.75  # 12 frames at 16 fps


def _dense_around_chunk() -> tuple[float, ...]:
    coarse_low = (0.1, 0.2, 0.3, 0.4, 0.5)
    dense = tuple(round(0.6 + 0.025 * i, 3) for i in range(13))  # 0.600 … 0.900
    coarse_high = (1.0, 1.25, 1.5, 2.0, 3.0, 5.0)
    return coarse_low + dense + coarse_high


TTBC_BUCKETS = _dense_around_chunk()
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 1.0, 1.5, 2.5, 5.0)
FIRST_FRAME_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 10.0, 20.0)
# One video frame at 16 fps is 62.5 ms: buckets in fractions of a frame on both sides.
AV_OFFSET_BUCKETS = (-0.25, -0.125, -0.0625, -0.03125, -0.015625, 0.0, 0.015625, 0.03125, 0.0625, 0.125, 0.25)


def _finite(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number of seconds, got {value!r}")
    return value


class Metrics:
    """The ``tm_`` series of one server, in a registry of its own. Thread-safe (prometheus-client is)."""

    def __init__(self, session_labels: bool = False) -> None:
        self.session_labels = session_labels
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttbc = Histogram(
            "tm_ttbc_seconds", "Time between consecutive published chunks", buckets=TTBC_BUCKETS, registry=r
        )
        self.deadline_misses = Counter(
            "tm_deadline_misses", "Chunks whose TTBC exceeded the chunk's duration", registry=r
        )
        self.chunks = Counter("tm_chunks", "Published chunks with a TTBC sample", registry=r)
        self.stage = Histogram(
            "tm_stage_seconds",
            "Per-chunk time of a pipeline stage",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.first_frame = Histogram(
            "tm_first_frame_latency_seconds",
            "Audio in to first frame published",
            buckets=FIRST_FRAME_BUCKETS,
            registry=r,
        )
        self.playout_buffer: Gauge | None = None
        if session_labels:
            self.playout_buffer = Gauge(
                "tm_playout_buffer_seconds", "Generated video not yet played out", ["session"], registry=r
            )
        self.playout_buffer_min = Gauge(
            "tm_playout_buffer_min_seconds",
            "Generated video not yet played out, of the live session with the least",
            registry=r,
        )
        self.playout_buffer_min.set_function(self._min_buffer)
        self._buffers: dict[str, float] = {}
        self.active_sessions = Gauge("tm_active_sessions", "Sessions starting or running", registry=r)
        self.av_offset = Gauge(
            "tm_av_offset_seconds", "Last A/V offset at the publisher (audio minus video)", registry=r
        )
        self.av_offset_hist = Histogram(
            "tm_av_offset_observed_seconds",
            "A/V offset at the publisher (audio minus video)",
            buckets=AV_OFFSET_BUCKETS,
            registry=r,
        )
        self.audio_received = Counter(
            "tm_audio_received_seconds", "Speech accepted by the API", ["transport"], registry=r
        )
        self.audio_played = Counter(
            "tm_audio_played_seconds", "Accepted speech whose video frames played", registry=r
        )
        self.audio_dropped = Counter(
            "tm_audio_dropped_seconds", "Accepted speech that never played", ["reason"], registry=r
        )
        self.audio_refused = Counter(
            "tm_audio_refused", "Audio pushes refused at a session's cap on pending audio", ["transport"],
            registry=r,
        )
        for reason in DROP_REASONS:
            self.audio_dropped.labels(reason=reason)
        for stage in STAGES:  # export every stage from the start, so dashboards see zeros, not gaps
            self.stage.labels(stage=stage)
        for transport in TRANSPORTS:
            self.audio_received.labels(transport=transport)
            self.audio_refused.labels(transport=transport)
        self.degraded_chunks = Counter(
            "tm_degraded_chunks", "Chunks generated at reduced quality (engine.degrade)", ["mode"], registry=r
        )
        for mode in DEGRADE_MODES:
            self.degraded_chunks.labels(mode=mode)
        self.degraded_sessions = Gauge(
            "tm_degraded_sessions", "Live sessions whose latest chunk was degraded", registry=r
        )
        self.degraded_sessions.set_function(lambda: float(len(self._degraded)))
        self._degraded: set[str] = set()
        self._sessions: set[str] = set()
        self._lock = threading.Lock()

    def observe_chunk(
        self,
        ttbc_s: float | None,
        stages: Mapping[str, float],
        deadline_s: float = CHUNK_SECONDS,
        missed: bool | None = None,
    ) -> None:
        """One published chunk: its TTBC (time since the session's previous publish; None for a session's
        first chunk), each stage's seconds, and its deadline (the chunk's duration). ``missed``: whether the
        chunk was late; None counts a TTBC over the deadline as late (an unpaced stream, ``run``), while
        ``serve`` (paced by playout) says whether the viewer's playout had run dry.

        Raises:
            ValueError: a stage outside ``STAGES`` (labels are a closed set), or a non-finite time.
        """
        unknown = set(stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stage(s) {sorted(unknown)}; the stages are {', '.join(STAGES)}")
        deadline_s = _finite(deadline_s, "deadline_s")
        if ttbc_s is not None:
            ttbc_s = _finite(ttbc_s, "ttbc_s")
            self.ttbc.observe(ttbc_s)
        self.chunks.inc()
        if missed is None:
            missed = ttbc_s is not None and ttbc_s > deadline_s
        if missed:
            self.deadline_misses.inc()
        for stage, seconds in stages.items():
            self.stage.labels(stage=stage).observe(_finite(seconds, f"stage {stage!r}"))

    def observe_degraded(self, session_id: str, mode: str | None) -> None:
        """A session's next chunk is degraded in ``mode`` (counted), or full (None); the gauge counts the
        live sessions whose latest chunk was degraded (no session label on either)."""
        if mode is not None and mode not in DEGRADE_MODES:
            raise ValueError(f"unknown degrade mode {mode!r}; expected one of {', '.join(DEGRADE_MODES)}")
        if mode is not None:
            self.degraded_chunks.labels(mode=mode).inc()
        with self._lock:
            if mode is not None and session_id in self._sessions:
                self._degraded.add(session_id)
            else:
                self._degraded.discard(session_id)

    def observe_first_frame(self, seconds: float) -> None:
        """Audio in → first frame published, for one speech segment or session start."""
        self.first_frame.observe(_finite(seconds, "first-frame latency"))

    def set_buffer(self, session: str, seconds: float) -> None:
        """The session's playout buffer depth (generated, not yet played), seconds."""
        seconds = _finite(seconds, "playout buffer")
        with self._lock:
            if session not in self._sessions:
                return  # not started, or ended already: no series comes back for it
            self._buffers[session] = seconds
            if self.playout_buffer is not None:
                self.playout_buffer.labels(session=session).set(seconds)

    def _min_buffer(self) -> float:
        with self._lock:
            return min(self._buffers.values(), default=0.0)

    def set_av_offset(self, seconds: float) -> None:
        """A/V offset measured at the publisher, audio time minus video time, seconds."""
        seconds = _finite(seconds, "A/V offset")
        self.av_offset.set(seconds)
        self.av_offset_hist.observe(seconds)

    def observe_audio(self, transport: str, seconds: float) -> None:
        """Speech accepted by the API over ``transport`` (http or websocket)."""
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}; expected one of {', '.join(TRANSPORTS)}")
        self.audio_received.labels(transport=transport).inc(_finite(seconds, "audio duration"))

    def observe_audio_settled(self, what: str, seconds: float) -> None:
        """Accepted speech settled (``server.audio_ledger``): ``played``, or dropped for a reason in
        ``DROP_REASONS``."""
        seconds = _finite(seconds, "audio duration")
        if what == "played":
            self.audio_played.inc(seconds)
        elif what in DROP_REASONS:
            self.audio_dropped.labels(reason=what).inc(seconds)
        else:
            raise ValueError(f"unknown audio outcome {what!r}; expected played or one of {DROP_REASONS}")

    def observe_audio_refused(self, transport: str) -> None:
        """A push over ``transport`` refused at its session's cap on pending audio."""
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}; expected one of {', '.join(TRANSPORTS)}")
        self.audio_refused.labels(transport=transport).inc()

    def session_started(self, session: str) -> None:
        """A session began; counted once per id."""
        with self._lock:
            if session in self._sessions:
                return
            self._sessions.add(session)
            self.active_sessions.inc()

    def session_ended(self, session: str) -> None:
        """A session ended or failed: no longer active, and its buffer series is removed (bounded label
        cardinality over hours of sessions). Unknown or already ended ids are ignored."""
        with self._lock:
            if session not in self._sessions:
                return
            self._sessions.discard(session)
            self._degraded.discard(session)
            self._buffers.pop(session, None)
            self.active_sessions.dec()
            if self.playout_buffer is not None:
                try:
                    self.playout_buffer.remove(session)
                except KeyError:
                    pass

    def set_engine_info(self, **labels: str) -> None:
        """Export ``tm_engine_info{labels} 1``: the score engine's start-up settings (low cardinality)."""
        Info("tm_engine", "How the score model runs", registry=self.registry).info(labels)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

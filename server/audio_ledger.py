"""A session's audio accounting and its cap on pending audio (``AudioLedger``), kept by its ``SpeechFeed``.

Every 16 kHz sample a session accepts (HTTP, WebSocket, the LiveKit agent's byte streams) is, in order,
*pending* (accepted, not yet played: queued in the feed, fed to the featurizers, or generated and waiting
in the playout buffer), then *settled*: **played** (its video frame was published) or **dropped** (a
barge-in ``clear``, or the session ended before it played). The accepted audio is one FIFO: it is fed and
played in the order it was accepted, and a clear or the end drops everything not yet played, so the
settled samples are always a prefix of the accepted ones and ``accepted = played + dropped + pending``
holds at every moment.

The cap (``max_pending_s``, ``serve --max-pending-audio-s``) bounds *pending*: ``admit`` takes a push whole
or not at all, and refuses it when ``pending + push > cap`` (``AudioBacklogFull``, which says when it would
fit: the pending audio plays at real time, so after ``pending + push - cap`` seconds) or when the push alone
is longer than the cap (``AudioTooLong``: it never fits). The LiveKit agent's audio is admitted without the
cap (``enforce=False``): the avatar protocol has no way to refuse or slow it; it still counts as pending,
so HTTP and WebSocket pushes to the same session see it.

Sources: a push may name its source (an audio WebSocket connection names itself), and the ledger counts
that source's own accepted, played and dropped samples, for the connection's ``playback_finished`` report.
The last ``_SOURCES_KEPT`` sources are kept.

Thread-safe, with a lock of its own that is held only inside these short methods (the WebSocket reads it on
the event loop; the feed calls it under the feed's lock).
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

from server.backend import AudioBacklogFull, AudioTooLong, SessionEnded

SAMPLE_RATE = 16_000
# serve's default cap on a session's pending audio: far above what a real-time stream holds in the pipeline
# (look-ahead, chunk in flight and playout buffer: about 2 s on the tiny preset) and small enough that a
# runaway sender holds at most ~2 MB of float32 per session.
DEFAULT_MAX_PENDING_AUDIO_S = 30.0
_SOURCES_KEPT = 64

# What happened to settled audio, as the observer hears it (the metrics' reasons).
PLAYED = "played"
DROPPED_CLEAR = "clear"
DROPPED_END = "session_end"


@dataclass(frozen=True)
class SourceCount:
    """One source's own audio, in 16 kHz samples."""

    accepted: int = 0
    played: int = 0
    dropped: int = 0

    @property
    def pending(self) -> int:
        return self.accepted - self.played - self.dropped


@dataclass(frozen=True)
class AudioAccount:
    """A consistent snapshot of a session's audio (16 kHz samples; ``*_s`` in seconds).

    ``source``: the counts of the source asked for (None when none was named or it is unknown).
    ``max_pending``: the cap in samples (None: no cap). ``ended``: the session ended; nothing is pending.
    """

    accepted: int
    played: int
    dropped: int
    max_pending: int | None
    ended: bool
    source: SourceCount | None = None
    sample_rate: int = SAMPLE_RATE

    @property
    def pending(self) -> int:
        return self.accepted - self.played - self.dropped

    @property
    def room(self) -> int | None:
        """Samples a push may still bring without passing the cap (None: no cap)."""
        return None if self.max_pending is None else max(0, self.max_pending - self.pending)

    def seconds(self, samples: int) -> float:
        return samples / self.sample_rate

    @property
    def accepted_s(self) -> float:
        return self.accepted / self.sample_rate

    @property
    def played_s(self) -> float:
        return self.played / self.sample_rate

    @property
    def dropped_s(self) -> float:
        return self.dropped / self.sample_rate

    @property
    def pending_s(self) -> float:
        return self.pending / self.sample_rate

    @property
    def max_pending_s(self) -> float | None:
        return None if self.max_pending is None else self.max_pending / self.sample_rate


class AudioLedger:
    """A session's accepted / played / dropped audio and its cap (see the module docstring).

    Args:
        max_pending_s: the cap on pending audio, seconds; None: no cap.
        name: the session id (in error messages).
        observer: told ``(what, seconds)`` as audio settles: ``PLAYED``, ``DROPPED_CLEAR`` or
            ``DROPPED_END`` (the server's metrics; called under the ledger's lock, so it must be quick).
        sample_rate: of the samples counted (the feed's 16 kHz).
    """

    def __init__(
        self,
        max_pending_s: float | None = None,
        name: str = "",
        observer: Callable[[str, float], None] | None = None,
        sample_rate: int = SAMPLE_RATE,
    ) -> None:
        if max_pending_s is not None and not (math.isfinite(max_pending_s) and max_pending_s > 0):
            raise ValueError(f"max_pending_s must be a positive number of seconds, got {max_pending_s!r}")
        self.name = name
        self.sample_rate = sample_rate
        self.max_pending = None if max_pending_s is None else round(max_pending_s * sample_rate)
        self.observer = observer
        self._lock = threading.Lock()
        self._accepted = 0
        self._played = 0
        self._dropped = 0
        self._ended: str | None = None  # the reason, once ended
        # The pending audio in FIFO order as [source, samples] runs, so settling credits each source.
        self._runs: collections.deque[list] = collections.deque()
        self._sources: collections.OrderedDict[str, list[int]] = collections.OrderedDict()

    # ---- accepting ---------------------------------------------------------------------------------------

    def admit(self, samples: int, source: str | None = None, enforce: bool = True) -> AudioAccount:
        """Take ``samples`` more pending samples, all or none.

        Raises:
            AudioTooLong: longer than the cap by itself (``enforce``).
            AudioBacklogFull: ``pending + samples`` would pass the cap (``enforce``); says when it fits.
            SessionEnded: the session ended.
        """
        with self._lock:
            if self._ended is not None:
                raise SessionEnded(self.name, self._ended)
            if enforce and self.max_pending is not None:
                cap_s = self.max_pending / self.sample_rate
                if samples > self.max_pending:
                    raise AudioTooLong(samples / self.sample_rate, cap_s)
                pending = self._accepted - self._played - self._dropped
                over = pending + samples - self.max_pending
                if over > 0:
                    raise AudioBacklogFull(
                        samples / self.sample_rate, pending / self.sample_rate, cap_s, over / self.sample_rate
                    )
            if samples <= 0:
                return self._account(source)
            self._accepted += samples
            if self._runs and self._runs[-1][0] == source:
                self._runs[-1][1] += samples
            else:
                self._runs.append([source, samples])
            if source is not None:
                count = self._sources.get(source)
                if count is None:
                    count = self._sources[source] = [0, 0, 0]
                    while len(self._sources) > _SOURCES_KEPT:
                        self._sources.popitem(last=False)
                count[0] += samples
            return self._account(source)

    # ---- settling ----------------------------------------------------------------------------------------

    def played(self, samples: int) -> None:
        """The oldest ``samples`` pending samples played (ignored once the session ended: they were dropped
        with it)."""
        with self._lock:
            if self._ended is not None or samples <= 0:
                return
            samples = min(samples, self._accepted - self._played - self._dropped)
            self._played += samples
            self._settle(samples, 1)
            self._tell(PLAYED, samples)

    def drop_pending(self, reason: str = DROPPED_CLEAR) -> int:
        """Every pending sample is dropped (a barge-in); returns how many."""
        with self._lock:
            return self._drop_all(reason)

    def end(self, reason: str) -> AudioAccount:
        """The session ended (``reason``): the pending audio is dropped, no more is admitted. Idempotent."""
        with self._lock:
            if self._ended is None:
                self._drop_all(DROPPED_END)
                self._ended = reason
            return self._account(None)

    def _drop_all(self, reason: str) -> int:
        samples = self._accepted - self._played - self._dropped
        if self._ended is not None or samples <= 0:
            return 0
        self._dropped += samples
        self._settle(samples, 2)
        self._tell(reason, samples)
        return samples

    def _settle(self, samples: int, slot: int) -> None:
        """Settle the oldest ``samples`` runs: credit each run's source (slot 1 played, 2 dropped)."""
        while samples > 0 and self._runs:
            run = self._runs[0]
            take = min(samples, run[1])
            if run[0] is not None and run[0] in self._sources:
                self._sources[run[0]][slot] += take
            run[1] -= take
            samples -= take
            if run[1] == 0:
                self._runs.popleft()

    def _tell(self, what: str, samples: int) -> None:
        if self.observer is not None and samples > 0:
            self.observer(what, samples / self.sample_rate)

    # ---- reading -----------------------------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self._ended is not None

    @property
    def end_reason(self) -> str | None:
        """Why the session ended (None while it is live)."""
        return self._ended

    def account(self, source: str | None = None) -> AudioAccount:
        """A consistent snapshot (with ``source``'s own counts when it is named and known)."""
        with self._lock:
            return self._account(source)

    def _account(self, source: str | None) -> AudioAccount:
        count = self._sources.get(source) if source is not None else None
        return AudioAccount(
            accepted=self._accepted,
            played=self._played,
            dropped=self._dropped,
            max_pending=self.max_pending,
            ended=self._ended is not None,
            source=None if count is None else SourceCount(*count),
            sample_rate=self.sample_rate,
        )

"""A live session's audio clock (``SpeechFeed``): pending speech, just-in-time feeding of the featurizers,
the audio that plays with the video, and the agent's speech segments on that timeline.

Timeline. A session has one audio clock in 16 kHz samples, shared by every character's featurizer and by the
published audio: video frame ``v`` plays samples ``[frame_sample(v), frame_sample(v + 1))``, ``frame_sample(v)
= v · 16000 // fps`` (``[1000 v, 1000 (v + 1))`` at 16 fps). The featurizers are the model family's:
``frontends.audio_features.AudioFeaturizer`` (TalkingMachines) or ``frontends.infinitetalk_chunks.
StreamChunkAudio`` (InfiniteTalk / LiveAct), which share the interface used here. The audio published with a
chunk's frames is the tape at ``frontends.audio_io.output_sample_rate(fps)``: 16 kHz where fps divides it,
else 48 kHz (LiveAct's 24 fps: 2000 samples a frame), upsampled exactly from the tape (``resample_span``).
Speech arrives (HTTP, WebSocket, LiveKit byte streams) into a *pending* queue and is fed to the featurizers
**just in time**, only when a chunk is generated: exactly up to the samples that chunk needs (its frames plus
the window's look-ahead of 2 latent frames). What the pending queue cannot cover is padded with silence, so a
chunk is always ready when the playout buffer needs one — video never waits for speech (silence mode).
Speaking characters get the speech; the others get zeros of the same length, so all featurizers stay on one
clock.

Consequences (by design): speech that arrives while silence chunks are queued starts after them plus the
0.5 s look-ahead already fed as silence, so first-frame latency ≈ playout buffer + 0.5 s + one chunk's
generation; speech that trickles in slower than real time is split by silence rather than stalling the video.

Barge-in (``clear``): the pending speech is dropped and the look-ahead already fed to the featurizers is
zeroed, so no old speech leaks into the next chunk.

Accounting and the cap (``server.audio_ledger.AudioLedger``, ``ledger``): every accepted sample is pending
until its frame plays (``mark_played``, from the output's playout) or it is dropped (``clear``, ``close``);
``offer`` is the one place where a push is refused because the session's pending audio would pass its cap
(``serve --max-pending-audio-s``): API pushes go through it, the LiveKit agent's audio through ``push``.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from frontends.audio_io import TARGET_SAMPLE_RATE, output_sample_rate, resample_span
from server.audio_ledger import DROPPED_CLEAR, AudioAccount, AudioLedger

# Input samples of the tape kept before a chunk's frames: the upsampling filter's support (48 kHz from 16 kHz
# reads 70 samples on either side).
_TAPE_MARGIN = 128


class ChunkFeaturizer(Protocol):
    """One character's streaming front-end, as the feed drives it (``AudioFeaturizer``,
    ``StreamChunkAudio``)."""

    def required_samples(self, chunk_index: int) -> int: ...

    def output_frames(self, chunk_index: int) -> range: ...

    def features_for_chunk(self, chunk_index: int) -> Any: ...

    def push(self, pcm: np.ndarray) -> None: ...

    def push_silence(self, num_samples: int) -> None: ...

    def silence_from(self, sample: int) -> None: ...


@dataclass
class _Utterance:
    """Speech pushed after a pause: when it arrived and (once fed) where it starts on the timeline."""

    arrived_at: float
    start_sample: int | None = None


@dataclass
class Segment:
    """An agent's speech segment (one ``lk.audio_stream``) on the session timeline, for playout reports."""

    segment_id: str
    start_sample: int | None = None  # where its first sample was fed
    end_sample: int | None = None  # end of what was fed so far
    fed_samples: int = 0  # its own samples fed (less than end - start when silence filled an underrun)
    received_all: bool = False
    pending_samples: int = 0  # received, not yet fed
    started_sent: bool = False
    runs: list[list[int]] = field(default_factory=list)  # [timeline start, length] of each stretch fed

    def record_fed(self, position: int, count: int) -> None:
        """`count` of its samples were fed at timeline sample `position` (after what was fed before)."""
        if self.start_sample is None:
            self.start_sample = position
        if self.runs and self.runs[-1][0] + self.runs[-1][1] == position:
            self.runs[-1][1] += count
        else:
            self.runs.append([position, count])
        self.end_sample = position + count
        self.fed_samples += count
        self.pending_samples -= count

    def own_samples_before(self, sample: int) -> int:
        """How many of its own samples lie on the timeline before `sample` (silence that filled an underrun
        inside its span is not counted)."""
        return sum(max(0, min(start + length, sample) - start) for start, length in self.runs)


class SpeechFeed:
    """The session's audio clock: pending speech, just-in-time feeding of the featurizers, the played audio.

    Thread-safe: ``push``/``clear``/``set_speakers`` come from API threads and the LiveKit loop,
    ``take_chunk`` from the engine thread.
    """

    def __init__(
        self,
        featurizers: list[ChunkFeaturizer],
        speaking: list[int],
        fps: int | None = None,
        ledger: AudioLedger | None = None,
    ) -> None:
        """fps: the video's frame rate (default: the featurizers' ``config.fps``). ledger: the session's audio
        accounting and cap (default: one without a cap)."""
        self.featurizers = featurizers
        self.ledger = ledger if ledger is not None else AudioLedger()
        self.speaking = set(speaking)
        self.fps = int(fps if fps is not None else featurizers[0].config.fps)  # type: ignore[attr-defined]
        self.sample_rate = TARGET_SAMPLE_RATE
        self.output_rate = output_sample_rate(self.fps)
        self.output_spf = self.output_rate // self.fps  # published samples per video frame
        self._lock = threading.RLock()
        self._pending: collections.deque[tuple[np.ndarray, Segment | None]] = collections.deque()
        self._pending_samples = 0
        self._fed = 0  # absolute samples fed to every featurizer
        self._tape = np.zeros(0, np.float32)  # fed audio from absolute sample _tape_offset on
        self._tape_offset = 0
        self.next_chunk = 0
        self.utterances: collections.deque[_Utterance] = collections.deque()
        self.segments: collections.deque[Segment] = collections.deque()
        # Where accepted speech was fed on the timeline and has not played yet: [start sample, length] runs.
        self._speech_runs: collections.deque[list[int]] = collections.deque()
        self._closed = False

    @property
    def lock(self) -> threading.RLock:
        """Held while the timeline changes; the player holds it while it reads segments and utterances."""
        return self._lock

    @property
    def pending_s(self) -> float:
        return self._pending_samples / self.sample_rate

    def frame_sample(self, frame: int) -> int:
        """The first timeline (16 kHz) sample of video frame ``frame``."""
        return frame * self.sample_rate // self.fps

    def offer(self, pcm: np.ndarray, source: str | None = None) -> AudioAccount:
        """Queue an API caller's speech ``[N]`` float32 16 kHz, all of it or none: refused when the pending
        audio would pass the cap. Returns the account after it.

        Raises:
            AudioBacklogFull, AudioTooLong: past the cap (nothing queued). SessionEnded: ``close``d.
        """
        with self._lock:
            account = self.ledger.admit(int(pcm.size), source)
            self._enqueue(pcm, None)
            return account

    def push(self, pcm: np.ndarray, segment: Segment | None = None) -> None:
        """Queue speech ``[N]`` float32 16 kHz (of ``segment`` when it came from the LiveKit protocol) without
        the cap: the avatar protocol cannot refuse audio; it still counts as pending. Ignored once closed."""
        with self._lock:
            if self._closed:
                return
            self.ledger.admit(int(pcm.size), enforce=False)
            self._enqueue(pcm, segment)

    def _enqueue(self, pcm: np.ndarray, segment: Segment | None) -> None:
        if pcm.size == 0:
            return
        with self._lock:
            if self._pending_samples == 0:
                self.utterances.append(_Utterance(arrived_at=time.perf_counter()))
            self._pending.append((np.asarray(pcm, np.float32), segment))
            self._pending_samples += pcm.size
            if segment is not None:
                segment.pending_samples += pcm.size

    def open_segment(self, segment_id: str) -> Segment:
        with self._lock:
            segment = Segment(segment_id)
            self.segments.append(segment)
            return segment

    def end_segment(self, segment: Segment) -> None:
        with self._lock:
            segment.received_all = True
            if segment.start_sample is None and segment.pending_samples == 0:
                segment.start_sample = segment.end_sample = self._fed  # an empty segment ends at once

    def set_speakers(self, speaking: list[int]) -> None:
        with self._lock:
            self.speaking = set(speaking)

    def mark_played(self, frame_end: int) -> None:
        """Every video frame before ``frame_end`` has played: the accepted speech fed before it is played."""
        end = self.frame_sample(frame_end)
        with self._lock:
            played = 0
            runs = self._speech_runs
            while runs and runs[0][0] < end:
                take = min(runs[0][1], end - runs[0][0])
                played += take
                if take == runs[0][1]:
                    runs.popleft()
                else:
                    runs[0] = [runs[0][0] + take, runs[0][1] - take]
            self.ledger.played(played)

    def close(self, reason: str) -> AudioAccount:
        """The session ended: what was not played is dropped (and counted so), nothing more is taken, and the
        queued speech is freed. Idempotent; returns the final account."""
        with self._lock:
            self._closed = True
            self._pending.clear()
            self._pending_samples = 0
            self._speech_runs.clear()
            self.utterances.clear()
            return self.ledger.end(reason)

    def clear(self, played_frame_end: int) -> list[Segment]:
        """Drop pending speech and zero what was fed past frame ``played_frame_end``; returns the segments
        that were pending (they are all finished, interrupted). The speech before the cut played; the rest
        of the accepted speech is dropped (``ledger``)."""
        with self._lock:
            self.mark_played(played_frame_end)
            self.ledger.drop_pending(DROPPED_CLEAR)
            self._speech_runs.clear()
            self._pending.clear()
            self._pending_samples = 0
            cut = self.frame_sample(played_frame_end)
            for featurizer in self.featurizers:
                featurizer.silence_from(cut)
            start = max(0, cut - self._tape_offset)
            if start < self._tape.size:
                self._tape = self._tape.copy()
                self._tape[start:] = 0.0
            self.utterances.clear()
            dropped = list(self.segments)
            self.segments.clear()
            return dropped

    def take_chunk(self) -> tuple[int, list[Any], np.ndarray]:
        """Feed the featurizers up to the next chunk's need and take its features.

        Returns ``(chunk_index, [its features per character], audio of its output frames)``: the audio is
        ``output_spf`` samples a frame at ``output_rate``.
        """
        with self._lock:
            index = self.next_chunk
            lead = self.featurizers[0]
            need = lead.required_samples(index) - self._fed
            if need > 0:
                self._feed(need)
            audio = [f.features_for_chunk(index) for f in self.featurizers]
            frames = lead.output_frames(index)
            spf = self.output_spf
            pcm = resample_span(
                self._tape_slice, frames.start * spf, frames.stop * spf, self.sample_rate, self.output_rate
            )
            margin = 0 if self.output_rate == self.sample_rate else _TAPE_MARGIN
            self._drop_tape_before(self.frame_sample(frames.stop) - margin)
            self.next_chunk = index + 1
            return index, audio, pcm

    def _feed(self, need: int) -> None:
        pieces: list[np.ndarray] = []
        got = 0
        while got < need and self._pending:
            pcm, segment = self._pending[0]
            take = min(need - got, pcm.size)
            if take == pcm.size:
                self._pending.popleft()
            else:
                self._pending[0] = (pcm[take:], segment)
            position = self._fed + got
            runs = self._speech_runs
            if runs and runs[-1][0] + runs[-1][1] == position:
                runs[-1][1] += take
            else:
                runs.append([position, take])
            if segment is not None:
                segment.record_fed(position, take)
            if self.utterances and self.utterances[-1].start_sample is None:
                self.utterances[-1].start_sample = position
            pieces.append(pcm[:take])
            got += take
        self._pending_samples -= got
        speech = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        wave = np.concatenate([speech, np.zeros(need - got, np.float32)])
        for character, featurizer in enumerate(self.featurizers):
            if character in self.speaking and got:
                featurizer.push(wave)
            else:
                featurizer.push_silence(need)
        self._tape = np.concatenate([self._tape, wave])
        self._fed += need

    def _tape_slice(self, start: int, stop: int) -> np.ndarray:
        out = np.zeros(stop - start, np.float32)
        lo, hi = max(start, self._tape_offset), min(stop, self._tape_offset + self._tape.size)
        if hi > lo:
            out[lo - start : hi - start] = self._tape[lo - self._tape_offset : hi - self._tape_offset]
        return out

    def _drop_tape_before(self, absolute: int) -> None:
        drop = min(max(absolute - self._tape_offset, 0), self._tape.size)
        self._tape = self._tape[drop:]
        self._tape_offset += drop

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
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from frontends.audio_io import TARGET_SAMPLE_RATE, output_sample_rate, resample_span

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
        self, featurizers: list[ChunkFeaturizer], speaking: list[int], fps: int | None = None
    ) -> None:
        """fps: the video's frame rate (default: the featurizers' ``config.fps``)."""
        self.featurizers = featurizers
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

    def push(self, pcm: np.ndarray, segment: Segment | None = None) -> None:
        """Queue speech ``[N]`` float32 16 kHz (of ``segment`` when it came from the LiveKit protocol)."""
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

    def clear(self, played_frame_end: int) -> list[Segment]:
        """Drop pending speech and zero what was fed past frame ``played_frame_end``; returns the segments
        that were pending (they are all finished, interrupted)."""
        with self._lock:
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

"""A whole audio file as one session through the engine: what ``talkingmachines run`` writes to an MP4 and
``training.evaluate`` scores.

``ChunkScheduler`` feeds the file through the same streaming audio front-end ``serve`` uses
(``AudioFeaturizer.push`` in real-time-sized pieces of 40 ms; a chunk is requested as soon as its audio
window has arrived; the stream ends with silence so the video covers all the audio). Each ``ChunkRequest``
carries the chunk's ``y``, its audio window, the per-latent-frame speaking flags and a noise seed derived
from (session seed, chunk index); the last chunk is trimmed so the video has exactly
``ceil(audio duration x fps)`` frames. ``RunSession`` is that stream as an engine session, and
``run_stream`` runs it through ``engine.pipeline.ChunkEngine`` flat out (no playout pacing).

The InfiniteTalk family (SoulX-LiveAct) has its own chunk source, ``FrameChunkScheduler``: per chunk the
windows of its own video frames (``frontends.infinitetalk_chunks``), by default cut from the whole clip's
features as upstream's offline generation does (``ClipChunkAudio``), or from the live front-end ``serve``
uses (``StreamChunkAudio``, ``run --stream-audio``). Its chunks are written whole (LiveAct: 21 + 32·k frames
for k + 1 chunks, enough chunks to cover the audio; the audio is padded with silence to the video's end)
and its audio is published at ``frontends.audio_io.output_sample_rate(fps)`` (48 kHz at 24 fps).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import torch

from decoder.encode import I2VConditioning
from engine.chunks import PreparedInputs, SessionTimes, chunk_request
from engine.executor import Executor, WorkerError
from engine.pipeline import ChunkEngine, Work
from engine.publish import ChunkPublisher, Published
from engine.stats import ChunkTiming, StreamStats
from frontends.audio_features import AudioFeaturizer
from frontends.audio_io import TARGET_SAMPLE_RATE, output_sample_rate, resample
from frontends.infinitetalk_chunks import ClipChunkAudio, StreamChunkAudio, chunk_frames
from proto.chunk_specs import chunk_request_specs
from proto.model_config import ModelConfig
from proto.stream_config import StreamConfig

SESSION_ID = "run"
# Audio is pushed into the front-end in pieces of this many seconds, as a live source would deliver it.
PUSH_PIECE_S = 0.04


class FrameSink(Protocol):
    """Where ``run`` writes (``server.publishers.file.Mp4FilePublisher`` is one)."""

    def write(self, frames: np.ndarray, audio: np.ndarray) -> None: ...


class _FileChunks:
    """What both file schedulers share: the session's model and stream, its conditioning, the whole audio
    input, the noise seed and how much of the audio has been pushed into the front-end."""

    def __init__(
        self,
        model: ModelConfig,
        stream: StreamConfig,
        conditioning: I2VConditioning | None,
        audio: np.ndarray,
        seed: int,
        session_id: str,
    ) -> None:
        self.model = model
        self.stream = stream
        self.conditioning = conditioning
        self.audio = np.asarray(audio, dtype=np.float32)
        self.seed = seed
        self.session_id = session_id
        self._pushed = 0


class ChunkScheduler(_FileChunks):
    """Turns the session's audio into chunk requests (``PreparedInputs``), in order, as their audio arrives;
    the last chunk's ``pcm`` stops where the audio stops (its frames are trimmed to it).

    Args:
        audio: ``[N]`` float32 16 kHz mono, the whole input (pushed piece by piece as a live source would).
        conditioning: the session's I2V ``y`` source (i2v presets), else None.
    """

    def __init__(
        self,
        model: ModelConfig,
        stream: StreamConfig,
        featurizer: AudioFeaturizer,
        conditioning: I2VConditioning | None,
        audio: np.ndarray,
        seed: int,
        session_id: str = SESSION_ID,
    ) -> None:
        super().__init__(model, stream, conditioning, audio, seed, session_id)
        self.featurizer = featurizer
        spf = featurizer.config.samples_per_frame
        self.samples_per_frame = spf
        self.total_frames = max(1, math.ceil(audio.size / spf))
        self.piece = round(PUSH_PIECE_S * featurizer.config.sample_rate)

    @property
    def num_chunks(self) -> int:
        """Chunks whose frames cover the audio: the smallest chunk count reaching ``total_frames``."""
        chunk = 0
        while self.featurizer.output_frames(chunk).stop < self.total_frames:
            chunk += 1
        return chunk + 1

    def _next_ready(self) -> int | None:
        """Push audio until a chunk is ready (or the audio ends); its index, or None when all are taken."""
        while True:
            ready = self.featurizer.ready_chunks()
            if len(ready):
                return ready.start
            if self.featurizer.num_chunks is not None:
                return None
            if self._pushed < self.audio.size:
                piece = self.audio[self._pushed : self._pushed + self.piece]
                self.featurizer.push(piece)
                self._pushed += piece.size
            else:
                self.featurizer.end_of_stream()

    def __iter__(self) -> Iterator[PreparedInputs]:
        while True:
            index = self._next_ready()
            if index is None:
                return
            yield self._prepare(index)

    def _prepare(self, index: int) -> PreparedInputs:
        chunk_audio = self.featurizer.features_for_chunk(index)
        specs = chunk_request_specs(self.model, self.stream, 1, index)
        request, tensors = chunk_request(
            self.session_id, index, self.seed, specs, [chunk_audio], self.conditioning
        )
        frames = self.featurizer.output_frames(index)
        keep = max(0, min(len(frames), self.total_frames - frames.start))
        pcm = chunk_audio.pcm[: keep * self.samples_per_frame]
        return PreparedInputs(request, tensors, pcm, first_frame=frames.start)


class FrameChunkScheduler(_FileChunks):
    """``run``'s chunk requests for the InfiniteTalk family (module docstring): each chunk's per-video-frame
    audio windows from ``source``, its ``y``, and its whole frames' audio at the output rate.

    Args:
        source: ``ClipChunkAudio`` (the whole clip, upstream's offline features) or ``StreamChunkAudio`` (the
            live front-end, fed the file and then silence, as a live session goes on).
        audio: ``[N]`` float32 16 kHz mono, the whole input.
    """

    def __init__(
        self,
        model: ModelConfig,
        stream: StreamConfig,
        source: ClipChunkAudio | StreamChunkAudio,
        conditioning: I2VConditioning | None,
        audio: np.ndarray,
        seed: int,
        session_id: str = SESSION_ID,
    ) -> None:
        super().__init__(model, stream, conditioning, audio, seed, session_id)
        self.source = source
        self.sample_rate = output_sample_rate(stream.fps)
        self.samples_per_frame = self.sample_rate // stream.fps
        self.total_frames = max(1, math.ceil(self.audio.size * stream.fps / TARGET_SAMPLE_RATE))
        chunks = 1
        while chunk_frames(stream, chunks - 1).stop < self.total_frames:
            chunks += 1
        self.num_chunks = chunks
        self._out = resample(self.audio, TARGET_SAMPLE_RATE, self.sample_rate)

    def __iter__(self) -> Iterator[PreparedInputs]:
        for index in range(self.num_chunks):
            yield self._prepare(index)

    def _feed(self, index: int) -> None:
        """The live front-end gets the file up to what chunk ``index`` needs, silence past its end."""
        assert isinstance(self.source, StreamChunkAudio)
        need = self.source.required_samples(index)
        if need <= self._pushed:
            return
        piece = self.audio[self._pushed : need]
        self.source.push(np.concatenate([piece, np.zeros(need - self._pushed - piece.size, np.float32)]))
        self._pushed = need

    def _prepare(self, index: int) -> PreparedInputs:
        if isinstance(self.source, StreamChunkAudio):
            self._feed(index)
        chunk_audio = self.source.features_for_chunk(index)
        specs = chunk_request_specs(self.model, self.stream, 1, index)
        request, tensors = chunk_request(
            self.session_id, index, self.seed, specs, [chunk_audio], self.conditioning
        )
        frames = chunk_frames(self.stream, index)
        spf = self.samples_per_frame
        pcm = np.zeros(len(frames) * spf, np.float32)
        have = self._out[frames.start * spf : frames.stop * spf]
        pcm[: have.size] = have
        return PreparedInputs(request, tensors, pcm, first_frame=frames.start)


class _SinkOutput:
    """``run``'s output as the engine sees it: frames go to the MP4 sink as soon as they come (no playout
    pacing, so nothing is ever buffered and the session is always due); the last chunk is trimmed to its
    audio (``pcm`` holds exactly the frames to keep)."""

    end_reason = None

    def __init__(self, sink: FrameSink, samples_per_frame: int) -> None:
        self.sink = sink
        self.spf = samples_per_frame

    def put_chunk(self, frames: np.ndarray, pcm: np.ndarray, first_frame: int) -> None:
        self.sink.write(frames[: pcm.size // self.spf], pcm)

    def tick(self) -> None:
        pass

    def buffered_s(self) -> float:
        return 0.0


class RunSession:
    """``run``'s one session on the engine (``engine.pipeline.EngineSession``): its chunks come from the
    ``ChunkScheduler`` (the whole audio file through the streaming front-end), its frames go to the sink."""

    epoch = 0

    def __init__(
        self, scheduler: ChunkScheduler | FrameChunkScheduler, decoder: Any, sink: FrameSink
    ) -> None:
        self.id = scheduler.session_id
        self.scheduler = scheduler
        self.decoder = decoder
        self.output = _SinkOutput(sink, scheduler.samples_per_frame)
        self.times = SessionTimes()
        self.chunks_generated = 0
        self.error: str | None = None
        self._chunks = iter(scheduler)
        self._left = scheduler.num_chunks

    @property
    def live(self) -> bool:
        return self.error is None

    def due(self) -> bool:
        """Chunks are left to prepare (the file is generated flat out)."""
        return self.live and self._left > 0

    def prepare_chunk(self) -> PreparedInputs:
        self._left -= 1
        return next(self._chunks)

    def probe(self, frames: np.ndarray, pcm: np.ndarray) -> np.ndarray:
        return frames


class _RunOwner:
    """``engine.pipeline.EngineOwner`` of ``run``: one session, failures remembered for the exit code."""

    def __init__(self, session: RunSession) -> None:
        self.session = session
        self.group_error: str | None = None

    def pick(self, in_flight: Work | None) -> RunSession | None:
        return self.session if self.session.due() else None

    def schedulable(self, session: RunSession) -> bool:  # type: ignore[override]
        return session.live

    def session_failed(self, session_id: str, reason: str) -> bool:
        self.session.error = self.session.error or reason
        return False  # the run stops; its workers get Shutdown, not a SessionClose

    def group_failed(self, reason: str) -> None:
        self.group_error = self.group_error or reason


def run_stream(
    executor: Executor,
    session: RunSession,
    stream: StreamConfig,
    stats: StreamStats,
    *,
    overlap: bool,
    device: torch.device,
    memory: Callable[[], dict[int, int]] | None = None,
    on_chunk: Callable[[ChunkTiming], None] | None = None,
) -> None:
    """Every chunk of ``session`` through the engine (``engine.pipeline.ChunkEngine``: request t+1 out,
    decode t, prepare t+2, collect t+1; publishing on its own thread), each recorded in ``stats``.

    Raises:
        WorkerError: the score side failed (the message names the rank).
        RuntimeError: the session failed on the master (its input, the decoder or the sink).
    """
    start = time.perf_counter()

    def record(published: Published) -> None:
        chunk = published.chunk
        timing = ChunkTiming(
            chunk_index=chunk.prepared.request.chunk_index,
            frames=chunk.prepared.pcm.size // session.scheduler.samples_per_frame,
            prepare_s=published.stages["prepare"],
            score_s=published.stages["score"],
            transfer_s=published.stages["transfer"],
            decode_s=published.stages["decode"],
            publish_s=published.stages["publish"],
            published_at_s=published.published_at - start,
            ttbc_s=published.ttbc_s,
            rss_bytes=memory() if memory is not None else {},
            deadline_s=chunk.deadline_s,
            degraded=bool(chunk.prepared.request.step_indices),
        )
        stats.add(timing)
        if on_chunk is not None:
            on_chunk(timing)

    owner = _RunOwner(session)
    publisher = ChunkPublisher(None, lambda: [session], keeps_frames=False, on_published=record)
    engine = ChunkEngine(executor, stream, publisher, owner, overlap=overlap, device=device)
    publisher.start()
    try:
        while owner.group_error is None and session.live:
            if not engine.turn() and not engine.busy() and not session.due():
                break
    finally:
        publisher.stop()  # publishes what was decoded
    for _, reason in publisher.failures():
        session.error = session.error or reason
    if owner.group_error is not None:
        raise WorkerError(owner.group_error)
    if session.error is not None:
        raise RuntimeError(session.error)

"""The master of ``talkingmachines run``: session set-up, the chunk scheduler, and the stream's main loop.

Session set-up (once): the reference image is decoded, fitted to the stream's frame size and encoded by the
VAE into the I2V conditioning ``y`` (``decoder.encode.I2VConditioning``); CLIP encodes the image and umT5
the prompt (``server.conditioning``; seeded tiny random encoders by default). They travel to the workers in
a ``SessionOpen``.

Scheduling (per chunk): the audio file is fed through the same streaming front-end ``serve`` uses —
``AudioFeaturizer.push`` in real-time-sized pieces (40 ms), a chunk is requested as soon as
``ready_chunks`` says its audio window has arrived, and the stream ends with silence (``end_of_stream``)
so the video covers all the audio. Each ``ChunkRequest`` carries the chunk's ``y``, its audio window, the
per-latent-frame speaking flags and a noise seed derived from (session seed, chunk index).

Output: frames and the chunk's own audio (``ChunkAudio.pcm``) go to the MP4 publisher; the last chunk is
trimmed so the video has exactly ``ceil(audio duration × fps)`` frames.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from decoder.checkpoint import load_vae
from decoder.encode import I2VConditioning
from decoder.vae import WanVAE, build_vae
from engine.executor import ColocatedExecutor, DedicatedExecutor, Executor, WorkerError
from engine.pipeline import ChunkEngine, Work
from engine.publish import ChunkPublisher, Published
from proto.chunk_specs import (
    chunk_request_specs,
    chunk_result_specs,
    chunk_seed,
    pad_text_context,
    session_open_specs,
)
from proto.model_config import ModelConfig
from proto.stream_config import StreamConfig
from proto.topology import ProcessGroups
from proto.vae_config import get_vae_preset
from proto.wire import ChunkRequest, SessionClose, SessionOpen, TensorSpec, check_specs
from server.audio_features import (
    AudioFeaturizer,
    AudioFeaturizerConfig,
    check_matches,
    featurizer_config_for,
)
from server.audio_io import load_audio
from server.conditioning import ConditioningConfig, ConditioningEncoders
from server.image_io import load_image
from server.launcher import EXIT_PEER_LOST
from server.live_session import PreparedInputs, SessionTimes
from server.memory_plan import plan_for_options
from server.publishers.file import Mp4FilePublisher
from server.rank_registry import local_rss
from server.run_options import RunOptions
from server.stats import ChunkTiming, StreamStats
from workers.score_rank import ScoreRank

SESSION_ID = "run"
# Audio is pushed into the front-end in pieces of this many seconds, as a live source would deliver it.
PUSH_PIECE_S = 0.04


def build_master_vae(options: RunOptions, device: torch.device) -> WanVAE:
    """The VAE from ``--vae-checkpoint``, or seeded random weights (the same for every ``--seed``); float32
    whatever ``--dtype`` (the decoder autocasts instead), prepared for the ``--vae-*`` decode options
    (channels-last weights under ``--vae-channels-last``)."""
    cfg = get_vae_preset(options.vae_preset)
    if options.vae_checkpoint is not None:
        vae = load_vae(options.vae_checkpoint, cfg, device=device)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.seed)
            vae = build_vae(cfg).to(device)
    return options.decode_options().prepare(vae)


def build_featurizer(options: RunOptions, model: ModelConfig, stream: StreamConfig) -> AudioFeaturizer:
    """The streaming wav2vec2 front-end, on the stream's frame grid and the model's audio dims."""
    grid = {"fps": stream.fps, "chunk_latents": stream.chunk_latent_frames}
    common = {"checkpoint": options.wav2vec_checkpoint, "tiny_seed": options.tiny_encoder_seed, **grid}
    if model.audio is None:
        return AudioFeaturizer(AudioFeaturizerConfig(**common))
    featurizer = AudioFeaturizer(featurizer_config_for(model.audio, **common))
    check_matches(featurizer, model.audio)
    return featurizer


class FrameSink(Protocol):
    """Where ``run`` writes (``server.publishers.file.Mp4FilePublisher`` is one)."""

    def write(self, frames: np.ndarray, audio: np.ndarray) -> None: ...


class ChunkScheduler:
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
        self.model = model
        self.stream = stream
        self.featurizer = featurizer
        self.conditioning = conditioning
        self.audio = audio
        self.seed = seed
        self.session_id = session_id
        self.specs = chunk_request_specs(model, stream, num_characters=1)
        spf = featurizer.config.samples_per_frame
        self.samples_per_frame = spf
        self.total_frames = max(1, math.ceil(audio.size / spf))
        self.piece = round(PUSH_PIECE_S * featurizer.config.sample_rate)
        self._pushed = 0

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
        tensors: dict[str, torch.Tensor] = {}
        for spec in self.specs:
            if spec.name == "y":
                assert self.conditioning is not None
                tensors["y"] = self.conditioning.chunk(index).float().cpu().contiguous()
            elif spec.name == "audio":
                tensors["audio"] = chunk_audio.span[None].float().contiguous()
        declared = tuple(TensorSpec.of(name, t) for name, t in tensors.items())
        check_specs(f"ChunkRequest chunk {index}", self.specs, declared)
        speaking = (tuple(bool(s) for s in chunk_audio.speaking_latent.tolist()),)
        request = ChunkRequest(
            session_id=self.session_id,
            chunk_index=index,
            speaking=speaking,
            noise_seed=chunk_seed(self.seed, index),
            tensors=declared,
        )
        frames = self.featurizer.output_frames(index)
        keep = max(0, min(len(frames), self.total_frames - frames.start))
        pcm = chunk_audio.pcm[: keep * self.samples_per_frame]
        return PreparedInputs(request, tensors, pcm, first_frame=frames.start)


class RecordingSink:
    """Publishes to ``sink`` and appends the exact uint8 frames to a raw file (``--save-frames``).

    The file holds the frames ``[T, H, W, 3]`` back to back; read it with
    ``np.fromfile(path, np.uint8).reshape(-1, H, W, 3)``.
    It lets runs on different topologies be compared bit for bit, which the lossy MP4 cannot.
    """

    def __init__(self, sink: FrameSink, path: Path) -> None:
        self.sink = sink
        self._file = path.open("wb")

    def write(self, frames: np.ndarray, audio: np.ndarray) -> None:
        self.sink.write(frames, audio)
        self._file.write(np.ascontiguousarray(frames).tobytes())
        self._file.flush()

    def close(self) -> None:
        self._file.close()


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

    def __init__(self, scheduler: ChunkScheduler, decoder: Any, sink: FrameSink) -> None:
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


def open_session_message(
    options: RunOptions, model: ModelConfig, stream: StreamConfig, image: np.ndarray, device: torch.device
) -> tuple[SessionOpen, dict[str, torch.Tensor]]:
    """The ``SessionOpen`` and its tensors: umT5 prompt context, CLIP image tokens, the face box."""
    encoders = ConditioningEncoders.from_config(
        ConditioningConfig.for_model(
            model,
            clip_checkpoint=options.clip_checkpoint,
            umt5_checkpoint=options.umt5_checkpoint,
            tiny_seed=options.tiny_encoder_seed,
            device=str(device),
            dtype=options.torch_dtype,
        )
    )
    return single_character_open(model, stream, encoders, options.prompt, image)


def single_character_open(
    model: ModelConfig,
    stream: StreamConfig,
    encoders: ConditioningEncoders,
    prompt: str,
    image: np.ndarray,
    session_id: str = SESSION_ID,
) -> tuple[SessionOpen, dict[str, torch.Tensor]]:
    """The ``SessionOpen`` of a one-character stream (what ``run`` sends) and its tensors, from encoders
    already built (``training.evaluate`` keeps them across streams)."""
    tensors: dict[str, torch.Tensor] = {}
    for spec in session_open_specs(model, num_characters=1):
        if spec.name == "context":
            tensors["context"] = pad_text_context(encoders.encode_prompt(prompt), model)
        elif spec.name == "clip_fea":
            tensors["clip_fea"] = encoders.encode_image(image)
        elif spec.name == "face_boxes":
            # One character filling the frame: its audio acts everywhere.
            tensors["face_boxes"] = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    message = SessionOpen(
        session_id=session_id,
        latent_height=stream.latent_height,
        latent_width=stream.latent_width,
        num_characters=1,
        tensors=tuple(TensorSpec.of(name, t.contiguous()) for name, t in tensors.items()),
    )
    return message, tensors


def make_executor(
    options: RunOptions,
    groups: ProcessGroups,
    store: dist.Store,
    stream: StreamConfig,
    score_rank: ScoreRank | None,
) -> Executor:
    """The transport for this topology; ``score_rank`` is rank 0's own score share (colocated only)."""
    topology = groups.topology
    if topology.disaggregated:
        cuda = groups.device.type == "cuda"
        return DedicatedExecutor(
            groups,
            store,
            chunk_result_specs(stream),
            result_timeout_s=options.chunk_timeout_s,
            send_stream=torch.cuda.Stream() if cuda else None,
            recv_stream=torch.cuda.Stream() if cuda else None,
        )
    if score_rank is None:
        raise ValueError(f"{topology.name!r}: rank 0 is a score worker too and needs its ScoreRank")
    return ColocatedExecutor(groups, store, score_rank)


def _progress(total: int) -> Callable[[ChunkTiming], None]:
    def show(timing: ChunkTiming) -> None:
        ttbc = "   first" if timing.ttbc_s is None else f"{timing.ttbc_s * 1000:6.0f} ms"
        print(
            f"chunk {timing.chunk_index + 1}/{total}  TTBC {ttbc}  (score {timing.score_s * 1000:.0f} ms, "
            f"transfer {timing.transfer_s * 1000:.0f} ms, decode {timing.decode_s * 1000:.0f} ms, "
            f"publish {timing.publish_s * 1000:.0f} ms)",
            file=sys.stderr,
            flush=True,
        )

    return show


def run_master(
    options: RunOptions, groups: ProcessGroups, store: dist.Store, score_rank: ScoreRank | None = None
) -> int:
    """Rank 0 of ``talkingmachines run``: set up the session, stream every chunk, write the MP4.

    ``score_rank``: rank 0's score share in a colocated topology (None when the decoder is dedicated).
    Returns the exit code: 0, or ``EXIT_PEER_LOST`` when the score side failed (the error names the rank).
    """
    topology = groups.topology
    model = options.model_config
    stream = options.stream_config()
    device = groups.device
    executor = make_executor(options, groups, store, stream, score_rank)

    image = load_image(options.image, max_pixels=options.max_image_pixels)
    audio = load_audio(options.audio, max_seconds=options.max_audio_s)
    vae = build_master_vae(options, device)
    conditioning = None
    if model.has_image_branch:
        conditioning = I2VConditioning.for_stream(vae, image, stream)
    featurizer = build_featurizer(options, model, stream)
    scheduler = ChunkScheduler(model, stream, featurizer, conditioning, audio, options.seed)
    message, tensors = open_session_message(options, model, stream, image, device)

    stats = StreamStats(topology.name, stream.chunk_duration_s(1))
    ranks = list(range(topology.world_size))
    publisher = Mp4FilePublisher(options.out, width=stream.width, height=stream.height, fps=stream.fps)
    sink: FrameSink = publisher
    if options.save_frames is not None:
        sink = recorder = RecordingSink(publisher, options.save_frames)
    decoder = options.decode_options().session(vae, stream.height, stream.width)
    session = RunSession(scheduler, decoder, sink)
    print(
        f"talkingmachines run: {topology.name}, preset {options.preset}, dtype {options.dtype}, "
        f"{stream.width}x{stream.height} "
        f"@ {stream.fps} fps, {audio.size / featurizer.config.sample_rate:.2f} s of audio -> "
        f"{scheduler.num_chunks} chunks; weights: {options.weights}",
        file=sys.stderr,
        flush=True,
    )
    print(f"talkingmachines run: {plan_for_options(options).summary()}", file=sys.stderr, flush=True)
    try:
        executor.open_session(message, tensors)
        run_stream(
            executor,
            session,
            stream,
            stats,
            overlap=topology.disaggregated and options.overlap,
            device=device,
            memory=lambda: local_rss(store, ranks),
            on_chunk=_progress(scheduler.num_chunks) if options.progress else None,
        )
        executor.close_session(SessionClose(SESSION_ID))
        executor.shutdown("run finished")
    except WorkerError as exc:
        written = publisher.close()
        if options.save_frames is not None:
            recorder.close()
        print(
            f"talkingmachines run: error: {exc}\n"
            f"talkingmachines run: stopped after {len(stats.chunks)} of {scheduler.num_chunks} chunks; "
            f"the partial video ({written.frames} frames) is at {str(options.out)!r}",
            file=sys.stderr,
            flush=True,
        )
        _write_stats(options, stats, failed=str(exc))
        return EXIT_PEER_LOST
    written = publisher.close()
    if options.save_frames is not None:
        recorder.close()
    _write_stats(options, stats)
    print(stats.format_summary())
    print(f"wrote {str(written.path)!r}: {written.frames} frames, {written.duration_s:.2f} s")
    return 0


def _write_stats(options: RunOptions, stats: StreamStats, failed: str | None = None) -> None:
    if options.stats_json is None:
        return
    extra: dict[str, object] = {"preset": options.preset, "height": options.height, "width": options.width}
    if failed is not None:
        extra["error"] = failed
    stats.write_json(options.stats_json, extra)

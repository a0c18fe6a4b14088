"""The master of ``talkingmachines run``: session set-up, then the whole audio file as one session through the
engine, written to an MP4.

Session set-up (once): the reference image is decoded, fitted to the stream's frame size and encoded by the
VAE into the I2V conditioning ``y`` (``decoder.encode.I2VConditioning``); CLIP encodes the image and umT5
the prompt (``frontends.conditioning``; seeded tiny random encoders by default). They travel to the workers
in a ``SessionOpen`` (``engine.session_open``).

The stream: ``engine.file_stream`` feeds the file through the same streaming front-end ``serve`` uses and
runs its chunks through ``engine.pipeline.ChunkEngine`` (request t+1 out, decode t, prepare t+2, collect
t+1; publishing on its own thread): frames and the chunk's own audio go to the MP4 publisher, the last chunk
trimmed so the video has exactly ``ceil(audio duration × fps)`` frames. Each published chunk prints a
progress line and joins the run's TTBC and stage statistics (``engine.stats``).

The InfiniteTalk family (``model.audio_variant == "infinitetalk"``, SoulX-LiveAct) streams its own schedule
(``engine.file_stream.FrameChunkScheduler``): upstream's whole-clip audio windows (``--stream-audio``: the
live front-end's instead), its reference image cropped to the video size before the VAE and CLIP
(``engine.session_open.reference_image``), whole chunks at its fps with 48 kHz audio (24 fps).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from decoder.checkpoint import load_vae
from decoder.encode import I2VConditioning
from decoder.streaming import DecodeOptions
from decoder.vae import WanVAE, build_vae
from engine.executor import ColocatedExecutor, DedicatedExecutor, Executor, WorkerError
from engine.file_stream import (
    SESSION_ID,
    ChunkScheduler,
    FrameChunkScheduler,
    FrameSink,
    RunSession,
    run_stream,
)
from engine.memory_plan import plan_for_options
from engine.rank_registry import local_rss
from engine.session_open import FULL_FRAME, reference_image, session_open
from engine.stats import ChunkTiming, StreamStats
from engine.step_pipeline import StepPipelineExecutor
from frontends.audio_features import (
    AudioFeaturizer,
    AudioFeaturizerConfig,
    check_matches,
    featurizer_config_for,
)
from frontends.audio_io import TARGET_SAMPLE_RATE, load_audio, output_sample_rate
from frontends.conditioning import ConditioningConfig, ConditioningEncoders
from frontends.image_io import load_image
from frontends.infinitetalk_chunks import ClipChunkAudio, StreamChunkAudio, build_front_end
from proto.model_config import InfiniteTalkAudioConfig as ModelAudio
from proto.model_config import ModelConfig
from proto.stream_config import StreamConfig
from proto.topology import ProcessGroups
from proto.vae_config import get_vae_preset
from proto.wire import SessionClose, SessionOpen
from server.launcher import EXIT_PEER_LOST
from server.options import GroupOptions
from server.publishers.file import Mp4FilePublisher
from server.run_options import RunOptions
from workers.score_rank import ScoreRank


def build_master_vae(options: GroupOptions, device: torch.device) -> WanVAE:
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


def build_decode_options(options: GroupOptions, device: torch.device) -> DecodeOptions:
    """The sessions' decode options (``--vae-*``), carrying the shared taew2.1 decoder under
    ``--vae-decoder taew2.1``: ``--taehv-checkpoint``'s weights, or seeded random ones (``--seed``, tiny
    presets; ``GroupOptions.check`` refuses the real presets without a checkpoint). Float32 weights, as the
    Wan VAE's; ``--vae-channels-last`` lays them out channels-last."""
    decode = options.decode_options()
    if options.vae_decoder != "taew2.1":
        return decode
    from decoder.taehv import build_taehv, convert_to_channels_last, load_taehv

    if options.taehv_checkpoint is not None:
        fast = load_taehv(options.taehv_checkpoint, device=device)
    else:
        fast = build_taehv(seed=options.seed, device=device)
    if decode.channels_last:
        convert_to_channels_last(fast)
    return dataclasses.replace(decode, fast_decoder=fast)


def build_featurizer(options: RunOptions, model: ModelConfig, stream: StreamConfig) -> AudioFeaturizer:
    """The streaming wav2vec2 front-end, on the stream's frame grid and the model's audio dims."""
    grid = {"fps": stream.fps, "chunk_latents": stream.chunk_latent_frames}
    common = {"checkpoint": options.wav2vec_checkpoint, "tiny_seed": options.tiny_encoder_seed, **grid}
    if model.audio is None:
        return AudioFeaturizer(AudioFeaturizerConfig(**common))
    featurizer = AudioFeaturizer(featurizer_config_for(model.audio, **common))
    check_matches(featurizer, model.audio)
    return featurizer


def build_scheduler(
    options: RunOptions,
    model: ModelConfig,
    stream: StreamConfig,
    conditioning: I2VConditioning | None,
    audio: np.ndarray,
) -> ChunkScheduler | FrameChunkScheduler:
    """The run's chunk source, by the model's audio variant: the TalkingMachines streaming featurizer, or the
    InfiniteTalk family's per-video-frame windows (the whole clip's, or the live front-end's with
    ``--stream-audio``)."""
    if isinstance(model.audio, ModelAudio):
        front = build_front_end(model.audio, stream, options.wav2vec_checkpoint, options.tiny_encoder_seed)
        source: ClipChunkAudio | StreamChunkAudio = (
            StreamChunkAudio(front, stream) if options.stream_audio else ClipChunkAudio(front, audio, stream)
        )
        return FrameChunkScheduler(model, stream, source, conditioning, audio, options.seed)
    featurizer = build_featurizer(options, model, stream)
    return ChunkScheduler(model, stream, featurizer, conditioning, audio, options.seed)


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
    return session_open(SESSION_ID, model, stream, encoders, options.prompt, image, [FULL_FRAME])


def make_executor(
    options: RunOptions,
    groups: ProcessGroups,
    store: dist.Store,
    stream: StreamConfig,
    score_rank: ScoreRank | None,
) -> Executor:
    """The transport for this topology; ``score_rank`` is rank 0's own score share (colocated only)."""
    topology = groups.topology
    if topology.step_pipeline:
        recv = torch.cuda.Stream() if groups.device.type == "cuda" else None
        return StepPipelineExecutor(groups, store, stream, options.chunk_timeout_s, recv_stream=recv)
    if topology.disaggregated:
        cuda = groups.device.type == "cuda"
        return DedicatedExecutor(
            groups,
            store,
            stream,
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
    image = reference_image(model, stream, image)
    audio = load_audio(options.audio, max_seconds=options.max_audio_s)
    vae = build_master_vae(options, device)
    conditioning = None
    if model.has_image_branch:
        conditioning = I2VConditioning.for_stream(vae, image, stream)
    scheduler = build_scheduler(options, model, stream, conditioning, audio)
    message, tensors = open_session_message(options, model, stream, image, device)

    stats = StreamStats(topology.name, stream.chunk_duration_s(1))
    ranks = list(range(topology.world_size))
    publisher = Mp4FilePublisher(
        options.out,
        width=stream.width,
        height=stream.height,
        fps=stream.fps,
        sample_rate=output_sample_rate(stream.fps),
    )
    sink: FrameSink = publisher
    if options.save_frames is not None:
        sink = recorder = RecordingSink(publisher, options.save_frames)
    decoder = build_decode_options(options, device).session(vae, stream.height, stream.width)
    session = RunSession(scheduler, decoder, sink)
    print(
        f"talkingmachines run: {topology.name}, preset {options.preset}, dtype {options.dtype}, "
        f"attention {options.attention_backend}{', cuda graphs' if options.cuda_graphs else ''}, "
        f"{stream.width}x{stream.height} "
        f"@ {stream.fps} fps, {audio.size / TARGET_SAMPLE_RATE:.2f} s of audio -> "
        f"{scheduler.num_chunks} chunks; weights: {options.weights}; {options.fp8_summary}",
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

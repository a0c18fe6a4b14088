"""The InfiniteTalk / SoulX-LiveAct audio front-end cut into a stream's chunks: what a ``ChunkRequest`` of the
``infinitetalk`` audio variant carries (``proto.chunk_specs``: per character, per video frame of the chunk,
the window of wav2vec2 hidden states around it, ``[T, audio_window, layers, dim]``).

Alignment (upstream generate.py, workers/LIVEACT.md "Audio windows"): chunk c covers the video frames
``first_video_frame(c) .. + video_frames_in_chunk(c)`` of the stream (LiveAct: 0..20, then 32 a chunk), and
its windows are those of its own video frames, cut from features at ``fps`` (one feature frame per video
frame) and clamped at the ends of the feature sequence they come from:

- ``ClipChunkAudio`` (``run``): the whole clip's features (``InfiniteTalkAudio.clip_embedding``, upstream's
  non-streaming path), clamped at the clip's ends, so ``run`` conditions every chunk exactly as upstream's
  offline generation does;
- ``StreamChunkAudio`` (``serve``, and ``run --stream-audio``): the live rolling buffer
  (``InfiniteTalkAudioStream``: 4 s of left context, the window's 2 frames of look-ahead and the stretch's
  ~0.1 s, see frontends/infinitetalk_audio.py for its error against the clip). It has the streaming
  featurizer's interface (``required_samples``, ``output_frames``, ``push``, ``push_silence``,
  ``silence_from``, ``features_for_chunk``), so ``server.speech_feed.SpeechFeed`` drives either family. The
  stream never ends: past the speech it goes on with silence, as a live session does.

Speaking flags (``ChunkRequest.speaking``, one per latent frame): a latent frame speaks when one of its video
frames' 16 kHz input audio has an RMS above ``speaking_rms_threshold``. LiveAct's model has no silence
embedding; the flags are sent as for the other family.

Time grid: video frame v at ``fps`` plays input samples ``[frame_sample(v), frame_sample(v + 1))`` with
``frame_sample(v) = v · 16000 // fps`` (the stretch to 25 Hz features maps input time t to feature frame
``t · fps``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from frontends.audio_io import TARGET_SAMPLE_RATE, pushed_pcm
from frontends.infinitetalk_audio import InfiniteTalkAudio, InfiniteTalkAudioConfig, frame_windows
from proto.model_config import InfiniteTalkAudioConfig as ModelAudio
from proto.stream_config import VAE_STRIDE, StreamConfig

SPEAKING_RMS_THRESHOLD = 1e-3


@dataclass(frozen=True)
class FrameChunkAudio:
    """One character's audio inputs of one chunk.

    span: ``[T, audio_window, layers, dim]`` float32, the windows of the chunk's T video frames (the wire's
        per-character ``audio``).
    speaking: ``[F]`` bool per latent frame of the chunk.
    """

    chunk_index: int
    span: torch.Tensor
    speaking: torch.Tensor

    @property
    def speaking_latent(self) -> torch.Tensor:
        return self.speaking


def frame_sample(frame: int, fps: int) -> int:
    """First 16 kHz input sample of video frame ``frame``."""
    return frame * TARGET_SAMPLE_RATE // fps


def chunk_frames(stream: StreamConfig, index: int) -> range:
    """Video frames of chunk ``index`` (LiveAct: 0..20 for chunk 0, then 32 a chunk)."""
    first = stream.first_video_frame(index)
    return range(first, first + stream.video_frames_in_chunk(index))


def latent_frames(stream: StreamConfig, index: int) -> list[range]:
    """The video frames of each latent frame of chunk ``index``: a stream's latent frame 0 is video frame 0
    alone, every later latent frame 4 video frames."""
    frames = chunk_frames(stream, index)
    stride = VAE_STRIDE[0]
    if index == 0:
        return [range(0, 1)] + [
            range(1 + stride * (j - 1), 1 + stride * j) for j in range(1, len(frames) // stride + 1)
        ]
    return [
        range(frames.start + stride * j, frames.start + stride * (j + 1))
        for j in range(len(frames) // stride)
    ]


def speaking_flags(
    samples: np.ndarray, first_sample: int, stream: StreamConfig, index: int, threshold: float
) -> torch.Tensor:
    """``[F]`` bool: per latent frame of chunk ``index``, whether one of its video frames is louder than
    ``threshold`` (RMS); ``samples`` are 16 kHz input samples from absolute index ``first_sample``."""
    flags = []
    for frames in latent_frames(stream, index):
        loud = False
        for v in frames:
            lo, hi = (
                frame_sample(v, stream.fps) - first_sample,
                frame_sample(v + 1, stream.fps) - first_sample,
            )
            piece = samples[max(lo, 0) : max(hi, 0)].astype(np.float64)
            if piece.size and np.sqrt(np.mean(piece**2)) > threshold:
                loud = True
                break
        flags.append(loud)
    return torch.tensor(flags, dtype=torch.bool)


def check_matches(audio: InfiniteTalkAudio, model: ModelAudio) -> None:
    """Fail at start-up when the front-end's windows would not fit the model's audio projection."""
    have = (audio.config.window, len(audio.layers), audio.hidden_size)
    want = (model.audio_window, model.wav2vec_layers, model.wav2vec_dim)
    if have != want:
        raise ValueError(
            f"audio front-end gives (window, layers, hidden) = {have}, the model's audio projection expects "
            f"{want}: pick the wav2vec2 checkpoint/layers that match the preset"
        )


class _ChunkAudio:
    """What both chunk sources share: the front-end, the stream's chunks and the speaking threshold."""

    def __init__(self, audio: InfiniteTalkAudio, stream: StreamConfig, speaking_rms_threshold: float) -> None:
        if audio.config.fps != stream.fps:
            raise ValueError(
                f"the audio front-end stretches for {audio.config.fps} fps, the stream plays {stream.fps} fps"
            )
        self.audio = audio
        self.stream = stream
        self.threshold = speaking_rms_threshold

    def output_frames(self, index: int) -> range:
        return chunk_frames(self.stream, index)


class ClipChunkAudio(_ChunkAudio):
    """A whole clip's features cut into chunks (``run``): upstream's offline windows, clamped at the clip.

    Args:
        audio: the front-end (its ``fps`` must be the stream's).
        samples: ``[N]`` float32 16 kHz mono, the whole clip.
    """

    def __init__(
        self,
        audio: InfiniteTalkAudio,
        samples: np.ndarray,
        stream: StreamConfig,
        speaking_rms_threshold: float = SPEAKING_RMS_THRESHOLD,
    ) -> None:
        super().__init__(audio, stream, speaking_rms_threshold)
        self.samples = np.asarray(samples, dtype=np.float32)
        self.embedding = audio.clip_embedding(self.samples)  # [frames, L, D]

    def features_for_chunk(self, index: int) -> FrameChunkAudio:
        frames = self.output_frames(index)
        span = frame_windows(self.embedding, frames.start, frames.stop, self.audio.config.window)
        speaking = speaking_flags(self.samples, 0, self.stream, index, self.threshold)
        return FrameChunkAudio(index, span.contiguous(), speaking)


class StreamChunkAudio(_ChunkAudio):
    """One character's live audio cut into chunks (``serve``): ``InfiniteTalkAudioStream`` windows of each
    chunk's video frames, with the streaming featurizer's interface (module docstring).

    Chunks are taken in increasing order; a chunk is ready once ``required_samples(index)`` samples have
    been pushed (its last frame's window look-ahead through the stretch).
    """

    sample_rate = TARGET_SAMPLE_RATE

    def __init__(
        self,
        audio: InfiniteTalkAudio,
        stream: StreamConfig,
        speaking_rms_threshold: float = SPEAKING_RMS_THRESHOLD,
    ) -> None:
        super().__init__(audio, stream, speaking_rms_threshold)
        self._features = audio.stream()
        self._raw = np.zeros(
            0, np.float32
        )  # pushed input from absolute sample _raw_offset on (speaking flags)
        self._raw_offset = 0
        self._received = 0
        self._next_chunk = 0

    def required_samples(self, index: int) -> int:
        """Input samples (from the stream start) that make chunk ``index`` ready."""
        return self._features.required_samples(self.output_frames(index).stop)

    def ready(self, index: int) -> bool:
        return self._received >= self.required_samples(index)

    def push(self, pcm: np.ndarray) -> None:
        """Append speech: ``[N]`` float32 16 kHz samples."""
        pcm = pushed_pcm(pcm)
        self._features.push(pcm)
        self._raw = np.concatenate([self._raw, pcm])
        self._received += pcm.size

    def push_silence(self, num_samples: int) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples={num_samples} must be >= 0")
        self.push(np.zeros(num_samples, np.float32))

    def silence_from(self, sample: int) -> None:
        """Barge-in: every held sample from absolute index ``sample`` on becomes silence."""
        self._features.silence_from(sample)
        start = max(0, sample - self._raw_offset)
        if start < self._raw.size:
            self._raw = self._raw.copy()
            self._raw[start:] = 0.0

    def features_for_chunk(self, index: int) -> FrameChunkAudio:
        if index < self._next_chunk:
            raise RuntimeError(f"chunk {index} was already taken; chunks are taken in increasing order")
        if not self.ready(index):
            raise RuntimeError(
                f"chunk {index} is not ready: it needs {self.required_samples(index)} samples, "
                f"{self._received} have arrived; push more audio (or push_silence) first"
            )
        frames = self.output_frames(index)
        span = self._features.windows(frames.start, frames.stop)
        speaking = speaking_flags(self._raw, self._raw_offset, self.stream, index, self.threshold)
        self._next_chunk = index + 1
        drop = min(max(frame_sample(frames.stop, self.stream.fps) - self._raw_offset, 0), self._raw.size)
        self._raw = self._raw[drop:]
        self._raw_offset += drop
        return FrameChunkAudio(index, span.contiguous(), speaking)


def build_front_end(
    model: ModelAudio, stream: StreamConfig, checkpoint: str | None, tiny_seed: int = 0
) -> InfiniteTalkAudio:
    """The family's front-end for ``run`` and ``serve``: wav2vec2 from ``checkpoint`` (a local folder in
    chinese-wav2vec2-base layout; nothing is downloaded) or the tiny random one at the model's wav2vec2 width
    and depth (seed ``tiny_seed``), stretching to the stream's fps; checked against the model's audio
    projection. Upstream LiveAct's gain (×3) and window (5)."""
    config = InfiniteTalkAudioConfig(
        checkpoint=checkpoint,
        fps=stream.fps,
        window=model.audio_window,
        tiny_hidden_size=model.wav2vec_dim,
        tiny_layers=model.wav2vec_layers,
        tiny_seed=tiny_seed,
    )
    audio = InfiniteTalkAudio(config)
    check_matches(audio, model)
    return audio

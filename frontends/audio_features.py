"""Streaming wav2vec2 audio front-end: 16 kHz PCM in, per-latent-frame audio features out.

Time grid (16 fps video, 4 video frames per latent frame, 1000 samples per video frame at 16 kHz):

- video frame `v` shows the audio samples `[1000 v, 1000 (v + 1))`, i.e. `[v/16, (v+1)/16)` s;
- latent frame `k` covers the 4 video frames `4k-3 .. 4k`. Latent frame 0 therefore covers video
  frames -3..0: the first chunk decodes to 9 frames (0..8) and frames before 0 are pre-stream silence;
- chunk `c` (of `chunk_latents` = 3) holds latent frames `3c .. 3c+2` and its output video frames are
  `max(0, 12c-3) .. 12c+8` (9 frames for chunk 0, 12 afterwards);
- the audio window of latent frame `k` is latent frames `k-2 .. k+2` (5, centred). A chunk is ready once
  audio reaches the end of its last latent frame plus the window's look-ahead of 2 latent frames:
  sample `1000 * (12c + 17)`. It never waits for more, and never uses more (so features do not depend on
  how the audio was split into pushes or when it arrived: `run` and `serve` compute the same thing).

Features: wav2vec2 runs at 50 Hz on a rolling buffer of `left_context_s` seconds before the chunk's
window plus the window itself (zeros before the stream start). The per-layer transformer outputs
(`hidden_states[1:]`, MultiTalk's choice) are linearly interpolated in time to the centre of each
video frame. Audio after the buffer's end is unseen: the 2 look-ahead latent frames, which only feed
the windows, see truncated right context (as SoulX-FlashTalk's rolling featuriser does).

Silence is represented by zero samples: pre-stream audio, `push_silence`, and the tail padded by
`end_of_stream` are zeros, featurised by wav2vec2 in context (MultiTalk's listener representation:
wav2vec2 of a zero waveform, not a zero feature). A per-video-frame speaking flag (frame RMS above
`speaking_rms_threshold`) lets the score model swap in its silence embedding where it is false.

Exact equality with a whole-clip computation is impossible: wav2vec2's self-attention is global and
its first conv layer (base models, `feat_extract_norm="group"`) normalises each channel over the whole
input, so every output frame depends on every input sample. With enough left context the difference
for frames far from the buffer edges is small (see tests/server/test_audio_features.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

from frontends.audio_io import TARGET_SAMPLE_RATE, pushed_pcm
from proto.model_config import AudioConfig

# wav2vec2's CNN front-end: 400-sample receptive field, 320-sample hop (20 ms) at 16 kHz.
_W2V_RECEPTIVE_FIELD = 400
_W2V_HOP = 320


@dataclass(frozen=True)
class AudioFeaturizerConfig:
    """Settings of the streaming audio front-end.

    checkpoint: local directory for `Wav2Vec2Model.from_pretrained` (no downloads); None builds a tiny
        random wav2vec2 (`tiny_layers` layers of width `tiny_hidden_size`, the `tiny` model preset's audio
        dims) seeded with `tiny_seed`.
    left_context_s: seconds of audio before the chunk's window fed to wav2vec2 with it.
    layers: 0-based transformer layer indices to keep, in order; None keeps all of them.
    normalize: zero-mean/unit-variance scaling of the model input (over the whole rolling buffer).
        None reads `do_normalize` from the checkpoint's preprocessor_config.json (False for tiny).
    speaking_rms_threshold: a video frame counts as speech when its RMS (full scale 1.0) exceeds this.
    """

    checkpoint: str | None = None
    sample_rate: int = TARGET_SAMPLE_RATE
    fps: int = 16
    frames_per_latent: int = 4
    chunk_latents: int = 3
    window_latents: int = 5
    left_context_s: float = 4.0
    layers: tuple[int, ...] | None = None
    normalize: bool | None = None
    speaking_rms_threshold: float = 1e-3
    device: str = "cpu"
    tiny_hidden_size: int = 32
    tiny_layers: int = 2
    tiny_seed: int = 0

    def __post_init__(self) -> None:
        if self.sample_rate != TARGET_SAMPLE_RATE:
            raise ValueError(
                f"audio front-end runs at {TARGET_SAMPLE_RATE} Hz, got sample_rate={self.sample_rate}"
            )
        if self.fps <= 0 or self.sample_rate % self.fps:
            raise ValueError(f"fps={self.fps} must divide the sample rate {self.sample_rate} Hz")
        if self.window_latents < 1 or self.window_latents % 2 == 0:
            raise ValueError(
                f"window_latents={self.window_latents} must be odd (a window centred on a frame)"
            )
        if self.frames_per_latent < 1 or self.chunk_latents < 1:
            raise ValueError("frames_per_latent and chunk_latents must be positive")
        if self.left_context_s < 0:
            raise ValueError(f"left_context_s={self.left_context_s} must be >= 0")

    @property
    def samples_per_frame(self) -> int:
        """Audio samples per video frame (1000 at 16 kHz, 16 fps)."""
        return self.sample_rate // self.fps

    @property
    def lookahead_latents(self) -> int:
        """Latent frames of future audio a latent frame's window needs (2 for a window of 5)."""
        return self.window_latents // 2


@dataclass(frozen=True)
class ChunkAudio:
    """Everything the master sends about one chunk's audio.

    span: `[F + W - 1, P, L, D]` float32 — the latent frames the chunk's windows cover, in time order:
        latent frames `3c - 2 .. 3c + 4` for chunk c (F = chunk_latents = 3, W = window_latents = 5),
        P = frames_per_latent video-rate vectors in time order, L = kept wav2vec2 layers, D = hidden size.
        This is the wire form (`workers.audio` takes `[B, C, F + W - 1, P, L, D]` and unfolds it).
    speaking: `[F, P]` bool per video-rate slot of the chunk's own latent frames.
    pcm: `[n_frames * samples_per_frame]` float32 16 kHz audio of the chunk's output video frames
        (9 frames for chunk 0, 12 afterwards), what the publisher plays with them.
    """

    chunk_index: int
    span: torch.Tensor
    speaking: torch.Tensor
    pcm: np.ndarray

    @property
    def features(self) -> torch.Tensor:
        """`[F, W, P, L, D]`: the window of each of the chunk's latent frames (slot `W//2` is the frame
        itself, slot 0 is 2 latent frames earlier). The projection input of latent frame f is
        `features[f].flatten()` (W*P*L*D values, window-major)."""
        window = self.span.shape[0] - self.speaking.shape[0] + 1
        return self.span.unfold(0, window, 1).permute(0, 4, 1, 2, 3).contiguous()

    @property
    def speaking_latent(self) -> torch.Tensor:
        """`[F]` bool: a latent frame speaks when any of its video frames does."""
        return self.speaking.any(dim=1)


def tiny_wav2vec2_config(hidden_size: int = 32, num_layers: int = 2) -> Wav2Vec2Config:
    """A small random wav2vec2 with the real CNN geometry (20 ms hop) and a 128-tap positional conv."""
    if hidden_size % 2:
        raise ValueError(f"tiny wav2vec2 hidden size {hidden_size} must be even (2 attention heads)")
    return Wav2Vec2Config(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        conv_dim=(32,) * 7,
        num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=math.gcd(16, hidden_size),
        apply_spec_augment=False,
        layerdrop=0.0,
    )


def build_wav2vec2(config: AudioFeaturizerConfig) -> tuple[Wav2Vec2Model, bool]:
    """Load (or build the tiny random) wav2vec2 in eval mode; returns it and whether to normalise input."""
    if config.checkpoint is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.tiny_seed)
            model = Wav2Vec2Model(tiny_wav2vec2_config(config.tiny_hidden_size, config.tiny_layers))
        normalize = bool(config.normalize)
    else:
        path = Path(config.checkpoint)
        if not path.is_dir():
            raise FileNotFoundError(
                f"wav2vec2 checkpoint {str(path)!r} is not a directory — pass a local Hugging Face model "
                "folder (config.json + weights), or no checkpoint for the tiny random model"
            )
        model = Wav2Vec2Model.from_pretrained(str(path), local_files_only=True)
        normalize = config.normalize if config.normalize is not None else _checkpoint_normalizes(path)
    return model.to(config.device).eval(), normalize


def _checkpoint_normalizes(path: Path) -> bool:
    preprocessor = path / "preprocessor_config.json"
    if not preprocessor.is_file():
        return False
    return bool(json.loads(preprocessor.read_text()).get("do_normalize", False))


def featurizer_config_for(audio: AudioConfig, **overrides: Any) -> AudioFeaturizerConfig:
    """Front-end settings whose frame grid and tiny model dims match a model's audio path."""
    fields: dict[str, Any] = {
        "frames_per_latent": audio.frames_per_latent,
        "window_latents": audio.window,
        "tiny_hidden_size": audio.wav2vec_dim,
        "tiny_layers": audio.wav2vec_layers,
    }
    fields.update(overrides)
    return AudioFeaturizerConfig(**fields)


def check_matches(featurizer: AudioFeaturizer, audio: AudioConfig) -> None:
    """Fail at start-up when the featuriser's output would not fit the model's audio projection."""
    have = (
        featurizer.config.window_latents,
        featurizer.config.frames_per_latent,
        len(featurizer.layers),
        featurizer.hidden_size,
    )
    want = (audio.window, audio.frames_per_latent, audio.wav2vec_layers, audio.wav2vec_dim)
    if have != want:
        raise ValueError(
            f"audio front-end gives (window, frames_per_latent, layers, hidden) = {have}, the model's audio "
            f"projection expects {want} — pick the wav2vec2 checkpoint/layers that match the preset"
        )


class AudioFeaturizer:
    """Per-character streaming audio buffer and wav2vec2 featuriser (one instance per character).

    Usage: `push(pcm)` as audio arrives (`push_silence(n)` while the character listens), then for each
    index in `ready_chunks()` call `features_for_chunk(index)`; `end_of_stream()` pads the tail with
    silence so the chunk holding the last audio becomes ready, and fixes `num_chunks`.
    Chunks are taken in increasing order; audio no later chunk needs is dropped.
    """

    def __init__(self, config: AudioFeaturizerConfig, model: Wav2Vec2Model | None = None) -> None:
        self.config = config
        if model is None:
            model, normalize = build_wav2vec2(config)
        else:
            normalize = bool(config.normalize)
        self.model = model
        self.normalize = normalize
        n_layers = model.config.num_hidden_layers
        for layer in config.layers or ():
            if not 0 <= layer < n_layers:
                raise ValueError(
                    f"layers={config.layers} names layer {layer}, the model has {n_layers} (0-based)"
                )
        self.layers = tuple(config.layers) if config.layers is not None else tuple(range(n_layers))
        self.hidden_size = int(model.config.hidden_size)
        spf = config.samples_per_frame
        fpl = config.frames_per_latent
        self._left_context = round(config.left_context_s * config.sample_rate)
        # Latent frames each chunk's windows span, relative to the chunk's first latent frame.
        self._first_latent = -config.lookahead_latents
        self._span_latents = config.chunk_latents + 2 * config.lookahead_latents
        self._span_samples = self._span_latents * fpl * spf
        self._buffer = np.zeros(0, dtype=np.float32)
        self._offset = 0  # absolute index of self._buffer[0]
        self._received = 0  # absolute samples pushed (audio and silence)
        self._audio_end = 0  # absolute end of the last real (non-silence) push
        self._ended = False
        self._next_chunk = 0

    # --- time grid -------------------------------------------------------------------------------------
    def _latent_start_sample(self, latent: int) -> int:
        """First sample of latent frame `latent` (its first video frame is `4*latent - 3`)."""
        fpl, spf = self.config.frames_per_latent, self.config.samples_per_frame
        return (fpl * latent - (fpl - 1)) * spf

    def required_samples(self, chunk_index: int) -> int:
        """Samples (from the stream start) that must have arrived before chunk `chunk_index` is ready."""
        last = chunk_index * self.config.chunk_latents + self.config.chunk_latents - 1
        return self._latent_start_sample(last + self.config.lookahead_latents + 1)

    def output_frames(self, chunk_index: int) -> range:
        """Video frame indices chunk `chunk_index` decodes to (0..8 for chunk 0, then 12 per chunk)."""
        first = (
            self._latent_start_sample(chunk_index * self.config.chunk_latents)
            // self.config.samples_per_frame
        )
        last = self._latent_start_sample((chunk_index + 1) * self.config.chunk_latents)
        return range(max(first, 0), last // self.config.samples_per_frame)

    # --- ingest ----------------------------------------------------------------------------------------
    def push(self, pcm: np.ndarray) -> None:
        """Append speech audio: `[N]` float32 samples at 16 kHz (resample first with frontends.audio_io)."""
        if self._ended:
            raise RuntimeError("push() after end_of_stream(): open a new AudioFeaturizer for a new stream")
        self._append(pushed_pcm(pcm))
        self._audio_end = self._received

    def push_silence(self, num_samples: int) -> None:
        """Append `num_samples` of silence (zeros, speaking flag false): the character is listening."""
        if self._ended:
            raise RuntimeError("push_silence() after end_of_stream()")
        if num_samples < 0:
            raise ValueError(f"num_samples={num_samples} must be >= 0")
        self._append(np.zeros(num_samples, dtype=np.float32))

    def silence_from(self, sample: int) -> None:
        """Barge-in: replace every held sample from absolute index `sample` on with silence.

        Chunks already taken are unaffected (their samples left the buffer or are before `sample`); audio
        pushed afterwards continues the same timeline, so the stream's length and timing do not change.
        """
        start = max(0, sample - self._offset)
        if start < self._buffer.size:
            self._buffer = self._buffer.copy()
            self._buffer[start:] = 0.0
        self._audio_end = min(self._audio_end, max(sample, 0))

    def _append(self, pcm: np.ndarray) -> None:
        self._buffer = np.concatenate([self._buffer, pcm])
        self._received += pcm.size

    def end_of_stream(self) -> None:
        """No more audio: the stream ends with silence, so every chunk up to `num_chunks` becomes ready."""
        self._ended = True

    @property
    def num_chunks(self) -> int | None:
        """After `end_of_stream`: chunks whose output video frames cover all received audio; else None."""
        if not self._ended:
            return None
        spf = self.config.samples_per_frame
        frames = max(1, math.ceil(self._audio_end / spf))
        chunk = 0
        while self.output_frames(chunk).stop < frames:
            chunk += 1
        return chunk + 1

    def ready_chunks(self) -> range:
        """Indices of chunks not yet taken whose audio (with look-ahead) has fully arrived."""
        if self._ended:
            return range(self._next_chunk, max(self._next_chunk, self.num_chunks or 0))
        ready = self._next_chunk
        while self.required_samples(ready) <= self._received:
            ready += 1
        return range(self._next_chunk, ready)

    # --- features --------------------------------------------------------------------------------------
    def _samples(self, start: int, stop: int) -> np.ndarray:
        """Absolute samples `[start, stop)`; zeros before the stream and after its end (silence)."""
        out = np.zeros(stop - start, dtype=np.float32)
        lo, hi = max(start, self._offset), min(stop, self._offset + self._buffer.size)
        if hi > lo:
            out[lo - start : hi - start] = self._buffer[lo - self._offset : hi - self._offset]
        return out

    def features_for_chunk(self, chunk_index: int) -> ChunkAudio:
        """Audio features, speaking flags and PCM for chunk `chunk_index` (layout in `ChunkAudio`)."""
        if chunk_index < self._next_chunk:
            raise RuntimeError(
                f"chunk {chunk_index} was already taken and its audio dropped; chunks are taken in "
                f"increasing order (next is {self._next_chunk})"
            )
        if not self._ended and chunk_index not in self.ready_chunks():
            raise RuntimeError(
                f"chunk {chunk_index} is not ready: it needs {self.required_samples(chunk_index)} samples, "
                f"{self._received} have arrived — push more audio (or push_silence) first"
            )
        cfg = self.config
        spf, fpl = cfg.samples_per_frame, cfg.frames_per_latent
        window_start = self._latent_start_sample(chunk_index * cfg.chunk_latents + self._first_latent)
        window_stop = window_start + self._span_samples
        buffer_start = self._buffer_start(window_start)
        wave = self._samples(buffer_start, window_stop)

        frame_features = self._video_rate_features(wave, buffer_start, window_start)  # [S*P, L, D]
        span = frame_features.reshape(self._span_latents, fpl, len(self.layers), self.hidden_size)

        own_start = window_start + cfg.lookahead_latents * fpl * spf
        own = self._samples(own_start, own_start + cfg.chunk_latents * fpl * spf)
        rms = np.sqrt(np.mean(own.reshape(cfg.chunk_latents, fpl, spf).astype(np.float64) ** 2, axis=-1))
        speaking = torch.from_numpy(rms > cfg.speaking_rms_threshold)

        frames = self.output_frames(chunk_index)
        pcm = self._samples(frames.start * spf, frames.stop * spf)

        self._next_chunk = chunk_index + 1
        self._drop_before(
            self._buffer_start(
                self._latent_start_sample(self._next_chunk * cfg.chunk_latents + self._first_latent)
            )
        )
        return ChunkAudio(chunk_index=chunk_index, span=span, speaking=speaking, pcm=pcm)

    def _buffer_start(self, window_start: int) -> int:
        """First sample fed to wav2vec2 for a window: `left_context` earlier, rounded down to the 20 ms hop
        grid of the stream (sample 0 is on it) so every chunk's 50 Hz frames sit at the same instants as a
        whole-stream computation's; otherwise odd and even chunks would sample the audio 10 ms apart."""
        return (window_start - self._left_context) // _W2V_HOP * _W2V_HOP

    def _drop_before(self, absolute: int) -> None:
        drop = min(max(absolute - self._offset, 0), self._buffer.size)
        if drop:
            self._buffer = self._buffer[drop:]
            self._offset += drop

    @torch.no_grad()
    def _video_rate_features(self, wave: np.ndarray, buffer_start: int, window_start: int) -> torch.Tensor:
        """wav2vec2 layer outputs at the centre of each video frame of the window.

        Args:
            wave: `[N]` samples, absolute indices `buffer_start ..`.
            window_start: absolute first sample of the window (a video frame boundary).

        Returns:
            `[span_latents * frames_per_latent, L, D]` float32 on CPU.
        """
        x = torch.from_numpy(wave)[None].to(self.config.device)
        if self.normalize:
            x = (x - x.mean()) / torch.sqrt(x.var() + 1e-7)
        hidden = self.model(x, output_hidden_states=True).hidden_states
        stacked = torch.stack([hidden[1 + i][0] for i in self.layers], dim=1).float().cpu()  # [T, L, D]
        spf = self.config.samples_per_frame
        n_frames = self._span_latents * self.config.frames_per_latent
        centres = window_start - buffer_start + spf * torch.arange(n_frames, dtype=torch.float64) + spf / 2
        # Output frame j of wav2vec2 is centred on sample 320 j + 200 of its input.
        position = ((centres - _W2V_RECEPTIVE_FIELD / 2) / _W2V_HOP).clamp(0, stacked.shape[0] - 1)
        lo = position.floor().long()
        hi = (lo + 1).clamp(max=stacked.shape[0] - 1)
        w = (position - lo).float()[:, None, None]
        return stacked[lo] * (1 - w) + stacked[hi] * w

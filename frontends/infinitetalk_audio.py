"""Audio front-end of the InfiniteTalk / SoulX-LiveAct family: per-video-frame wav2vec2 embeddings.

Upstream's pipeline (SoulX-LiveAct `generate.py` + `util_liveact.py`; InfiniteTalk's `get_embedding` is the
same minus the time stretch, see below), reproduced here for a whole clip (`InfiniteTalkAudio.clip_embedding`)
and approximated over a rolling buffer for live audio (`InfiniteTalkAudioStream`):

1. Time stretch. Features are computed at a fixed 25 frames per second (`FEATURE_RATE`); to drive video at
   `fps` (LiveAct's `--fps`, default 24), the audio is first sped up by `25 / fps` with SoX's `tempo` effect
   (WSOLA: pitch kept, duration divided by the factor), so feature frame `j` of the stretched audio lines up
   with video frame `j` at `fps`. At fps 25 the factor is 1 and SoX skips the effect. `Tempo` below is our
   implementation of SoX's algorithm (default "music" profile: 82 ms segments, 14.68 ms search, 12 ms
   overlap, linear search); it matches the `sox` program within 1e-7 (whose float output lies on a 2^-24
   grid). Input is 16 kHz mono float32.
2. Gain: LiveAct multiplies the 16 kHz audio by 3.0 (`gain`). InfiniteTalk instead loudness-normalises the
   clip to -23 LUFS (pyloudnorm), which is also one scalar gain for the whole clip. Both cancel in step 3
   except through its 1e-7 variance epsilon, so pyloudnorm is not a dependency: `gain=1.0, fps=25` gives
   InfiniteTalk's features within 3e-6 of its loudness-normalised ones (tiny model; the test allows 1e-4).
3. Normalisation: `Wav2Vec2FeatureExtractor` from the checkpoint folder's preprocessor_config.json; with
   `do_normalize` (chinese-wav2vec2-base: true) the whole clip is scaled to zero mean, unit variance.
4. wav2vec2 with one change (upstream subclasses `Wav2Vec2Model`): the CNN feature encoder's 50 Hz output
   (`T = (N - 400) // 320 + 1` frames for N samples) is linearly interpolated (`align_corners=True`) to
   `int(N / 16000 * 25)` frames *before* the feature projection and the transformer, so the encoder runs
   at 25 Hz. Here a forward hook on `model.feature_extractor` does that interpolation, and the stock model
   does the rest.
5. Kept: `hidden_states[1:]`, the output of every transformer layer (12 for a base model), stacked into
   `[frames, layers, hidden]` (`[N, 12, 768]` for chinese-wav2vec2-base). Upstream LiveAct runs wav2vec2 in
   bfloat16 on the GPU (`dtype`); InfiniteTalk and this module's default run float32.
6. Per-frame window (`frame_windows`, upstream's `get_audio_emb`): video frame `v` takes frames
   `v-2 .. v+2` (`window` = 5), indices clamped to `[0, frames-1]`, giving `[n, 5, layers, hidden]` for a
   range of n frames (`[53, 5, 12, 768]` per LiveAct iteration; upstream adds a leading batch dim of 1).
   The DiT's audio projection then treats the first frame of the 53 alone and the rest in groups of 4
   (`split_first_frame`).

LiveAct's generation loop (`upstream_iteration_frames`): each iteration is handed the windows of 53 video
frames (6 + 8 latent frames minus one, times 4, plus one); iterations 0 and 1 both use frames 0..52, and
iteration t >= 2 frames 32(t-1) .. 32(t-1)+52.

Time grid of the whole-clip features: the interpolation maps feature frame j to CNN frame
`j * (T-1) / (frames-1)`, which is exactly 2j (CNN frame 2j covers samples `[640j, 640j+400)`) when the
stretched clip's length mod 640 is below 80 samples, and otherwise drifts by up to 2 CNN frames (40 ms)
towards the clip's end: upstream's features of a sample depend slightly on how long the clip is.

Streaming (`InfiniteTalkAudioStream`): the time stretch is a causal algorithm and runs incrementally
(identical to the whole-clip stretch; output lags input by about 100 ms). Features for frames
`[start, stop)` run steps 3-5 on stretched audio from `left_context_frames` before the first window frame
to `right_context_frames` after the last (`stop + 1`, the window's look-ahead), on the exact 2j grid
(buffer edges on multiples of 640 samples). wav2vec2's self-attention, positional convolution, CNN group
norm and the input normalisation all see the whole clip offline, so a bounded buffer only approximates
it: the error is set mostly by the right context, which the positional convolution (128 taps at 25 Hz:
+-2.56 s) and attention miss at the buffer's end. Measured with `measure_streaming_error` (12 s of
speech-like audio, fps 24, consecutive 32-frame requests, pushes of 0.2 s; RMS of the difference over the
RMS of the whole-clip windows, max |difference| / max |whole clip| in brackets), random weights:

    left / right (frames)   0             16            32            64
    tiny (2 x 32), 0        0.22 (0.49)   0.20 (0.40)   0.18 (0.41)   0.16 (0.39)
    tiny, 25                0.19 (0.29)   0.16 (0.34)   0.13 (0.25)   0.11 (0.23)
    tiny, 100               0.16 (0.27)   0.12 (0.21)   0.08 (0.16)   0.007 (0.014)
    base (12 x 768), 100    0.17 (0.32)   0.14 (0.29)   0.10 (0.18)   0.04 (0.07)

Left context beyond 100 frames (4 s) changed nothing measurable; with context covering the whole clip the
stream equals the whole-clip features (test: <= 1e-5). Defaults: `left_context_frames=100` and
`right_context_frames=0`, i.e. a request for frames `[start, stop)` waits only for the window's own 2
look-ahead frames (80 ms of stretched audio) plus the stretch's ~100 ms, the latency of upstream's own
streaming mode (`--steam_audio`: each iteration's 55 frames of audio featurised alone, which differs from
its whole-clip features by ~1.0 RMS-relative on these random models). Each right-context frame adds
1 / fps s of latency. A trained checkpoint's numbers: `python -m frontends.infinitetalk_audio
CHECKPOINT_DIR AUDIO_FILE [--left ...] [--right ...]`.

Audio other than 16 kHz is resampled with `frontends.audio_io.resample` before the stretch; upstream
stretches at the file's own rate and then resamples with torchaudio's Hann-windowed sinc, so only 16 kHz
input gives upstream's features within the tolerances above. Upstream keeps channel 0 of a multi-channel
file; audio_io averages channels.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

from frontends.audio_features import tiny_wav2vec2_config
from frontends.audio_io import TARGET_SAMPLE_RATE, load_audio, pushed_pcm, resample

FEATURE_RATE = 25
"""Feature frames per second of (stretched) audio: upstream's `get_embedding` fixes 25."""

LIVEACT_FPS = 24
"""SoulX-LiveAct generate.py's default `--fps`."""

LIVEACT_GAIN = 3.0
"""LiveAct multiplies the stretched 16 kHz audio by this before the feature extractor."""

WINDOW = 5
"""Feature frames per video frame: the frame and 2 on each side."""

FRAME_SAMPLES = TARGET_SAMPLE_RATE // FEATURE_RATE
"""640 samples of stretched 16 kHz audio per feature frame (2 hops of wav2vec2's CNN)."""

DEFAULT_LEFT_CONTEXT_FRAMES = 100
"""Stream default: 4 s of stretched audio before a request's first window frame."""

DEFAULT_RIGHT_CONTEXT_FRAMES = 0
"""Stream default: no audio after the last window frame (what upstream's own `--steam_audio` reads)."""

_CNN_RECEPTIVE_FIELD = 400


# --- SoX tempo (WSOLA) -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TempoParams:
    """SoX `tempo` geometry in samples, for its default profile (82 ms segments)."""

    factor: float
    segment: int
    search: int
    overlap: int

    @classmethod
    def for_rate(cls, sample_rate: int, factor: float) -> TempoParams:
        if not 0.1 <= factor <= 100:
            raise ValueError(f"tempo factor {factor} is outside SoX's range 0.1..100")
        segment_ms = 82.0
        overlap_ms = min(segment_ms / 6.833, segment_ms / 2)
        search_ms = segment_ms / 5.587
        segment = int(sample_rate * segment_ms / 1000 + 0.5)
        search = int(sample_rate * search_ms / 1000 + 0.5)
        overlap = int(max(sample_rate * overlap_ms / 1000 + 4.5, 16)) & ~7  # a multiple of 8
        if 2 * overlap > segment:
            overlap -= 8
        return cls(factor=factor, segment=segment, search=search, overlap=overlap)

    @property
    def input_per_segment(self) -> int:
        """Input samples that must be buffered before one more segment can be produced."""
        max_skip = math.ceil(self.factor * (self.segment - self.overlap))
        return max(max_skip + self.overlap, self.segment) + self.search


class Tempo:
    """Streaming time stretch: SoX's `tempo FACTOR` on mono float audio (factor > 1 shortens it).

    Each segment of `segment` input samples is placed where its first `overlap` samples best match (least
    squares over `search` candidate offsets) the tail of the previous segment, cross-faded linearly with
    it, and the input advances by `factor * (segment - overlap)` samples per `segment - overlap` output
    samples. `push` returns the output that the input so far determines; `finish` pads with silence and
    returns the rest, `round(input / factor)` samples in all. Arithmetic is float32 as in SoX.
    """

    def __init__(self, sample_rate: int, factor: float) -> None:
        self.params = TempoParams.for_rate(sample_rate, factor)
        p = self.params
        self._identity = factor == 1  # SoX drops a tempo of 1 from the chain
        self._fifo = np.zeros(p.search // 2, dtype=np.float32)  # SoX primes its input with silence
        self._received = 0
        self._produced = 0
        self._segments = 0
        self._skipped = 0
        self._tail = np.zeros(p.overlap, dtype=np.float32)
        self._fade_in = (np.float32(1.0) / np.float32(p.overlap)) * np.arange(p.overlap, dtype=np.float32)
        self._fade_out = np.float32(1.0) - self._fade_in
        self._finished = False

    @property
    def produced(self) -> int:
        """Output samples returned so far."""
        return self._produced

    def output_length(self, input_length: int) -> int:
        """Samples the whole stretched clip has for `input_length` input samples."""
        return input_length if self._identity else int(input_length / self.params.factor + 0.5)

    def input_needed(self, output_samples: int) -> int:
        """Input samples after which `push` has returned at least `output_samples` samples in all."""
        if self._identity or output_samples <= 0:
            return max(output_samples, 0)
        p = self.params
        step = p.segment - p.overlap
        last = -(-output_samples // step) - 1  # index of the segment that completes them
        consumed = int(p.factor * (last * step) + 0.5)  # input skipped before that segment
        return max(0, consumed + p.input_per_segment - p.search // 2)

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Feed input samples; returns the new output samples (float32, maybe none)."""
        if self._finished:
            raise RuntimeError("Tempo.push() after finish()")
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        self._received += x.size
        if self._identity:
            self._produced += x.size
            return x.copy()
        self._fifo = np.concatenate([self._fifo, x])
        return self._run()

    def silence_from(self, sample: int) -> None:
        """Barge-in: input samples from absolute index `sample` on that are still waiting in the FIFO become
        silence (output already returned is the caller's to zero; the overlap tail of the last segment, at
        most `overlap` samples, still fades out)."""
        if self._identity:
            return
        first = self._skipped - self.params.search // 2  # absolute input index of self._fifo[0]
        start = max(0, sample - first)
        if start < self._fifo.size:
            self._fifo = self._fifo.copy()
            self._fifo[start:] = 0.0

    def finish(self) -> np.ndarray:
        """End of input: the remaining output, up to `output_length(samples pushed)` in all."""
        if self._finished:
            return np.zeros(0, dtype=np.float32)
        self._finished = True
        if self._identity:
            return np.zeros(0, dtype=np.float32)
        total = self.output_length(self._received)
        pieces = []
        have = self._produced
        pad = np.zeros(self.params.input_per_segment, dtype=np.float32)
        while have < total:
            self._fifo = np.concatenate([self._fifo, pad])
            piece = self._run(limit=total - have)
            pieces.append(piece)
            have += piece.size
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)

    def _run(self, limit: int | None = None) -> np.ndarray:
        p = self.params
        out: list[np.ndarray] = []
        n_out = 0
        while self._fifo.size >= p.input_per_segment and (limit is None or n_out < limit):
            window = self._fifo[: p.input_per_segment]
            if self._segments == 0:
                offset = p.search // 2
                head = window[offset : offset + p.overlap]
            else:
                offset = self._best_offset(window)
                head = self._tail * self._fade_out + window[offset : offset + p.overlap] * self._fade_in
            out.append(head)
            out.append(window[offset + p.overlap : offset + p.segment - p.overlap])
            self._tail = window[offset + p.segment - p.overlap : offset + p.segment].copy()
            n_out += p.segment - p.overlap
            self._segments += 1
            skip = int(p.factor * (self._segments * (p.segment - p.overlap)) + 0.5) - self._skipped
            self._skipped += skip
            self._fifo = self._fifo[skip:]
        result = np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
        if limit is not None:
            result = result[:limit]
        self._produced += result.size
        return result.astype(np.float32, copy=False)

    def _best_offset(self, window: np.ndarray) -> int:
        """First offset with the least squared difference to the previous tail (SoX sums sequentially)."""
        p = self.params
        candidates = np.lib.stride_tricks.sliding_window_view(window[: p.search - 1 + p.overlap], p.overlap)
        squared = np.square(candidates - self._tail[None, :])
        # cumsum accumulates left to right in float32, as SoX's loop does; argmin keeps the first minimum.
        return int(np.argmin(np.cumsum(squared, axis=1, dtype=np.float32)[:, -1]))


def time_stretch(samples: np.ndarray, sample_rate: int, factor: float) -> np.ndarray:
    """Whole-clip SoX `tempo factor`: `[N]` → `[round(N / factor)]` float32."""
    tempo = Tempo(sample_rate, factor)
    return np.concatenate([tempo.push(samples), tempo.finish()])


# --- configuration and model -------------------------------------------------------------------------------
@dataclass(frozen=True)
class InfiniteTalkAudioConfig:
    """Settings of the InfiniteTalk/LiveAct audio front-end.

    checkpoint: local wav2vec2 folder (`TencentGameMate/chinese-wav2vec2-base` layout: config.json, weights,
        preprocessor_config.json) for `from_pretrained`; nothing is downloaded. None builds a tiny random
        wav2vec2 (`tiny_layers` x `tiny_hidden_size`, seeded with `tiny_seed`) that normalises its input.
    fps: video frames per second; the audio is stretched by `FEATURE_RATE / fps` (1 at 25 fps).
    gain: factor on the stretched 16 kHz audio (LiveAct 3.0; 1.0 for InfiniteTalk).
    window: feature frames per video frame (odd, centred).
    layers: 0-based transformer layers to keep, in order; None keeps all (upstream).
    normalize: zero-mean/unit-variance input scaling; None takes `do_normalize` from the checkpoint's
        preprocessor_config.json (which must then exist).
    dtype: wav2vec2's dtype ("float32"; upstream LiveAct uses "bfloat16" on the GPU).
    left_context_frames / right_context_frames: the stream's extra stretched audio, in feature frames,
        before the first and after the last window frame of a request.
    """

    checkpoint: str | None = None
    fps: float = LIVEACT_FPS
    gain: float = LIVEACT_GAIN
    window: int = WINDOW
    layers: tuple[int, ...] | None = None
    normalize: bool | None = None
    dtype: str = "float32"
    device: str = "cpu"
    left_context_frames: int = DEFAULT_LEFT_CONTEXT_FRAMES
    right_context_frames: int = DEFAULT_RIGHT_CONTEXT_FRAMES
    tiny_hidden_size: int = 32
    tiny_layers: int = 2
    tiny_seed: int = 0

    def __post_init__(self) -> None:
        if not self.fps > 0:
            raise ValueError(f"fps={self.fps} must be positive")
        TempoParams.for_rate(TARGET_SAMPLE_RATE, self.tempo_factor)  # SoX's factor range
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"window={self.window} must be odd (centred on a frame)")
        if self.left_context_frames < 0 or self.right_context_frames < 0:
            raise ValueError("left_context_frames and right_context_frames must be >= 0")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}: use float32, bfloat16 or float16")

    @property
    def tempo_factor(self) -> float:
        """Speed-up applied before featurising (upstream: `rate = 25 / fps`)."""
        return FEATURE_RATE / self.fps


def load_wav2vec2(config: InfiniteTalkAudioConfig) -> tuple[Wav2Vec2Model, Wav2Vec2FeatureExtractor]:
    """The wav2vec2 model (eval, on `config.device`/`dtype`) and the feature extractor that normalises its
    input. Raises FileNotFoundError for a missing folder, config.json or (when `normalize` is None)
    preprocessor_config.json, ValueError for a checkpoint that is not 16 kHz."""
    dtype = getattr(torch, config.dtype)
    if config.checkpoint is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.tiny_seed)
            model = Wav2Vec2Model(tiny_wav2vec2_config(config.tiny_hidden_size, config.tiny_layers))
        extractor = _feature_extractor(True if config.normalize is None else config.normalize)
        return model.to(config.device, dtype).eval(), extractor
    path = Path(config.checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(
            f"wav2vec2 checkpoint {str(path)!r} is not a directory: pass a local folder in the "
            "TencentGameMate/chinese-wav2vec2-base layout (config.json, pytorch_model.bin or "
            "model.safetensors, preprocessor_config.json); nothing is downloaded"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"wav2vec2 checkpoint folder {str(path)!r} has no config.json")
    preprocessor = path / "preprocessor_config.json"
    if preprocessor.is_file():
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(path), local_files_only=True)
        if extractor.sampling_rate != TARGET_SAMPLE_RATE:
            raise ValueError(
                f"{preprocessor} says sampling_rate={extractor.sampling_rate}; this front-end feeds "
                f"{TARGET_SAMPLE_RATE} Hz audio"
            )
        if config.normalize is not None:
            extractor.do_normalize = config.normalize
    elif config.normalize is None:
        raise FileNotFoundError(
            f"wav2vec2 checkpoint folder {str(path)!r} has no preprocessor_config.json (upstream reads "
            "do_normalize from it): add it, or set normalize explicitly"
        )
    else:
        extractor = _feature_extractor(config.normalize)
    model = Wav2Vec2Model.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    return model.to(config.device, dtype).eval(), extractor


def _feature_extractor(normalize: bool) -> Wav2Vec2FeatureExtractor:
    return Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=TARGET_SAMPLE_RATE,
        padding_value=0.0,
        do_normalize=normalize,
        return_attention_mask=False,
    )


def num_feature_frames(stretched_samples: int) -> int:
    """Feature frames of a whole stretched 16 kHz clip, as upstream computes it (float, truncated)."""
    return int(stretched_samples / TARGET_SAMPLE_RATE * FEATURE_RATE)


def frame_windows(embedding: torch.Tensor, start: int, stop: int, window: int = WINDOW) -> torch.Tensor:
    """`[frames, L, D]` → `[stop - start, window, L, D]`: frames `v - window//2 .. v + window//2` for each
    video frame v in `[start, stop)`, indices clamped to the clip (upstream's `get_audio_emb`)."""
    half = window // 2
    offsets = torch.arange(window) - half
    index = (torch.arange(start, stop)[:, None] + offsets[None, :]).clamp(0, embedding.shape[0] - 1)
    return embedding[index]


def split_first_frame(windows: torch.Tensor, vae_scale: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """How the DiT's audio projection regroups one iteration's `[1 + 4k, W, L, D]` windows.

    Returns the first frame's whole window `[1, W, L, D]` and, per latent frame of the other 4k frames,
    `[k, W + vae_scale - 1, L, D]`: the first frame's window up to its centre, the centre of each middle
    frame, and the last frame's window from its centre (8 vectors for W=5, vae_scale=4).
    """
    frames, window = windows.shape[:2]
    if (frames - 1) % vae_scale:
        raise ValueError(f"{frames} frames is not 1 + a multiple of {vae_scale}")
    mid = window // 2
    latter = windows[1:].reshape(-1, vae_scale, *windows.shape[1:])
    grouped = torch.cat(
        [latter[:, 0, : mid + 1], latter[:, 1:-1, mid], latter[:, -1, mid:]],
        dim=1,
    )
    return windows[:1], grouped


def upstream_iteration_frames(iteration: int, blocks: tuple[int, int] = (6, 8), vae_stride: int = 4) -> range:
    """Video frames whose windows LiveAct's generate.py hands iteration `iteration` (53 frames each)."""
    frame_num = (sum(blocks) - 1) * vae_stride + 1
    start = max(0, (iteration - 1) * blocks[-1] * vae_stride)
    return range(start, start + frame_num)


class InfiniteTalkAudio:
    """The wav2vec2 model and the whole-clip pipeline (one instance can serve many streams)."""

    def __init__(
        self,
        config: InfiniteTalkAudioConfig,
        model: Wav2Vec2Model | None = None,
        feature_extractor: Wav2Vec2FeatureExtractor | None = None,
    ) -> None:
        self.config = config
        if model is None:
            model, loaded = load_wav2vec2(config)
            feature_extractor = feature_extractor or loaded
        self.model = model
        self.feature_extractor = feature_extractor or _feature_extractor(config.normalize is not False)
        n_layers = int(model.config.num_hidden_layers)
        for layer in config.layers or ():
            if not 0 <= layer < n_layers:
                raise ValueError(f"layers={config.layers} names layer {layer}; the model has {n_layers}")
        self.layers = tuple(config.layers) if config.layers is not None else tuple(range(n_layers))
        self.hidden_size = int(model.config.hidden_size)

    def prepare(self, samples: np.ndarray, sample_rate: int = TARGET_SAMPLE_RATE) -> np.ndarray:
        """Mono audio → the stretched, gained 16 kHz float32 audio that wav2vec2 is fed (steps 1-2)."""
        x = np.asarray(samples, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"takes mono [N] samples, got shape {list(x.shape)}")
        if sample_rate != TARGET_SAMPLE_RATE:
            x = resample(x, sample_rate, TARGET_SAMPLE_RATE)
        stretched = time_stretch(x, TARGET_SAMPLE_RATE, self.config.tempo_factor)
        return stretched * np.float32(self.config.gain)

    def clip_embedding(self, samples: np.ndarray, sample_rate: int = TARGET_SAMPLE_RATE) -> torch.Tensor:
        """Upstream's whole-clip features: `[frames, L, D]` float32 on CPU, frames = video frames at fps."""
        wave = self.prepare(samples, sample_rate)
        frames = num_feature_frames(wave.size)
        if frames < 1:
            raise ValueError(f"{samples.shape[0]} samples is less than one video frame of audio")
        return self.embed(wave, frames)

    @torch.no_grad()
    def embed(self, wave: np.ndarray, frames: int) -> torch.Tensor:
        """Steps 3-5 on prepared audio: `[frames, L, D]` float32 on CPU."""
        if wave.size < _CNN_RECEPTIVE_FIELD:
            raise ValueError(f"wav2vec2 needs at least {_CNN_RECEPTIVE_FIELD} samples, got {wave.size}")
        values = np.squeeze(self.feature_extractor(wave, sampling_rate=TARGET_SAMPLE_RATE).input_values)
        param = next(self.model.parameters())
        x = torch.from_numpy(np.asarray(values)).to(param.device, param.dtype)[None]
        with self._interpolated_to(frames):
            hidden = self.model(x, output_hidden_states=True).hidden_states
        return torch.stack([hidden[1 + i][0] for i in self.layers], dim=1).float().cpu()

    @contextmanager
    def _interpolated_to(self, frames: int) -> Iterator[None]:
        """Upstream's change to wav2vec2: the CNN's `[B, C, T]` output is resampled to `frames` steps."""

        def hook(_module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return F.interpolate(output, size=frames, mode="linear", align_corners=True)

        handle = self.model.feature_extractor.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def stream(self) -> InfiniteTalkAudioStream:
        """A new live stream over this model."""
        return InfiniteTalkAudioStream(self)


class InfiniteTalkAudioStream:
    """Per-character live audio: push 16 kHz audio, take `[n, window, L, D]` windows of video frames.

    Frames are video frames at `config.fps` (feature frames of the stretched audio). `windows(start, stop)`
    is available once `ready_frames() >= stop`; its result depends only on the audio and (start, stop),
    never on how the audio was split into pushes. Requests must not start before an earlier request's
    start (older audio is dropped). After `end_of_stream()` every range is available and frames past the
    end repeat the last one, as upstream clamps.
    """

    def __init__(self, audio: InfiniteTalkAudio) -> None:
        self.audio = audio
        cfg = audio.config
        self._half = cfg.window // 2
        self._left = cfg.left_context_frames
        self._right = cfg.right_context_frames
        self._tempo = Tempo(TARGET_SAMPLE_RATE, cfg.tempo_factor)
        self._gain = np.float32(cfg.gain)
        self._wave = np.zeros(0, dtype=np.float32)  # stretched, gained
        self._offset = 0  # stretched-sample index of self._wave[0]
        self._ended = False
        self._min_start = 0

    # --- ingest ----------------------------------------------------------------------------------------
    def push(self, pcm: np.ndarray) -> None:
        """Append mono float32 16 kHz samples (resample other rates with frontends.audio_io first)."""
        if self._ended:
            raise RuntimeError("push() after end_of_stream(): start a new stream")
        self._append(self._tempo.push(pushed_pcm(pcm)))

    def silence_from(self, sample: int) -> None:
        """Barge-in: the input from 16 kHz sample `sample` on becomes silence. The stretched audio from the
        matching point (`sample / tempo_factor`) is zeroed and so is the input still waiting in the stretch;
        later pushes continue the same timeline. Requests whose windows were already taken are unaffected."""
        self._tempo.silence_from(sample)
        start = max(0, int(sample / self.audio.config.tempo_factor) - self._offset)
        if start < self._wave.size:
            self._wave = self._wave.copy()
            self._wave[start:] = 0.0

    def end_of_stream(self) -> None:
        """No more audio: the stretch is flushed and the clip's frame count fixed (`num_frames`)."""
        if not self._ended:
            self._append(self._tempo.finish())
            self._ended = True

    def _append(self, stretched: np.ndarray) -> None:
        if stretched.size:
            self._wave = np.concatenate([self._wave, stretched * self._gain])

    @property
    def _stretched(self) -> int:
        return self._offset + self._wave.size

    @property
    def num_frames(self) -> int | None:
        """After `end_of_stream`: the clip's frame count as upstream computes it; before: None."""
        return num_feature_frames(self._stretched) if self._ended else None

    def ready_frames(self) -> int:
        """The largest `stop` for which `windows(start, stop)` can be computed now; after `end_of_stream`
        `num_frames` (and any larger stop works too: frames past the end repeat the last one)."""
        if self._ended:
            return self.num_frames or 0
        return max(0, self._stretched // FRAME_SAMPLES - self._half - self._right)

    def required_samples(self, stop: int) -> int:
        """16 kHz input samples (from the stream start) that make `windows(start, stop)` ready."""
        return self._tempo.input_needed((stop + self._half + self._right) * FRAME_SAMPLES)

    def ready(self, stop: int) -> bool:
        """Whether `windows(start, stop)` can be computed now."""
        return self._ended or stop <= self.ready_frames()

    # --- features --------------------------------------------------------------------------------------
    def embeddings(self, start: int, stop: int) -> tuple[torch.Tensor, int]:
        """Features of the frames the windows of `[start, stop)` read: `([m, L, D], first frame index)`."""
        if not 0 <= start < stop:
            raise ValueError(f"frame range [{start}, {stop}) is empty or negative")
        if start < self._min_start:
            raise RuntimeError(
                f"frames from {start} were requested after a request from {self._min_start}; the audio "
                "before that is dropped (requests must not go back)"
            )
        if not self.ready(stop):
            raise RuntimeError(
                f"frames up to {stop} are not ready: {self.ready_frames()} are; push more audio first"
            )
        first = max(0, start - self._half)
        last = stop + self._half  # exclusive
        lo = max(0, first - self._left)
        hi = last + self._right
        if self._ended:
            total = self.num_frames or 0
            if total < 1:
                raise ValueError("the stream ended with less than one video frame of audio")
            first, last = min(first, total - 1), min(last, total)
            lo, hi = min(lo, first), min(hi, total)
        wave = self._wave[lo * FRAME_SAMPLES - self._offset : hi * FRAME_SAMPLES - self._offset]
        features = self.audio.embed(wave, hi - lo)  # on the exact 2j grid: (T - 1) / (frames - 1) = 2
        self._min_start = start
        self._drop_before(lo * FRAME_SAMPLES)  # later requests start no earlier, so neither does their lo
        return features[first - lo : last - lo], first

    def windows(self, start: int, stop: int) -> torch.Tensor:
        """`[stop - start, window, L, D]` float32: the per-frame windows of video frames `[start, stop)`."""
        features, first = self.embeddings(start, stop)
        half = self._half
        index = torch.arange(start, stop)[:, None] + (torch.arange(2 * half + 1) - half)[None, :]
        upper = (self.num_frames if self._ended else first + features.shape[0]) or 1
        index = index.clamp(0, upper - 1) - first
        return features[index]

    def _drop_before(self, absolute: int) -> None:
        drop = min(max(absolute - self._offset, 0), self._wave.size)
        if drop:
            self._wave = self._wave[drop:]
            self._offset += drop


# --- measuring the streaming approximation -----------------------------------------------------------------
def measure_streaming_error(
    audio: InfiniteTalkAudio,
    samples: np.ndarray,
    *,
    chunk_frames: int = 32,
    push_samples: int = 3200,
) -> dict[str, float]:
    """Stream `samples` (16 kHz) in pushes, take windows of consecutive `chunk_frames` ranges as soon as they
    are ready, and compare them with the whole clip's windows.

    The clip is first trimmed so that its stretched length is a multiple of 640 samples: then the
    whole-clip interpolation grid is the stream's exact 2j grid and the difference is the context's alone.
    Returns max_abs, max_rel (max_abs / max |clip features|) and rms_rel (RMS of the difference over the RMS
    of the clip features).
    """
    factor = audio.config.tempo_factor
    keep = len(samples)
    tempo = Tempo(TARGET_SAMPLE_RATE, factor)
    while tempo.output_length(keep) % FRAME_SAMPLES:
        keep -= 1
    x = np.asarray(samples[:keep], dtype=np.float32)
    offline = audio.clip_embedding(x)
    total = offline.shape[0]
    stream = audio.stream()
    got = []
    start = 0
    for i in range(0, keep, push_samples):
        stream.push(x[i : i + push_samples])
        while start < total and stream.ready(min(start + chunk_frames, total)):
            got.append(stream.windows(start, min(start + chunk_frames, total)))
            start += chunk_frames
    stream.end_of_stream()
    while start < total:
        got.append(stream.windows(start, min(start + chunk_frames, total)))
        start += chunk_frames
    streamed = torch.cat(got)
    reference = frame_windows(offline, 0, total, audio.config.window)
    diff = (streamed - reference).abs()
    return {
        "max_abs": float(diff.max()),
        "max_rel": float(diff.max() / reference.abs().max()),
        "rms_rel": float(diff.pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()),
    }


def main(argv: list[str] | None = None) -> None:
    """`python -m frontends.infinitetalk_audio CHECKPOINT AUDIO`: streaming error per context length."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("checkpoint", help="local wav2vec2 folder (or 'tiny' for the random test model)")
    parser.add_argument("audio", help="a WAV/FLAC/OGG speech clip (a few seconds or more)")
    parser.add_argument("--fps", type=float, default=LIVEACT_FPS)
    parser.add_argument("--left", type=int, nargs="+", default=[0, 25, 50, 100, 200])
    parser.add_argument("--right", type=int, nargs="+", default=[0, 5])
    parser.add_argument("--chunk-frames", type=int, default=32)
    args = parser.parse_args(argv)
    checkpoint = None if args.checkpoint == "tiny" else args.checkpoint
    base = InfiniteTalkAudio(InfiniteTalkAudioConfig(checkpoint=checkpoint, fps=args.fps))
    samples = load_audio(args.audio)
    for left in args.left:
        for right in args.right:
            config = InfiniteTalkAudioConfig(
                checkpoint=checkpoint, fps=args.fps, left_context_frames=left, right_context_frames=right
            )
            audio = InfiniteTalkAudio(config, base.model, base.feature_extractor)
            error = measure_streaming_error(audio, samples, chunk_frames=args.chunk_frames)
            print(json.dumps({"left_context_frames": left, "right_context_frames": right, **error}))


if __name__ == "__main__":
    main()

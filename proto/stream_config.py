"""Streaming configuration: resolution, chunking, the few-step schedule, the attention window, cache and
position modes — and the named stream schedules of the model families (``STREAM_SCHEDULES``).

A schedule is data: ``StreamConfig.for_schedule("soulx-liveact", height=512, width=512)`` is LiveAct's
(chunks of 6 then 8 latent frames, 3 steps, audio from the second step, ConvKV memory window, 24 fps),
``StreamConfig.for_schedule("talkingmachines")`` the paper's (3-frame chunks attending to chunk 0, the
previous chunk and themselves, 2 steps, 16 fps). Everything downstream (the score engine, the master's
audio alignment and decoding, the publishers, the TTBC line) reads chunk sizes and fps from the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

CacheMode = Literal["per-step", "clean-context"]
PositionMode = Literal["window", "absolute"]
Window = Literal["sparse-causal", "convkv-memory"]

# SoulX-LiveAct's cache window, in latent frames (workers/LIVEACT.md): chunk 0 fills slots 0..5; from then on
# slots 0..1 are the sink, 2..3 the ConvKV-compressed memory, 4..5 the neighbours, 6..13 the current chunk.
CONVKV_FIRST_CHUNK = 6
CONVKV_CHUNK = 8

VAE_STRIDE = (4, 8, 8)  # Wan VAE: 4× in time, 8× in space
PATCH = (1, 2, 2)  # Wan DiT patch: one latent frame, 2×2 latent pixels per token


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class StreamConfig:
    """How a session is streamed.

    height, width: output video size in pixels (multiples of 16: VAE stride 8 × patch 2).
    fps: video frame rate (Wan: 16).
    chunk_latent_frames: latent frames per chunk (3 → 12 video frames, 9 for the first chunk).
    denoising_steps: nominal timesteps in (0, 1000], strictly decreasing, starting at 1000 (pure noise).
    timestep_shift: the flow-matching shift of the scheduler grid (wan.md §4.2; students use 5).
    warp_denoising_steps: map nominal steps onto the shifted grid, t_eff = timesteps[1000 − t].
    cache_mode: 'per-step' (keys/values of c_0 and c_{t−1} kept per step) or 'clean-context' (one extra
        σ = 0 pass per chunk refreshes its keys; every step uses the clean ones).
    position_mode: 'window' (positions inside the training clip, endless) or 'absolute' (true frame index).
    train_latent_frames: latent frames of the training clip (21 = 81 video frames), the window's extent;
        for the ConvKV window the model's whole window (first chunk + chunk: 14).
    window: the self-attention window. 'sparse-causal': chunk t attends to c_0, c_{t-1} and itself (the
        paper); 'convkv-memory': LiveAct's 14-frame window of sink, ConvKV-compressed memory, neighbours and
        the current chunk (fixed chunk sizes 6 then 8, per-step caches, window positions).
    first_chunk_latent_frames: latent frames of chunk 0 when it differs from the others (LiveAct: 6).
    audio_from_step: the first denoising step that sees the audio (LiveAct: 1; step 0 runs without it).
    audio_cfg: audio classifier-free guidance scale on the audio steps (1.0 = off; LiveAct's option).
    """

    height: int = 512
    width: int = 512
    fps: int = 16
    chunk_latent_frames: int = 3
    denoising_steps: tuple[int, ...] = (1000, 500)
    timestep_shift: float = 5.0
    warp_denoising_steps: bool = True
    cache_mode: CacheMode = "per-step"
    position_mode: PositionMode = "window"
    train_latent_frames: int = 21
    window: Window = "sparse-causal"
    first_chunk_latent_frames: int | None = None
    audio_from_step: int = 0
    audio_cfg: float = 1.0

    @classmethod
    def for_schedule(cls, name: str, **overrides: object) -> StreamConfig:
        """The named schedule (``STREAM_SCHEDULES``) with ``overrides`` (size, steps, …) on top."""
        if name not in STREAM_SCHEDULES:
            raise ValueError(f"unknown stream schedule {name!r}; known: {', '.join(STREAM_SCHEDULES)}")
        return cls(**{**STREAM_SCHEDULES[name], **overrides})  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        step = VAE_STRIDE[1] * PATCH[1]
        for name in ("height", "width"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value > 0 and value % step == 0,
                f"StreamConfig.{name}={value!r} must be a positive multiple of {step} (VAE stride × patch)",
            )
        _require(
            isinstance(self.fps, int) and self.fps > 0,
            f"StreamConfig.fps must be a positive int, got {self.fps!r}",
        )
        _require(
            isinstance(self.chunk_latent_frames, int) and self.chunk_latent_frames > 0,
            f"StreamConfig.chunk_latent_frames must be a positive int, got {self.chunk_latent_frames!r}",
        )
        steps = tuple(self.denoising_steps)
        _require(len(steps) > 0, "StreamConfig.denoising_steps must hold at least one step")
        _require(
            all(0 < s <= 1000 for s in steps) and all(a > b for a, b in pairwise(steps)),
            f"StreamConfig.denoising_steps={steps} must be strictly decreasing values in (0, 1000]",
        )
        _require(
            self.timestep_shift > 0, f"StreamConfig.timestep_shift must be > 0, got {self.timestep_shift!r}"
        )
        _require(
            self.cache_mode in ("per-step", "clean-context"),
            f"StreamConfig.cache_mode must be 'per-step' or 'clean-context', got {self.cache_mode!r}",
        )
        _require(
            self.position_mode in ("window", "absolute"),
            f"StreamConfig.position_mode must be 'window' or 'absolute', got {self.position_mode!r}",
        )
        _require(
            self.window in ("sparse-causal", "convkv-memory"),
            f"StreamConfig.window must be 'sparse-causal' or 'convkv-memory', got {self.window!r}",
        )
        first = self.first_chunk_latent_frames
        _require(
            first is None or (isinstance(first, int) and first > 0),
            f"StreamConfig.first_chunk_latent_frames must be None or a positive int, got {first!r}",
        )
        _require(
            isinstance(self.audio_from_step, int) and 0 <= self.audio_from_step < len(steps),
            f"StreamConfig.audio_from_step={self.audio_from_step!r} must index one of the {len(steps)} steps",
        )
        _require(
            self.audio_cfg >= 1.0, f"StreamConfig.audio_cfg must be >= 1.0 (1 = off), got {self.audio_cfg!r}"
        )
        f = self.chunk_latent_frames
        if self.window == "convkv-memory":
            _require(
                (first, f) == (CONVKV_FIRST_CHUNK, CONVKV_CHUNK)
                and self.train_latent_frames == CONVKV_FIRST_CHUNK + CONVKV_CHUNK
                and (self.cache_mode, self.position_mode) == ("per-step", "window"),
                "StreamConfig: the 'convkv-memory' window is LiveAct's layout: first_chunk_latent_frames="
                f"{CONVKV_FIRST_CHUNK}, chunk_latent_frames={CONVKV_CHUNK}, train_latent_frames="
                f"{CONVKV_FIRST_CHUNK + CONVKV_CHUNK}, per-step caches and window positions; "
                f"got first={first}, chunk={f}, train={self.train_latent_frames}, "
                f"{self.cache_mode}, {self.position_mode}",
            )
            return
        _require(
            first is None or first == f,
            "StreamConfig.first_chunk_latent_frames differs from chunk_latent_frames only in the "
            f"'convkv-memory' window; got {first} and {f}",
        )
        _require(
            isinstance(self.train_latent_frames, int)
            and self.train_latent_frames >= 2 * f
            and self.train_latent_frames % f == 0,
            f"StreamConfig.train_latent_frames={self.train_latent_frames!r} must be a multiple of "
            f"chunk_latent_frames={f} holding at least 2 chunks (c_0 and the current chunk)",
        )

    @property
    def latent_height(self) -> int:
        return self.height // VAE_STRIDE[1]

    @property
    def latent_width(self) -> int:
        return self.width // VAE_STRIDE[2]

    @property
    def token_height(self) -> int:
        return self.latent_height // PATCH[1]

    @property
    def token_width(self) -> int:
        return self.latent_width // PATCH[2]

    @property
    def tokens_per_frame(self) -> int:
        """Tokens per latent frame: (H/16)·(W/16), e.g. 1024 at 512×512."""
        return self.token_height * self.token_width

    @property
    def tokens_per_chunk(self) -> int:
        """Tokens of a chunk after the first (every chunk's, when they are all the same size)."""
        return self.tokens_per_frame * self.chunk_latent_frames

    def frames_in_chunk(self, chunk_index: int) -> int:
        """Latent frames of chunk ``chunk_index`` (LiveAct: 6 for chunk 0, then 8)."""
        if chunk_index == 0 and self.first_chunk_latent_frames is not None:
            return self.first_chunk_latent_frames
        return self.chunk_latent_frames

    def tokens_in_chunk(self, chunk_index: int) -> int:
        return self.tokens_per_frame * self.frames_in_chunk(chunk_index)

    def latent_shape(self, chunk_index: int) -> tuple[int, int, int, int]:
        """Shape of chunk ``chunk_index``'s latent ``[16, F_i, H/8, W/8]``."""
        return (16, self.frames_in_chunk(chunk_index), self.latent_height, self.latent_width)

    @property
    def num_steps(self) -> int:
        return len(self.denoising_steps)

    @property
    def num_kv_caches(self) -> int:
        """Self-attention caches a session keeps: one per denoising step (``per-step``) or one
        (``clean-context``), plus one per audio step with audio CFG (LiveAct's null-audio caches)."""
        caches = self.num_steps if self.cache_mode == "per-step" else 1
        if self.audio_cfg > 1.0:
            caches += self.num_steps - self.audio_from_step
        return caches

    @property
    def kv_cache_tokens(self) -> int:
        """Tokens one self-attention cache holds per block: c_0, c_t−1 and c_t (3 chunks) in the paper's
        window; the whole 14-frame window (sink, ConvKV memory, neighbours, current chunk) in LiveAct's."""
        if self.window == "convkv-memory":
            return self.train_latent_frames * self.tokens_per_frame
        return 3 * self.tokens_per_chunk

    @property
    def latent_chunk_shape(self) -> tuple[int, int, int, int]:
        """Shape of a later chunk's latent `[16, F, H/8, W/8]` (``latent_shape(i)`` for chunk i)."""
        return (16, self.chunk_latent_frames, self.latent_height, self.latent_width)

    def video_frames_in_chunk(self, chunk_index: int) -> int:
        """Video frames decoded from chunk `chunk_index`: 1 + 4·(F_0 − 1) for the first, then 4·F (9, 12;
        LiveAct: 21, 32)."""
        f = self.frames_in_chunk(chunk_index)
        return 1 + VAE_STRIDE[0] * (f - 1) if chunk_index == 0 else VAE_STRIDE[0] * f

    def first_video_frame(self, chunk_index: int) -> int:
        """Index of chunk ``chunk_index``'s first video frame in the stream."""
        if chunk_index == 0:
            return 0
        return self.video_frames_in_chunk(0) + (chunk_index - 1) * self.video_frames_in_chunk(1)

    def chunk_duration_s(self, chunk_index: int) -> float:
        """Video duration of chunk `chunk_index` in seconds (0.75 s for a later 3-latent chunk at 16 fps)."""
        return self.video_frames_in_chunk(chunk_index) / self.fps


# The model families' stream schedules (``StreamConfig.for_schedule``); height and width are the caller's.
STREAM_SCHEDULES: dict[str, dict[str, object]] = {
    # TalkingMachines (the paper): 3-latent chunks, sink + previous + current, 2 steps, 16 fps.
    "talkingmachines": {},
    # SoulX-LiveAct (generate.py at ac8579b): chunks of 6 then 8 latent frames in a 14-frame window,
    # timesteps 1000, 937.5, 833.3 (= 1000, 750, 500 on the shift-5 grid), step 0 without audio, 24 fps.
    "soulx-liveact": {
        "fps": 24,
        "chunk_latent_frames": CONVKV_CHUNK,
        "first_chunk_latent_frames": CONVKV_FIRST_CHUNK,
        "denoising_steps": (1000, 750, 500),
        "timestep_shift": 5.0,
        "warp_denoising_steps": True,
        "cache_mode": "per-step",
        "position_mode": "window",
        "train_latent_frames": CONVKV_FIRST_CHUNK + CONVKV_CHUNK,
        "window": "convkv-memory",
        "audio_from_step": 1,
    },
}

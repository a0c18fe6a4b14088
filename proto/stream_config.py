"""Streaming configuration: resolution, chunking, the few-step schedule, cache and position modes."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

CacheMode = Literal["per-step", "clean-context"]
PositionMode = Literal["window", "absolute"]

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
    train_latent_frames: latent frames of the training clip (21 = 81 video frames), the window's extent.
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
        f = self.chunk_latent_frames
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
        return self.tokens_per_frame * self.chunk_latent_frames

    @property
    def num_steps(self) -> int:
        return len(self.denoising_steps)

    @property
    def latent_chunk_shape(self) -> tuple[int, int, int, int]:
        """Shape of one chunk's latent `[16, F, H/8, W/8]`."""
        return (16, self.chunk_latent_frames, self.latent_height, self.latent_width)

    def video_frames_in_chunk(self, chunk_index: int) -> int:
        """Video frames decoded from chunk `chunk_index`: 1 + 4·(F − 1) for the first, then 4·F (9, 12)."""
        f = self.chunk_latent_frames
        return 1 + VAE_STRIDE[0] * (f - 1) if chunk_index == 0 else VAE_STRIDE[0] * f

    def chunk_duration_s(self, chunk_index: int) -> float:
        """Video duration of chunk `chunk_index` in seconds (0.75 s for a later 3-latent chunk at 16 fps)."""
        return self.video_frames_in_chunk(chunk_index) / self.fps

"""Per-session streaming decode: latent chunks in, uint8 video frames out, the causal cache carried between.

Definition of the whole-video decode this matches: Wan's own `decode` (`WanVAE.decode`), i.e. all latents
of the stream decoded one latent per decoder call from a fresh cache, with the 'Rep' first-frame convention:
latent 0 gives video frame 0 alone, every later latent 4 frames. Streamed in 3-latent chunks, the first chunk
therefore gives 1 + 4 + 4 = 9 frames and every later chunk 12, and nothing is dropped. A session runs
exactly the same per-latent steps on the same cache, so chunk-by-chunk output is identical to the
whole-video decode (tests hold this at 7 chunks).

Whole chunk per call (`chunk_at_once=True`): one decoder call over the chunk's latents, carrying the same
cache (one causal pass over several latents equals the per-latent steps up to float rounding; the cache's
layout and size do not depend on how many latents a call takes). On CPU in float32 the frames differ from
the per-latent path by at most 4e-6 on [-1, 1] (tests allow 1e-4): one uint8 level in fewer than 1 value
in 10000. It is not the default: on this project's 2-core CPU it is faster only at small sizes (tiny VAE
at 32x32: 37 vs 55 ms a chunk) and slower at larger ones (tiny at 256x256: 3.1 vs 2.1 s; wan2.1 at 64x64:
4.1 vs 3.6 s; `benchmarks/vae_decode.py`), and its activation peak is that of 3 latents (wan2.1 at
512x512: 4.7 GiB against 1.7 GiB; `engine.memory_plan` counts the one in use). GPUs are not measured yet.

Memory: the session's `FeatureCache` is allocated on the first latent and updated in place afterwards, so
its size is constant for the life of the stream (at 512x512 with `wan2.1`: 0.62 G elements, 1.24 GB in bf16).

GPU use: `autocast_dtype=torch.bfloat16` (or float16) runs the decoder under autocast with the cache stored
in that dtype; `channels_last=True` keeps activations and cache in `torch.channels_last_3d` (call
`convert_to_channels_last(vae)` once on the shared model); `compile_step=True` compiles the decoder step.
`decode_chunk(..., stream=s)` enqueues all work on the caller's CUDA stream and returns without
synchronising; pass `synchronize=True` to wait for the frames.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from decoder.feature_cache import FeatureCache
from decoder.vae import WanVAE

if TYPE_CHECKING:
    from decoder.taehv import TAEHVDecoder, TAEHVSession


def frames_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """Decoder output [1, 3, T, H, W] (pixels in [-1, 1], unclamped) -> uint8 [T, H, W, 3].

    Clamps to [-1, 1] and rounds (x + 1) * 127.5 to the nearest integer.
    """
    if video.dim() != 5 or video.shape[0] != 1 or video.shape[1] != 3:
        raise ValueError(f"frames_to_uint8 expects [1, 3, T, H, W], got {list(video.shape)}")
    pixels = ((video[0].float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).contiguous()


def convert_to_channels_last(vae: WanVAE) -> WanVAE:
    """Store the VAE's conv weights in channels-last layouts (5-D: channels_last_3d, 4-D: channels_last).

    cuDNN runs NDHWC convolutions faster in bf16/fp16 on recent GPUs; on CPU it is a layout change only.
    Call once on the shared model, then open sessions with `channels_last=True`.
    """
    for module in vae.modules():
        if isinstance(module, nn.Conv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
        elif isinstance(module, nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    return vae


@dataclass(frozen=True)
class DecodeOptions:
    """How a product path (``run``, ``serve``) decodes: the `DecodeSession` options its sessions share."""

    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False
    compile_step: bool = False
    chunk_at_once: bool = False
    # --vae-decoder taew2.1: the shared fast decoder (decoder.taehv) sessions decode with instead of the Wan
    # VAE, which then only encodes the reference image; None: the Wan VAE decodes.
    fast_decoder: TAEHVDecoder | None = field(default=None, compare=False, repr=False)

    def prepare(self, vae: WanVAE) -> WanVAE:
        """The shared model, ready for these options (channels-last weights when asked for); call once."""
        return convert_to_channels_last(vae) if self.channels_last else vae

    def session(self, vae: WanVAE, height: int, width: int) -> DecodeSession | TAEHVSession:
        """A stream's session on the (prepared) shared model, or on the fast decoder when one is set."""
        if self.fast_decoder is not None:
            from decoder.taehv import TAEHVSession

            if self.compile_step:
                raise ValueError(
                    "--vae-compile compiles the Wan VAE's decoder step; taew2.1 has none to compile"
                )
            return TAEHVSession(
                self.fast_decoder,
                height,
                width,
                autocast_dtype=self.autocast_dtype,
                channels_last=self.channels_last,
                chunk_at_once=self.chunk_at_once,
            )
        return DecodeSession(
            vae,
            height,
            width,
            autocast_dtype=self.autocast_dtype,
            channels_last=self.channels_last,
            compile_step=self.compile_step,
            chunk_at_once=self.chunk_at_once,
        )


class DecodeSession:
    """Decode state of one stream: the VAE's causal feature cache and the frame bookkeeping.

    Sessions share one `WanVAE` (read-only) and each carries its own cache; the VAE's device is the
    session's device.
    """

    def __init__(
        self,
        vae: WanVAE,
        height: int,
        width: int,
        *,
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        compile_step: bool = False,
        chunk_at_once: bool = False,
    ) -> None:
        """height, width: output frame size in pixels, positive multiples of the VAE's spatial stride (8).

        autocast_dtype: None runs in the model's dtype (float32 on CPU); torch.bfloat16/float16 autocasts.
        chunk_at_once: one decoder call per chunk (module docstring); False: one call per latent.
        """
        stride = vae.cfg.spatial_stride
        if height <= 0 or width <= 0 or height % stride or width % stride:
            raise ValueError(
                f"decode size {height}x{width} is not supported: height and width must be positive multiples "
                f"of {stride} (the VAE's spatial stride), e.g. {max(stride, height // stride * stride)}x"
                f"{max(stride, width // stride * stride)}"
            )
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(
                f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {autocast_dtype}"
            )
        self.vae = vae
        self.height = height
        self.width = width
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        self.chunk_at_once = chunk_at_once
        self.cache = FeatureCache(
            dtype=autocast_dtype,
            memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format,
        )
        self.latents_decoded = 0
        self.frames_decoded = 0
        # The first latent allocates the cache and takes Wan's 'Rep' branch; it runs eagerly once, and only
        # the steady-state step (one graph, fixed shapes, in-place cache updates) is compiled.
        self._compiled_step: Callable[[torch.Tensor, FeatureCache], torch.Tensor] | None = (
            torch.compile(vae.decode_step, dynamic=False) if compile_step else None
        )

    @property
    def device(self) -> torch.device:
        return self.vae.conv2.weight.device

    @property
    def latent_size(self) -> tuple[int, int]:
        """(h, w) of the latents this session accepts."""
        stride = self.vae.cfg.spatial_stride
        return self.height // stride, self.width // stride

    def frames_for(self, num_latents: int) -> int:
        """Frames the next `num_latents` latents decode to: 1 + 4(n-1) at the stream start, 4n later."""
        stride = self.vae.cfg.temporal_stride
        return stride * num_latents - (stride - 1 if self.latents_decoded == 0 else 0)

    def cache_nbytes(self) -> int:
        """Bytes of the session's feature cache (constant after the first latent)."""
        return self.cache.nbytes()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [z, T, h, w] (or [1, z, T, h, w]) -> video [1, 3, T', H, W], unclamped float.

        Runs on the current CUDA stream (or CPU); the decoder calls (one per latent, or one for the whole
        chunk) carry the session's cache.
        """
        z = self._check_latents(latents)
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last_3d)
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            if self.chunk_at_once:
                video = self._step()(z, self.cache)
            else:
                pieces = [self._step()(z[:, :, i : i + 1], self.cache) for i in range(z.shape[2])]
                video = torch.cat(pieces, dim=2)
        self.frames_decoded += self.frames_for(z.shape[2])
        self.latents_decoded += z.shape[2]
        return video

    def decode_chunk(
        self,
        latents: torch.Tensor,
        *,
        stream: torch.cuda.Stream | None = None,
        synchronize: bool = False,
    ) -> torch.Tensor:
        """Normalised latent chunk [z, T, h, w] -> frames uint8 [T', H, W, 3] on the VAE's device.

        T' = 1 + 4(T-1) for the stream's first chunk (9 for 3 latents), 4T afterwards (12).
        stream: CUDA stream to run on. The caller makes it wait for whatever produced `latents` (e.g.
        `stream.wait_event(ev)`); the result is only valid on that stream until synchronised. Nothing here
        synchronises the device unless `synchronize=True`.
        """
        if stream is None:
            return self._decode_to_uint8(latents, synchronize)
        if latents.is_cuda:
            # The allocator must not reuse the latents' memory until this stream is done with it.
            latents.record_stream(stream)
        with torch.cuda.stream(stream):
            return self._decode_to_uint8(latents, synchronize)

    def _step(self) -> Callable[[torch.Tensor, FeatureCache], torch.Tensor]:
        if self._compiled_step is None or self.cache.first:
            return self.vae.decode_step
        return self._compiled_step

    def _decode_to_uint8(self, latents: torch.Tensor, synchronize: bool) -> torch.Tensor:
        frames = frames_to_uint8(self.decode_latents(latents))
        if synchronize and frames.is_cuda:
            torch.cuda.current_stream(frames.device).synchronize()
        return frames

    def _check_latents(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.unsqueeze(0) if latents.dim() == 4 else latents
        h, w = self.latent_size
        z_dim = self.vae.cfg.z_dim
        if z.dim() != 5 or z.shape[0] != 1 or z.shape[1] != z_dim or z.shape[3:] != (h, w) or z.shape[2] == 0:
            raise ValueError(
                f"latent chunk has shape {list(latents.shape)}; this session decodes "
                f"{self.height}x{self.width} "
                f"and expects [{z_dim}, T>=1, {h}, {w}]"
            )
        if z.device != self.device:
            raise ValueError(f"latent chunk is on {z.device} but the session's VAE is on {self.device}")
        return z

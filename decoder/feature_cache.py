"""The causal feature cache that lets a Wan VAE encoder or decoder run over a video piece by piece.

Every temporal convolution of the VAE looks back a few frames. Running the network on consecutive pieces of
a video gives the same result as one run over the whole video if each such convolution sees, in front of
the current piece, the last frames of its input from the previous piece. This object holds those frames:
one buffer per temporal convolution, allocated (as zeros, which is exactly the causal zero padding) on the
stream's first step and updated in place afterwards, so its shapes, addresses and size never change after
the first step however long the stream runs. That keeps per-session memory constant and suits
`torch.compile` and CUDA graphs.
"""

from __future__ import annotations

import torch


class FeatureCache:
    """Per-stream buffers of the VAE's temporal convolutions, visited in a fixed order on every step.

    A step is one call of the encoder or decoder on one piece of video: `begin_step()`, then each temporal
    convolution calls `slot(...)` in network order and writes back with `store(...)`, then `end_step()`.
    `first` is True during the stream's first step; layers whose behaviour depends on it (the decoder's
    temporal up-sampling skips its time convolution on the first latent, Wan's 'Rep' convention) read it.
    """

    def __init__(
        self,
        dtype: torch.dtype | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        """dtype: storage dtype of the buffers (None: the dtype of the activations they first see).
        memory_format: layout of the 5-D buffers (torch.channels_last_3d on GPUs that prefer it)."""
        self.dtype = dtype
        self.memory_format = memory_format
        self.buffers: list[torch.Tensor] = []
        self.first = True
        self._cursor = 0
        self._in_step = False

    def begin_step(self) -> None:
        if self._in_step:
            raise RuntimeError(
                "FeatureCache.begin_step called twice without end_step; a step was interrupted"
            )
        self._cursor = 0
        self._in_step = True

    def end_step(self) -> None:
        if self._cursor != len(self.buffers):
            raise RuntimeError(
                f"FeatureCache step visited {self._cursor} of {len(self.buffers)} cached convolutions: "
                "the same cache was used with a different network"
            )
        self._in_step = False
        self.first = False

    def slot(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """Buffer [B, C, frames, H, W] for the next temporal convolution, whose input is x [B, C, T, H, W].

        On the stream's first step it is allocated as zeros; later steps must present the same shapes.
        """
        if not self._in_step:
            raise RuntimeError("FeatureCache.slot called outside begin_step()/end_step()")
        index = self._cursor
        self._cursor += 1
        b, c, _, h, w = x.shape
        shape = (b, c, frames, h, w)
        if index == len(self.buffers):
            if not self.first:
                raise RuntimeError(
                    f"FeatureCache has {len(self.buffers)} buffers but a step asked for buffer {index}: the "
                    "cache was built by a different network"
                )
            buffer = torch.zeros(shape, dtype=self.dtype or x.dtype, device=x.device)
            self.buffers.append(buffer.contiguous(memory_format=self.memory_format))
        buffer = self.buffers[index]
        if tuple(buffer.shape) != shape:
            raise ValueError(
                f"FeatureCache buffer {index} holds frames of shape {list(buffer.shape)} but this step feeds "
                f"{list(shape)}: the resolution or batch of a stream cannot change mid-stream"
            )
        return buffer

    @staticmethod
    def store(buffer: torch.Tensor, frames: torch.Tensor) -> None:
        """Overwrite `buffer` [B, C, n, H, W] in place with the last n of `frames` [B, C, T >= n, H, W]."""
        buffer.copy_(frames[:, :, frames.shape[2] - buffer.shape[2] :])

    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(b.numel() * b.element_size() for b in self.buffers)

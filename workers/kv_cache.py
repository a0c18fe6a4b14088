"""Fixed-size, preallocated self-attention cache of sparse causal attention, written in place.

For every block and every slot (a denoising step index in `per-step` mode, a single slot in `clean-context`
mode) one buffer of three chunk positions, `[B, 3·L, H, D]` (L = tokens per chunk, frame-major on every
topology; H = the heads this rank holds, so a sequence-parallel rank keeps exactly its heads' slice):

- position 0, the sink: c_0 (which carries the reference image), written by chunk 0 and kept;
- positions 1 and 2, a ring: chunk t ≥ 1 writes its keys/values into position 1 + (t − 1) mod 2, and the
  other ring position holds c_{t−1}.

A pass over chunk t writes the chunk's keys/values into its position (in place, per block, as the block
computes them) and attention reads the one view `[:, :visible]` of the buffer (visible = min(t + 1, 3)
chunks): no per-block concatenation, nothing accumulated over the forward. From chunk 3 on the ring puts
c_t before c_{t−1} in that view; attention does not depend on the order of its keys (up to float rounding,
<= 1e-5 here; tests/workers/test_streaming_equivalence.py).

Keys are stored rotated (RoPE applied, in the tables' float32) at the positions the chunk took when it was
computed. c_0 is always at frames 0 … F − 1, so it is rotated exactly once, when stored. The previous chunk
is used at its own positions in `absolute` mode and in `window` mode while the stream is inside the training
clip; once the window stops moving, c_{t−1} was computed at T − F but is attended at T − 2F: the engine then
rotates that ring position once per chunk (not per step) by −F frames on the temporal axis
(`shift_position`, rotations by angles add), which adds one rounding of the stored dtype to those keys
(float32: ~1e-7 relative; bfloat16: one more bf16 rounding than rotating un-rotated keys at use).

The storage is allocated once: memory never grows with the number of chunks.
"""

from __future__ import annotations

import torch

SINK = 0


class ChunkKVCache:
    """Keys (rotated) and values `[layers, slots, B, 3·L, H, D]`: the sink c_0 and a ring of two chunks."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        batch: int,
        tokens: int,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, num_slots, batch, 3 * tokens, heads, head_dim)
        self.tokens = tokens
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache tensors (constant for the session's lifetime)."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    @staticmethod
    def position(chunk_index: int) -> int:
        """The chunk position (0: sink, 1 or 2: ring) that chunk `chunk_index` writes."""
        return SINK if chunk_index == 0 else 1 + (chunk_index - 1) % 2

    def write_offset(self, chunk_index: int) -> int:
        """First token of chunk `chunk_index`'s keys/values in every block's buffer."""
        return self.position(chunk_index) * self.tokens

    def visible(self, chunk_index: int) -> int:
        """Tokens that chunk `chunk_index` attends to: the buffer's first min(t + 1, 3) chunk positions."""
        return min(chunk_index + 1, 3) * self.tokens

    def slot_views(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[layers, B, 3·L, H, D]` of one slot (views, written in place)."""
        return self.k[:, slot], self.v[:, slot]

    def shift_position(
        self,
        position: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        work: dict[tuple, torch.Tensor] | None = None,
    ) -> None:
        """Rotate the keys stored at chunk `position` (all blocks, slots) in place by cos/sin `[L, D/2]`, in
        the tables' dtype, one (block, slot) at a time through buffers kept in `work` (the caller keeps it
        across chunks, so after the first shift none is allocated; a one-block copy, not the cache's size)."""
        start = position * self.tokens
        keys = self.k[:, :, :, start : start + self.tokens]  # [layers, slots, B, L, H, D]
        work = {} if work is None else work
        shape = tuple(keys.shape[2:])
        key = (shape, cos.dtype, cos.device)
        if key not in work:
            work[key] = torch.empty(shape, dtype=cos.dtype, device=cos.device)
            half = (*shape[:-1], shape[-1] // 2)
            work[(*key, "half")] = torch.empty(half, dtype=cos.dtype, device=cos.device)
        full, real_copy = work[key], work[(*key, "half")]
        c, s = cos[:, None, :], sin[:, None, :]
        real, imag = full.unflatten(-1, (-1, 2)).unbind(-1)
        for layer in range(keys.shape[0]):
            for slot in range(keys.shape[1]):
                stored = keys[layer, slot]
                full.copy_(stored)
                real_copy.copy_(real)
                real.mul_(c).addcmul_(imag, s, value=-1)  # real cos - imag sin
                imag.mul_(c).addcmul_(real_copy, s)  # real sin + imag cos
                stored.copy_(full)

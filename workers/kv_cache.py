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

With ``kv_dtype="fp8"`` (``--kv-cache-dtype fp8``) the keys and values are stored as float8_e4m3fn with one
float32 amax scale per (token, head) over head_dim (`Fp8KV`, SoulX-LiveAct's ``--fp8_kv_cache`` layout):
quantised when written (``copy_``), dequantised to the model's dtype when read (`read`), so every write
adds one e4m3 rounding (3 mantissa bits: relative error <= 2^-4 of each element, at most 1/16 of the
(token, head)'s amax) and the storage is head_dim + 4 bytes per (token, head) instead of 2·head_dim (bf16).

`MemoryKVCache` is the other window, SoulX-LiveAct's (StreamConfig.window == 'convkv-memory'): 14 latent
frames of pre-RoPE keys and values per slot, with sink, ConvKV-compressed memory and neighbour frames
(its docstring has the layout; workers/LIVEACT.md the schedule).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from proto.stream_config import CONVKV_CHUNK, CONVKV_FIRST_CHUNK
from workers.fp8 import E4M3, KV_CACHE_DTYPES, dequantize, quantize

SINK = 0


class Fp8KV:
    """An e4m3 cache tensor with its scales: data `[..., N, H, D]` float8_e4m3fn and scale `[..., N, H, 1]`
    float32 (one per token and head). Indexing (over any dimension but the last) gives views of both, so
    the cache's slot/block/token views work as on a plain tensor; ``copy_`` quantises a tensor into the view
    (or copies another `Fp8KV`'s data and scales exactly); ``dequantize`` reads it back."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor) -> None:
        self.data = data
        self.scale = scale

    @classmethod
    def zeros(cls, shape: tuple[int, ...], device: torch.device | str) -> Fp8KV:
        data = torch.zeros(shape, dtype=E4M3, device=device)
        return cls(data, torch.zeros((*shape[:-1], 1), dtype=torch.float32, device=device))

    def __getitem__(self, index: object) -> Fp8KV:
        return Fp8KV(self.data[index], self.scale[index])

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def copy_(self, src: torch.Tensor | Fp8KV) -> Fp8KV:
        if isinstance(src, Fp8KV):
            self.data.copy_(src.data)
            self.scale.copy_(src.scale)
        else:
            q, scale = quantize(src, "row")
            self.data.copy_(q)
            self.scale.copy_(scale)
        return self

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.data, self.scale, dtype)


KVStore = torch.Tensor | Fp8KV


def read(view: KVStore, dtype: torch.dtype) -> torch.Tensor:
    """A cache view as a tensor of ``dtype`` for attention: the view itself when the cache is stored in the
    model's dtype, the dequantised values of an FP8 cache."""
    return view.dequantize(dtype) if isinstance(view, Fp8KV) else view


class _KVBuffers:
    """Keys and values `[layers, slots, B, N, H, D]`, allocated once (zeros) and written in place.

    dtype: the model's (what attention reads); kv_dtype "auto" stores that dtype, "fp8" stores `Fp8KV`."""

    def __init__(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str, kv_dtype: str = "auto"
    ) -> None:
        if kv_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_CACHE_DTYPES}, got {kv_dtype!r}")
        self.dtype = dtype
        self.kv_dtype = kv_dtype
        self.k: KVStore
        self.v: KVStore
        if kv_dtype == "fp8":
            self.k, self.v = Fp8KV.zeros(shape, device), Fp8KV.zeros(shape, device)
        else:
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
        """Bytes held by the cache tensors (constant for the session's lifetime), FP8 scales included."""
        tensors = (self.k, self.v)
        return sum(t.nbytes if isinstance(t, Fp8KV) else t.numel() * t.element_size() for t in tensors)

    def read(self, view: KVStore) -> torch.Tensor:
        """A view of this cache as a tensor of the model's dtype (`read`)."""
        return read(view, self.dtype)

    def slot_views(self, slot: int) -> tuple[KVStore, KVStore]:
        """Keys and values `[layers, B, N, H, D]` of one slot (views, written in place)."""
        return self.k[:, slot], self.v[:, slot]


class ChunkKVCache(_KVBuffers):
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
        kv_dtype: str = "auto",
    ) -> None:
        super().__init__((num_layers, num_slots, batch, 3 * tokens, heads, head_dim), dtype, device, kv_dtype)
        self.tokens = tokens

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
                full.copy_(self.read(stored))
                real_copy.copy_(real)
                real.mul_(c).addcmul_(imag, s, value=-1)  # real cos - imag sin
                imag.mul_(c).addcmul_(real_copy, s)  # real sin + imag cos
                stored.copy_(full)


# LiveAct's window, in latent frames (workers/LIVEACT.md): sink 0..1, memory 2..3, neighbours 4..5 (together
# the first chunk's 6 frames, the context of every later chunk), then the current chunk's 8 at 6..13.
MEMORY_FRAME = 2  # slot 2 <- ConvKV(slots 2..6): the long-term memory (recursive from chunk 3 on)
RECENT_MEMORY_FRAME = 3  # slot 3 <- ConvKV(slots 7..11)
NEIGHBOUR_FRAMES = 2  # slots 4..5 <- slots 12..13
WINDOW_FRAMES = CONVKV_FIRST_CHUNK + CONVKV_CHUNK  # 14
CONVKV_RATIO = 5  # frames per memory frame; the layout above needs exactly this ConvKVMemoryConfig.ratio

# compress(layer, keys, values) -> (memory keys, memory values): `WanSelfAttention.compress_memory` of that
# layer over pre-RoPE keys/values `[B, 5·L, H, D]`, giving `[B, L, H, D]`.
Compress = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class MemoryKVCache(_KVBuffers):
    """Pre-RoPE keys and values `[layers, slots, B, 14·L, H, D]` of SoulX-LiveAct's ConvKV window, in place.

    One slot per forward pass kind of a chunk: a denoising step (its keys at that step's noise level), plus,
    with audio CFG, one per audio step for the null-audio pass (`StreamingDiT` numbers them). L = tokens per
    latent frame; H = the heads this rank holds (a sequence-parallel rank keeps its heads' slice of every
    token, frame-major, as one rank would). Token range [f·L, (f + 1)·L) of a slot is frame slot f:

    - chunk 0 (6 frames) writes slots 0..5 and attends to [0, 6·L): itself;
    - chunk 1 (8 frames) writes slots 6..13 and attends to [0, 14·L): chunk 0 as it was, and itself;
    - chunk c >= 2: first `update_memory` (once per chunk per slot, before the pass):
      slot 2 <- ConvKV(slots 2..6), slot 3 <- ConvKV(slots 7..11), slots 4..5 <- slots 12..13, so slots 0..1
      stay chunk 0's first frames (the sink, frame 0 the reference image's latent), slot 2 is the recursive
      long-term memory, slot 3 chunk c−1's frames 1..5 compressed, slots 4..5 its last two frames; then it
      writes slots 6..13 and attends to [0, 14·L).

    Keys are stored pre-RoPE (after `norm_k`, in the cache dtype): the ConvKV mixes tokens of different
    positions, which does not commute with the rotation, and the neighbours move from positions 12..13 to
    4..5. A pass rotates the visible keys at use by the window's table (slot f at temporal position f,
    spatial position by the token's index in its slot; a memory token m takes the grid position of m), as
    upstream rotates its whole cache each call. Values carry no rotation.

    The storage is allocated once per session; its size never changes (`nbytes`).
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        batch: int,
        tokens_per_frame: int,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        kv_dtype: str = "auto",
    ) -> None:
        shape = (num_layers, num_slots, batch, WINDOW_FRAMES * tokens_per_frame, heads, head_dim)
        super().__init__(shape, dtype, device, kv_dtype)
        self.tokens_per_frame = tokens_per_frame

    def write_offset(self, chunk_index: int) -> int:
        """First token of chunk `chunk_index`'s keys/values: frame slot 0 for chunk 0, 6 afterwards."""
        return 0 if chunk_index == 0 else CONVKV_FIRST_CHUNK * self.tokens_per_frame

    def visible(self, chunk_index: int) -> int:
        """Tokens chunk `chunk_index` attends to: frame slots [0, 6) for chunk 0, [0, 14) afterwards."""
        return (CONVKV_FIRST_CHUNK if chunk_index == 0 else WINDOW_FRAMES) * self.tokens_per_frame

    def update_memory(self, slot: int, compress: Compress) -> None:
        """LiveAct's update of one slot before a pass of chunk >= 2, every block, in place: slot 2 <-
        ConvKV(slots 2..6), slot 3 <- ConvKV(slots 7..11), slots 4..5 <- slots 12..13. The two compressions
        of a block are computed before anything is written (slot 2's input includes slots 4..5)."""
        n = self.tokens_per_frame
        first, recent = MEMORY_FRAME * n, RECENT_MEMORY_FRAME * n
        neighbours = recent + n
        stack = CONVKV_RATIO * n
        tail = WINDOW_FRAMES * n - NEIGHBOUR_FRAMES * n
        for layer in range(self.num_layers):
            k, v = self.k[layer, slot], self.v[layer, slot]
            old_run, new_run = slice(first, first + stack), slice(first + stack, first + 2 * stack)
            old = compress(layer, self.read(k[:, old_run]), self.read(v[:, old_run]))
            new = compress(layer, self.read(k[:, new_run]), self.read(v[:, new_run]))
            k[:, first:recent].copy_(old[0])
            v[:, first:recent].copy_(old[1])
            k[:, recent:neighbours].copy_(new[0])
            v[:, recent:neighbours].copy_(new[1])
            k[:, neighbours : neighbours + NEIGHBOUR_FRAMES * n].copy_(k[:, tail:])
            v[:, neighbours : neighbours + NEIGHBOUR_FRAMES * n].copy_(v[:, tail:])

"""Token layout of Ulysses sequence parallelism in the DiT: every rank holds one band of every latent frame.

With P ranks and S = h·w tokens per latent frame, rank p holds tokens ``[p·S/P, (p+1)·S/P)`` of *each* frame
of the forward's F frames (a horizontal band of the token grid when P divides h), F·S/P tokens in frame
order. Why bands rather than one contiguous run of F·S/P tokens: every shard then has the same whole-frame
structure as the full sequence (F frames × S/P tokens), so everything that is per latent frame — the
per-frame timestep modulation, the output head, the frame-local audio attention, the face masks — runs on a
shard unchanged, with no per-token bookkeeping. The price is that P must divide S (no padding);
``check_sp_shapes`` says so at start-up with the valid degrees.

Around self-attention, ``workers.ulysses.seq_to_head`` concatenates the shards in rank order, so the full
sequence a head shard sees is *rank-major*: ``[band 0 of frames 0..F−1, band 1 of frames 0..F−1, …]``.
Softmax attention without a mask does not depend on the order of its keys, and gives each query its own
output, so the only thing that must follow the permutation is the RoPE position of every token
(``band_major``). Cached keys of a chunk are stored in that same order (head-sharded, ``[B, L, H/P, D]``),
and get their positions permuted per cached chunk the same way. A boolean attention mask (the full-sequence
references) would have to be permuted too; the SP path refuses one instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from proto.topology import check_heads_divisible
from workers.ulysses import group_rank, group_size


def check_sp_shapes(num_heads: int, tokens_per_frame: int, sp_degree: int, preset: str | None = None) -> None:
    """Raise ``ValueError`` unless ``sp_degree`` ranks can split both the heads and each frame's tokens."""
    check_heads_divisible(num_heads, sp_degree, preset)
    if tokens_per_frame % sp_degree != 0:
        choices = [p for p in range(1, num_heads + 1) if tokens_per_frame % p == 0 and num_heads % p == 0]
        raise ValueError(
            f"--score-workers {sp_degree} does not divide the {tokens_per_frame} tokens of a latent frame "
            f"(sequence parallelism gives each worker the same band of every frame); use one of "
            f"{', '.join(map(str, choices))}, or a video size whose (H/16)·(W/16) the worker count divides"
        )


def shard_frames(x: torch.Tensor, group: dist.ProcessGroup | None, frames: int, dim: int = 1) -> torch.Tensor:
    """This rank's band of every frame: ``[.., F·S, ..]`` (frame-major on ``dim``) → ``[.., F·S/P, ..]``."""
    p = group_size(group)
    if p == 1:
        return x
    dim = dim % x.dim()
    length = x.shape[dim]
    if length % (frames * p) != 0:
        raise ValueError(f"shard_frames: {length} tokens are not {frames} frames of a multiple of {p} tokens")
    banded = x.unflatten(dim, (frames, p, length // (frames * p)))
    return banded.select(dim + 1, group_rank(group)).flatten(dim, dim + 1).contiguous()


def band_major(
    x: torch.Tensor, sp_degree: int, frames: int, tokens_per_frame: int, dim: int = 0
) -> torch.Tensor:
    """Reorder a frame-major sequence ``[..., G·F·S, ...]`` (G groups of F frames of S tokens, e.g. cached
    chunks) into the order ``seq_to_head`` produces for each group: its F frames' band 0, then band 1, …"""
    if sp_degree == 1:
        return x
    dim = dim % x.dim()
    group_tokens = frames * tokens_per_frame
    if x.shape[dim] % group_tokens != 0 or tokens_per_frame % sp_degree != 0:
        raise ValueError(
            f"band_major: {x.shape[dim]} tokens are not groups of {frames} frames × {tokens_per_frame} "
            f"tokens split in {sp_degree} bands"
        )
    groups = x.unflatten(dim, (-1, frames, sp_degree, tokens_per_frame // sp_degree))
    return groups.transpose(dim + 1, dim + 2).flatten(dim, dim + 3)


def gather_frames(x: torch.Tensor, group: dist.ProcessGroup | None, frames: int) -> torch.Tensor:
    """All ranks' bands ``[B, F·S/P, C]`` → the full frame-major sequence ``[B, F·S, C]`` on every rank."""
    p = group_size(group)
    if p == 1:
        return x
    bands = [torch.empty_like(x) for _ in range(p)]
    dist.all_gather(bands, x.contiguous(), group=group)
    b, local, c = x.shape
    # [P, B, F, S/P, C] → [B, F, P, S/P, C]: band p of frame f goes to tokens [p·S/P, (p+1)·S/P) of f.
    stacked = torch.stack(bands).view(p, b, frames, local // frames, c)
    return stacked.permute(1, 2, 0, 3, 4).reshape(b, frames * p * (local // frames), c)

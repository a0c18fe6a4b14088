"""Token layout of Ulysses sequence parallelism in the DiT: every rank holds one band of every latent frame.

With P ranks and S = h·w tokens per latent frame, rank p holds tokens ``[p·S/P, (p+1)·S/P)`` of *each* frame
of the forward's F frames (a horizontal band of the token grid when P divides h), F·S/P tokens in frame
order. Why bands rather than one contiguous run of F·S/P tokens: every shard then has the same whole-frame
structure as the full sequence (F frames × S/P tokens), so everything that is per latent frame — the
per-frame timestep modulation, the output head, the frame-local audio attention, the face masks — runs on a
shard unchanged, with no per-token bookkeeping. The price is that P must divide S (no padding);
``check_sp_shapes`` says so at start-up with the valid degrees.

Around self-attention, ``frames_to_heads`` trades the band for a head shard and puts the gathered tokens
back in the canonical frame-major order of the unsharded model, in the same copy the all-to-all needs
anyway; ``heads_to_frames`` undoes it. Every head therefore attends over exactly the keys, in exactly the
order, that one rank would use: the attention's float reductions, the RoPE positions and the cached
keys/values (``[B, L, H/P, D]``, frame-major) are those of the single-rank model, and a boolean attention
mask applies unchanged. The token-wise layers (and cross-attention queries) see F·S/P rows instead of F·S,
and each attention sees H/P heads: the same sums, but matrix products of other shapes, for which CPU BLAS
(MKL/oneDNN; Intel vs AMD, AVX-512 or not, thread counts) and GPU kernels may pick other kernels and round
differently. The SP topologies therefore equal one worker within float32 rounding (max abs <= 1e-5 on the
latents at the tiny presets, tests/workers/test_sp_engine.py), not bit for bit.
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


def frames_to_heads(x: torch.Tensor, group: dist.ProcessGroup | None, frames: int) -> torch.Tensor:
    """``[B, F·S/P, H, D]`` (this rank's band of every frame, all heads) → ``[B, F·S, H/P, D]`` (all tokens
    in frame-major order, this rank's head group ``[p·H/P, (p+1)·H/P)``)."""
    p = group_size(group)
    if p == 1:
        return x
    b, local, h, d = x.shape
    if h % p != 0 or local % frames != 0:
        raise ValueError(
            f"frames_to_heads: {h} heads or {local} tokens do not split into {p} head groups "
            f"and {frames} frames"
        )
    # [B, L/P, P, H/P, D] → [P, B, L/P, H/P, D]: chunk j of dim 0 (head group j) goes to rank j.
    send = x.reshape(b, local, p, h // p, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[j] is band j of every frame: [P, B, F, S/P, ..] → [B, F, P, S/P, ..] is frame-major.
    band = local // frames
    return recv.view(p, b, frames, band, h // p, d).permute(1, 2, 0, 3, 4, 5).reshape(b, p * local, h // p, d)


def heads_to_frames(x: torch.Tensor, group: dist.ProcessGroup | None, frames: int) -> torch.Tensor:
    """``[B, F·S, H/P, D]`` (frame-major, head group) → ``[B, F·S/P, H, D]`` (band of every frame, all heads);
    the inverse of ``frames_to_heads``."""
    p = group_size(group)
    if p == 1:
        return x
    b, length, hp, d = x.shape
    if length % (frames * p) != 0:
        raise ValueError(
            f"heads_to_frames: {length} tokens are not {frames} frames of a multiple of {p} tokens"
        )
    band = length // (frames * p)
    # [B, F, P, S/P, ..] → [P, B, F, S/P, ..]: band j of every frame goes to rank j.
    send = x.reshape(b, frames, p, band, hp, d).permute(2, 0, 1, 3, 4, 5).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[j] is my band for rank j's head group; head groups in rank order are all heads.
    return recv.permute(1, 2, 3, 0, 4, 5).reshape(b, length // p, p * hp, d)


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

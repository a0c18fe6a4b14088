"""Ulysses sequence parallelism: tokens sharded across the SP group, heads sharded around self-attention.

With P ranks, each rank holds a contiguous shard of L/P tokens for everything token-wise (norms,
projections, FFN, cross-attention against the replicated context). Around self-attention one all-to-all
trades the sequence shard for a head shard (``seq_to_head``: every rank then sees all L tokens for H/P
heads), and a second one trades it back (``head_to_seq``). Rank p owns tokens ``[p·L/P, (p+1)·L/P)`` and
heads ``[p·H/P, (p+1)·H/P)``; the head shard is also what the per-rank KV cache keeps.

Both all-to-alls use ``all_to_all_single``, which gloo implements for CPU tensors (checked on torch 2.15), so
the CPU test worlds run the same code as NCCL. The ops are inference-only (no autograd through the
collective). A ``group`` of ``None`` or size 1 makes every function the identity, so one code path serves
the self-contained single-worker topology.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from proto.topology import check_heads_divisible


def validate_heads(num_heads: int, sp_degree: int, preset: str | None = None) -> None:
    """Raise ``ValueError`` (naming the valid SP degrees) unless ``sp_degree`` divides ``num_heads``."""
    check_heads_divisible(num_heads, sp_degree, preset)


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def padded_length(length: int, sp_degree: int) -> int:
    """``length`` rounded up to a multiple of ``sp_degree``."""
    return -(-length // sp_degree) * sp_degree


def seq_to_head(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``[B, L/P, H, D]`` (sequence shard, all heads) -> ``[B, L, H/P, D]`` (all tokens, head shard)."""
    p = group_size(group)
    if p == 1:
        return x
    b, s, h, d = x.shape
    if h % p != 0:
        raise ValueError(f"seq_to_head: {h} heads do not split over {p} ranks (see validate_heads)")
    # [B, s, P, H/P, D] -> [P, B, s, H/P, D]: chunk j of dim 0 (head group j) goes to rank j.
    send = x.reshape(b, s, p, h // p, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[j] is rank j's token shard for my head group; shards in rank order are the full sequence.
    return recv.permute(1, 0, 2, 3, 4).reshape(b, p * s, h // p, d)


def head_to_seq(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``[B, L, H/P, D]`` (all tokens, head shard) -> ``[B, L/P, H, D]`` (sequence shard, all heads)."""
    p = group_size(group)
    if p == 1:
        return x
    b, length, hp, d = x.shape
    if length % p != 0:
        raise ValueError(
            f"head_to_seq: sequence length {length} does not split over {p} ranks (pad with shard_sequence)"
        )
    s = length // p
    # [B, P, s, H/P, D] -> [P, B, s, H/P, D]: chunk j of dim 0 (token shard j) goes to rank j.
    send = x.reshape(b, p, s, hp, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[j] is my token shard for rank j's head group; head groups in rank order are all heads.
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s, p * hp, d)


def shard_sequence(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous shard of ``x`` along ``dim``, after zero-padding it to a multiple of P.

    Padded tokens are real zeros in the shard: when ``x.shape[dim]`` is not a multiple of P the caller must
    keep them out of attention (mask them) or choose a length that divides. ``gather_sequence`` undoes it.
    """
    p = group_size(group)
    if p == 1:
        return x
    dim = dim % x.dim()
    length = x.shape[dim]
    pad = padded_length(length, p) - length
    if pad:
        # F.pad lists (left, right) pairs starting from the last dimension.
        x = F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, pad])
    return x.chunk(p, dim=dim)[group_rank(group)].contiguous()


def gather_sequence(
    x: torch.Tensor, group: dist.ProcessGroup | None, length: int, dim: int = 1
) -> torch.Tensor:
    """All shards concatenated along ``dim`` on every rank, cut back to the unpadded ``length``."""
    p = group_size(group)
    if p == 1:
        return x.narrow(dim, 0, length)
    shards = [torch.empty_like(x) for _ in range(p)]
    dist.all_gather(shards, x.contiguous(), group=group)
    full = torch.cat(shards, dim=dim)
    if full.shape[dim] < length:
        raise ValueError(f"gather_sequence: the shards hold {full.shape[dim]} tokens, fewer than {length}")
    return full.narrow(dim, 0, length)

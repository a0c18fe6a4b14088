"""Ulysses SP primitives on a real gloo world: layouts, round trips, and attention equal to one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_world import run_world

from workers.ulysses import gather_sequence, head_to_seq, seq_to_head, shard_sequence, validate_heads


def test_heads_that_do_not_split_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"12 heads; --score-workers 5 .* use one of 1, 2, 3, 4, 6, 12"):
        validate_heads(12, 5)


def test_without_a_group_every_primitive_is_the_identity() -> None:
    x = torch.randn(2, 7, 4, 3)
    assert torch.equal(seq_to_head(x, None), x)
    assert torch.equal(head_to_seq(x, None), x)
    assert torch.equal(gather_sequence(shard_sequence(x, None), None, length=7), x)


def _full(b: int, length: int, h: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(b, length, h, d, generator=torch.Generator().manual_seed(seed))


def _layouts(rank: int, world: int) -> None:
    x = _full(2, 6 * world, 3 * world, 4, seed=1)
    local = x.chunk(world, dim=1)[rank]
    heads = seq_to_head(local, dist.group.WORLD)
    # All tokens, this rank's contiguous slice of heads.
    assert torch.equal(heads, x.chunk(world, dim=2)[rank])
    assert torch.equal(head_to_seq(heads, dist.group.WORLD), local)


def test_seq_to_head_gives_all_tokens_of_a_head_shard_and_head_to_seq_inverts_it(tmp_path) -> None:
    run_world(_layouts, 3, tmp_path)


def _padded_shards(rank: int, world: int) -> None:
    x = _full(1, 7, 2, 3, seed=2)
    shard = shard_sequence(x, dist.group.WORLD, dim=1)
    assert shard.shape == (1, 4, 2, 3)  # 7 tokens padded to 8, 4 per rank
    assert torch.equal(gather_sequence(shard, dist.group.WORLD, length=7, dim=1), x)


def test_shard_then_gather_restores_a_sequence_that_needed_padding(tmp_path) -> None:
    run_world(_padded_shards, 2, tmp_path)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, L, H, D] in and out; plain softmax attention over all tokens, per head."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _sp_attention_matches(rank: int, world: int) -> None:
    torch.set_num_threads(1)
    q, k, v = (_full(2, 5 * world, 2 * world, 8, seed=s) for s in (10, 11, 12))
    reference = _attention(q, k, v)
    group = dist.group.WORLD
    ql, kl, vl = (shard_sequence(t, group) for t in (q, k, v))
    heads = _attention(seq_to_head(ql, group), seq_to_head(kl, group), seq_to_head(vl, group))
    out_local = head_to_seq(heads, group)
    out = gather_sequence(out_local, group, length=q.shape[1])
    assert (out - reference).abs().max().item() <= 1e-6


def test_sequence_parallel_attention_equals_single_process_attention(tmp_path) -> None:
    run_world(_sp_attention_matches, 3, tmp_path)

"""3-D RoPE (workers/rope.py): Wan's interleaved-pair convention and per-axis frequencies."""

import torch

from proto.model_config import get_model_preset
from workers.rope import apply_rope, grid_positions, inverse_frequencies, rope_cos_sin


def test_grid_positions_are_row_major_frame_row_column():
    pos = grid_positions(torch.tensor([5, 6]), 2, 3)
    assert pos.shape == (12, 3)
    assert pos[0].tolist() == [5, 0, 0]
    assert pos[1].tolist() == [5, 0, 1]
    assert pos[3].tolist() == [5, 1, 0]
    assert pos[6].tolist() == [6, 0, 0]


def test_axis_frequencies_follow_wans_per_axis_bases():
    cfg = get_model_preset("wan2.1-i2v-14b")
    inv_t, inv_h, inv_w = inverse_frequencies(cfg)
    assert (len(inv_t), len(inv_h), len(inv_w)) == (22, 21, 21)
    assert torch.allclose(inv_t, 10000.0 ** (-torch.arange(0, 44, 2, dtype=torch.float64) / 44))
    assert torch.allclose(inv_h, 10000.0 ** (-torch.arange(0, 42, 2, dtype=torch.float64) / 42))


def test_rotation_equals_complex_multiplication_of_interleaved_pairs():
    cfg = get_model_preset("tiny")
    pos = grid_positions(torch.tensor([0, 7, 20]), 3, 2)
    cos, sin = rope_cos_sin(cfg, pos)
    x = torch.randn(2, pos.shape[0], cfg.num_heads, cfg.head_dim, dtype=torch.float64)
    as_complex = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
    expected = torch.view_as_real(
        as_complex * torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[None, :, None]
    )
    assert torch.allclose(apply_rope(x, cos, sin), expected.flatten(-2), atol=1e-12)


def test_first_pairs_rotate_with_time_and_the_rest_with_space():
    cfg = get_model_preset("tiny")
    cos, _ = rope_cos_sin(cfg, torch.tensor([[3, 0, 0], [0, 2, 1]]))
    t_pairs = cfg.rope_pairs[0]
    assert bool((cos[0, t_pairs:] == 1).all()) and not bool((cos[0, :t_pairs] == 1).all())
    assert bool((cos[1, :t_pairs] == 1).all())


def test_attention_logits_depend_only_on_position_offsets():
    cfg = get_model_preset("tiny")
    q = torch.randn(1, 1, 1, cfg.head_dim, dtype=torch.float64)
    k = torch.randn(1, 1, 1, cfg.head_dim, dtype=torch.float64)

    def logit(pq, pk):
        cq, sq = rope_cos_sin(cfg, torch.tensor([pq]))
        ck, sk = rope_cos_sin(cfg, torch.tensor([pk]))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    assert torch.allclose(logit([5, 1, 2], [3, 0, 0]), logit([20, 4, 3], [18, 3, 1]), atol=1e-12)
    assert not torch.allclose(logit([5, 1, 2], [3, 0, 0]), logit([5, 1, 2], [2, 0, 0]))


def test_rope_keeps_dtype():
    cfg = get_model_preset("tiny")
    cos, sin = rope_cos_sin(cfg, grid_positions(torch.arange(2), 2, 2))
    x = torch.randn(1, 8, cfg.num_heads, cfg.head_dim, dtype=torch.bfloat16)
    assert apply_rope(x, cos, sin).dtype == torch.bfloat16

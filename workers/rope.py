"""Wan 2.1 3-D rotary position embedding with interleaved pairs, positions passed explicitly.

Each head of width D holds D/2 complex pairs (x[2j], x[2j+1]); the first pairs rotate with the temporal
position, then the row, then the column (split from ModelConfig.rope_pairs, 22/21/21 for D = 128). Axis a
with n_a pairs uses angle pos · θ^(−2j / (2·n_a)), j < n_a, exactly Wan's per-axis `rope_params`. Angles are
always computed in float64 as in Wan; the rotation runs in the tables' dtype: `rope_cos_sin` gives float64
tables (Wan's path, used by the full-sequence references and training), and the streaming engine casts them
once to float32 (`StreamingDiT`, built per chunk position at session open), which stays within 1e-5 of the
float64 path on the tiny presets (tests/workers/test_streaming_static.py). Positions are given per token, so a
sequence shard or a cached chunk can be rotated for any window position without a 1024-entry table.
"""

from __future__ import annotations

import torch

from proto.model_config import ModelConfig


def grid_positions(frame_positions: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Token positions `[F·h·w, 3]` (int64: frame, row, column) in Wan's row-major (f, h, w) token order.

    `frame_positions` `[F]` are the temporal positions of the latent frames; h, w are token-grid sizes.
    """
    f = frame_positions.to(torch.int64)
    rows = torch.arange(height, dtype=torch.int64, device=f.device)
    cols = torch.arange(width, dtype=torch.int64, device=f.device)
    grid = torch.stack(torch.meshgrid(f, rows, cols, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)


def inverse_frequencies(config: ModelConfig, device: torch.device | None = None) -> list[torch.Tensor]:
    """Per-axis inverse frequencies (float64), lengths `config.rope_pairs`."""
    out = []
    for pairs in config.rope_pairs:
        exponent = torch.arange(0, 2 * pairs, 2, dtype=torch.float64, device=device) / (2 * pairs)
        out.append(1.0 / (config.rope_theta**exponent))
    return out


def rope_cos_sin(config: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles of tokens at `positions` `[L, 3]`: float64 `[L, D/2]` each."""
    inv = inverse_frequencies(config, device=positions.device)
    pos = positions.to(torch.float64)
    angles = torch.cat([pos[:, axis, None] * inv[axis][None, :] for axis in range(3)], dim=1)
    return torch.cos(angles), torch.sin(angles)


def temporal_shift_cos_sin(
    config: ModelConfig, shift: int, tokens: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[tokens, D/2]` (float64) of a rotation by `shift` latent frames on the temporal axis only.

    Rotating keys already rotated at positions p by this table gives them positions p + shift (rotations by
    angles add), which is how the streaming cache moves its previous chunk back one chunk in window mode.
    """
    positions = torch.tensor([[shift, 0, 0]], dtype=torch.int64, device=device).expand(tokens, 3)
    return rope_cos_sin(config, positions)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of `x` `[..., L, H, D]` by cos/sin `[L, D/2]`, computed in the tables' dtype
    (float64: Wan's path; float32: the streaming engine's), the result in x's dtype."""
    pairs = x.to(cos.dtype).unflatten(-1, (-1, 2))
    real, imag = pairs.unbind(-1)
    c = cos[:, None, :]
    s = sin[:, None, :]
    return torch.stack((real * c - imag * s, real * s + imag * c), dim=-1).flatten(-2).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of `x` `[B, L, H, D]` by angles with cos/sin `[L, D/2]`; keeps x's dtype.

    The arithmetic runs in the tables' dtype (`rotate`)."""
    length, d = x.shape[1], x.shape[3]
    if cos.shape != (length, d // 2):
        raise ValueError(
            f"RoPE table has shape {tuple(cos.shape)}, expected {(length, d // 2)} for x {tuple(x.shape)}"
        )
    return rotate(x, cos, sin)

"""TalkingMachines audio conditioning: audio projection, silence embedding, face-region token masks and the
frame-local audio attention used inside every cross-attention.

Inputs (built by the master's audio front-end): for each character, wav2vec2 hidden states resampled to the
video frame rate and grouped per latent frame, `[frames_per_latent, wav2vec_layers, wav2vec_dim]` per latent
frame. A chunk of F latent frames is delivered with `half_window` extra latent frames of context on each side
(`[B, C, F + window − 1, frames_per_latent, layers, dim]`), so each latent frame sees the audio of the
`window` (= 5) latent frames centred on it — the paper's local window.

Audio parameters (key names, relative to the model):
- `audio_proj.proj.{0,2,4}`: Linear(window·fpl·layers·dim → hidden) → GELU → Linear(hidden → hidden) → GELU →
  Linear(hidden → num_tokens·token_dim);
- `audio_proj.norm`: LayerNorm(token_dim) on every audio token;
- `audio_proj.silence`: `[num_tokens, token_dim]`, the learned silence embedding (zero-initialised, the
  paper's "e.g. zero embedding"): it replaces a character's tokens on the latent frames where it is silent;
- `blocks.{i}.cross_attn.k_audio`, `.v_audio` (Linear token_dim → dim, zero-initialised) and
  `.norm_k_audio` (RMSNorm over dim, like `norm_k_img`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from proto.model_config import AudioConfig
from workers.attention import attention


@dataclass
class AudioConditioning:
    """Audio inputs for one forward over F latent frames of C characters: raw features or ready tokens.

    features: `[B, C, F + window − 1, frames_per_latent, wav2vec_layers, wav2vec_dim]` (half_window latent
        frames of context before and after the F frames; see `pad_audio_window` for whole clips), with
    speaking: `[B, C, F]` bool; False = silent, the character's tokens become the silence embedding.
    tokens: instead of features/speaking, projected tokens `[B, C, F, num_tokens, token_dim]`
        (`AudioProjection` output), e.g. to reuse one projection for several forwards.
    face_mask: `[B, C, F·h·w]` (bool or float in [0, 1]) — where character c's audio output is added; None =
        everywhere (single character filling the frame). Build it with `face_token_mask`.
    """

    features: torch.Tensor | None = None
    speaking: torch.Tensor | None = None
    face_mask: torch.Tensor | None = None
    tokens: torch.Tensor | None = None

    def __post_init__(self) -> None:
        raw = self.features is not None and self.speaking is not None
        if raw == (self.tokens is not None):
            raise ValueError(
                "AudioConditioning takes either features and speaking flags, or tokens (not both)"
            )


class AudioProjection(nn.Module):
    """Windowed audio projection: per latent frame, `window` latent frames of features → num_tokens tokens."""

    def __init__(self, config: AudioConfig) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Sequential(
            nn.Linear(config.input_dim, config.hidden_dim),
            nn.GELU(),
            nn.Linear(config.hidden_dim, config.hidden_dim),
            nn.GELU(),
            nn.Linear(config.hidden_dim, config.num_tokens * config.token_dim),
        )
        self.norm = nn.LayerNorm(config.token_dim, eps=config.eps)
        self.silence = nn.Parameter(torch.zeros(config.num_tokens, config.token_dim))

    def forward(self, features: torch.Tensor, speaking: torch.Tensor) -> torch.Tensor:
        """features `[B, C, F + window − 1, fpl, layers, dim]`, speaking `[B, C, F]`
        → tokens `[B, C, F, N, token_dim]`."""
        cfg = self.config
        b, c, t_in = features.shape[:3]
        frames = t_in - (cfg.window - 1)
        expected = (cfg.frames_per_latent, cfg.wav2vec_layers, cfg.wav2vec_dim)
        if frames < 1 or tuple(features.shape[3:]) != expected:
            raise ValueError(
                f"audio features have shape {tuple(features.shape)}; expected [B, C, F + {cfg.window - 1}, "
                f"{', '.join(map(str, expected))}] (each latent frame needs {cfg.half_window} frames of "
                "context on each side — pad whole clips with pad_audio_window)"
            )
        if tuple(speaking.shape) != (b, c, frames):
            raise ValueError(f"speaking flags have shape {tuple(speaking.shape)}, expected {(b, c, frames)}")
        # unfold puts the window axis last: [B, C, F, fpl, layers, dim, window] → window-major flattening.
        windows = features.unfold(2, cfg.window, 1).movedim(-1, 3).flatten(3)
        tokens = self.proj(windows.to(self.proj[0].weight.dtype))
        tokens = tokens.unflatten(-1, (cfg.num_tokens, cfg.token_dim))
        norm = self.norm
        tokens = F.layer_norm(
            tokens.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps
        ).to(tokens.dtype)
        silence = self.silence.to(tokens.dtype).expand_as(tokens)
        return torch.where(speaking[..., None, None].to(torch.bool), tokens, silence)


def pad_audio_window(features: torch.Tensor, half_window: int) -> torch.Tensor:
    """Replicate the first/last latent frame `half_window` times along dim 2 (clip edges, as MultiTalk
    clamps): `[B, C, T, ...]` → `[B, C, T + 2·half_window, ...]`; a streaming chunk starting at latent
    frame s is then `padded[:, :, s : s + F + 2·half_window]`.
    """
    first = features[:, :, :1].expand(-1, -1, half_window, *features.shape[3:])
    last = features[:, :, -1:].expand(-1, -1, half_window, *features.shape[3:])
    return torch.cat([first, features, last], dim=2)


def normalise_boxes(boxes_px: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel boxes `[C, 4]` (x0, y0, x1, y1) in an image of height × width → normalised [0, 1] boxes."""
    scale = torch.tensor([width, height, width, height], dtype=torch.float64, device=boxes_px.device)
    return boxes_px.to(torch.float64) / scale


def face_token_mask(
    boxes: torch.Tensor, token_height: int, token_width: int, num_frames: int
) -> torch.Tensor:
    """Token mask `[C, num_frames·h·w]` (bool) of the tokens whose cell overlaps each character's face box.

    boxes: `[C, 4]` normalised (x0, y0, x1, y1) in [0, 1] (use `normalise_boxes` for pixel boxes); token cells
    are the (h, w) token grid over the frame; the mask repeats for every latent frame, Wan's (f, h, w) order.
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"face boxes must be [C, 4] (x0, y0, x1, y1), got shape {tuple(boxes.shape)}")
    b = boxes.to(torch.float64)
    if bool(((b < 0) | (b > 1)).any()) or bool(((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])).any()):
        raise ValueError(
            f"face boxes must be normalised with x0 < x1, y0 < y1 inside [0, 1], got {b.tolist()}"
        )
    rows = torch.arange(token_height, dtype=torch.float64, device=b.device)
    cols = torch.arange(token_width, dtype=torch.float64, device=b.device)
    # A cell [i/h, (i+1)/h) overlaps [y0, y1) when its start < y1 and its end > y0.
    in_rows = (rows[None, :] / token_height < b[:, 3:4]) & ((rows[None, :] + 1) / token_height > b[:, 1:2])
    in_cols = (cols[None, :] / token_width < b[:, 2:3]) & ((cols[None, :] + 1) / token_width > b[:, 0:1])
    per_frame = (in_rows[:, :, None] & in_cols[:, None, :]).flatten(1)
    return per_frame.repeat(1, num_frames)


def frame_local_audio_attention(
    q: torch.Tensor,
    k_audio: torch.Tensor,
    v_audio: torch.Tensor,
    face_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Each latent frame's queries attend only to that frame's audio tokens, per character, masked per token.

    q `[B, F·S, H, D]` (S tokens per frame); k_audio, v_audio `[B, C, F, N, H, D]`; face_mask `[B, C, F·S]` or
    None. Returns Σ_c mask_c · softmax(q k_cᵀ) v_c as `[B, F·S, H, D]` (a separate softmax per character).
    """
    b, c, f, n, h, d = k_audio.shape
    s = q.shape[1] // f
    q_frames = q.reshape(b * f, s, h, d)
    out = torch.zeros_like(q)
    for j in range(c):
        o = attention(q_frames, k_audio[:, j].reshape(b * f, n, h, d), v_audio[:, j].reshape(b * f, n, h, d))
        o = o.reshape(b, f * s, h, d)
        out = out + (o if face_mask is None else o * face_mask[:, j, :, None, None].to(o.dtype))
    return out

"""Audio conditioning of both audio variants (ModelConfig.audio): TalkingMachines' audio projection, silence
embedding, face-region token masks and the frame-local audio attention used inside every cross-attention;
and the InfiniteTalk / SoulX-LiveAct audio projection and per-block audio cross-attention (at the end).

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

from proto.model_config import AudioConfig, InfiniteTalkAudioConfig
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


# ---- InfiniteTalk / SoulX-LiveAct variant ------------------------------------------------------------------
#
# Parameter names are upstream's (MeiGen-AI/InfiniteTalk wan/modules/multitalk_model.py,
# Soul-AILab/SoulX-LiveAct model_liveact/model_memory.py), so a published state dict loads without renaming:
# - `audio_proj.proj1` (first-frame window → intermediate), `audio_proj.proj1_vf` (a later latent frame's
#   taps → intermediate), `audio_proj.proj2` (intermediate → intermediate), `audio_proj.proj3` (intermediate
#   → context_tokens·output_dim), `audio_proj.norm` (LayerNorm(output_dim), when norm_output_audio);
# - `blocks.{i}.norm_x` (affine LayerNorm(dim), when norm_input_visual) and
#   `blocks.{i}.audio_cross_attn.{q_linear, kv_linear, proj}` (dim → dim, output_dim → 2·dim, dim → dim, all
#   with bias; no q/k norms).


@dataclass
class InfiniteTalkAudio:
    """Audio inputs of the infinitetalk variant for one forward over F latent frames (one speaker).

    windows: `[B, T, audio_window, wav2vec_layers, wav2vec_dim]`, each video frame's window of wav2vec2 hidden
        states (`video_frame_windows`), T = 1 + vae_scale·(F − 1) when `starts_clip`, else vae_scale·F.
    tokens: instead of windows, projected tokens `[B, F, context_tokens, output_dim]`.
    starts_clip: the first latent frame is the clip's reference frame (LiveAct's first chunk): its window goes
        through `proj1`, and with `mute_reference_frame` its audio output is zero.
    """

    windows: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    starts_clip: bool = False

    def __post_init__(self) -> None:
        if (self.windows is None) == (self.tokens is None):
            raise ValueError("InfiniteTalkAudio takes either windows or tokens (exactly one)")


def video_frame_windows(embedding: torch.Tensor, start: int, end: int, half_window: int) -> torch.Tensor:
    """Per-video-frame audio windows `[end − start, 2·half_window + 1, ...]` of a clip's per-video-frame
    features `embedding` `[T, ...]` (e.g. `[T, layers, dim]`): frame i gets frames i − half .. i + half,
    indices clamped to the clip (its first/last frame repeats), as InfiniteTalk and LiveAct build them."""
    offsets = torch.arange(-half_window, half_window + 1, device=embedding.device)
    frames = torch.arange(start, end, device=embedding.device)
    index = (frames[:, None] + offsets[None, :]).clamp(0, embedding.shape[0] - 1)
    return embedding[index]


class InfiniteTalkAudioProjection(nn.Module):
    """`audio_proj`: per latent frame, its video frames' audio windows → context_tokens audio tokens."""

    def __init__(self, config: InfiniteTalkAudioConfig) -> None:
        super().__init__()
        self.config = config
        inter = config.intermediate_dim
        self.proj1 = nn.Linear(config.first_frame_dim, inter)
        self.proj1_vf = nn.Linear(config.later_frame_dim, inter)
        self.proj2 = nn.Linear(inter, inter)
        self.proj3 = nn.Linear(inter, config.context_tokens * config.output_dim)
        self.norm: nn.Module = nn.Identity()
        if config.norm_output_audio:
            self.norm = nn.LayerNorm(config.output_dim, eps=config.norm_eps)

    def later_frame_taps(self, windows: torch.Tensor) -> torch.Tensor:
        """Windows of whole later latent frames `[B, vae_scale·F, W, L, C]` → their taps `[B, F, taps·L·C]`:
        the first video frame's window up to its centre, the middle frames' centres, the last frame's window
        from its centre (in that order, each window-major)."""
        cfg = self.config
        mid = cfg.half_window
        groups = windows.unflatten(1, (-1, cfg.vae_scale))  # [B, F, vae_scale, W, L, C]
        taps = torch.cat([groups[:, :, 0, : mid + 1], groups[:, :, 1:-1, mid], groups[:, :, -1, mid:]], dim=2)
        return taps.flatten(2)

    def forward(self, windows: torch.Tensor, starts_clip: bool) -> torch.Tensor:
        """windows `[B, T, W, L, C]` (`InfiniteTalkAudio`) → tokens `[B, F, context_tokens, output_dim]`."""
        cfg = self.config
        expected = (cfg.audio_window, cfg.wav2vec_layers, cfg.wav2vec_dim)
        later = windows[:, 1:] if starts_clip else windows
        if windows.ndim != 5 or tuple(windows.shape[2:]) != expected or later.shape[1] % cfg.vae_scale:
            first = "1 + " if starts_clip else ""
            raise ValueError(
                f"audio windows have shape {tuple(windows.shape)}; expected [B, {first}{cfg.vae_scale}·F, "
                f"{', '.join(map(str, expected))}] (starts_clip={starts_clip})"
            )
        dtype = self.proj1.weight.dtype
        hidden = [torch.relu(self.proj1_vf(self.later_frame_taps(later).to(dtype)))]
        if starts_clip:
            hidden.insert(0, torch.relu(self.proj1(windows[:, :1].flatten(2).to(dtype))))
        h = torch.relu(self.proj2(torch.cat(hidden, dim=1)))
        tokens = self.proj3(h).unflatten(-1, (cfg.context_tokens, cfg.output_dim))
        if isinstance(self.norm, nn.LayerNorm):
            norm = self.norm
            tokens = F.layer_norm(
                tokens.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps
            ).to(tokens.dtype)
        return tokens


class AudioCrossAttention(nn.Module):
    """`audio_cross_attn`: every latent frame's tokens attend to that frame's audio tokens only (one speaker).

    x `[B, F·S, dim]` (S tokens per frame; under sequence parallelism a rank's band of every frame), audio
    keys/values from `kv` `[B, F, N, H, D]` → `[B, F·S, dim]`. The block adds it to the residual.
    """

    def __init__(self, dim: int, num_heads: int, token_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(token_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def kv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio tokens `[B, F, N, token_dim]` → keys, values `[B, F, N, H, D]` (once per chunk)."""
        k, v = self.kv_linear(tokens).unflatten(-1, (2, self.num_heads, self.head_dim)).unbind(-3)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self.q_linear(x).unflatten(-1, (self.num_heads, self.head_dim))
        out = frame_local_audio_attention(q, kv[0][:, None], kv[1][:, None], None)
        return self.proj(out.flatten(2))

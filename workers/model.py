"""The Wan 2.1 DiT (T2V and I2V) with either audio variant and optional ConvKV memory, in one file.

Structure and module names follow Wan 2.1's `wan/modules/model.py` exactly (see wan.md §1), so a public
state dict loads with `load_state_dict` and no renaming: `patch_embedding`, `text_embedding`,
`time_embedding`, `time_projection`, `blocks.{i}.{modulation, self_attn, norm3, cross_attn, ffn}`, `head`,
`img_emb` (I2V), plus the audio layers documented in workers/audio.py: TalkingMachines (`audio_proj`,
`blocks.{i}.cross_attn.{k_audio, v_audio, norm_k_audio}`) or InfiniteTalk / SoulX-LiveAct (`audio_proj.{proj1,
proj1_vf, proj2, proj3, norm}`, `blocks.{i}.{norm_x, audio_cross_attn}`), and LiveAct's ConvKV memory
(`blocks.{i}.self_attn.{memory_proj_k, memory_proj_v}`, `WanSelfAttention.compress_memory`).

Differences from the original forward, all needed for streaming and none changing the math:
- timesteps may be per latent frame (`t` `[B, F]`), the modulation broadcast per frame (causal students);
- RoPE positions are explicit per token (`frame_positions`, `prefix_frame_positions`);
- self-attention can take a pre-RoPE key/value prefix (`prefix_kv`, e.g. a flop count of a cached forward)
  and a boolean mask (the full-sequence reference of sparse attention);
- `forward_step`, the streaming engine's pass over one chunk: time embeddings and float32 RoPE tables come
  precomputed, each block writes its chunk's keys/values in place into the session's preallocated cache
  buffer (rotated; or pre-RoPE, the visible keys then rotated at use, for LiveAct's ConvKV window) and
  attends over one view of it (`workers.kv_cache`); the audio keys/values come projected once per chunk
  (`audio_kv`);
- text/image cross-attention keys/values can be precomputed once per session (`cross_attention_kv`);
- the infinitetalk variant's audio output is added after the text/image cross-attention, as upstream does;
  on a clip's first latent frame it is zero when the config says so (LiveAct's `mute_reference_frame`);
- with an `sp_group`, Ulysses sequence parallelism: each rank runs its band of every frame, self-attention
  switches to head sharding (all tokens in the unsharded frame-major order) around its core, the head's
  output is gathered (layout in `workers/sp.py`).
Modulation, time embedding and head run in float32 whatever the weight dtype, as in Wan.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from proto.model_config import AudioConfig, ConvKVMemoryConfig, InfiniteTalkAudioConfig, ModelConfig
from workers.attention import attention
from workers.audio import (
    AudioConditioning,
    AudioCrossAttention,
    AudioProjection,
    InfiniteTalkAudio,
    InfiniteTalkAudioProjection,
    frame_local_audio_attention,
)
from workers.kv_cache import KVStore
from workers.kv_cache import read as read_kv
from workers.rope import apply_rope, grid_positions, rope_cos_sin
from workers.sp import check_sp_shapes, frames_to_heads, gather_frames, heads_to_frames, shard_frames
from workers.ulysses import group_size

KV = tuple[torch.Tensor, torch.Tensor]
Rope = tuple[torch.Tensor, torch.Tensor]
# One block's cache for a streaming pass: (keys, values) buffers `[B, N, H, D]`, the first token the pass
# writes its chunk's keys/values at, how many tokens it attends to, and how the keys are stored: None =
# rotated when written (the sparse-causal `ChunkKVCache`, N = 3·L), or the float32 cos/sin `[visible, D/2]`
# of the key positions = stored pre-RoPE and rotated at use (LiveAct's `MemoryKVCache`, N = 14 frames).
# The buffers are `kv_cache.Fp8KV` (e4m3 + scales) with --kv-cache-dtype fp8.
CacheView = tuple[KVStore, KVStore, int, int, Rope | None]


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding `[N, dim]` (float64, [cos | sin]) of timesteps `t` `[N]` in 0..1000."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _modulation(*shape: int) -> nn.Parameter:
    """N(0, 1/dim) modulation drawn in float32 and stored in the default dtype (see `_init_f32`)."""
    drawn = torch.randn(*shape, dtype=torch.float32) / shape[-1] ** 0.5
    return nn.Parameter(drawn.to(torch.get_default_dtype()))


def _init_f32(weight: torch.Tensor, init: Callable[[torch.Tensor], object]) -> None:
    """Run the random ``init`` on a float32 copy of ``weight`` and store it. bfloat16 draws from a seed are
    not the float32 draws rounded (a bfloat16 ``uniform_`` maps values rounding up to its upper bound to the
    lower one), so this keeps seeded random weights built in bfloat16 the float32 ones rounded: a bfloat16
    ``--random-weights`` run is the same model. One float32 tensor at a time, as large as one weight."""
    if weight.dtype == torch.float32:
        init(weight)
        return
    tmp = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    init(tmp)
    weight.copy_(tmp)


def _linear_f32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` computed in float32 regardless of the layer's dtype (Wan's fp32 autocast regions)."""
    return F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())


class WanRMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32, times a learned weight `[dim]`."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (affine or not), result cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class WanSelfAttention(nn.Module):
    """Self-attention with RMSNorm on q/k over the full width and 3-D RoPE.

    The core is split so sequence parallelism can wrap it: `project` gives q, k, v `[B, L, H, D]` after the
    q/k norms and before RoPE; `attend` prepends a pre-RoPE prefix, applies RoPE and calls
    `workers.attention.attention`; `attend_cached` rotates q and k, writes k and v into a cache buffer in
    place and attends over the buffer's visible view. With an SP group of P ranks, `forward` projects its
    token shard, switches q/k/v to head sharding (all L tokens in frame-major order, H/P heads) around the
    core, and back.

    With a `ConvKVMemoryConfig`, SoulX-LiveAct's memory convolutions `memory_proj_k` / `memory_proj_v`
    (depthwise Conv1d over the token axis, kernel = stride = ratio, no bias) and `compress_memory`, which
    turns past pre-RoPE keys/values into memory tokens; the stream prepends them as a `prefix`.
    """

    def __init__(
        self, dim: int, num_heads: int, eps: float, memory: ConvKVMemoryConfig | None = None
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)
        self.memory = memory
        if memory is not None:
            conv = {"kernel_size": memory.ratio, "stride": memory.ratio, "groups": dim, "bias": False}
            self.memory_proj_k = nn.Conv1d(dim, dim, **conv)
            self.memory_proj_v = nn.Conv1d(dim, dim, **conv)

    def compress_memory(
        self, k: torch.Tensor, v: torch.Tensor, mean: bool = False, first_head: int = 0
    ) -> KV:
        """Past pre-RoPE keys and values `[B, N, H, D]` → memory tokens `[B, N / ratio, H, D]` each.

        Every `ratio` consecutive tokens (in the given order: frame-major, so a run crosses a frame boundary
        unless the tokens of a frame are a multiple of ratio) become one, per channel: the depthwise
        `memory_proj_k` for the keys and, as upstream (`values_use_key_conv`), for the values too
        (`memory_proj_v` otherwise). `mean=True` averages the run instead (upstream's `--mean_memory`).

        The convolution is per channel, so a head shard compresses alone: k, v may hold heads
        [first_head, first_head + H) of the model's (a sequence-parallel rank's cache), and use those heads'
        channels of the weights.
        """
        if self.memory is None:
            raise ValueError("this self-attention has no ConvKV memory (ModelConfig.memory is None)")
        ratio = self.memory.ratio
        heads = k.shape[2] if k.ndim == 4 else -1
        if (
            k.shape != v.shape
            or k.ndim != 4
            or k.shape[1] % ratio
            or k.shape[3] != self.head_dim
            or not 0 <= first_head <= self.num_heads - heads
            or heads < 1
        ):
            raise ValueError(
                f"memory keys/values must both be [B, N, H, {self.head_dim}] with N a multiple of {ratio} "
                f"and heads [{first_head}, {first_head} + H) among the {self.num_heads}, got "
                f"{tuple(k.shape)} and {tuple(v.shape)}"
            )
        if mean:
            return k.unflatten(1, (-1, ratio)).mean(2), v.unflatten(1, (-1, ratio)).mean(2)
        v_conv = self.memory_proj_k if self.memory.values_use_key_conv else self.memory_proj_v
        channels = slice(first_head * self.head_dim, (first_head + heads) * self.head_dim)

        def compress(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
            weight = conv.weight[channels]
            flat = x.flatten(2).transpose(1, 2).to(weight.dtype)  # [B, channels, N]
            out = F.conv1d(flat, weight, stride=ratio, groups=flat.shape[1])
            return out.transpose(1, 2).unflatten(-1, (heads, self.head_dim)).to(x.dtype)

        return compress(k, self.memory_proj_k), compress(v, v_conv)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x `[B, L, dim]` → q, k, v `[B, L, H, D]` (q, k normed, not rotated)."""
        b, length, _ = x.shape
        shape = (b, length, self.num_heads, self.head_dim)
        q = self.norm_q(self.q(x)).view(shape)
        k = self.norm_k(self.k(x)).view(shape)
        v = self.v(x).view(shape)
        return q, k, v

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope_q: Rope,
        rope_k: Rope,
        prefix: KV | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of q `[B, Lq, H, D]` over [prefix ; k] (all pre-RoPE) → `[B, Lq, H, D]`.

        rope_q: cos/sin `[Lq, D/2]`; rope_k: cos/sin `[Lp + Lq, D/2]` for the concatenated keys.
        """
        if prefix is not None:
            k = torch.cat([prefix[0], k], dim=1)
            v = torch.cat([prefix[1], v], dim=1)
        return attention(apply_rope(q, *rope_q), apply_rope(k, *rope_k), v, mask=mask)

    def attend_cached(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope, cache: CacheView
    ) -> torch.Tensor:
        """Write k, v `[B, L, H, D]` into the cache buffers at tokens [at, at + L) and attend with q, rotated
        by `rope` (the chunk's cos/sin `[L, D/2]`), over the buffers' first `visible` tokens.

        Keys stored rotated (`key_rope` None): k is rotated by `rope` when written and the buffer is attended
        as it is. Keys stored pre-RoPE (`key_rope` the cos/sin `[visible, D/2]` of the window's positions):
        k is written as it is and the visible keys are rotated at use (LiveAct's window, whose memory is
        compressed from pre-RoPE keys)."""
        k_buf, v_buf, at, visible, key_rope = cache
        length = k.shape[1]
        # An FP8 cache (`kv_cache.Fp8KV`) quantises on copy_ and is dequantised to k's dtype when read.
        if key_rope is None:
            k_buf[:, at : at + length].copy_(apply_rope(k, *rope))
            v_buf[:, at : at + length].copy_(v)
            keys, values = read_kv(k_buf[:, :visible], k.dtype), read_kv(v_buf[:, :visible], v.dtype)
            return attention(apply_rope(q, *rope), keys, values)
        k_buf[:, at : at + length].copy_(k)
        v_buf[:, at : at + length].copy_(v)
        keys = apply_rope(read_kv(k_buf[:, :visible], k.dtype), *key_rope)
        return attention(apply_rope(q, *rope), keys, read_kv(v_buf[:, :visible], v.dtype))

    def forward(
        self,
        x: torch.Tensor,
        rope_q: Rope,
        rope_k: Rope,
        prefix: KV | None = None,
        mask: torch.Tensor | None = None,
        sp_group: dist.ProcessGroup | None = None,
        frames: int = 1,
        cache: CacheView | None = None,
    ) -> torch.Tensor:
        """x `[B, L, dim]` → output `[B, L, dim]`.

        With `cache` (a streaming pass): the keys/values of x go into the cache (rotated by `rope_q`) and
        attention reads it (`attend_cached`); prefix, mask and rope_k are unused.
        With `sp_group` of P ranks: x is this rank's band of each of its `frames` frames, `[B, L/P, dim]`
        (`workers.sp`), the output is too; rope tables, prefix and the cache cover all L (+ Lp) tokens in
        frame-major order, as without SP, for this rank's H/P heads.
        """
        q, k, v = (frames_to_heads(t, sp_group, frames) for t in self.project(x))
        if cache is not None:
            out = self.attend_cached(q, k, v, rope_q, cache)
        else:
            out = self.attend(q, k, v, rope_q, rope_k, prefix, mask)
        return self.o(heads_to_frames(out, sp_group, frames).flatten(2))


class WanCrossAttention(nn.Module):
    """Text cross-attention, plus the I2V image branch (`k_img`, `v_img`, `norm_k_img`) and the audio branch
    (`k_audio`, `v_audio`, `norm_k_audio`) when configured. Branches have separate softmaxes, summed
    before `o`.
    """

    def __init__(
        self, dim: int, num_heads: int, eps: float, image: bool, audio_token_dim: int | None
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)
        self.has_image = image
        if image:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = WanRMSNorm(dim, eps)
        self.has_audio = audio_token_dim is not None
        if audio_token_dim is not None:
            self.k_audio = nn.Linear(audio_token_dim, dim)
            self.v_audio = nn.Linear(audio_token_dim, dim)
            self.norm_k_audio = WanRMSNorm(dim, eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))

    def context_kv(self, text: torch.Tensor, image: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Keys/values of the embedded text `[B, Lt, dim]` (and image `[B, Li, dim]`), each `[B, L, H, D]`.

        They depend only on the session's prompt and reference image, so streaming computes them once.
        """
        kv = {"k": self._heads(self.norm_k(self.k(text))), "v": self._heads(self.v(text))}
        if self.has_image:
            if image is None:
                raise ValueError("this i2v cross-attention needs CLIP image features (clip_fea), got None")
            kv["k_img"] = self._heads(self.norm_k_img(self.k_img(image)))
            kv["v_img"] = self._heads(self.v_img(image))
        return kv

    def audio_kv(self, audio_tokens: torch.Tensor) -> KV:
        """Audio keys/values `[B, C, F, N, H, D]` of tokens `[B, C, F, N, token_dim]` (once per chunk)."""
        if not self.has_audio:
            raise ValueError(
                "audio conditioning was given but this model has no audio layers (ModelConfig.audio)"
            )
        k_audio = self._heads(self.norm_k_audio(self.k_audio(audio_tokens)))
        return k_audio, self._heads(self.v_audio(audio_tokens))

    def forward(
        self,
        x: torch.Tensor,
        kv: dict[str, torch.Tensor],
        audio_tokens: torch.Tensor | None = None,
        face_mask: torch.Tensor | None = None,
        audio_kv: KV | None = None,
    ) -> torch.Tensor:
        """x `[B, L, dim]`, kv from `context_kv`; audio_tokens `[B, C, F, N, token_dim]` (L = F·S), or their
        `audio_kv`, and face_mask `[B, C, L]` or None → `[B, L, dim]`."""
        q = self._heads(self.norm_q(self.q(x)))
        out = attention(q, kv["k"], kv["v"])
        if self.has_image:
            out = out + attention(q, kv["k_img"], kv["v_img"])
        if audio_kv is None and audio_tokens is not None:
            audio_kv = self.audio_kv(audio_tokens)
        if audio_kv is not None:
            out = out + frame_local_audio_attention(q, *audio_kv, face_mask)
        return self.o(out.flatten(2))


class WanAttentionBlock(nn.Module):
    """Modulated self-attention → cross-attention (norm3, no gate) → [infinitetalk: + audio cross-attention on
    norm_x(x), no gate] → modulated FFN (wan.md §1.3)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim = config.dim
        audio = config.audio
        self.norm1 = WanLayerNorm(dim, eps=config.eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, config.num_heads, config.eps, config.memory)
        self.norm3 = WanLayerNorm(dim, eps=config.eps, elementwise_affine=True)
        self.cross_attn = WanCrossAttention(
            dim,
            config.num_heads,
            config.eps,
            image=config.has_image_branch,
            audio_token_dim=audio.token_dim if isinstance(audio, AudioConfig) else None,
        )
        self.norm2 = WanLayerNorm(dim, eps=config.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(config.ffn_dim, dim)
        )
        self.modulation = _modulation(1, 6, dim)
        self.frame_audio = isinstance(audio, InfiniteTalkAudioConfig)
        if isinstance(audio, InfiniteTalkAudioConfig):
            self.audio_cross_attn = AudioCrossAttention(dim, config.num_heads, audio.output_dim)
            self.norm_x: nn.Module = (
                WanLayerNorm(dim, eps=config.eps, elementwise_affine=True)
                if audio.norm_input_visual
                else nn.Identity()
            )

    def audio_kv(self, tokens: torch.Tensor) -> KV:
        """This block's audio keys/values of projected tokens (either variant; once per chunk)."""
        if self.frame_audio:
            return self.audio_cross_attn.kv(tokens)
        return self.cross_attn.audio_kv(tokens)

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        rope_q: Rope,
        rope_k: Rope,
        cross_kv: dict[str, torch.Tensor],
        audio_tokens: torch.Tensor | None = None,
        face_mask: torch.Tensor | None = None,
        prefix: KV | None = None,
        mask: torch.Tensor | None = None,
        sp_group: dist.ProcessGroup | None = None,
        cache: CacheView | None = None,
        audio_kv: KV | None = None,
        mute_first_frame: bool = False,
    ) -> torch.Tensor:
        """x `[B, F·S, dim]`, e0 `[B, F, 6, dim]` (float32) → x.

        cache: this block's streaming cache view (`WanSelfAttention.forward`); audio_kv: the audio keys/values
        projected once per chunk, instead of audio_tokens. With `sp_group`, S is this rank's band of every
        frame (`workers.sp`); all else is token-wise. mute_first_frame (infinitetalk): the audio output of
        the first latent frame is zero (a clip's reference frame in LiveAct).
        """
        b, length, dim = x.shape
        frames = e0.shape[1]
        m = (self.modulation.float()[:, None] + e0).unbind(dim=2)  # 6 × [B, F, dim]

        def modulate(t: torch.Tensor, scale: int, shift: int) -> torch.Tensor:
            out = (
                t.float().view(b, frames, length // frames, dim) * (1 + m[scale][:, :, None])
                + m[shift][:, :, None]
            )
            return out.view(b, length, dim).type_as(x)

        def gated(res: torch.Tensor, y: torch.Tensor, gate: int) -> torch.Tensor:
            g = y.float().view(b, frames, length // frames, dim) * m[gate][:, :, None]
            return (res.float() + g.view(b, length, dim)).type_as(res)

        y = self.self_attn(
            modulate(self.norm1(x), 1, 0), rope_q, rope_k, prefix, mask, sp_group, frames, cache
        )
        x = gated(x, y, 2)
        if not self.frame_audio:
            x = x + self.cross_attn(self.norm3(x), cross_kv, audio_tokens, face_mask, audio_kv)
            return gated(x, self.ffn(modulate(self.norm2(x), 4, 3)), 5)
        x = x + self.cross_attn(self.norm3(x), cross_kv)
        if audio_kv is None and audio_tokens is not None:
            audio_kv = self.audio_cross_attn.kv(audio_tokens)
        if audio_kv is not None:
            out = self.audio_cross_attn(self.norm_x(x), audio_kv)
            if mute_first_frame:
                first = length // frames
                out = torch.cat([torch.zeros_like(out[:, :first]), out[:, first:]], dim=1)
            x = x + out
        return gated(x, self.ffn(modulate(self.norm2(x), 4, 3)), 5)


class Head(nn.Module):
    """Output head: LayerNorm (no affine), 2-way modulation by the time embedding, Linear(dim → 64)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = WanLayerNorm(config.dim, eps=config.eps, elementwise_affine=False)
        self.head = nn.Linear(config.dim, config.patch_out_dim)
        self.modulation = _modulation(1, 2, config.dim)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x `[B, F·S, dim]`, e `[B, F, dim]` (float32) → `[B, F·S, patch_out_dim]` float32."""
        b, length, dim = x.shape
        frames = e.shape[1]
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(dim=2)
        h = (
            self.norm(x).float().view(b, frames, length // frames, dim) * (1 + scale[:, :, None])
            + shift[:, :, None]
        )
        return _linear_f32(self.head, h.view(b, length, dim))


class MLPProj(nn.Module):
    """I2V image embedding: LayerNorm → Linear → GELU → Linear → LayerNorm over CLIP features."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, in_dim),
            nn.GELU(),
            nn.Linear(in_dim, out_dim),
            nn.LayerNorm(out_dim),
        )

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        return self.proj(clip_fea)


class WanModel(nn.Module):
    """Wan 2.1 DiT predicting the flow velocity v = ε − x0 for latents `[B, 16, F, H/8, W/8]`.

    Build on the meta device for counting or streamed loading: `with torch.device("meta"): WanModel(cfg)`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(
            config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList([WanAttentionBlock(config) for _ in range(config.num_layers)])
        self.head = Head(config)
        if config.has_image_branch:
            self.img_emb = MLPProj(config.clip_dim, dim)
        if isinstance(config.audio, AudioConfig):
            self.audio_proj: nn.Module = AudioProjection(config.audio)
        elif isinstance(config.audio, InfiniteTalkAudioConfig):
            self.audio_proj = InfiniteTalkAudioProjection(config.audio)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, zero_head: bool = True, zero_audio: bool = True) -> None:
        """Wan's initialisation: Xavier-uniform Linear weights with zero biases, N(0, 0.02) text/time MLPs, a
        zero output head; the audio path's output layers zero so a fresh audio path leaves the output
        unchanged (TalkingMachines: the audio k/v projections; infinitetalk: `audio_cross_attn.proj`); ConvKV
        memory convolutions 1/ratio, a plain mean of each run (upstream's `post_init`).

        `zero_head=False` / `zero_audio=False` give random (Xavier) head and audio output weights, for tests
        that need a non-trivial output from an untrained model.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                _init_f32(module.weight, nn.init.xavier_uniform_)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        _init_f32(self.patch_embedding.weight, lambda w: nn.init.xavier_uniform_(w.flatten(1)))
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for module in seq:
                if isinstance(module, nn.Linear):
                    _init_f32(module.weight, lambda w: nn.init.normal_(w, std=0.02))
        if zero_head:
            nn.init.zeros_(self.head.head.weight)
        if zero_audio and self.config.audio is not None:
            for block in self.blocks:
                if block.frame_audio:
                    layers = [block.audio_cross_attn.proj]
                else:
                    layers = [block.cross_attn.k_audio, block.cross_attn.v_audio]
                for layer in layers:
                    nn.init.zeros_(layer.weight)
                    nn.init.zeros_(layer.bias)
        if self.config.memory is not None:
            for block in self.blocks:
                for conv in (block.self_attn.memory_proj_k, block.self_attn.memory_proj_v):
                    nn.init.constant_(conv.weight, 1.0 / self.config.memory.ratio)

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """umT5 features `[B, Lt ≤ text_len, text_dim]` → zero-padded to text_len → `[B, text_len, dim]`."""
        _, length, width = context.shape
        cfg = self.config
        if width != cfg.text_dim or length > cfg.text_len:
            raise ValueError(
                f"text context has shape {tuple(context.shape)}; "
                f"expected [B, ≤{cfg.text_len}, {cfg.text_dim}] "
                f"for preset {cfg.name!r}"
            )
        padded = F.pad(context, (0, 0, 0, cfg.text_len - length))
        return self.text_embedding(padded.to(self.text_embedding[0].weight.dtype))

    def cross_attention_kv(
        self, context: torch.Tensor, clip_fea: torch.Tensor | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """Per-block text (and image) cross-attention keys/values, computed once per session.

        context: umT5 features `[B, Lt, text_dim]`; clip_fea: CLIP features `[B, clip_tokens, clip_dim]`
        (i2v only).
        """
        text = self.embed_text(context)
        image = None
        if self.config.has_image_branch:
            if clip_fea is None:
                raise ValueError(
                    f"preset {self.config.name!r} is i2v and needs clip_fea [B, 257, 1280]-shaped input"
                )
            image = self.img_emb(clip_fea.to(self.img_emb.proj[1].weight.dtype))
        return [block.cross_attn.context_kv(text, image) for block in self.blocks]

    def time_embed(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t `[B, F]` → (e `[B, F, dim]`, e0 `[B, F, 6, dim]`), float32."""
        b, f = t.shape
        sin = sinusoidal_embedding(self.config.freq_dim, t.reshape(-1)).float()
        e = _linear_f32(self.time_embedding[2], F.silu(_linear_f32(self.time_embedding[0], sin)))
        e0 = _linear_f32(self.time_projection[1], F.silu(e))
        return e.view(b, f, -1), e0.view(b, f, 6, -1)

    def unpatchify(self, out: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        """Tokens `[B, F·h·w, pt·ph·pw·C]` (channel fastest) → `[B, C, F·pt, h·ph, w·pw]`."""
        pt, ph, pw = self.config.patch_size
        c = self.config.out_dim
        x = out.view(out.shape[0], frames, height, width, pt, ph, pw, c)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(out.shape[0], c, frames * pt, height * ph, width * pw)

    def embed(
        self, x: torch.Tensor, y: torch.Tensor | None, sp_group: dist.ProcessGroup | None = None
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Latents x `[B, 16, F, H, W]` (+ I2V y `[B, 20, F, H, W]`) → (tokens `[B, F·h·w, dim]`, this SP
        rank's band of every frame with `sp_group`; the token grid (F, h, w))."""
        cfg = self.config
        b, _, frames, height, width = x.shape
        if cfg.has_image_branch:
            y_shape = (b, cfg.in_dim - cfg.out_dim, frames, height, width)
            if y is None or y.shape != y_shape:
                raise ValueError(
                    f"i2v preset {cfg.name!r} needs y of shape {y_shape}, "
                    f"got {None if y is None else tuple(y.shape)}"
                )
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        elif y is not None:
            raise ValueError(f"preset {cfg.name!r} is t2v and takes no y conditioning")
        h = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))
        grid = (h.shape[2], h.shape[3], h.shape[4])
        h = h.flatten(2).transpose(1, 2)
        if group_size(sp_group) > 1:
            check_sp_shapes(cfg.num_heads, grid[1] * grid[2], group_size(sp_group), cfg.name)
            h = shard_frames(h, sp_group, grid[0])
        return h, grid

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        cross_kv: list[dict[str, torch.Tensor]] | None = None,
        context: torch.Tensor | None = None,
        clip_fea: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        audio: AudioConditioning | InfiniteTalkAudio | None = None,
        frame_positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        prefix_kv: list[KV] | None = None,
        prefix_frame_positions: torch.Tensor | None = None,
        sp_group: dist.ProcessGroup | None = None,
    ) -> torch.Tensor:
        """Velocity prediction `[B, 16, F, H, W]` (float32) for noisy latents x `[B, 16, F, H, W]`.

        t: timesteps in [0, 1000], `[B]` (shared) or `[B, F]` (per latent frame).
        cross_kv: from `cross_attention_kv`; otherwise computed from `context` (+ `clip_fea` for i2v).
        y: I2V conditioning `[B, 20, F, H, W]` (4 mask + 16 image-latent channels), required for i2v.
        audio: per-frame audio inputs of the model's variant (`AudioConditioning` for talkingmachines,
            `InfiniteTalkAudio` for infinitetalk); None = no audio branch (upstream LiveAct's `skip_audio`).
        frame_positions: temporal RoPE positions `[F]` of x's latent frames (default 0..F−1).
        attn_mask: boolean self-attention mask `[Lq, Lp + Lq]`, True = may attend (sdpa/math backends).
        prefix_kv / prefix_frame_positions: per block pre-RoPE (k, v) `[B, Lp, H, D]` prepended to the keys,
            and the temporal positions `[Fp]` they take in this call.
        sp_group: Ulysses sequence parallelism over this group's P ranks (every rank passes the same inputs):
            each rank runs the blocks on its band of every frame (`workers.sp`), the output is gathered on
            every rank; prefix_kv is then this rank's head shard `[B, L, H/P, D]`, tokens in frame-major
            order as without SP (so attn_mask applies unchanged).

        RoPE runs in float64 here (Wan's path); the streaming engine uses `forward_step`.
        """
        cfg = self.config
        b = x.shape[0]
        if cross_kv is None:
            if context is None:
                raise ValueError("WanModel.forward needs cross_kv or context")
            cross_kv = self.cross_attention_kv(context, clip_fea)
        h, grid = self.embed(x, y, sp_group)

        if t.ndim == 1:
            t = t[:, None].expand(b, grid[0])
        if t.shape != (b, grid[0]):
            raise ValueError(f"timesteps must be [B] or [B, F] = {(b, grid[0])}, got {tuple(t.shape)}")
        e, e0 = self.time_embed(t)

        if frame_positions is None:
            frame_positions = torch.arange(grid[0], device=x.device)
        pos_q = grid_positions(frame_positions, grid[1], grid[2])
        rope_q = rope_cos_sin(cfg, pos_q)
        if prefix_kv is not None:
            if prefix_frame_positions is None or len(prefix_kv) != len(self.blocks):
                raise ValueError("prefix_kv needs one (k, v) per block and prefix_frame_positions")
            pos_k = torch.cat([grid_positions(prefix_frame_positions, grid[1], grid[2]), pos_q])
            rope_k = rope_cos_sin(cfg, pos_k)
        else:
            rope_k = rope_q

        audio_tokens = face_mask = None
        if audio is not None:
            audio_tokens, face_mask = self.audio_inputs(audio, grid[0], sp_group)
        mute = self.mutes_first_frame(audio)

        for i, block in enumerate(self.blocks):
            prefix = None if prefix_kv is None else prefix_kv[i]
            h = block(
                h,
                e0,
                rope_q,
                rope_k,
                cross_kv[i],
                audio_tokens,
                face_mask,
                prefix,
                attn_mask,
                sp_group,
                mute_first_frame=mute,
            )

        out = gather_frames(self.head(h, e), sp_group, grid[0])
        return self.unpatchify(out, *grid)

    def audio_inputs(
        self,
        audio: AudioConditioning | InfiniteTalkAudio,
        frames: int,
        sp_group: dist.ProcessGroup | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens, projected if given as features/windows; this rank's face mask or None).

        Tokens are `[B, C, F, N, token_dim]` (talkingmachines) or `[B, F, context_tokens, output_dim]`
        (infinitetalk, no face mask)."""
        cfg = self.config
        if cfg.audio is None:
            raise ValueError(f"preset {cfg.name!r} has no audio layers; pass audio=None")
        wanted = InfiniteTalkAudio if isinstance(cfg.audio, InfiniteTalkAudioConfig) else AudioConditioning
        if not isinstance(audio, wanted):
            raise ValueError(
                f"preset {cfg.name!r} has the {cfg.audio_variant} audio variant and takes {wanted.__name__}, "
                f"got {type(audio).__name__}"
            )
        if isinstance(audio, InfiniteTalkAudio):
            tokens = audio.tokens
            if tokens is None:
                assert audio.windows is not None
                tokens = self.audio_proj(audio.windows, audio.starts_clip)
            if tokens.shape[1] != frames:
                raise ValueError(
                    f"audio covers {tokens.shape[1]} latent frames (tokens {tuple(tokens.shape)}), the "
                    f"latents {frames}"
                )
            return tokens, None
        tokens = audio.tokens
        if tokens is None:
            tokens = self.audio_proj(audio.features, audio.speaking)
        face_mask = audio.face_mask
        if face_mask is not None:
            face_mask = shard_frames(face_mask, sp_group, frames, dim=2)
        return tokens, face_mask

    def mutes_first_frame(self, audio: AudioConditioning | InfiniteTalkAudio | None) -> bool:
        """Whether the audio output of the first latent frame is zero: infinitetalk audio starting a clip, in
        a model whose config says `mute_reference_frame` (LiveAct)."""
        cfg = self.config.audio
        return (
            isinstance(audio, InfiniteTalkAudio)
            and audio.starts_clip
            and isinstance(cfg, InfiniteTalkAudioConfig)
            and cfg.mute_reference_frame
        )

    def audio_kv(self, tokens: torch.Tensor) -> list[KV]:
        """Every block's audio keys/values of projected tokens (`audio_inputs`), computed once per chunk."""
        return [block.audio_kv(tokens) for block in self.blocks]

    def forward_step(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        e0: torch.Tensor,
        rope: Rope,
        cache_k: KVStore,
        cache_v: KVStore,
        write_at: int,
        visible: int,
        cross_kv: list[dict[str, torch.Tensor]],
        y: torch.Tensor | None = None,
        audio_kv: list[KV] | None = None,
        face_mask: torch.Tensor | None = None,
        sp_group: dist.ProcessGroup | None = None,
        blocks: Sequence[nn.Module] | None = None,
        mute_first_frame: bool = False,
        key_rope: Rope | None = None,
    ) -> torch.Tensor:
        """One streaming pass over a chunk x `[B, 16, F, H, W]` → velocity `[B, 16, F, H, W]` (float32).

        e `[B, F, dim]`, e0 `[B, F, 6, dim]`: `time_embed` of the pass's timestep, computed once per session.
        rope: float32 cos/sin `[F·h·w, D/2]` of the chunk's tokens. cache_k/cache_v `[layers, B, N, H, D]`:
        one slot of the session's cache; every block writes the chunk's keys and values at tokens
        [write_at, write_at + L) and attends over tokens [0, visible) (`workers.kv_cache`). audio_kv: per
        block audio keys/values (`WanModel.audio_kv`, once per chunk), face_mask this rank's.
        blocks: the blocks to run (default `self.blocks`; the engine passes compiled ones).
        mute_first_frame: infinitetalk, the chunk starts the clip (`mutes_first_frame`).
        key_rope: None = the cache holds rotated keys (the chunk's are rotated by `rope` when written); or the
        float32 cos/sin `[visible, D/2]` of the cached keys' positions: the cache holds pre-RoPE keys (the
        chunk's are written as they are) and its visible keys are rotated by it at use (LiveAct's window,
        `workers.kv_cache.MemoryKVCache`).
        """
        h, grid = self.embed(x, y, sp_group)
        for i, block in enumerate(self.blocks if blocks is None else blocks):
            h = block(
                h,
                e0,
                rope,
                rope,
                cross_kv[i],
                None,
                face_mask,
                sp_group=sp_group,
                cache=(cache_k[i], cache_v[i], write_at, visible, key_rope),
                audio_kv=None if audio_kv is None else audio_kv[i],
                mute_first_frame=mute_first_frame,
            )
        out = gather_frames(self.head(h, e), sp_group, grid[0])
        return self.unpatchify(out, *grid)


def count_parameters(model: nn.Module) -> int:
    """Total number of parameter elements (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())

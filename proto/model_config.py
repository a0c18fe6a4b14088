"""Model configuration: the Wan 2.1 DiT shape, its optional audio layers, and named presets.

Everything is a frozen dataclass validated at construction, so a bad preset fails at start-up with a message
that names the field, never deep inside a forward pass. Field names follow Wan 2.1's `WanModel` constructor.

Model families are data, not forks: `ModelConfig.audio` picks the audio-conditioning variant by its type —
`AudioConfig` (TalkingMachines: audio keys/values inside each cross-attention) or `InfiniteTalkAudioConfig`
(InfiniteTalk / SoulX-LiveAct: a separate frame-local audio cross-attention per block) — and
`ModelConfig.memory` adds LiveAct's ConvKV memory to every self-attention. `ModelConfig.audio_variant` names
the variant ("talkingmachines", "infinitetalk" or None).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

ModelType = Literal["t2v", "i2v"]
AudioVariant = Literal["talkingmachines", "infinitetalk"]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _require_positive_ints(config: object, names: tuple[str, ...]) -> None:
    """Each named field of `config` is a positive int (the message names the class and the field)."""
    for name in names:
        value = getattr(config, name)
        _require(
            isinstance(value, int) and value > 0,
            f"{type(config).__name__}.{name} must be a positive int, got {value!r}",
        )


@dataclass(frozen=True)
class AudioConfig:
    """Shape of the TalkingMachines audio path (audio projection + audio keys/values in each cross-attention).

    The audio front-end delivers, per character and per latent frame, wav2vec2 hidden states of
    `frames_per_latent` video frames: `[frames_per_latent, wav2vec_layers, wav2vec_dim]`. The projection sees
    a window of `window` latent frames centred on each latent frame and maps it to `num_tokens` audio
    tokens of width `token_dim`; every cross-attention projects them with `k_audio` / `v_audio`
    (token_dim → dim).
    """

    wav2vec_layers: int = 12
    wav2vec_dim: int = 768
    frames_per_latent: int = 4
    window: int = 5
    hidden_dim: int = 5632
    num_tokens: int = 32
    token_dim: int = 768
    eps: float = 1e-5

    variant: ClassVar[AudioVariant] = "talkingmachines"

    def __post_init__(self) -> None:
        _require_positive_ints(
            self,
            ("wav2vec_layers", "wav2vec_dim", "frames_per_latent", "hidden_dim", "num_tokens", "token_dim"),
        )
        _require(
            isinstance(self.window, int) and self.window > 0 and self.window % 2 == 1,
            f"AudioConfig.window must be a positive odd int (centred on the frame), got {self.window!r}",
        )
        _require(self.eps > 0, f"AudioConfig.eps must be > 0, got {self.eps!r}")

    @property
    def half_window(self) -> int:
        """Latent frames of audio context needed on each side of a frame (2 for the 5-frame window)."""
        return self.window // 2

    @property
    def input_dim(self) -> int:
        """Width of one flattened window fed to the projection MLP."""
        return self.window * self.frames_per_latent * self.wav2vec_layers * self.wav2vec_dim


@dataclass(frozen=True)
class InfiniteTalkAudioConfig:
    """Shape of the InfiniteTalk / SoulX-LiveAct audio path (`audio_proj` + `blocks.{i}.audio_cross_attn`).

    Field names are the upstream constructor's (LiveAct's `WanModel(audio_window, intermediate_dim,
    output_dim, context_tokens, vae_scale, norm_input_visual, norm_output_audio)` and `AudioProjModel(blocks,
    channels)`), so a published `config.json` maps onto it one to one.

    Input: per video frame, the wav2vec2 hidden states of the `audio_window` video frames centred on it,
    `[audio_window, wav2vec_layers, wav2vec_dim]`. A clip's first latent frame (the reference frame) is one
    video frame: its window goes through `proj1`; every later latent frame covers `vae_scale` video frames,
    of which `later_frame_taps` window entries (first frame: its window's first half and centre, middle
    frames: their centre, last frame: its centre and second half) go through `proj1_vf`. Then `proj2`,
    `proj3` give `context_tokens` tokens of width `output_dim` per latent frame, LayerNorm'd when
    `norm_output_audio`. In every block, `norm_x` (affine LayerNorm, when `norm_input_visual`) feeds
    `audio_cross_attn`: each latent frame's tokens attend only to that frame's audio tokens (`q_linear`,
    `kv_linear` token → 2·dim, `proj`), added to the residual after the text/image cross-attention.
    `mute_reference_frame` (LiveAct's forward: True) zeroes that output on a clip's first latent frame;
    InfiniteTalk's adds it there too (False, the default).
    """

    wav2vec_layers: int = 12
    wav2vec_dim: int = 768
    audio_window: int = 5
    vae_scale: int = 4
    intermediate_dim: int = 512
    context_tokens: int = 32
    output_dim: int = 768
    norm_output_audio: bool = True
    norm_input_visual: bool = True
    mute_reference_frame: bool = False
    norm_eps: float = 1e-5

    variant: ClassVar[AudioVariant] = "infinitetalk"

    def __post_init__(self) -> None:
        _require_positive_ints(
            self, ("wav2vec_layers", "wav2vec_dim", "intermediate_dim", "context_tokens", "output_dim")
        )
        _require(
            isinstance(self.audio_window, int) and self.audio_window > 0 and self.audio_window % 2 == 1,
            "InfiniteTalkAudioConfig.audio_window must be a positive odd int (centred on the video frame), "
            f"got {self.audio_window!r}",
        )
        _require(
            isinstance(self.vae_scale, int) and self.vae_scale >= 2,
            "InfiniteTalkAudioConfig.vae_scale must be an int >= 2 (a later latent frame's first and last "
            f"video frames are tapped separately), got {self.vae_scale!r}",
        )
        for name in ("norm_output_audio", "norm_input_visual", "mute_reference_frame"):
            value = getattr(self, name)
            _require(isinstance(value, bool), f"InfiniteTalkAudioConfig.{name} must be a bool, got {value!r}")
        _require(self.norm_eps > 0, f"InfiniteTalkAudioConfig.norm_eps must be > 0, got {self.norm_eps!r}")

    @property
    def half_window(self) -> int:
        """Video frames of audio context on each side of a video frame (2 for the 5-frame window)."""
        return self.audio_window // 2

    @property
    def later_frame_taps(self) -> int:
        """Window entries a later latent frame feeds `proj1_vf`: audio_window + vae_scale − 1 (8 upstream)."""
        return self.audio_window + self.vae_scale - 1

    @property
    def first_frame_dim(self) -> int:
        """Input width of `proj1` (the reference frame's window)."""
        return self.audio_window * self.wav2vec_layers * self.wav2vec_dim

    @property
    def later_frame_dim(self) -> int:
        """Input width of `proj1_vf` (a later latent frame's taps)."""
        return self.later_frame_taps * self.wav2vec_layers * self.wav2vec_dim


@dataclass(frozen=True)
class ConvKVMemoryConfig:
    """SoulX-LiveAct's ConvKV memory: `blocks.{i}.self_attn.memory_proj_k` / `memory_proj_v`.

    Each is a depthwise `Conv1d(dim, dim, kernel=ratio, stride=ratio, groups=dim, bias=False)` over the token
    axis of past pre-RoPE keys/values `[B, N, H, D]` (heads flattened to dim channels): every `ratio`
    consecutive tokens (frame-major order, so a run may cross a frame boundary) become one memory token, N →
    N / ratio. Upstream compresses the values with `memory_proj_k` too (its `v_compress` calls the key conv;
    `memory_proj_v` is loaded but unused): `values_use_key_conv` keeps that behaviour (True for the published
    model), False would use `memory_proj_v`. How the stream fills and uses the memory is the streaming
    schedule's business, not the model's.
    """

    ratio: int = 5
    values_use_key_conv: bool = True

    def __post_init__(self) -> None:
        _require_positive_ints(self, ("ratio",))
        _require(
            isinstance(self.values_use_key_conv, bool),
            f"ConvKVMemoryConfig.values_use_key_conv must be a bool, got {self.values_use_key_conv!r}",
        )


@dataclass(frozen=True)
class ModelConfig:
    """Wan 2.1 DiT hyper-parameters (wan.md §1.1) plus the optional audio path and ConvKV memory.

    `clip_dim` / `clip_tokens` describe the I2V image branch (CLIP ViT-H/14 penultimate features
    `[B, 257, 1280]`); they are ignored for `t2v`. `audio`: None, `AudioConfig` (TalkingMachines) or
    `InfiniteTalkAudioConfig` (InfiniteTalk / LiveAct, i2v only). `memory`: None or `ConvKVMemoryConfig`.
    """

    name: str
    model_type: ModelType = "t2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    clip_dim: int = 1280
    clip_tokens: int = 257
    eps: float = 1e-6
    rope_theta: float = 10000.0
    num_train_timesteps: int = 1000
    audio: AudioConfig | InfiniteTalkAudioConfig | None = None
    vae_stride: tuple[int, int, int] = field(default=(4, 8, 8))
    memory: ConvKVMemoryConfig | None = None
    # The family's stream schedule (proto.stream_config.STREAM_SCHEDULES): chunk sizes, steps, window, fps.
    stream_schedule: str = "talkingmachines"

    def __post_init__(self) -> None:
        from proto.stream_config import STREAM_SCHEDULES

        _require(
            self.stream_schedule in STREAM_SCHEDULES,
            f"ModelConfig.stream_schedule must be one of {sorted(STREAM_SCHEDULES)}, "
            f"got {self.stream_schedule!r}",
        )
        _require(
            self.model_type in ("t2v", "i2v"),
            f"ModelConfig.model_type must be 't2v' or 'i2v', got {self.model_type!r}",
        )
        _require(
            len(self.patch_size) == 3 and all(isinstance(p, int) and p > 0 for p in self.patch_size),
            f"ModelConfig.patch_size must be three positive ints, got {self.patch_size!r}",
        )
        _require(
            self.patch_size[0] == 1,
            f"ModelConfig.patch_size[0] must be 1 (per-frame tokens), got {self.patch_size}",
        )
        _require_positive_ints(
            self,
            (
                "dim",
                "ffn_dim",
                "freq_dim",
                "num_heads",
                "num_layers",
                "in_dim",
                "out_dim",
                "text_dim",
                "text_len",
                "clip_dim",
                "clip_tokens",
                "num_train_timesteps",
            ),
        )
        _require(
            self.dim % self.num_heads == 0,
            f"ModelConfig.dim={self.dim} is not divisible by num_heads={self.num_heads}",
        )
        _require(
            self.head_dim % 2 == 0 and self.head_dim >= 6,
            f"ModelConfig head_dim={self.head_dim} must be even and >= 6 so 3-D RoPE gives every axis a pair",
        )
        _require(
            self.freq_dim % 2 == 0, f"ModelConfig.freq_dim must be even (cos|sin halves), got {self.freq_dim}"
        )
        if self.model_type == "i2v":
            _require(
                self.in_dim == self.out_dim + 20,
                f"ModelConfig.in_dim={self.in_dim} but an i2v model takes out_dim={self.out_dim} noisy "
                f"+ 4 mask + 16 image-latent channels = {self.out_dim + 20}",
            )
        _require(self.eps > 0, f"ModelConfig.eps must be > 0, got {self.eps!r}")
        _require(
            self.audio is None or isinstance(self.audio, AudioConfig | InfiniteTalkAudioConfig),
            "ModelConfig.audio must be an AudioConfig, an InfiniteTalkAudioConfig or None, "
            f"got {type(self.audio).__name__}",
        )
        if isinstance(self.audio, InfiniteTalkAudioConfig):
            _require(
                self.model_type == "i2v",
                f"ModelConfig {self.name!r}: the infinitetalk audio variant is i2v only (upstream asserts "
                f"it), got model_type={self.model_type!r}",
            )
        _require(
            self.memory is None or isinstance(self.memory, ConvKVMemoryConfig),
            f"ModelConfig.memory must be a ConvKVMemoryConfig or None, got {type(self.memory).__name__}",
        )

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_pairs(self) -> tuple[int, int, int]:
        """Complex (interleaved) pairs per head for the t/h/w axes; Wan: 128 → (22, 21, 21).

        Wan splits head_dim d into real dims d − 4·(d//6), 2·(d//6), 2·(d//6) for t, h, w.
        """
        spatial = self.head_dim // 6
        return (self.head_dim // 2 - 2 * spatial, spatial, spatial)

    @property
    def patch_out_dim(self) -> int:
        """Values per output token: out_dim · prod(patch_size) (64 for Wan)."""
        return self.out_dim * self.patch_size[0] * self.patch_size[1] * self.patch_size[2]

    @property
    def has_image_branch(self) -> bool:
        return self.model_type == "i2v"

    @property
    def has_audio(self) -> bool:
        return self.audio is not None

    @property
    def audio_variant(self) -> AudioVariant | None:
        """'talkingmachines', 'infinitetalk', or None without audio layers."""
        return None if self.audio is None else self.audio.variant


# wav2vec2 width 32: a linear probe of the tiny random wav2vec2's features predicts the per-frame loudness of
# held-out espeak-ng speech with r 0.79 at width 32 against 0.57 at width 8 (numpy voice: 0.91 vs 0.76;
# `python -m training.audio_probe`, training/results/audio_probe.json): at 8 the front-end capped lip-sync.
_TINY_AUDIO = AudioConfig(
    wav2vec_layers=2, wav2vec_dim=32, frames_per_latent=4, window=5, hidden_dim=32, num_tokens=4, token_dim=16
)

# Exact Wan 2.1 shapes from wan.md §1.1; the TalkingMachines audio dims are ours (see workers/audio.py):
# a 184,320 → 5632 → 5632 → 32·768 projection is ≈1.21B parameters, matching the paper's "1.2B audio module".
PRESETS: dict[str, ModelConfig] = {
    # tiny: CPU tests and the trained toy default (training/README.md). Width 128: at 64 a token (a 2x2
    # patch of 16 noisy + 20 I2V channels, 144 values) did not fit through the residual stream, and the
    # teacher never learnt to copy the reference frame.
    "tiny": ModelConfig(
        name="tiny",
        model_type="i2v",
        dim=128,
        ffn_dim=256,
        freq_dim=32,
        num_heads=4,
        num_layers=2,
        in_dim=36,
        text_dim=32,
        text_len=16,
        clip_dim=32,
        clip_tokens=17,
        audio=_TINY_AUDIO,
    ),
    "wan2.1-t2v-1.3b": ModelConfig(
        name="wan2.1-t2v-1.3b",
        model_type="t2v",
        dim=1536,
        ffn_dim=8960,
        num_heads=12,
        num_layers=30,
        in_dim=16,
    ),
    "wan2.1-i2v-14b": ModelConfig(
        name="wan2.1-i2v-14b",
        model_type="i2v",
        dim=5120,
        ffn_dim=13824,
        num_heads=40,
        num_layers=40,
        in_dim=36,
    ),
    "talkingmachines-18b": ModelConfig(
        name="talkingmachines-18b",
        model_type="i2v",
        dim=5120,
        ffn_dim=13824,
        num_heads=40,
        num_layers=40,
        in_dim=36,
        audio=AudioConfig(),
    ),
}

# SoulX-LiveAct (github.com/Soul-AILab/SoulX-LiveAct, model_liveact/model_memory.py): Wan 2.1 I2V-14B with the
# InfiniteTalk audio module (upstream's constructor defaults: 5-frame window, 512 intermediate, 32 tokens of
# 768, both audio norms; the reference frame's audio muted as LiveAct's forward does) and ConvKV memory
# (ratio 5) in every self-attention. Published resolutions: 720x416 (portrait, `--size 416*720`, 45x26 =
# 1170 tokens per latent frame) and 512x512 (1024 tokens per latent frame); its evaluation setting is 480x832
# (portrait). 18,884,094,784 parameters (`talkingmachines inspect --preset soulx-liveact`; derivation in
# tests/workers/test_liveact_family.py).
PRESETS["soulx-liveact"] = replace(
    PRESETS["wan2.1-i2v-14b"],
    name="soulx-liveact",
    audio=InfiniteTalkAudioConfig(mute_reference_frame=True),
    memory=ConvKVMemoryConfig(),
    stream_schedule="soulx-liveact",
)
# The family at the tiny preset's width, for CPU tests and the upstream-equivalence fixtures
# (tests/oracles/make_liveact_fixtures.py). clip_tokens is 257: upstream splits its cross-attention context
# into image and text at a hard-coded 257 tokens.
PRESETS["soulx-liveact-tiny"] = replace(
    PRESETS["tiny"],
    name="soulx-liveact-tiny",
    clip_tokens=257,
    audio=InfiniteTalkAudioConfig(
        wav2vec_layers=2,
        wav2vec_dim=32,
        intermediate_dim=32,
        context_tokens=32,
        output_dim=16,
        mute_reference_frame=True,
    ),
    memory=ConvKVMemoryConfig(),
    stream_schedule="soulx-liveact",
)


def get_model_preset(name: str) -> ModelConfig:
    """Return the preset called `name`; an unknown name raises with the list of valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown model preset {name!r}; valid presets: {', '.join(model_preset_names())}"
        ) from None


def model_preset_names() -> list[str]:
    """Names of all model presets, sorted."""
    return sorted(PRESETS)

"""Model configuration: the Wan 2.1 DiT shape, its optional TalkingMachines audio layers, and named presets.

Everything is a frozen dataclass validated at construction, so a bad preset fails at start-up with a message
that names the field, never deep inside a forward pass. Field names follow Wan 2.1's `WanModel` constructor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ModelType = Literal["t2v", "i2v"]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


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

    def __post_init__(self) -> None:
        for name in (
            "wav2vec_layers",
            "wav2vec_dim",
            "frames_per_latent",
            "hidden_dim",
            "num_tokens",
            "token_dim",
        ):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value > 0,
                f"AudioConfig.{name} must be a positive int, got {value!r}",
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
class ModelConfig:
    """Wan 2.1 DiT hyper-parameters (wan.md §1.1) plus the optional audio path.

    `clip_dim` / `clip_tokens` describe the I2V image branch (CLIP ViT-H/14 penultimate features
    `[B, 257, 1280]`); they are ignored for `t2v`.
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
    audio: AudioConfig | None = None
    vae_stride: tuple[int, int, int] = field(default=(4, 8, 8))

    def __post_init__(self) -> None:
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
        for name in (
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
        ):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value > 0,
                f"ModelConfig.{name} must be a positive int, got {value!r}",
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
            self.audio is None or isinstance(self.audio, AudioConfig),
            f"ModelConfig.audio must be an AudioConfig or None, got {type(self.audio).__name__}",
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

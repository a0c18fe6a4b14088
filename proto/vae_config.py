"""Wan 2.1 VAE presets: the architecture numbers and latent normalisation constants.

`wan2.1` is the released `Wan2.1_VAE.pth` (126,892,531 parameters). `tiny` runs the same code with fewer
channels so CPU tests stay fast; it keeps 16 latent channels and the Wan normalisation so its latents have
the layout the score model expects.
"""

from __future__ import annotations

from dataclasses import dataclass

# Per-channel statistics of Wan 2.1 VAE latents (wan/modules/vae.py, class WanVAE). Encoding gives
# z = (mu - mean) / std; decoding starts from z * std + mean.
WAN21_LATENT_MEAN: tuple[float, ...] = (
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
)
WAN21_LATENT_STD: tuple[float, ...] = (
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
)


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of a Wan-style causal video VAE.

    Attributes:
        name: preset name.
        dim: base channel count (96 for Wan 2.1); stage widths are dim * dim_mult.
        z_dim: latent channels (16).
        dim_mult: channel multipliers of the encoder stages; the decoder mirrors them.
        num_res_blocks: residual blocks per encoder stage; the decoder uses one more per stage.
        temporal_downsample: per encoder down-sampling layer, whether it also halves time. The decoder
            up-samples time at the mirrored positions.
        latent_mean, latent_std: per-channel latent normalisation constants, length z_dim.
    """

    name: str
    dim: int
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latent_mean: tuple[float, ...] = WAN21_LATENT_MEAN
    latent_std: tuple[float, ...] = WAN21_LATENT_STD

    def __post_init__(self) -> None:
        if self.dim <= 0:
            raise ValueError(f"VAE preset {self.name!r}: dim must be positive, got {self.dim}")
        if self.z_dim <= 0:
            raise ValueError(f"VAE preset {self.name!r}: z_dim must be positive, got {self.z_dim}")
        if len(self.dim_mult) < 2 or any(m <= 0 for m in self.dim_mult):
            raise ValueError(
                f"VAE preset {self.name!r}: dim_mult needs at least 2 positive entries, got {self.dim_mult}"
            )
        if any(self.dim * m % 2 for m in self.dim_mult):
            raise ValueError(
                f"VAE preset {self.name!r}: every stage width dim*dim_mult must be even (the decoder's "
                f"up-sampling convolutions halve it), got dim={self.dim}, dim_mult={self.dim_mult}"
            )
        if self.num_res_blocks <= 0:
            raise ValueError(f"VAE preset {self.name!r}: num_res_blocks must be positive")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"VAE preset {self.name!r}: temporal_downsample needs one flag per down-sampling layer "
                f"({len(self.dim_mult) - 1}), got {len(self.temporal_downsample)}"
            )
        if len(self.latent_mean) != self.z_dim or len(self.latent_std) != self.z_dim:
            raise ValueError(
                f"VAE preset {self.name!r}: latent_mean and latent_std need z_dim={self.z_dim} entries, got "
                f"{len(self.latent_mean)} and {len(self.latent_std)}"
            )
        if any(s <= 0 for s in self.latent_std):
            raise ValueError(f"VAE preset {self.name!r}: latent_std entries must be positive")

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent cell along height and width (8 for Wan 2.1)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        """Video frames per latent frame after the first (4 for Wan 2.1): T latents decode to 1 + 4(T-1)."""
        return 2 ** sum(self.temporal_downsample)

    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        """Per decoder up-sampling layer, whether it doubles time (the encoder's flags reversed)."""
        return tuple(reversed(self.temporal_downsample))


VAE_PRESETS: dict[str, VAEConfig] = {
    "wan2.1": VAEConfig(name="wan2.1", dim=96),
    "tiny": VAEConfig(name="tiny", dim=8),
}


def get_vae_preset(name: str) -> VAEConfig:
    """The VAE preset called `name`; raises ValueError listing the known presets otherwise."""
    try:
        return VAE_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown VAE preset {name!r}; known presets: {sorted(VAE_PRESETS)}") from None


# The DiT presets that run at CPU scale: the tiny VAE decodes them, they default to a small frame size and run
# on seeded random weights without a checkpoint (``tiny`` has its shipped trained bundle besides).
TINY_DIT_PRESETS = ("tiny", "soulx-liveact-tiny")


def vae_preset_for(dit_preset: str) -> str:
    """The VAE preset that goes with DiT preset ``dit_preset``: ``tiny`` for the CPU-scale presets
    (``TINY_DIT_PRESETS``), Wan 2.1's for the real ones."""
    return "tiny" if dit_preset in TINY_DIT_PRESETS else "wan2.1"

"""The Wan 2.1 VAE's exact structure: state-dict keys, shapes and parameter count (reference/wan.md §3.3)."""

from __future__ import annotations

import pytest
import torch

from decoder.vae import build_vae
from proto.vae_config import VAEConfig, get_vae_preset


def _wan21_reference_shapes() -> dict[str, tuple[int, ...]]:
    """Every key and shape of Wan2.1_VAE.pth, spelled out from the reference key table (wan.md §3.3)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(prefix: str, c_out: int, c_in: int, kernel: tuple[int, ...]) -> None:
        shapes[f"{prefix}.weight"] = (c_out, c_in, *kernel)
        shapes[f"{prefix}.bias"] = (c_out,)

    def res(prefix: str, c_in: int, c_out: int) -> None:
        shapes[f"{prefix}.residual.0.gamma"] = (c_in, 1, 1, 1)
        conv(f"{prefix}.residual.2", c_out, c_in, (3, 3, 3))
        shapes[f"{prefix}.residual.3.gamma"] = (c_out, 1, 1, 1)
        conv(f"{prefix}.residual.6", c_out, c_out, (3, 3, 3))
        if c_in != c_out:
            conv(f"{prefix}.shortcut", c_out, c_in, (1, 1, 1))

    def middle(prefix: str) -> None:
        res(f"{prefix}.middle.0", 384, 384)
        shapes[f"{prefix}.middle.1.norm.gamma"] = (384, 1, 1)
        conv(f"{prefix}.middle.1.to_qkv", 1152, 384, (1, 1))
        conv(f"{prefix}.middle.1.proj", 384, 384, (1, 1))
        res(f"{prefix}.middle.2", 384, 384)

    conv("encoder.conv1", 96, 3, (3, 3, 3))
    for i, (c_in, c_out) in {
        0: (96, 96),
        1: (96, 96),
        3: (96, 192),
        4: (192, 192),
        6: (192, 384),
        7: (384, 384),
        9: (384, 384),
        10: (384, 384),
    }.items():
        res(f"encoder.downsamples.{i}", c_in, c_out)
    for i, c in {2: 96, 5: 192, 8: 384}.items():
        conv(f"encoder.downsamples.{i}.resample.1", c, c, (3, 3))
    for i, c in {5: 192, 8: 384}.items():
        conv(f"encoder.downsamples.{i}.time_conv", c, c, (3, 1, 1))
    middle("encoder")
    shapes["encoder.head.0.gamma"] = (384, 1, 1, 1)
    conv("encoder.head.2", 32, 384, (3, 3, 3))
    conv("conv1", 32, 32, (1, 1, 1))
    conv("conv2", 16, 16, (1, 1, 1))
    conv("decoder.conv1", 384, 16, (3, 3, 3))
    middle("decoder")
    for i, (c_in, c_out) in {
        0: (384, 384),
        1: (384, 384),
        2: (384, 384),
        4: (192, 384),
        5: (384, 384),
        6: (384, 384),
        8: (192, 192),
        9: (192, 192),
        10: (192, 192),
        12: (96, 96),
        13: (96, 96),
        14: (96, 96),
    }.items():
        res(f"decoder.upsamples.{i}", c_in, c_out)
    for i in (3, 7):
        conv(f"decoder.upsamples.{i}.resample.1", 192, 384, (3, 3))
        conv(f"decoder.upsamples.{i}.time_conv", 768, 384, (3, 1, 1))
    conv("decoder.upsamples.11.resample.1", 96, 192, (3, 3))
    shapes["decoder.head.0.gamma"] = (96, 1, 1, 1)
    conv("decoder.head.2", 3, 96, (3, 3, 3))
    return shapes


def _meta_state_shapes(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in build_vae(get_vae_preset(name), "meta").state_dict().items()}


def test_wan21_keys_and_shapes_equal_reference_list() -> None:
    assert _meta_state_shapes("wan2.1") == _wan21_reference_shapes()


def test_wan21_parameter_count_is_exact() -> None:
    shapes = _meta_state_shapes("wan2.1")
    sizes = {k: torch.Size(s).numel() for k, s in shapes.items()}
    assert len(shapes) == 194
    assert sum(sizes.values()) == 126_892_531
    for part, expected in {
        "encoder.": 53_595_872,
        "decoder.": 73_295_331,
        "conv1.": 1_056,
        "conv2.": 272,
    }.items():
        assert sum(n for k, n in sizes.items() if k.startswith(part)) == expected


def test_tiny_preset_has_the_same_keys_with_fewer_channels() -> None:
    tiny, wan = _meta_state_shapes("tiny"), _meta_state_shapes("wan2.1")
    assert tiny.keys() == wan.keys()
    assert sum(torch.Size(s).numel() for s in tiny.values()) < 1_000_000


def test_latent_statistics_are_buffers_outside_the_state_dict() -> None:
    vae = build_vae(get_vae_preset("tiny"))
    assert "latent_mean" not in vae.state_dict()
    assert vae.latent_mean[0].item() == pytest.approx(-0.7571)
    assert vae.latent_std[15].item() == pytest.approx(1.9160)


def test_unknown_preset_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown VAE preset 'wan2\.2'.*'tiny', 'wan2\.1'"):
        get_vae_preset("wan2.2")


def test_config_rejects_mismatched_normalisation_constants() -> None:
    with pytest.raises(ValueError, match="latent_mean and latent_std need z_dim=4"):
        VAEConfig(name="bad", dim=8, z_dim=4)

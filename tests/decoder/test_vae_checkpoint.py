"""Loading Wan VAE weights: Wan2.1_VAE.pth layout and safetensors, with errors that name the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from decoder.checkpoint import VAECheckpointError, load_vae, save_vae_checkpoint
from decoder.vae import WanVAE, build_vae
from proto.vae_config import get_vae_preset

TINY = get_vae_preset("tiny")


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    torch.manual_seed(0)
    model = build_vae(TINY)
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_round_trip_restores_every_tensor(vae: WanVAE, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"vae{suffix}"
    save_vae_checkpoint(vae, path)
    loaded = load_vae(path, TINY)
    original, restored = vae.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert torch.equal(loaded.latent_std, vae.latent_std)


def test_pth_is_a_plain_state_dict_with_wans_key_names(vae: WanVAE, tmp_path: Path) -> None:
    path = tmp_path / "Wan2.1_VAE.pth"
    save_vae_checkpoint(vae, path)
    state = torch.load(path, weights_only=True)
    assert len(state) == 194
    assert state["decoder.upsamples.3.time_conv.weight"].shape == (2 * 32, 32, 3, 1, 1)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_gives_a_clear_error(vae: WanVAE, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"vae{suffix}"
    save_vae_checkpoint(vae, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(VAECheckpointError, match=rf"VAE checkpoint .*vae\{suffix} \(\d+ bytes\).*truncated"):
        load_vae(path, TINY)


def test_wrong_preset_names_the_key_and_both_shapes(vae: WanVAE, tmp_path: Path) -> None:
    path = tmp_path / "vae.safetensors"
    save_vae_checkpoint(vae, path)
    with pytest.raises(
        VAECheckpointError,
        match=r"key encoder\.conv1\.weight has shape \[8, 3, 3, 3, 3\], the VAE preset 'wan2\.1' expects "
        r"\[96, 3, 3, 3, 3\]; wrong preset\?",
    ):
        load_vae(path, get_vae_preset("wan2.1"))


def test_partial_state_dict_names_a_missing_key(vae: WanVAE, tmp_path: Path) -> None:
    state = dict(vae.state_dict())
    del state["decoder.head.2.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(VAECheckpointError, match=r"lacks 1 of the 194 tensors.*decoder\.head\.2\.weight"):
        load_vae(path, TINY)


def test_prefixed_keys_are_reported_as_unexpected(vae: WanVAE, tmp_path: Path) -> None:
    path = tmp_path / "wrapped.pth"
    torch.save({"vae." + k: v for k, v in vae.state_dict().items()}, path)
    with pytest.raises(VAECheckpointError, match="lacks 194 of the 194 tensors"):
        load_vae(path, TINY)


def test_nested_checkpoint_is_not_a_plain_state_dict(vae: WanVAE, tmp_path: Path) -> None:
    path = tmp_path / "nested.pth"
    torch.save({"state_dict": vae.state_dict()}, path)
    with pytest.raises(VAECheckpointError, match=r"not a plain state dict.*\['state_dict'\]"):
        load_vae(path, TINY)


def test_missing_file_and_unknown_suffix_are_named(tmp_path: Path) -> None:
    with pytest.raises(VAECheckpointError, match="does not exist"):
        load_vae(tmp_path / "absent.pth", TINY)
    odd = tmp_path / "vae.npz"
    odd.write_bytes(b"x")
    with pytest.raises(VAECheckpointError, match=r"unknown suffix '\.npz'"):
        load_vae(odd, TINY)

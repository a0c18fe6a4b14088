"""Loading and saving Wan VAE weights: `Wan2.1_VAE.pth` (a plain state dict, torch.save) and safetensors.

Keys are Wan's own (encoder.*, conv1.*, conv2.*, decoder.*), 194 tensors for `wan2.1`. Every problem is
reported with the file, the key and the shapes involved.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from decoder.vae import WanVAE, build_vae
from proto.vae_config import VAEConfig

_SAFETENSORS_SUFFIXES = (".safetensors",)
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class VAECheckpointError(ValueError):
    """A VAE checkpoint file is unreadable or does not match the preset."""


def read_vae_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a VAE checkpoint on CPU: .pth/.pt (torch.load, weights_only, mmap) or .safetensors."""
    path = Path(path)
    if not path.is_file():
        raise VAECheckpointError(f"VAE checkpoint {path} does not exist")
    size = path.stat().st_size
    if path.suffix in _SAFETENSORS_SUFFIXES:
        try:
            state = load_file(path, device="cpu")
        except (SafetensorError, OSError) as err:
            raise VAECheckpointError(
                f"VAE checkpoint {path} ({size} bytes) is not a readable safetensors file ({err}); "
                "is it truncated or an interrupted download?"
            ) from err
    elif path.suffix in _TORCH_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises RuntimeError/EOFError/UnpicklingError/ValueError variously
            raise VAECheckpointError(
                f"VAE checkpoint {path} ({size} bytes) could not be read by torch.load "
                f"({type(err).__name__}: {err}); is it truncated, an interrupted download, or not a "
                "torch.save state dict?"
            ) from err
    else:
        raise VAECheckpointError(
            f"VAE checkpoint {path} has an unknown suffix {path.suffix!r}; use one of "
            f"{_TORCH_SUFFIXES + _SAFETENSORS_SUFFIXES}"
        )
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        top = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise VAECheckpointError(
            f"VAE checkpoint {path} is not a plain state dict of tensors (Wan2.1_VAE.pth layout); "
            f"top level: {top}"
        )
    return state


def check_vae_state_dict(state: dict[str, torch.Tensor], vae: WanVAE, source: str = "checkpoint") -> None:
    """Raise VAECheckpointError unless `state` has exactly the VAE's keys with the VAE's shapes."""
    expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    name = vae.cfg.name
    for key, shape in expected.items():
        if key in state and tuple(state[key].shape) != shape:
            raise VAECheckpointError(
                f"{source} key {key} has shape {list(state[key].shape)}, the VAE preset {name!r} expects "
                f"{list(shape)}; wrong preset?"
            )
    missing = [k for k in expected if k not in state]
    if missing:
        raise VAECheckpointError(
            f"{source} lacks {len(missing)} of the {len(expected)} tensors of VAE preset {name!r}, e.g. "
            f"{missing[:3]} ({list(expected[missing[0]])}); partial file or not a Wan VAE?"
        )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise VAECheckpointError(
            f"{source} has {len(unexpected)} keys the VAE preset {name!r} does not have, "
            f"e.g. {unexpected[:3]}; "
            "a different model, or a prefixed wrapper state dict?"
        )
    bad = [k for k, v in state.items() if not v.is_floating_point()]
    if bad:
        raise VAECheckpointError(
            f"{source} key {bad[0]} has dtype {state[bad[0]].dtype}, expected a float dtype"
        )


def load_vae(
    path: str | os.PathLike[str],
    cfg: VAEConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> WanVAE:
    """Build the VAE of `cfg` on the meta device, check and load the weights at `path`, move to device/dtype.

    Wan's checkpoint is fp32; keep float32 weights and use autocast for bf16/fp16 compute.
    """
    vae = build_vae(cfg, device="meta")
    state = read_vae_state_dict(path)
    check_vae_state_dict(state, vae, source=f"VAE checkpoint {path}")
    vae.load_state_dict(state, strict=True, assign=True)
    vae.reset_latent_stats()  # non-persistent buffers are still on the meta device
    vae = vae.to(device=device, dtype=dtype)
    return vae.eval().requires_grad_(False)


def save_vae_checkpoint(vae: WanVAE, path: str | os.PathLike[str]) -> None:
    """Write the VAE's weights in Wan's layout: torch.save state dict (.pth/.pt) or safetensors."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    if path.suffix in _SAFETENSORS_SUFFIXES:
        save_file(state, path)
    elif path.suffix in _TORCH_SUFFIXES:
        torch.save(state, path)
    else:
        raise VAECheckpointError(
            f"cannot save VAE checkpoint {path}: unknown suffix {path.suffix!r}; use .pth or .safetensors"
        )

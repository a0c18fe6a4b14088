"""Build the score model a rank serves: from a checkpoint, or seeded random weights equal on every rank."""

from __future__ import annotations

from pathlib import Path

import torch

from proto.model_config import ModelConfig, get_model_preset
from workers.checkpoint import load_dit_checkpoint
from workers.model import WanModel


def build_score_model(
    preset: str | ModelConfig,
    checkpoint: str | Path | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> WanModel:
    """The DiT of ``preset`` in eval mode on ``device`` in ``dtype``.

    With ``checkpoint``, its weights (``workers.checkpoint.load_dit_checkpoint``). Without, random weights
    drawn from ``seed`` alone (the global RNG state is restored afterwards), so every rank of a world builds
    bit-identical models (ranks on the same kind of device); unlike Wan's training initialisation the output
    head and the audio key/value projections are random too, so an untrained model's output depends on its
    inputs (visible noise, not a constant) and the audio path is exercised.

    The parameters are created directly on ``device`` in ``dtype``: an 18B model drawn in float32 on the host
    first would need about 70 GB of host memory per rank.
    """
    config = get_model_preset(preset) if isinstance(preset, str) else preset
    if checkpoint is not None:
        model, _ = load_dit_checkpoint(checkpoint, config, dtype=dtype, device=device)
        return model.eval()
    device = torch.device(device)
    rng_devices = [device] if device.type == "cuda" else []
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            with device:
                model = WanModel(config)
                model.init_weights(zero_head=False, zero_audio=False)
        finally:
            torch.set_default_dtype(default_dtype)
    return model.eval()

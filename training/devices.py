"""Where a training stage runs."""

from __future__ import annotations

import torch


def check_device(device: str) -> torch.device:
    """`device` as a torch.device, or ValueError naming why it cannot be used here."""
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r} is not a torch device: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this machine has no CUDA GPU (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: training runs on cpu or cuda")
    return dev

"""``talkingmachines run`` on a CUDA device: the side-stream decode/copy pipeline gives the CPU's frames.

Skipped without a GPU (marker ``gpu``, see tests/conftest.py). The default bundle (trained tiny student +
VAE) runs the same inputs on the CPU and on the GPU; the overlapped GPU run (decode and device-to-host copy
on side streams into pinned buffers) must equal the GPU run without overlap — a missing ``wait_stream`` or
``record_stream`` shows up as torn or stale frames there — and stay within rounding of the CPU run (cuDNN
convolutions and reductions differ from the CPU's in the last bits; frames are 8-bit).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.runtime.run_helpers import run_cli, write_inputs

pytestmark = pytest.mark.gpu

HEIGHT = WIDTH = 64


def _frames(path: Path) -> np.ndarray:
    return np.fromfile(path, np.uint8).reshape(-1, HEIGHT, WIDTH, 3)


def _run(folder: Path, name: str, *extra: str) -> np.ndarray:
    image, audio = write_inputs(folder, audio_seconds=2.0)
    frames = folder / f"{name}.rgb"
    result = run_cli(
        image, audio, folder / f"{name}.mp4", "--resolution", f"{HEIGHT}x{WIDTH}",
        "--save-frames", str(frames), *extra, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return _frames(frames)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_matches_cpu_and_overlap_changes_nothing(tmp_path: Path) -> None:
    cpu = _run(tmp_path, "cpu", "--device", "cpu")
    overlapped = _run(tmp_path, "cuda", "--device", "cuda")
    serial = _run(tmp_path, "cuda_serial", "--device", "cuda", "--no-overlap")
    assert cpu.shape == overlapped.shape == serial.shape
    assert cpu.shape[0] >= 29  # 2 s of audio: 9 + 12 + ... frames
    overlap_diff = np.abs(overlapped.astype(np.int16) - serial.astype(np.int16))
    device_diff = np.abs(overlapped.astype(np.int16) - cpu.astype(np.int16))
    print(f"overlap vs serial: mean {overlap_diff.mean():.4f} max {overlap_diff.max()}; "
          f"cuda vs cpu: mean {device_diff.mean():.4f} max {device_diff.max()}")  # fmt: skip
    assert overlap_diff.mean() < 0.05 and overlap_diff.max() <= 2
    assert device_diff.mean() < 2.0
    # every chunk, not only the first, stays close (a stale buffer would repeat an earlier chunk)
    per_frame = device_diff.reshape(device_diff.shape[0], -1).mean(axis=1)
    assert per_frame.max() < 6.0, per_frame

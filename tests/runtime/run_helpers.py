"""Helpers for the runtime tests: tiny inputs, running ``talkingmachines run`` as a real process tree, and
finding the processes of one run (by a marker in their environment) to kill them or prove none is left."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
MARKER_ENV = "TM_TEST_RUN_MARKER"


def write_inputs(folder: Path, audio_seconds: float, sample_rate: int = 22_050) -> tuple[Path, Path]:
    """A random 80x96 PNG portrait and a stereo WAV of a gated tone at ``sample_rate`` (resampled by run)."""
    rng = np.random.default_rng(0)
    image = folder / "face.png"
    Image.fromarray((rng.random((96, 80, 3)) * 255).astype(np.uint8)).save(image)
    t = np.arange(round(audio_seconds * sample_rate)) / sample_rate
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 1.5 * t) > 0)
    audio = folder / "speech.wav"
    sf.write(audio, np.stack([tone, 0.5 * tone], axis=1).astype(np.float32), sample_rate)
    return image, audio


def run_command(image: Path, audio: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "server.cli",
        "run",
        "--image",
        str(image),
        "--audio",
        str(audio),
        "--out",
        str(out),
        "--threads",
        os.environ.get("TM_TEST_THREADS", "1"),  # tests/test_cpu_matrix.py reruns the equality tests with 2
        "--device",
        "cpu",
        *extra,
    ]


def run_env(marker: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env[MARKER_ENV] = marker
    return env


def run_cli(
    image: Path, audio: Path, out: Path, *extra: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``talkingmachines run`` to completion in a fresh process tree; returns its result."""
    return subprocess.run(
        run_command(image, audio, out, *extra),
        env=run_env(uuid.uuid4().hex),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def marked_processes(marker: str) -> dict[int, dict[str, str]]:
    """pid -> environment of every live process carrying ``MARKER_ENV=marker`` (zombies excluded)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        env = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
        if env.get(MARKER_ENV) == marker and state not in ("Z", "X"):
            found[int(entry.name)] = env
    return found


def read_frames(path: Path, height: int, width: int) -> np.ndarray:
    """The raw frames written by ``--save-frames``: uint8 ``[T, H, W, 3]``."""
    return np.fromfile(path, dtype=np.uint8).reshape(-1, height, width, 3)


# Frames of two topologies (or thread counts) of the same run: their latents agree to float32 rounding
# (<= 1e-5, tests/workers/test_sp_engine.py), which moves a pixel by far less than one level, so only values
# sitting on a rounding boundary may flip, by one level (two where a flip in one chunk's latents carries into
# the next chunk). A wrong key order, seed or chunk gives differences of tens of levels on most pixels.
FRAME_MAX_LEVELS = 2
FRAME_MAX_CHANGED = 0.01


def assert_frames_match(got: np.ndarray, want: np.ndarray) -> None:
    """``got`` equals ``want`` (uint8 ``[T, H, W, 3]``) up to rounding flips (see ``FRAME_MAX_LEVELS``)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    changed = float((diff > 0).mean())
    assert diff.max() <= FRAME_MAX_LEVELS and changed <= FRAME_MAX_CHANGED, (
        f"frames differ by up to {diff.max()} levels in {changed:.2%} of values "
        f"(allowed {FRAME_MAX_LEVELS} levels in {FRAME_MAX_CHANGED:.0%})"
    )

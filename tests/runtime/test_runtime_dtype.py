"""``talkingmachines run --dtype bfloat16`` end to end on the CPU: the start-up line names the dtype and the
attention backend (auto's sdpa; math by name), and the MP4's frames are close to the float32 run's (the same
seeded random model, rounded to bfloat16)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from run_helpers import read_frames, run_cli, write_inputs

AUDIO_S = 1.4  # 23 frames, 3 chunks: chunk 2 attends to the bf16 KV cache of chunks 0 and 1
# Mean absolute difference per pixel value (0..255) between the bfloat16 and the float32 run's frames.
# Observed on a CPU: 3.6 levels (2.7, 3.9, 4.9 over chunks 0, 1, 2: the caches carry the rounding; max 34 on
# single values of the random model's noise-like frames). Another --seed gives 33, so the bound keeps a 2x
# margin and still tells the same model from another. (The trained default at 32x32: 0.25 levels, max 2.)
MAX_MEAN_LEVELS = 8.0


def _run(image: Path, audio: Path, folder: Path, dtype: str, *extra: str) -> tuple[np.ndarray, str, Path]:
    out, raw = folder / f"{dtype}.mp4", folder / f"{dtype}.u8"
    result = run_cli(
        image, audio, out, "--resolution", "32x32", "--random-weights", "--seed", "7", "--dtype", dtype,
        "--decoder", "colocated", "--save-frames", str(raw), *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return read_frames(raw, 32, 32), result.stderr, out


@pytest.mark.slow
def test_a_bfloat16_run_writes_frames_close_to_the_float32_runs(tmp_path: Path) -> None:
    image, audio = write_inputs(tmp_path, AUDIO_S)
    # The float32 reference attends with the float32 `math` backend (equal to sdpa within ~1e-6): the start-up
    # line names a backend given by name as well as auto's choice.
    want, stderr32, _ = _run(image, audio, tmp_path, "float32", "--attention-backend", "math")
    got, stderr16, mp4 = _run(image, audio, tmp_path, "bfloat16")
    line16 = "talkingmachines run: self-contained 1, preset tiny, dtype bfloat16, attention sdpa, 32x32"
    assert line16 in stderr16, stderr16
    assert "preset tiny, dtype float32, attention math, 32x32" in stderr32, stderr32
    with av.open(str(mp4)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 23
    assert got.shape == want.shape == (23, 32, 32, 3)
    assert got.std() > 5  # random weights give visible noise, not a constant picture
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.mean() <= MAX_MEAN_LEVELS, f"bfloat16 frames differ by {diff.mean():.2f} levels on average"
    assert diff.mean() > 0  # the run did change precision

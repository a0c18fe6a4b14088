"""What ``serve`` publishes is what ``run`` writes, and a session's frames do not depend on its neighbours.

One disaggregated 1 + 1 ``serve`` group (seeded random weights at 32x32, seed 7) and ``talkingmachines run``
with the same topology, seed, image and prompt. The inputs are silent: ``run`` gets a silent WAV, the serve
sessions get no speech (silence mode), so every chunk's inputs are fixed and the comparison does not depend
on when speech reaches a live session. Frames are compared after H.264 in both (the same encoder settings;
serve's file is longer, so the encoder's look-ahead may differ near the end): per value within a few levels
on average, where another seed differs by ~30 levels.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from tests.runtime.run_helpers import run_cli
from tests.serve.conftest import PORTRAIT, ServeProcess, portrait_base64, start_serve

pytestmark = pytest.mark.slow

TOPOLOGY = ("--decoder", "dedicated", "--score-workers", "1")
WEIGHTS = ("--random-weights", "--resolution", "32x32", "--seed", "7")
FRAMES = 23  # 1.4375 s: chunk 0 (9 frames) + chunk 1 (12) + 2 frames of chunk 2
MEAN_LEVELS = 1.0  # mean |difference| per value allowed after H.264 (another seed: ~30)


def _frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.int16)


def _mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a[:FRAMES] - b[:FRAMES]).mean())


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("frames")


@pytest.fixture(scope="module")
def server(out_dir: Path) -> Iterator[ServeProcess]:
    files = out_dir / "files"
    files.mkdir()
    server = start_serve(out_dir, *TOPOLOGY, *WEIGHTS, api={"file_output_dir": str(files)})
    yield server
    server.stop()


def _record(http: httpx.Client, names: list[str], out_dir: Path) -> list[np.ndarray]:
    """Sessions ``names`` at once (same image, one full-frame character), each until 3 chunks played."""
    width, height = Image.open(PORTRAIT).size
    full_frame = [{"box": [0, 0, width, height]}]  # one character filling the frame, as run's
    ids = []
    for name in names:
        output = {"type": "file", "path": name}
        body = {"image": portrait_base64(), "characters": full_frame, "output": output}
        response = http.post("/v1/sessions", json=body)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # ~1 chunk is generated ahead of playout: 5 chunks = 3 played
        if all(http.get(f"/v1/sessions/{i}").json()["chunks_generated"] >= 5 for i in ids):
            break
        time.sleep(0.2)
    for i in ids:
        assert http.delete(f"/v1/sessions/{i}").status_code == 200
    frames = [_frames(out_dir / "files" / name) for name in names]
    assert all(f.shape[0] >= FRAMES for f in frames), [f.shape for f in frames]
    return frames


@pytest.fixture(scope="module")
def alone(server: ServeProcess, out_dir: Path) -> np.ndarray:
    with server.client() as http:
        return _record(http, ["alone.mp4"], out_dir)[0]


def test_serve_publishes_the_frames_run_writes(alone: np.ndarray, out_dir: Path) -> None:
    audio = out_dir / "silence.wav"
    sf.write(audio, np.zeros(round(FRAMES / 16 * 16_000), np.float32), 16_000)
    ran = out_dir / "run.mp4"
    result = run_cli(PORTRAIT, audio, ran, *TOPOLOGY, *WEIGHTS, "--quiet")
    assert result.returncode == 0, result.stderr
    run_frames = _frames(ran)
    assert run_frames.shape == (FRAMES, 32, 32, 3)
    assert run_frames.std() > 5  # random weights: visible noise, not a flat picture
    assert _mean_diff(alone, run_frames) <= MEAN_LEVELS

    other_seed = out_dir / "run8.mp4"
    result = run_cli(PORTRAIT, audio, other_seed, *TOPOLOGY, *WEIGHTS, "--seed", "8", "--quiet")
    assert result.returncode == 0, result.stderr
    assert _mean_diff(alone, _frames(other_seed)) > 10 * MEAN_LEVELS  # the comparison can fail


def test_two_live_sessions_each_publish_the_frames_of_a_session_served_alone(
    server: ServeProcess, alone: np.ndarray, out_dir: Path
) -> None:
    with server.client() as http:
        first, second = _record(http, ["first.mp4", "second.mp4"], out_dir)
    assert _mean_diff(first, alone) <= MEAN_LEVELS
    assert _mean_diff(second, alone) <= MEAN_LEVELS

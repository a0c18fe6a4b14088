"""``serve --preset soulx-liveact-tiny``: a disaggregated 1 + 1 group on the LiveAct schedule publishes what
``run`` writes, and refuses a second character.

As tests/serve/test_serve_frames.py: silent inputs (``run`` a silent WAV, the live session no speech), so
every chunk's inputs are fixed; ``run --stream-audio`` featurises with serve's live front-end (``run``'s
default, the whole clip's features, is upstream's offline path and differs from a live stream's). Frames are
compared after H.264 in both files.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from tests.runtime.run_helpers import run_cli
from tests.serve.conftest import PORTRAIT, ServeProcess, portrait_base64, start_serve
from tests.serve.test_serve_frames import _frames as h264_frames

pytestmark = pytest.mark.slow

TOPOLOGY = ("--decoder", "dedicated", "--score-workers", "1")
WEIGHTS = ("--preset", "soulx-liveact-tiny", "--random-weights", "--resolution", "32x32", "--seed", "7")
FRAMES = 85  # chunks 0..2: 21 + 32 + 32 frames at 24 fps
MEAN_LEVELS = 1.0  # mean |difference| per value allowed after H.264


def _frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        assert container.streams.video[0].average_rate == 24
        assert container.streams.audio[0].rate == 48_000
    return h264_frames(path)


def _mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a[:FRAMES] - b[:FRAMES]).mean())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, Path]]:
    out_dir = tmp_path_factory.mktemp("liveact")
    (out_dir / "files").mkdir()
    server = start_serve(out_dir, *TOPOLOGY, *WEIGHTS, api={"file_output_dir": str(out_dir / "files")})
    yield server, out_dir
    server.stop()


def _body(characters: list[dict], path: str) -> dict:
    return {"image": portrait_base64(), "characters": characters, "output": {"type": "file", "path": path}}


@pytest.fixture(scope="module")
def served(server: tuple[ServeProcess, Path]) -> tuple[np.ndarray, Path]:
    process, out_dir = server
    width, height = Image.open(PORTRAIT).size
    with process.client() as http:
        response = http.post("/v1/sessions", json=_body([{"box": [0, 0, width, height]}], "liveact.mp4"))
        assert response.status_code == 201, response.text
        session = response.json()["id"]
        deadline = time.monotonic() + 90
        # Up to 2 chunks are generated ahead of playout (pipelined): 6 generated = 4 played, > 85 frames
        while time.monotonic() < deadline:
            if http.get(f"/v1/sessions/{session}").json()["chunks_generated"] >= 6:
                break
            time.sleep(0.2)
        assert http.delete(f"/v1/sessions/{session}").status_code == 200
    frames = _frames(out_dir / "files" / "liveact.mp4")
    assert frames.shape[0] >= FRAMES, frames.shape
    return frames, out_dir


def test_serve_publishes_the_frames_run_writes_on_the_liveact_schedule(
    served: tuple[np.ndarray, Path],
) -> None:
    served_frames, out_dir = served
    audio = out_dir / "silence.wav"
    sf.write(audio, np.zeros(round(80 / 24 * 16_000), np.float32), 16_000)  # 80 frames: 3 chunks
    ran = out_dir / "run.mp4"
    result = run_cli(PORTRAIT, audio, ran, *TOPOLOGY, *WEIGHTS, "--stream-audio", "--quiet")
    assert result.returncode == 0, result.stderr
    run_frames = _frames(ran)
    assert run_frames.shape == (FRAMES, 32, 32, 3)
    assert run_frames.std() > 5  # random weights: visible noise, not a flat picture
    assert _mean_diff(served_frames, run_frames) <= MEAN_LEVELS

    other_seed = out_dir / "run8.mp4"
    result = run_cli(
        PORTRAIT, audio, other_seed, *TOPOLOGY, *WEIGHTS, "--stream-audio", "--seed", "8", "--quiet"
    )
    assert result.returncode == 0, result.stderr
    assert _mean_diff(served_frames, _frames(other_seed)) > 10 * MEAN_LEVELS  # the comparison can fail


def test_a_liveact_session_with_two_characters_is_refused(server: tuple[ServeProcess, Path]) -> None:
    width, height = Image.open(PORTRAIT).size
    two = [{"box": [0, 0, width // 2, height]}, {"box": [width // 2, 0, width, height]}]
    with server[0].client() as http:
        response = http.post("/v1/sessions", json=_body(two, "two.mp4"))
    assert response.status_code == 422, response.text
    assert "animates one character" in response.text

"""``serve --step-pipeline``: two live sessions at once through 2 stage ranks (their chunks interleaved in the
pipe, up to two in flight) each publish the frames ``run`` writes on 1 + 1 (after H.264, within the level
``tests/serve/test_serve_frames.py`` allows; another seed differs by ~30 levels)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.runtime.run_helpers import run_cli
from tests.serve.conftest import PORTRAIT, ServeProcess, start_serve
from tests.serve.test_serve_frames import FRAMES, MEAN_LEVELS, WEIGHTS, _frames, _mean_diff, _record

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("step_pipeline")


@pytest.fixture(scope="module")
def server(out_dir: Path) -> Iterator[ServeProcess]:
    files = out_dir / "files"
    files.mkdir()
    server = start_serve(out_dir, "--step-pipeline", *WEIGHTS, api={"file_output_dir": str(files)})
    yield server
    server.stop()


def test_two_sessions_through_the_step_pipeline_publish_the_frames_run_writes(
    server: ServeProcess, out_dir: Path
) -> None:
    assert "step-pipeline 2x1+1" in server.log()
    with server.client() as http:
        first, second = _record(http, ["first.mp4", "second.mp4"], out_dir)
    audio = out_dir / "silence.wav"
    sf.write(audio, np.zeros(round(FRAMES / 16 * 16_000), np.float32), 16_000)
    ran = out_dir / "run.mp4"
    result = run_cli(PORTRAIT, audio, ran, "--decoder", "dedicated", *WEIGHTS, "--quiet")
    assert result.returncode == 0, result.stderr
    run_frames = _frames(ran)
    assert run_frames.std() > 5
    assert _mean_diff(first, run_frames) <= MEAN_LEVELS
    assert _mean_diff(second, run_frames) <= MEAN_LEVELS

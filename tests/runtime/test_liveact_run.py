"""``talkingmachines run --preset soulx-liveact-tiny`` end to end: real process worlds (gloo, 32x32, seeded
random weights) on the LiveAct schedule (chunks of 6, then 8 latent frames; 21, then 32 video frames at 24
fps, 48 kHz audio). The master side with a scripted score side is tests/runtime/test_liveact_master.py."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from run_helpers import assert_frames_match, read_frames, run_cli, write_inputs

PRESET = ("--preset", "soulx-liveact-tiny", "--random-weights", "--resolution", "32x32", "--seed", "7")
AUDIO_S = 2.5  # 60 frames at 24 fps: 3 chunks (21 + 32 + 32 = 85 frames), so chunk 2 updates the memory
FRAMES = 85

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_inputs(tmp_path_factory.mktemp("inputs"), AUDIO_S)


def _run(inputs: tuple[Path, Path], folder: Path, name: str, *extra: str) -> tuple[np.ndarray, Path]:
    image, audio = inputs
    out, frames = folder / f"{name}.mp4", folder / f"{name}.u8"
    result = run_cli(image, audio, out, *PRESET, "--save-frames", str(frames), "--quiet", *extra)
    assert result.returncode == 0, result.stderr
    return read_frames(frames, 32, 32), out


@pytest.fixture(scope="module")
def self_contained_1(inputs, tmp_path_factory) -> tuple[np.ndarray, Path]:
    return _run(inputs, tmp_path_factory.mktemp("sc1"), "sc1", "--decoder", "colocated")


def test_run_writes_21_plus_32_k_frames_at_24_fps_with_the_audio_in_sync(inputs, self_contained_1) -> None:
    frames, out = self_contained_1
    assert frames.shape == (FRAMES, 32, 32, 3)
    assert frames.std() > 5  # random weights: visible noise, not a flat picture
    with av.open(str(out)) as container:
        video = container.streams.video[0]
        assert video.average_rate == 24
        assert sum(1 for _ in container.decode(video=0)) == FRAMES
    with av.open(str(out)) as container:
        audio = container.streams.audio[0]
        rate = audio.rate
        duration = float(audio.duration * audio.time_base)
        pcm = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])
    assert rate == 48_000
    assert abs(duration - FRAMES / 24) < 1e-3  # audio and video end together (silence after the input's)
    assert abs(pcm.size - FRAMES * 2000) < 1024  # within one AAC frame (1024 samples)
    original, original_rate = sf.read(str(inputs[1]))
    expected_rms = np.sqrt(np.mean(original.mean(axis=1)[:original_rate] ** 2))
    assert np.sqrt(np.mean(pcm[:rate] ** 2)) == pytest.approx(expected_rms, rel=0.1)


@pytest.mark.equality
def test_disaggregated_1_plus_1_gives_the_same_frames_as_self_contained_1(
    inputs, self_contained_1, tmp_path
) -> None:
    frames, _ = _run(inputs, tmp_path, "dis1", "--score-workers", "1", "--decoder", "dedicated")
    assert_frames_match(frames, self_contained_1[0])


def test_the_streaming_front_end_changes_the_audio_windows_not_the_schedule(
    inputs, self_contained_1, tmp_path
) -> None:
    frames, _ = _run(inputs, tmp_path, "stream", "--decoder", "colocated", "--stream-audio")
    assert frames.shape == self_contained_1[0].shape
    assert not np.array_equal(frames, self_contained_1[0])  # the live front-end's features are not the clip's

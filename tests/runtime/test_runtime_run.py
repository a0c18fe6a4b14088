"""``talkingmachines run`` end to end: real process worlds (gloo, tiny preset, 32x32), video and audio."""

from __future__ import annotations

import json
import math
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from run_helpers import read_frames, run_cli, write_inputs

SIZE = ("--resolution", "32x32")
AUDIO_S = 1.4  # 23 frames: 3 chunks (9 + 12 + 12 frames), so chunk 2 attends to c_0 and c_1


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_inputs(tmp_path_factory.mktemp("inputs"), AUDIO_S)


def _run(inputs: tuple[Path, Path], folder: Path, name: str, *topology: str) -> tuple[np.ndarray, Path]:
    image, audio = inputs
    out, frames = folder / f"{name}.mp4", folder / f"{name}.u8"
    result = run_cli(image, audio, out, *SIZE, "--seed", "7", "--save-frames", str(frames), *topology)
    assert result.returncode == 0, result.stderr
    return read_frames(frames, 32, 32), out


@pytest.fixture(scope="module")
def self_contained_1(inputs, tmp_path_factory) -> tuple[np.ndarray, Path]:
    return _run(inputs, tmp_path_factory.mktemp("sc1"), "sc1", "--decoder", "colocated")


@pytest.fixture(scope="module")
def disaggregated_2(inputs, tmp_path_factory) -> tuple[np.ndarray, Path]:
    return _run(inputs, tmp_path_factory.mktemp("dis2"), "dis2", "--score-workers", "2")


@pytest.mark.slow
def test_disaggregated_1_plus_1_gives_the_same_frames_as_self_contained_1(
    inputs, self_contained_1, tmp_path
) -> None:
    frames, _ = _run(inputs, tmp_path, "dis1", "--score-workers", "1", "--decoder", "dedicated")
    assert frames.shape == (23, 32, 32, 3)
    assert frames.std() > 5  # random weights give visible noise, not a constant picture
    np.testing.assert_array_equal(frames, self_contained_1[0])


@pytest.mark.slow
def test_disaggregated_2_plus_1_gives_the_same_frames_as_self_contained_2(
    inputs, disaggregated_2, tmp_path
) -> None:
    frames, _ = _run(inputs, tmp_path, "sc2", "--score-workers", "2", "--decoder", "colocated")
    np.testing.assert_array_equal(disaggregated_2[0], frames)


@pytest.mark.slow
def test_disaggregated_2_plus_1_matches_self_contained_1_up_to_sp_rounding(
    self_contained_1, disaggregated_2
) -> None:
    # Ulysses changes the float summation order (keys in band order, sharded matmuls): latents agree to
    # ~1e-6, which flips the rounding of a handful of uint8 values by one level.
    sp1, sp2 = self_contained_1[0].astype(int), disaggregated_2[0].astype(int)
    assert sp1.shape == sp2.shape
    assert np.abs(sp1 - sp2).max() <= 1
    assert (sp1 != sp2).mean() < 1e-3


@pytest.mark.slow
def test_the_mp4_has_the_input_audio_in_sync_at_16_fps(inputs, disaggregated_2) -> None:
    _, audio_path = inputs
    duration = sf.info(str(audio_path)).duration
    with av.open(str(disaggregated_2[1])) as container:
        video = container.streams.video[0]
        assert video.average_rate == 16
        assert (video.codec_context.width, video.codec_context.height) == (32, 32)
        frames = sum(1 for _ in container.decode(video=0))
    with av.open(str(disaggregated_2[1])) as container:
        stream = container.streams.audio[0]
        audio_duration = float(stream.duration * stream.time_base)
        samples = [f.to_ndarray()[0] for f in container.decode(audio=0)]
        rate = stream.rate
    pcm = np.concatenate(samples)
    assert frames == math.ceil(duration * 16)
    assert abs(frames / 16 - duration) <= 1 / 16
    assert abs(audio_duration - duration) <= 1 / 16
    assert abs(audio_duration - frames / 16) < 1e-3  # audio and video end together
    assert 0 <= pcm.size - frames * rate // 16 < 1024  # decoders add at most one AAC frame of padding
    # The audio is the input's (AAC is lossy: compare loudness over the first second, where it is a tone).
    original, original_rate = sf.read(str(audio_path))
    assert original_rate == 22_050
    expected_rms = np.sqrt(np.mean(original.mean(axis=1)[:original_rate] ** 2))
    assert np.sqrt(np.mean(pcm[:rate] ** 2)) == pytest.approx(expected_rms, rel=0.1)


@pytest.mark.slow
def test_a_20_chunk_run_keeps_master_and_worker_memory_flat(tmp_path) -> None:
    image, audio = write_inputs(tmp_path, (12 * 20 - 3.5) / 16)  # 237 frames: 9 + 19 x 12
    stats_path = tmp_path / "stats.json"
    result = run_cli(
        image,
        audio,
        tmp_path / "long.mp4",
        *SIZE,
        "--score-workers",
        "2",
        "--stats-json",
        str(stats_path),
        "--quiet",
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads(stats_path.read_text())
    assert stats["summary"]["chunks"] == 20
    growth = stats["summary"]["rss_growth_after_chunk_3"]
    assert sorted(growth) == ["0", "1", "2"]  # the master and both workers were measured
    assert all(g <= 0.05 for g in growth.values()), growth

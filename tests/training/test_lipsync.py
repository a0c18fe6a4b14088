"""The lip-sync score: high and at offset 0 on ground truth, ~0 on frozen or random mouths, finds delays."""

from __future__ import annotations

import numpy as np
import pytest

from training.data import Clip, DataConfig, SyntheticTalkingDataset
from training.lipsync import lipsync_score, mouth_opening_from_frames, pearson

CFG = DataConfig(num_frames=81, two_character_prob=0.0, silent_prob=0.0)


@pytest.fixture(scope="module")
def dataset() -> SyntheticTalkingDataset:
    return SyntheticTalkingDataset(CFG, seed=0)


@pytest.fixture(scope="module")
def clip(dataset: SyntheticTalkingDataset) -> Clip:
    return dataset.clip(1)


def _delayed(video: np.ndarray, k: int) -> np.ndarray:
    """Frame t shows frame t - k (k > 0: the video lags the audio), edges repeated."""
    index = np.clip(np.arange(len(video)) - k, 0, len(video) - 1)
    return video[index]


@pytest.mark.parametrize("index", [1, 2, 3])
def test_ground_truth_video_scores_high_at_offset_zero(dataset: SyntheticTalkingDataset, index: int) -> None:
    clip = dataset.clip(index)
    score = lipsync_score(clip.video, clip)
    assert score["correlation"] > 0.8
    assert score["offset_frames"] == 0


def test_measured_opening_tracks_the_drawn_opening(clip: Clip) -> None:
    measured = mouth_opening_from_frames(clip.video, clip)
    assert pearson(measured, clip.mouth_open[clip.speaker]) > 0.95


def test_frozen_mouth_scores_low(dataset: SyntheticTalkingDataset, clip: Clip) -> None:
    frozen = dataset.clip(1, mouth_open_override=np.full_like(clip.mouth_open, 0.4))
    assert abs(lipsync_score(frozen.video, clip)["correlation"]) < 0.2


def test_random_mouth_scores_low(dataset: SyntheticTalkingDataset, clip: Clip) -> None:
    random_open = np.random.default_rng(0).random(clip.mouth_open.shape).astype(np.float32)
    babbling = dataset.clip(1, mouth_open_override=random_open)
    assert lipsync_score(babbling.video, clip)["correlation"] < 0.2


@pytest.mark.parametrize("k", [3, -2])
def test_video_shifted_by_k_frames_gives_offset_k(clip: Clip, k: int) -> None:
    score = lipsync_score(_delayed(clip.video, k), clip)
    assert score["offset_frames"] == k
    assert score["best_correlation"] > 0.8 > score["correlation"]


def test_silent_clip_has_no_lipsync_score() -> None:
    silent = SyntheticTalkingDataset(DataConfig(silent_prob=1.0), seed=0).clip(0)
    with pytest.raises(ValueError, match="no speaking character"):
        lipsync_score(silent.video, silent)


def test_frames_of_another_size_are_rejected(clip: Clip) -> None:
    with pytest.raises(ValueError, match="resize"):
        mouth_opening_from_frames(np.zeros((81, 32, 32, 3), np.uint8), clip)

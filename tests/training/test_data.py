"""Synthetic talking-character clips: determinism, layout, and the ground truth they carry."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from training.data import SPEAKING_RMS_THRESHOLD, DataConfig, SyntheticTalkingDataset
from training.lipsync import pearson


def _speaking_clips(cfg: DataConfig, count: int, seed: int = 0) -> list:
    ds = SyntheticTalkingDataset(cfg, seed=seed)
    clips = [ds.clip(i) for i in range(count * 3)]
    return [c for c in clips if c.speaker >= 0][:count]


def test_same_seed_and_index_give_identical_clips() -> None:
    a = SyntheticTalkingDataset(DataConfig(), seed=3).clip(7)
    b = SyntheticTalkingDataset(DataConfig(), seed=3).clip(7)
    assert np.array_equal(a.video, b.video)
    assert np.array_equal(a.audio, b.audio)
    assert np.array_equal(a.mouth_open, b.mouth_open)
    assert np.array_equal(a.mouth_boxes_px, b.mouth_boxes_px)


def test_other_index_or_seed_gives_another_clip() -> None:
    base = SyntheticTalkingDataset(DataConfig(), seed=3).clip(7)
    assert not np.array_equal(base.video, SyntheticTalkingDataset(DataConfig(), seed=3).clip(8).video)
    assert not np.array_equal(base.video, SyntheticTalkingDataset(DataConfig(), seed=4).clip(7).video)


def test_clip_fields_have_the_contract_shapes_and_dtypes() -> None:
    cfg = DataConfig(height=64, width=48, num_frames=13)
    clip = SyntheticTalkingDataset(cfg, seed=0).clip(0)
    c = clip.num_characters
    assert clip.video.shape == (13, 64, 48, 3) and clip.video.dtype == np.uint8
    assert clip.audio.shape == (13 * 1000,) and clip.audio.dtype == np.float32
    assert clip.mouth_open.shape == (c, 13) and clip.mouth_open.dtype == np.float32
    assert clip.envelope.shape == (13,) and clip.envelope.dtype == np.float32
    assert clip.speaking.shape == (c, 13) and clip.speaking.dtype == bool
    assert clip.face_boxes_px.shape == (c, 4) and clip.mouth_boxes_px.shape == (c, 13, 4)
    assert np.array_equal(clip.reference, clip.video[0])


@pytest.mark.parametrize("frames", [1, 9, 33])
def test_audio_has_1000_samples_per_video_frame(frames: int) -> None:
    clip = SyntheticTalkingDataset(DataConfig(num_frames=frames, silent_prob=0.0), seed=1).clip(0)
    assert clip.audio.shape == (frames * 1000,)


def test_speaker_mouth_follows_the_audio_envelope() -> None:
    clips = _speaking_clips(DataConfig(num_frames=49, silent_prob=0.0), 6)
    for clip in clips:
        assert pearson(clip.mouth_open[clip.speaker], clip.envelope) > 0.8
        assert 0.0 <= clip.mouth_open.min() and clip.mouth_open.max() <= 1.0


def test_two_character_clips_have_one_speaker_and_a_silent_listener() -> None:
    cfg = DataConfig(two_character_prob=1.0, silent_prob=0.0)
    ds = SyntheticTalkingDataset(cfg, seed=0)
    speakers = set()
    for i in range(6):
        clip = ds.clip(i)
        assert clip.num_characters == 2
        listener = 1 - clip.speaker
        speakers.add(clip.speaker)
        assert clip.speaking[clip.speaker].any() and not clip.speaking[listener].any()
        assert np.all(clip.mouth_open[listener] == 0) and clip.mouth_open[clip.speaker].max() > 0.3
    assert speakers == {0, 1}


def test_silent_clips_have_zero_audio_closed_mouths_and_no_speaking_flags() -> None:
    clip = SyntheticTalkingDataset(DataConfig(silent_prob=1.0), seed=0).clip(0)
    assert clip.speaker == -1 and clip.voice == "silent"
    assert not clip.audio.any() and not clip.speaking.any() and not clip.mouth_open.any()


def test_speaking_flags_use_the_server_rms_threshold() -> None:
    from frontends.audio_features import AudioFeaturizerConfig

    assert AudioFeaturizerConfig().speaking_rms_threshold == SPEAKING_RMS_THRESHOLD
    clip = _speaking_clips(DataConfig(num_frames=49, silent_prob=0.0), 1)[0]
    rms = np.sqrt((clip.audio.reshape(49, 1000).astype(np.float64) ** 2).mean(1))
    assert np.array_equal(clip.speaking[clip.speaker], rms > SPEAKING_RMS_THRESHOLD)


def test_mouth_boxes_lie_inside_the_face_boxes() -> None:
    clip = SyntheticTalkingDataset(DataConfig(two_character_prob=1.0), seed=2).clip(0)
    for c in range(clip.num_characters):
        fx0, fy0, fx1, fy1 = clip.face_boxes_px[c]
        m = clip.mouth_boxes_px[c]
        assert (m[:, 0] >= fx0).all() and (m[:, 2] <= fx1).all()
        assert (m[:, 1] >= fy0).all() and (m[:, 3] <= fy1).all()


def test_mouth_override_changes_only_the_mouth() -> None:
    ds = SyntheticTalkingDataset(DataConfig(two_character_prob=0.0, silent_prob=0.0), seed=0)
    clip = ds.clip(1)
    closed = ds.clip(1, mouth_open_override=np.zeros_like(clip.mouth_open))
    assert np.array_equal(closed.audio, clip.audio)
    changed = np.argwhere((closed.video != clip.video).any(axis=(0, 3)))
    x0, y0, x1, y1 = clip.mouth_boxes_px[0].min(0)[:2].tolist() + clip.mouth_boxes_px[0].max(0)[2:].tolist()
    assert changed.size > 0
    assert changed[:, 0].min() >= y0 - 2 and changed[:, 0].max() <= y1 + 2
    assert changed[:, 1].min() >= x0 - 2 and changed[:, 1].max() <= x1 + 2


def test_every_style_is_drawn() -> None:
    ds = SyntheticTalkingDataset(DataConfig(num_frames=1), seed=0)
    assert {ds.clip(i).style for i in range(30)} == {"realistic", "cartoon", "flat"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"num_frames": 32}, r"1 \+ 4k"), ({"height": 60}, "multiples of 8"), ({"styles": ("oil",)}, "styles")],
)
def test_invalid_config_is_rejected_with_the_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataConfig(**kwargs)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_espeak_clips_have_speech_that_the_mouth_follows() -> None:
    cfg = DataConfig(num_frames=33, silent_prob=0.0, two_character_prob=0.0, espeak_fraction=1.0)
    clip = SyntheticTalkingDataset(cfg, seed=0).clip(0)
    assert clip.voice == "espeak" and clip.audio.shape == (33_000,)
    assert clip.speaking[0].any()
    assert pearson(clip.mouth_open[0], clip.envelope) > 0.8

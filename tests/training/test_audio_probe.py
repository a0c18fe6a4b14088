"""The audio probe: its frame alignment, and that it finds the loudness the features carry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from frontends.audio_features import AudioFeaturizer, featurizer_config_for
from proto.model_config import get_model_preset
from training import audio_probe
from training.data import DataConfig, SyntheticTalkingDataset


def test_frame_features_cover_the_chunked_frames_in_order() -> None:
    audio = get_model_preset("tiny").audio
    config = featurizer_config_for(audio, fps=16, chunk_latents=3, tiny_seed=0)
    clip = SyntheticTalkingDataset(DataConfig(num_frames=65, silent_prob=0.0), seed=3).clip(0)
    features, envelope = audio_probe.frame_features(AudioFeaturizer(config), clip, 3)
    # 65 frames = 17 latents = 5 chunks of 3 (15 latents) = frames 0 … 56
    assert features.shape == (57, audio.wav2vec_layers * audio.wav2vec_dim)
    np.testing.assert_array_equal(envelope, clip.envelope[:57])
    ctx = audio_probe.with_context(features)
    assert ctx.shape == (57, 5 * features.shape[1])
    np.testing.assert_array_equal(ctx[10, 2 * features.shape[1] : 3 * features.shape[1]], features[10])
    np.testing.assert_array_equal(ctx[0, : features.shape[1]], features[0])  # edge repeated


def test_probe_predicts_the_envelope_and_not_a_shuffled_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audio_probe.shutil, "which", lambda name: None)  # numpy voice only: fast
    row = audio_probe.probe(width=8, train_clips=8, test_clips=3, frames=33)
    assert set(row) == {"width", "layers", "feature_dim", "numpy", "numpy_shuffled"}
    assert row["numpy"] > 0.4
    assert row["numpy"] > row["numpy_shuffled"] + 0.3


def test_cli_writes_json_and_rejects_bad_widths(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(audio_probe.shutil, "which", lambda name: None)
    assert audio_probe.main(["--widths", "8,x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    out = tmp_path / "probe.json"
    argv = ["--widths", "8", "--train-clips", "4", "--test-clips", "2", "--out", str(out)]
    assert audio_probe.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["provenance"]["command"].startswith("python -m training.audio_probe")
    assert [r["width"] for r in result["rows"]] == [8]

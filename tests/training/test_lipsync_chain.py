"""training.lipsync_chain: the lip-sync of each link from ground truth to the student's frames."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import training.lipsync_chain as chain
from frontends.model_bundle import DEFAULT_BUNDLE_DIR


def test_a_latent_rate_mouth_holds_each_latent_frames_mean() -> None:
    opening = np.array([0.3, 0.0, 1.0, 0.0, 1.0, 0.2, 0.2, 0.6, 0.6], np.float32)
    held = chain.latent_rate_opening(opening)
    np.testing.assert_allclose(held, [0.3, 0.5, 0.5, 0.5, 0.5, 0.4, 0.4, 0.4, 0.4], rtol=1e-6)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        chain.latent_rate_opening(np.zeros(8))


def test_the_chain_scores_every_link_on_the_same_clips(tmp_path: Path, monkeypatch) -> None:
    torch.set_num_threads(2)
    monkeypatch.setattr(chain.shutil, "which", lambda name: None)  # the numpy voice only, espeak-ng or not
    out = tmp_path / "chain.json"
    # the shipped student stands in for a teacher checkpoint (same preset): the teacher's link is computed
    teacher = DEFAULT_BUNDLE_DIR / "student.safetensors"
    args = ["--clips", "2", "--frames", "33", "--teacher", str(teacher), "--guidance", "1,3"]
    args += ["--out", str(out)]
    assert chain.main(args) == 0
    result = json.loads(out.read_text())
    assert "espeak" not in result and result["frames"] == 33
    per_clip = result["numpy"]["per_clip"]
    assert set(per_clip) == {"truth", "latent_rate", "vae", "student", "teacher_g1", "teacher_g3"}
    assert all(len(v) == 2 and all(np.isfinite(v)) for v in per_clip.values())
    # the ground truth follows its envelope; a mouth that moves once per latent frame follows it less
    assert min(per_clip["truth"]) > 0.8
    assert all(h < t for h, t in zip(per_clip["latent_rate"], per_clip["truth"], strict=True))
    assert result["numpy"]["mean"]["vae"] == pytest.approx(np.mean(per_clip["vae"]), abs=1e-4)


def test_bad_arguments_are_clear_errors(tmp_path: Path, capsys) -> None:
    assert chain.main(["--frames", "57", "--clips", "0"]) == 2
    assert chain.main(["--frames", "56"]) == 2
    assert "12k - 3" in capsys.readouterr().err
    assert chain.main(["--guidance", "0.5"]) == 2
    assert "--guidance" in capsys.readouterr().err
    assert chain.main(["--checkpoint", str(tmp_path / "none")]) == 2
    assert "no model bundle" in capsys.readouterr().err

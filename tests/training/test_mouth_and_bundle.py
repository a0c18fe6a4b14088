"""Mouth-weighted losses and the model bundle the student stage exports."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from frontends.model_bundle import load_bundle
from training import run
from training.batches import mouth_cells
from training.data import DataConfig, SyntheticTalkingDataset
from training.distill import StudentConfig
from workers.checkpoint import save_dit_checkpoint
from workers.factory import build_score_model


def test_mouth_cells_cover_the_mouth_and_little_else() -> None:
    clip = SyntheticTalkingDataset(DataConfig(two_character_prob=0.0, silent_prob=0.0), seed=1).clip(2)
    cells = mouth_cells(clip, latent_frames=9).numpy()
    assert cells.shape == (9, 8, 8)
    for k in range(9):
        frame = 0 if k == 0 else 4 * k
        x0, y0, x1, y1 = clip.mouth_boxes_px[0, frame]
        cx, cy = int((x0 + x1) / 2) // 8, int((y0 + y1) / 2) // 8
        assert cells[k, cy, cx] == 1.0
        assert 1 <= cells[k].sum() <= 6  # a mouth spans a few 8x8 cells, not the face


def test_two_characters_get_both_mouths() -> None:
    dataset = SyntheticTalkingDataset(DataConfig(two_character_prob=1.0, silent_prob=0.0), seed=0)
    clip = dataset.clip(0)
    cells = mouth_cells(clip, latent_frames=9).numpy()
    for c in range(2):
        x0, y0, x1, y1 = clip.mouth_boxes_px[c, 0]
        assert cells[0, int((y0 + y1) / 2) // 8, int((x0 + x1) / 2) // 8] == 1.0


def test_mouth_weighted_flow_loss_counts_mouth_errors_more() -> None:
    from training.batches import token_weight

    class _Inputs:
        mouth = torch.zeros(1, 2, 4, 4)

    _Inputs.mouth[0, :, 1, 2] = 1.0
    weight = token_weight(_Inputs(), 8.0)
    assert weight.shape == (1, 1, 2, 4, 4) and weight.max() == 9.0 and weight.min() == 1.0
    err_mouth = torch.zeros(1, 16, 2, 4, 4)
    err_mouth[..., 1, 2] = 1.0
    err_else = torch.zeros(1, 16, 2, 4, 4)
    err_else[..., 0, 0] = 1.0
    weighted = [(e * weight).mean() / weight.mean() for e in (err_mouth, err_else)]
    assert weighted[0] == pytest.approx(9 * weighted[1])


@pytest.mark.parametrize(
    ("extra", "folder", "chunk", "steps"),
    [([], "student", 3, (1000, 500)),
     (["--student-chunk", "7", "--student-steps", "4"], "student_c7_s4", 7, (1000, 750, 500, 250))],
)  # fmt: skip
def test_student_stage_exports_a_bundle_with_its_serving_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra, folder, chunk, steps
) -> None:
    seen = []

    def train_student(cfg: StudentConfig, out_dir: Path, resume: bool = False) -> Path:
        seen.append(cfg)
        Path(out_dir).mkdir(parents=True)
        return save_dit_checkpoint(build_score_model("tiny"), Path(out_dir) / "student.safetensors")

    fake = types.ModuleType("training.distill")
    fake.train_student = train_student
    monkeypatch.setitem(sys.modules, "training.distill", fake)
    for stage, name in (("vae", "vae.pth"), ("teacher", "teacher.safetensors")):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / name).write_bytes(b"weights")
    assert run.main(["--stage", "student", "--out", str(tmp_path), *extra]) == 0
    assert seen[0].chunk_latents == chunk and seen[0].denoising_steps == steps
    bundle = load_bundle(tmp_path / folder / "bundle")
    assert (bundle.height, bundle.width) == (64, 64)
    assert bundle.chunk_latent_frames == chunk and bundle.denoising_steps == steps
    assert bundle.train_latent_frames == (15 // chunk) * chunk  # 57-frame clips: 15 latents
    assert bundle.vae.read_bytes() == b"weights" and bundle.encoder_seed == 0
    assert np.isfinite(bundle.timestep_shift)

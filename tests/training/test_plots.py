"""training.plots: learning curves from the stage logs."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from training.plots import main, read_log


def _write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"torn": ')


def test_one_png_per_stage_with_a_log(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write(run / "vae" / "vae_log.jsonl", [
        {"event": "train", "step": s, "loss": 1.0 / s} for s in range(1, 5)
    ] + [{"event": "eval", "step": s, "psnr": 10 + s, "psnr_mouth": 8 + s, "lipsync_recon": 0.1 * s,
          "lipsync_truth": 0.9} for s in (0, 2, 4)])  # fmt: skip
    teacher = [{"step": s, "loss": 1.0 / s, "val_loss": 2.0 / s} for s in (1, 2)]
    _write(run / "teacher" / "teacher_log.jsonl", teacher)
    assert len(read_log(run / "teacher" / "teacher_log.jsonl")) == 2  # the torn last line is skipped
    out = tmp_path / "png"
    assert main(["--run", str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["stage_a_vae.png", "stage_b_teacher.png"]
    assert Image.open(out / "stage_a_vae.png").size[0] > 600


def test_a_run_without_logs_is_an_error(tmp_path: Path) -> None:
    assert main(["--run", str(tmp_path), "--out", str(tmp_path / "png")]) == 2

"""training.evaluate: it measures what `talkingmachines run` produces, and the shipped default lip-syncs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from frontends.model_bundle import DEFAULT_BUNDLE_DIR, load_bundle
from training.evaluate import (
    LIPSYNC_THRESHOLD,
    Generator,
    eval_clips,
    evaluate_generator,
    format_table,
    main,
    score_clip,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundle():
    torch.set_num_threads(2)
    return load_bundle(DEFAULT_BUNDLE_DIR)


@pytest.fixture(scope="module")
def clips(bundle):
    return eval_clips(bundle, 4, 65)


def test_ground_truth_frames_score_as_perfect_quality_and_sync(clips) -> None:
    row = score_clip(clips[0].video, clips[0])
    assert row["psnr"] > 90 and row["lipsync"] > 0.8 and row["offset_frames"] == 0


def test_the_committed_default_lip_syncs_and_random_weights_do_not(bundle, clips) -> None:
    trained = evaluate_generator(Generator(bundle), clips)
    untrained = evaluate_generator(Generator(bundle, random_weights=True), clips)
    print(f"\nlip-sync r: trained {trained['lipsync']:.3f}, random {untrained['lipsync']:.3f}; "
          f"PSNR {trained['psnr']:.2f} vs {untrained['psnr']:.2f} dB")  # fmt: skip
    assert trained["lipsync"] > LIPSYNC_THRESHOLD, trained
    assert untrained["lipsync"] < LIPSYNC_THRESHOLD, untrained
    assert trained["psnr"] > untrained["psnr"] + 3.0  # measured: 23.15 vs 11.60 dB
    # the colour the image-first stage-A VAE brought (the grey default before it measured 18.10 dB here)
    assert trained["psnr"] > 21.0
    assert len(trained["per_clip"]) == len(clips)


def test_evaluation_frames_equal_what_run_writes(bundle, clips, tmp_path: Path) -> None:
    clip = clips[1]
    image, audio = tmp_path / "ref.png", tmp_path / "speech.wav"
    Image.fromarray(clip.reference).save(image)
    sf.write(audio, clip.audio, 16_000, subtype="FLOAT")
    frames = tmp_path / "frames.raw"
    cmd = [sys.executable, "-m", "server.cli", "run", "--image", str(image), "--audio", str(audio),
           "--out", str(tmp_path / "o.mp4"), "--device", "cpu", "--threads", "1", "--quiet",
           "--decoder", "colocated", "--save-frames", str(frames)]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "weights: trained bundle" in result.stderr
    ran = np.fromfile(frames, np.uint8).reshape(-1, bundle.height, bundle.width, 3)
    ours = Generator(bundle).generate(clip.reference, clip.audio, seed=0).frames
    assert ours.shape == ran.shape == (len(clip.video), bundle.height, bundle.width, 3)
    assert np.abs(ours.astype(np.int16) - ran.astype(np.int16)).mean() < 0.5


def test_cli_writes_results_with_drift_and_table(tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    argv = ["--clips", "1", "--silent-clips", "1", "--clip-frames", "33", "--drift-seconds", "4",
            "--speech-clips", "0", "--out", str(out), "--threads", "2"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert set(results["main"]) >= {"lipsync", "offset_frames_median", "psnr", "psnr_mouth", "ttbc_p50_s"}
    assert 0.0 <= results["main"]["silent_mouth_opening"] <= 1.0
    assert 0.0 < results["main"]["silent_mouth_opening_ground_truth"] < 0.25  # its lip line: 0.12-0.20
    assert results["drift"]["seconds"] >= 4.0 and results["drift"]["windows"]
    table = format_table([{"chunk": 3, "steps": 2, **results["main"]}])
    assert table.count("\n") == 3 and "| 3 | 2 |" in table


def test_a_missing_bundle_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["--checkpoint", str(tmp_path)]) == 2
    assert "not a model bundle" in capsys.readouterr().err


def test_still_from_an_mp4_shows_its_frames(tmp_path: Path) -> None:
    import av

    mp4 = tmp_path / "o.mp4"
    shades = np.linspace(20, 235, 10).astype(np.uint8)
    with av.open(str(mp4), "w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for shade in shades:
            frame = np.full((32, 32, 3), shade, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    png = tmp_path / "still.png"
    assert main(["--still-from-mp4", str(mp4), "--still", str(png)]) == 0
    strip = np.asarray(Image.open(png))
    assert strip.shape == (32 * 3, 32 * 3 * 8, 3)
    # 8 evenly spaced frames of the 10, left to right: their grey levels, to the codec's rounding
    picks = np.linspace(0, 9, 8).round().astype(int)
    centres = strip[48, 48 :: 96, 0].astype(int)
    assert np.abs(centres - shades[picks].astype(int)).max() <= 4


def test_still_from_mp4_needs_a_png(tmp_path: Path, capsys) -> None:
    assert main(["--still-from-mp4", str(tmp_path / "o.mp4")]) == 2
    assert "needs --still" in capsys.readouterr().err


def test_speech_plot_is_written(bundle, clips, tmp_path: Path) -> None:
    from training.evaluate import save_speech_plot

    png = save_speech_plot(tmp_path / "speech.png", clips[0], clips[0].video, fps=16)
    assert Image.open(png).size[0] > 500

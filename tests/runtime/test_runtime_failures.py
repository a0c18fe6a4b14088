"""Failures of ``talkingmachines run``: a worker killed mid-stream, and bad inputs refused before any rank."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from run_helpers import REPO, marked_processes, run_command, run_env, write_inputs

from server.cli import main


@pytest.mark.slow
def test_a_worker_killed_mid_stream_is_named_within_10_s_and_no_process_is_left(tmp_path) -> None:
    image, audio = write_inputs(tmp_path, 8.0)
    marker = uuid.uuid4().hex
    command = run_command(image, audio, tmp_path / "out.mp4", "--resolution", "32x32", "--score-workers", "2")
    proc = subprocess.Popen(command, env=run_env(marker), cwd=REPO, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    second_chunk = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("chunk 2/"):
                second_chunk.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert second_chunk.wait(120), "".join(lines)
        victims = [pid for pid, env in marked_processes(marker).items() if env.get("RANK") == "2"]
        assert len(victims) == 1
        os.kill(victims[0], signal.SIGKILL)
        killed_at = time.monotonic()
        code = proc.wait(timeout=30)
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(5)
    stderr = "".join(lines)
    assert code != 0
    assert elapsed < 10
    # The master's own message names the dead rank (rank 2, a non-leader: the leader only saw a broken
    # all-to-all), and so does the launcher.
    assert "talkingmachines run: error: score worker rank 2 (score worker 1)" in stderr, stderr
    assert "died" in stderr
    assert "rank 2 (score worker 1) failed first: killed by SIGKILL" in stderr
    assert marked_processes(marker) == {}


@pytest.fixture
def good_inputs(tmp_path) -> tuple[Path, Path]:
    return write_inputs(tmp_path, 0.5)


def _usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", *argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_unreadable_audio_exits_2_before_any_rank_starts(tmp_path, good_inputs, capsys) -> None:
    image, _ = good_inputs
    bad = tmp_path / "noise.wav"
    bad.write_bytes(b"RIFF this is not audio")
    err = _usage_error(capsys, ["--image", str(image), "--audio", str(bad), "--out", str(tmp_path / "o.mp4")])
    assert "noise.wav" in err and "could not be decoded" in err


def test_an_image_over_the_pixel_limit_exits_2(tmp_path, good_inputs, capsys) -> None:
    _, audio = good_inputs
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((300, 400, 3), dtype=np.uint8)).save(big)
    argv = ["--image", str(big), "--audio", str(audio), "--out", str(tmp_path / "o.mp4")]
    err = _usage_error(capsys, [*argv, "--max-image-pixels", "100000"])
    assert "400x300 = 120000 pixels, more than the limit of 100000" in err


def test_an_unknown_preset_exits_2_listing_the_presets(tmp_path, good_inputs, capsys) -> None:
    image, audio = good_inputs
    argv = ["--image", str(image), "--audio", str(audio), "--out", str(tmp_path / "o.mp4")]
    err = _usage_error(capsys, [*argv, "--preset", "huge"])
    assert "unknown model preset 'huge'" in err and "tiny" in err


def test_a_worker_count_that_does_not_divide_the_heads_exits_2(tmp_path, good_inputs, capsys) -> None:
    image, audio = good_inputs
    argv = ["--image", str(image), "--audio", str(audio), "--out", str(tmp_path / "o.mp4")]
    err = _usage_error(capsys, [*argv, "--score-workers", "3"])
    assert "has 4 heads; --score-workers 3 does not divide them" in err
    assert "use one of 1, 2, 4" in err


def test_a_missing_output_directory_exits_2(tmp_path, good_inputs, capsys) -> None:
    image, audio = good_inputs
    err = _usage_error(
        capsys, ["--image", str(image), "--audio", str(audio), "--out", str(tmp_path / "no/o.mp4")]
    )
    assert "does not exist" in err


def test_a_size_that_is_not_a_multiple_of_16_exits_2(tmp_path, good_inputs, capsys) -> None:
    image, audio = good_inputs
    argv = ["--image", str(image), "--audio", str(audio), "--out", str(tmp_path / "o.mp4")]
    err = _usage_error(capsys, [*argv, "--resolution", "100x64"])
    assert "StreamConfig.height=100 must be a positive multiple of 16" in err


def test_a_configuration_that_cannot_fit_the_memory_exits_2_with_the_plan(
    tmp_path, good_inputs, capsys
) -> None:
    image, audio = good_inputs
    argv = ["--image", str(image), "--audio", str(audio), "--out", str(tmp_path / "o.mp4")]
    err = _usage_error(capsys, [*argv, "--device", "cpu", "--device-memory", "0.001"])
    assert "disaggregated 1+1 with tiny (float32) at 64x64 for 1 session(s) does not fit" in err
    assert "where 0.0010 GiB is available (--device-memory)" in err
    assert "DiT weights" in err and "KV cache" in err and "decode cache" in err

"""``talkingmachines run --step-pipeline`` as a real process tree: the frames of 1 + 1, a killed stage rank
named like any dead worker, and the refusals of what the topology cannot run."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid

import pytest
from run_helpers import (
    REPO,
    assert_frames_match,
    marked_processes,
    read_frames,
    run_cli,
    run_command,
    run_env,
    write_inputs,
)

from server.cli import main

SIZE = ("--resolution", "32x32")


@pytest.mark.slow  # not `equality`: tests/workers/test_step_pipeline.py compares latents per CPU cell
def test_step_pipeline_frames_equal_the_disaggregated_1_plus_1_frames(tmp_path) -> None:
    image, audio = write_inputs(tmp_path, 2.0)
    frames = {}
    for name, extra in (("pipe", ("--step-pipeline",)), ("base", ())):
        raw = tmp_path / f"{name}.raw"
        done = run_cli(image, audio, tmp_path / f"{name}.mp4", *SIZE, "--save-frames", str(raw), *extra)
        assert done.returncode == 0, done.stderr
        topology = "step-pipeline 2x1+1" if extra else "disaggregated 1+1"
        assert f"talkingmachines run: {topology}," in done.stderr
        frames[name] = read_frames(raw, 32, 32)
    assert len(frames["pipe"]) == 32
    assert_frames_match(frames["pipe"], frames["base"])


def _signal_after_chunk_2(
    tmp_path, rank: int, sig: signal.Signals, *extra: str
) -> tuple[int, float, str, str]:
    """``run --step-pipeline``; ``sig`` goes to ``rank`` once chunk 2 was published. Returns (exit code,
    seconds from the signal to the exit, stderr, the run's process marker)."""
    image, audio = write_inputs(tmp_path, 8.0)
    marker = uuid.uuid4().hex
    command = run_command(image, audio, tmp_path / "out.mp4", *SIZE, "--step-pipeline", *extra)
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
        victims = [pid for pid, env in marked_processes(marker).items() if env.get("RANK") == str(rank)]
        assert len(victims) == 1
        os.kill(victims[0], sig)
        signalled_at = time.monotonic()
        code = proc.wait(timeout=60)
        elapsed = time.monotonic() - signalled_at
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(5)
    return code, elapsed, "".join(lines), marker


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rank", "role"), [(1, "step stage 0 score worker 0"), (2, "step stage 1 score worker 0")]
)
def test_a_killed_stage_rank_is_named_and_no_process_is_left(tmp_path, rank: int, role: str) -> None:
    code, elapsed, stderr, marker = _signal_after_chunk_2(tmp_path, rank, signal.SIGKILL)
    assert code != 0
    assert elapsed < 10, stderr
    # The master names the dead rank whichever stage it was in (stage 0's death reaches the master as the
    # last stage's failed hand-off), and so does the launcher.
    expected = f"talkingmachines run: error: score worker rank {rank} ({role}) of 'step-pipeline 2x1+1'"
    assert expected in stderr, stderr
    assert "died" in stderr
    assert f"rank {rank} ({role}) failed first: killed by SIGKILL" in stderr
    assert marked_processes(marker) == {}


@pytest.mark.slow
def test_a_hung_first_stage_is_named_by_its_stopped_heartbeat(tmp_path) -> None:
    # The master waits on the last stage; stage 0 (SIGSTOP: alive and silent) is named from the heartbeats.
    code, _, stderr, marker = _signal_after_chunk_2(tmp_path, 1, signal.SIGSTOP, "--chunk-timeout", "3")
    assert code != 0
    expected = (
        "talkingmachines run: error: score worker rank 1 (step stage 0 score worker 0) of "
        "'step-pipeline 2x1+1' stopped responding"
    )
    assert expected in stderr, stderr
    assert marked_processes(marker) == {}


def _usage_error(capsys: pytest.CaptureFixture[str], tmp_path, *argv: str) -> str:
    image, audio = write_inputs(tmp_path, 0.5)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--image", str(image), "--audio", str(audio), "--out", str(tmp_path / "o.mp4"), *argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_a_colocated_step_pipeline_is_refused(tmp_path, capsys) -> None:
    err = _usage_error(capsys, tmp_path, "--step-pipeline", "--decoder", "colocated", "--device", "cpu")
    assert "--step-pipeline (2 stages) needs --decoder dedicated" in err


def test_the_liveact_window_is_refused(tmp_path, capsys) -> None:
    err = _usage_error(
        capsys, tmp_path, "--step-pipeline", "--preset", "soulx-liveact-tiny", "--device", "cpu"
    )
    assert "--step-pipeline supports the 'sparse-causal' window only" in err

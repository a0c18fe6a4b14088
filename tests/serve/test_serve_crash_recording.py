"""A recording survives ``kill -9``: the MP4 publisher writes a fragmented MP4 while it records.

Two real processes are SIGKILLed mid-stream and the file they leave is read back with PyAV:

- a writer that feeds ``Mp4FilePublisher`` chunk by chunk and prints how many frames it has handed over, so
  the loss can be measured exactly (at most one fragment plus the encoder's look-ahead);
- ``talkingmachines serve`` (the tiny default, one colocated process) recording a call to a file output:
  the master is killed the way the issue found it (a 48-byte, unplayable file before this change).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av

from proto.stream_config import StreamConfig
from server.publishers.file import FRAGMENT_S
from tests.serve.conftest import REPO, SPEECH, portrait_base64, start_serve

FPS = 16
STREAM = StreamConfig()  # the tiny default's chunks: 9 video frames, then 12
# Lost to a kill: the fragment being filled (FRAGMENT_S) and the frames inside x264's look-ahead (veryfast:
# 10 frames of rc-lookahead, B-frames) -- at most about 1.9 s at 16 fps.
MAX_LOSS_FRAMES = int(FRAGMENT_S * FPS) + 14

_WRITER = """
import sys, time
import numpy as np
from server.publishers.file import Mp4FilePublisher
publisher = Mp4FilePublisher(sys.argv[1], width=64, height=48)
rng = np.random.default_rng(0)
for i in range(10_000):
    frames = rng.integers(0, 256, (4, 48, 64, 3), dtype=np.uint8)
    audio = (0.1 * rng.standard_normal(4000)).astype(np.float32)
    publisher.write(frames, audio)
    print(4 * (i + 1), flush=True)  # frames handed to the publisher so far
    time.sleep(0.05)  # a stream's pace (5x real time: fragments are cut by media time, not wall time)
"""


def _decoded(path: Path) -> tuple[int, int]:
    """(video frames, audio samples) that decode from the file."""
    with av.open(str(path)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    with av.open(str(path)) as container:
        samples = sum(frame.samples for frame in container.decode(audio=0))
    return frames, samples


def test_a_killed_writer_leaves_a_file_playable_up_to_its_last_fragment(tmp_path: Path) -> None:
    path = tmp_path / "killed.mp4"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        handed = 0
        while handed < 4 * FPS + 6:  # 4.4 s: mid-fragment, past a few whole ones
            line = proc.stdout.readline()
            assert line, f"the writer exited with {proc.wait()}"
            handed = int(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    frames, samples = _decoded(path)
    print(f"\nkilled after {handed} frames handed over: {frames} decode ({path.stat().st_size} bytes)")
    assert handed - MAX_LOSS_FRAMES <= frames <= handed
    assert abs(samples / 16_000 - frames / FPS) <= FRAGMENT_S  # the audio of the same fragments


def test_kill_9_of_the_serving_master_leaves_the_call_recording_playable(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    server = start_serve(tmp_path, "--decoder", "colocated", api={"file_output_dir": str(out)})
    try:
        http = server.client()
        body = {"image": portrait_base64(), "output": {"type": "file", "path": "call.mp4"}}
        created = http.post("/v1/sessions", json=body)
        assert created.status_code == 201, created.text
        session = created.json()["id"]
        wav = {"Content-Type": "audio/wav"}
        pushed = http.post(f"/v1/sessions/{session}/audio", content=SPEECH.read_bytes(), headers=wav)
        assert pushed.status_code == 200, pushed.text
        deadline, played = time.monotonic() + 30, 0.0
        while played < 4.0:  # seconds of the call written at playout time
            assert time.monotonic() < deadline, f"the call did not play 4 s in 30 s:\n{server.log()}"
            info = http.get(f"/v1/sessions/{session}").json()
            generated = sum(STREAM.video_frames_in_chunk(c) for c in range(info["chunks_generated"]))
            played = generated / FPS - info["playout_buffer_s"]
            time.sleep(0.1)
        os.kill(server.proc.pid, signal.SIGKILL)  # the master: no drain, no trailer, no atexit
        server.proc.wait(timeout=10)
    finally:
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
    frames, samples = _decoded(out / "call.mp4")
    written = int(played * FPS)
    print(f"\nmaster killed with ~{written} frames written: {frames} decode, {samples / 16_000:.2f} s audio")
    assert frames >= written - MAX_LOSS_FRAMES
    assert samples / 16_000 >= frames / FPS - FRAGMENT_S


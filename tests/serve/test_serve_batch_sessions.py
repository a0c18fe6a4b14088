"""``serve --max-batch-sessions 2``: two live sessions scored together publish the frames each publishes
when served alone (the same group, one session at a time: no partner, no batch).

One disaggregated 1 + 1 group (seeded random weights at 32x32) with ``--ahead 30``: every session is always
due, so chunks of the two sessions meet in batches (a lightly loaded real-time group has its sessions fall
due at different moments and seldom batches: batching is for a loaded group). Silent sessions (no speech:
every chunk's inputs are fixed), with different images (the portrait, and it upside down) and prompts, so
that a batch that mixed the sessions' caches or conditioning would show (their frames differ by far more
than the tolerance). Frames are compared after H.264, per value within ``MEAN_LEVELS`` on average
(tests/serve/test_serve_frames.py)."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serve.conftest import PORTRAIT, ServeProcess, portrait_base64, start_serve
from tests.serve.test_serve_frames import FRAMES, MEAN_LEVELS, TOPOLOGY, WEIGHTS, _frames

pytestmark = pytest.mark.slow

PROMPTS = {"a": "a person talking", "b": "an old sailor singing loudly in the rain"}


def _image(name: str) -> str:
    """Session a's image is the portrait, b's the portrait upside down (base64 PNG)."""
    if name.startswith("a"):
        return portrait_base64()
    buffer = io.BytesIO()
    Image.open(PORTRAIT).convert("RGB").transpose(Image.Transpose.ROTATE_180).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    out = tmp_path_factory.mktemp("batch")
    (out / "files").mkdir()
    server = start_serve(
        out,
        *TOPOLOGY,
        *WEIGHTS,
        "--max-batch-sessions",
        "2",
        "--ahead",
        "30",
        api={"file_output_dir": str(out / "files")},
    )
    server.out = out  # type: ignore[attr-defined]
    yield server
    server.stop()


def _record(http: httpx.Client, names: dict[str, str], out: Path) -> dict[str, np.ndarray]:
    """Sessions ``names`` (file name -> prompt) at once, each until 5 chunks were generated and ``FRAMES``
    played (the file is written at playout time)."""
    width, height = Image.open(PORTRAIT).size
    ids = {}
    for name, prompt in names.items():
        body = {
            "image": _image(name),
            "characters": [{"box": [0, 0, width, height]}],
            "prompt": prompt,
            "output": {"type": "file", "path": name},
        }
        response = http.post("/v1/sessions", json=body)
        assert response.status_code == 201, response.text
        ids[name] = response.json()["id"]
    start = time.monotonic()
    deadline = start + 60
    while time.monotonic() < deadline:
        if time.monotonic() - start > FRAMES / 16 + 1.0 and all(
            http.get(f"/v1/sessions/{i}").json()["chunks_generated"] >= 5 for i in ids.values()
        ):
            break
        time.sleep(0.2)
    for i in ids.values():
        assert http.delete(f"/v1/sessions/{i}").status_code == 200
    return {name: _frames(out / "files" / name) for name in names}


def test_two_batched_sessions_publish_the_frames_each_publishes_alone(server: ServeProcess) -> None:
    out: Path = server.out  # type: ignore[attr-defined]
    with server.client() as http:
        together = _record(http, {"a.mp4": PROMPTS["a"], "b.mp4": PROMPTS["b"]}, out)
        alone_a = _record(http, {"a_alone.mp4": PROMPTS["a"]}, out)["a_alone.mp4"]
        alone_b = _record(http, {"b_alone.mp4": PROMPTS["b"]}, out)["b_alone.mp4"]
    assert "sessions' chunks scored together" in server.log()  # the engine did batch them
    for got, want in ((together["a.mp4"], alone_a), (together["b.mp4"], alone_b)):
        assert got.shape[0] >= FRAMES and want.shape[0] >= FRAMES
        assert float(np.abs(got[:FRAMES] - want[:FRAMES]).mean()) <= MEAN_LEVELS
    # The sessions differ, so the comparison can fail.
    assert float(np.abs(alone_a[:FRAMES] - alone_b[:FRAMES]).mean()) > 10 * MEAN_LEVELS

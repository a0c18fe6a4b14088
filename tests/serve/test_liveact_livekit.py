"""``serve --preset soulx-liveact-tiny`` into a real livekit-server: a silent call's subscriber gets the
avatar's video at the LiveAct schedule's 24 fps and its (48 kHz) audio, chunk after chunk of 32 frames.
The LiveKit harness (``Viewer``, session creation) is tests/serve/test_serve_livekit.py's."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import AUTH, ServeProcess, start_serve
from tests.serve.test_serve_livekit import AGENT, AVATAR, Observed, Viewer, _create

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The HMAC key is 6 bytes long")]

FPS = 24
WARMUP_S = 2.0
WINDOW_S = 5.0


@pytest.fixture(scope="module")
def liveact_livekit_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp: Path = tmp_path_factory.mktemp("serve-liveact-lk")
    server = start_serve(
        tmp,
        "--decoder",
        "colocated",
        "--preset",
        "soulx-liveact-tiny",
        "--random-weights",
        "--resolution",
        "32x32",
        api={"livekit_api_key": "devkey", "livekit_api_secret": "secret"},
    )
    yield server
    server.stop()


async def _silent_call(server: ServeProcess, lk_url: str) -> Observed:
    out = Observed()
    room_name = f"liveact-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=30) as http:
        async with Viewer(lk_url, room_name, out) as viewer:
            output = {"type": "livekit", "url": lk_url, "room": room_name, "identity": AVATAR,
                      "agent_identity": AGENT}  # fmt: skip
            info = await _create(http, output)
            await viewer.wait_for_video()
            await asyncio.sleep(WARMUP_S + WINDOW_S + 0.5)
            out.info = (await http.get(f"/v1/sessions/{info['id']}")).json()
            await http.delete(f"/v1/sessions/{info['id']}")
    return out


@pytest.fixture(scope="module")
def silent(liveact_livekit_serve: ServeProcess, livekit_server) -> Observed:
    return asyncio.run(_silent_call(liveact_livekit_serve, livekit_server.url))


def test_a_liveact_call_streams_24_fps_video_and_its_audio_into_the_room(silent: Observed) -> None:
    assert silent.video, "the subscriber received no avatar_video frames"
    assert {(w, h) for _, w, h, _ in silent.video} == {(32, 32)}
    start = silent.video[0][0] + WARMUP_S
    window = [v for v in silent.video if start <= v[0] < start + WINDOW_S]
    fps = len(window) / WINDOW_S
    print(f"\nliveact silent call: subscriber video {fps:.2f} fps over {WINDOW_S:.0f} s; {silent.info}")
    assert abs(fps - FPS) <= 1.5
    span = silent.audio[-1][0] - silent.audio[0][0] if silent.audio else 0.0
    assert span >= WINDOW_S
    assert max(r for _, r in silent.audio) < 0.01  # silence mode publishes silence
    assert silent.info["state"] == "running"
    assert silent.info["chunks_generated"] >= 5  # 7.5 s of playout: 21 + 32·k frames, about one ahead

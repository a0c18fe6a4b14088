"""A LiveKit call with the SoulX-LiveAct family (``--preset soulx-liveact-tiny``, random weights, 32x32,
colocated on this CPU): a subscriber in the room receives the avatar's video at the schedule's 24 fps and its
audio, exactly as with the default model — same server, same publisher, the fps from the schedule."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serve.conftest import ServeProcess, start_serve
from tests.serve.test_serve_livekit import SIZE, WINDOW_S, Observed, _silent_call, _window

pytestmark = pytest.mark.filterwarnings("ignore:The HMAC key is 6 bytes long")

LIVEACT_FPS = 24  # proto.stream_config.STREAM_SCHEDULES["soulx-liveact"]


@pytest.fixture(scope="module")
def liveact_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp: Path = tmp_path_factory.mktemp("serve-lk-liveact")
    server = start_serve(
        tmp,
        "--preset",
        "soulx-liveact-tiny",
        "--random-weights",
        "--decoder",
        "colocated",
        "--resolution",
        f"{SIZE}x{SIZE}",
        api={"livekit_api_key": "devkey", "livekit_api_secret": "secret"},
        ready_s=180,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def liveact_call(liveact_serve: ServeProcess, livekit_server) -> Observed:
    return asyncio.run(_silent_call(liveact_serve, livekit_server.url))


def test_a_liveact_avatar_streams_video_at_the_schedules_24_fps_and_audio_to_the_room(
    liveact_call: Observed,
) -> None:
    assert liveact_call.video, "the subscriber received no avatar_video frames"
    assert {(w, h) for _, w, h, _ in liveact_call.video} == {(SIZE, SIZE)}
    fps = len(_window(liveact_call)) / WINDOW_S
    print(f"\nLiveAct call: {fps:.2f} fps over {WINDOW_S:.0f} s; session {liveact_call.info}")
    assert abs(fps - LIVEACT_FPS) <= 1.5
    assert liveact_call.audio, "no avatar audio reached the subscriber"
    assert liveact_call.info["state"] == "running" and liveact_call.info["chunks_generated"] >= 5

"""The whole call in a real browser: livekit-server --dev + ``talkingmachines serve`` (tiny preset, 32x32) +
the offline echo agent (deploy/agent/echo_agent.py, speaking examples/speech.wav) + headless Chromium on our
call page (``GET /call``) with a fake camera and a microphone fed from examples/speech.wav.

The browser is driven by Selenium with the Debian ``chromedriver`` given explicitly (``SE_OFFLINE``: Selenium
Manager never downloads anything). Without Chromium, chromedriver or the built page the test skips locally
and FAILS in CI (``CI=true``). The screenshot is saved in the test's tmp dir, and copied to
``$TM_ARTIFACTS_DIR`` when that is set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import AUDIO_JS, SAMPLE_FRAME_JS, wait_for
from tests.livekit.conftest import LiveKitServer, livekit_server  # noqa: F401  (the real SFU)
from tests.serve.conftest import API_KEY, PORTRAIT, REPO, SPEECH, ServeProcess, start_serve

CALL_KEY = "call-e2e-key"
VIDEO_TIMEOUT_S = 45.0  # page load → avatar video playing (the agent's session set-up is inside this)
AUDIO_TIMEOUT_S = 30.0  # avatar audio with a non-zero level (the echo agent speaks 4.8 s of speech)


@pytest.fixture(scope="module")
def call_server(
    browser_prerequisites: None,
    livekit_server: LiveKitServer,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServeProcess]:
    server = start_serve(
        tmp_path_factory.mktemp("call-serve"),
        "--decoder",
        "colocated",
        "--resolution",
        "32x32",
        api={
            "livekit_api_key": livekit_server.api_key,
            "livekit_api_secret": livekit_server.api_secret,
            "livekit_public_url": livekit_server.url,
            "call_access_key": CALL_KEY,
        },
    )
    yield server
    server.stop()


@pytest.fixture
def echo_agent(
    call_server: ServeProcess,
    livekit_server: LiveKitServer,  # noqa: F811
    tmp_path: Path,
) -> Iterator[str]:
    """The echo agent in a fresh room: it starts the avatar session on our server and speaks the WAV.
    Yields the room name."""
    room = f"call-{uuid.uuid4().hex[:8]}"
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        LIVEKIT_API_KEY=livekit_server.api_key,
        LIVEKIT_API_SECRET=livekit_server.api_secret,
        TALKINGMACHINES_API_KEY=API_KEY,
    )
    log_path = tmp_path / "echo_agent.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deploy.agent.echo_agent",
                "--url",
                livekit_server.url,
                "--room",
                room,
                "--api-url",
                call_server.url,
                "--image",
                str(PORTRAIT),
                "--wav",
                str(SPEECH),
                "--repeat-every",
                "1",
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield room
    finally:
        proc.terminate()  # the agent ends its avatar session (DELETE) and leaves the room
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_call_page_shows_the_avatar_playing_and_receives_its_audio(
    call_server: ServeProcess, echo_agent: str, browser: Any, tmp_path: Path
) -> None:
    # A call link (the ticket rides in the URL fragment: no key in any URL or log).
    with call_server.client() as http:
        link = http.post("/v1/call/link", json={"room": echo_agent, "name": "Tester"}).json()
    started = time.monotonic()
    path, _, fragment = link["url"].partition("#")
    browser.get(f"{call_server.url}{path}&autojoin=1#{fragment}")

    def diagnostics() -> str:
        state = browser.find_element("id", "connection-state").text
        error = browser.find_element("id", "error").text
        frame = browser.execute_script(SAMPLE_FRAME_JS)
        return f"page state {state!r}, page error {error!r}, last frame {frame}"

    first = wait_for(
        "the avatar video did not show a non-black frame",
        VIDEO_TIMEOUT_S,
        lambda: (s := browser.execute_script(SAMPLE_FRAME_JS)) and s["mean"] > 8 and s,
        diagnostics,
    )
    video_after_s = time.monotonic() - started

    def changed() -> dict[str, Any] | None:
        now = browser.execute_script(SAMPLE_FRAME_JS)
        moved = now["time"] > first["time"] + 0.5
        differs = sum(abs(a - b) for a, b in zip(now["cells"], first["cells"], strict=True)) > 64
        return now if moved and differs and now["mean"] > 8 else None

    later = wait_for("the avatar video did not change (frozen or not playing)", 15, changed, diagnostics)
    assert (first["width"], first["height"]) == (32, 32)
    assert later["paused"] is False

    audio = wait_for(
        "no avatar audio arrived (subscribed track with bytes and a non-zero level)",
        AUDIO_TIMEOUT_S,
        lambda: (a := browser.execute_async_script(AUDIO_JS))
        and a.get("subscribed", 0) >= 1
        and a["audioBytesReceived"] > 0
        and a["audioLevel"] > 0.001
        and a,
        lambda: f"stats {browser.execute_async_script(AUDIO_JS)}",
    )
    assert browser.find_element("id", "connection-state").text == "Connected"
    rtt = browser.find_element("id", "latency").text
    assert rtt.startswith("RTT ") and rtt.endswith(" ms"), rtt

    screenshot = tmp_path / "call_e2e.png"
    assert browser.save_screenshot(str(screenshot))
    artifacts = os.environ.get("TM_ARTIFACTS_DIR")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(artifacts) / screenshot.name)
    print(
        f"\navatar video after {video_after_s:.1f} s (mean {first['mean']:.0f}), audio level "
        f"{audio['audioLevel']:.3f}, {audio['audioBytesReceived']} audio bytes, {rtt}; "
        f"screenshot {screenshot}"
    )

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

from server.call_page import STATIC_DIR
from tests.livekit.conftest import LiveKitServer, livekit_server  # noqa: F401  (the real SFU)
from tests.serve.conftest import API_KEY, PORTRAIT, REPO, SPEECH, ServeProcess, start_serve

CHROMIUM = Path(os.environ.get("TM_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("TM_CHROMEDRIVER", "/usr/bin/chromedriver"))
CALL_KEY = "call-e2e-key"
VIDEO_TIMEOUT_S = 45.0  # page load → avatar video playing (the agent's session set-up is inside this)
AUDIO_TIMEOUT_S = 30.0  # avatar audio with a non-zero level (the echo agent speaks 4.8 s of speech)


def _require(ok: bool, what: str) -> None:
    if ok:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{what} — CI must run the browser test", pytrace=False)
    pytest.skip(what)


@pytest.fixture(scope="module")
def browser_prerequisites() -> None:
    _require(
        CHROMIUM.is_file() and CHROMEDRIVER.is_file(),
        f"no Chromium at {CHROMIUM} or chromedriver at {CHROMEDRIVER}; run deploy/install_browser.sh",
    )
    _require((STATIC_DIR / "index.html").is_file(), "the call page is not built; run deploy/build_web.sh")
    try:
        import selenium  # noqa: F401
    except ImportError:
        _require(False, "selenium is not installed; run ./install.sh --test")


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


@pytest.fixture
def browser(browser_prerequisites: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=800,900",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={SPEECH}",
        "--autoplay-policy=no-user-gesture-required",
        # The SFU offers only a 127.0.0.1 candidate; Chromium skips loopback interfaces without this.
        "--allow-loopback-in-peer-connection",
    ):
        options.add_argument(flag)
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_script_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


# Runs in the page: one frame of the avatar <video> drawn on a canvas → its mean value and a coarse
# fingerprint (the mean of each of 8x8 cells), or null before the video has a frame.
_SAMPLE_FRAME_JS = """
const video = document.getElementById('avatar-video');
if (!video || video.readyState < 2 || !video.videoWidth) return null;
const size = 32;
const canvas = document.createElement('canvas');
canvas.width = size; canvas.height = size;
const ctx = canvas.getContext('2d', {willReadFrequently: true});
ctx.drawImage(video, 0, 0, size, size);
const data = ctx.getImageData(0, 0, size, size).data;
let sum = 0;
const cells = new Array(64).fill(0);
for (let y = 0; y < size; y++) for (let x = 0; x < size; x++) {
  const i = (y * size + x) * 4;
  const v = (data[i] + data[i + 1] + data[i + 2]) / 3;
  sum += v;
  cells[Math.floor(y / 4) * 8 + Math.floor(x / 4)] += v / 16;
}
return {mean: sum / (size * size), cells: cells.map(Math.round), time: video.currentTime,
        width: video.videoWidth, height: video.videoHeight, paused: video.paused};
"""

_AUDIO_JS = """
const done = arguments[arguments.length - 1];
const call = window.talkingmachinesCall;
if (!call || !call.room) { done(null); return; }
const subscribed = [...call.room.remoteParticipants.values()]
  .flatMap((p) => [...p.trackPublications.values()])
  .filter((t) => t.kind === 'audio' && t.isSubscribed).length;
call.stats().then((s) => done({subscribed, ...s}), (e) => done({error: String(e)}));
"""


def _wait_for(what: str, timeout_s: float, probe: Any, diagnostics: Any) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{what} within {timeout_s} s; {diagnostics()}")


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
        frame = browser.execute_script(_SAMPLE_FRAME_JS)
        return f"page state {state!r}, page error {error!r}, last frame {frame}"

    first = _wait_for(
        "the avatar video did not show a non-black frame",
        VIDEO_TIMEOUT_S,
        lambda: (s := browser.execute_script(_SAMPLE_FRAME_JS)) and s["mean"] > 8 and s,
        diagnostics,
    )
    video_after_s = time.monotonic() - started

    def changed() -> dict[str, Any] | None:
        now = browser.execute_script(_SAMPLE_FRAME_JS)
        moved = now["time"] > first["time"] + 0.5
        differs = sum(abs(a - b) for a, b in zip(now["cells"], first["cells"], strict=True)) > 64
        return now if moved and differs and now["mean"] > 8 else None

    later = _wait_for("the avatar video did not change (frozen or not playing)", 15, changed, diagnostics)
    assert (first["width"], first["height"]) == (32, 32)
    assert later["paused"] is False

    audio = _wait_for(
        "no avatar audio arrived (subscribed track with bytes and a non-zero level)",
        AUDIO_TIMEOUT_S,
        lambda: (a := browser.execute_async_script(_AUDIO_JS))
        and a.get("subscribed", 0) >= 1
        and a["audioBytesReceived"] > 0
        and a["audioLevel"] > 0.001
        and a,
        lambda: f"stats {browser.execute_async_script(_AUDIO_JS)}",
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

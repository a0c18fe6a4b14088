"""The real browser of the browser tests: headless Chromium driven by Selenium with the Debian
``chromedriver`` given explicitly (``SE_OFFLINE``: Selenium Manager never downloads anything), a fake camera
and a microphone fed from examples/speech.wav. Without Chromium, chromedriver, selenium or the built call
page the tests skip locally and FAIL in CI (``CI=true``)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.call_page import STATIC_DIR
from tests.serve.conftest import SPEECH

CHROMIUM = Path(os.environ.get("TM_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("TM_CHROMEDRIVER", "/usr/bin/chromedriver"))


def require(ok: bool, what: str) -> None:
    if ok:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{what} — CI must run the browser test", pytrace=False)
    pytest.skip(what)


@pytest.fixture(scope="module")
def browser_prerequisites() -> None:
    require(
        CHROMIUM.is_file() and CHROMEDRIVER.is_file(),
        f"no Chromium at {CHROMIUM} or chromedriver at {CHROMEDRIVER}; run deploy/install_browser.sh",
    )
    require((STATIC_DIR / "index.html").is_file(), "the call page is not built; run deploy/build_web.sh")
    try:
        import selenium  # noqa: F401
    except ImportError:
        require(False, "selenium is not installed; run ./install.sh --test")


@contextlib.contextmanager
def chromium(profile: Path, *, loopback_candidates: bool = True) -> Iterator[Any]:
    """Headless Chromium with a fake camera and examples/speech.wav as its microphone.
    ``loopback_candidates``: also gather ICE candidates on loopback (Chromium skips them by default). Set
    ``SE_OFFLINE=true`` first (Selenium Manager must not download a driver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    flags = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile / 'chromium-profile'}",
        "--window-size=800,900",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={SPEECH}",
        "--autoplay-policy=no-user-gesture-required",
    ]
    if loopback_candidates:
        flags.append("--allow-loopback-in-peer-connection")
    for flag in flags:
        options.add_argument(flag)
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(profile / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_script_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser(browser_prerequisites: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("SE_OFFLINE", "true")
    # The test SFU offers only a 127.0.0.1 candidate; Chromium skips loopback interfaces without the flag.
    with chromium(tmp_path, loopback_candidates=True) as driver:
        yield driver


# Runs in the page: one frame of the avatar <video> drawn on a canvas → its mean value and a coarse
# fingerprint (the mean of each of 8x8 cells), or null before the video has a frame.
SAMPLE_FRAME_JS = """
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

AUDIO_JS = """
const done = arguments[arguments.length - 1];
const call = window.talkingmachinesCall;
if (!call || !call.room) { done(null); return; }
const subscribed = [...call.room.remoteParticipants.values()]
  .flatMap((p) => [...p.trackPublications.values()])
  .filter((t) => t.kind === 'audio' && t.isSubscribed).length;
call.stats().then((s) => done({subscribed, ...s}), (e) => done({error: String(e)}));
"""


def wait_for(what: str, timeout_s: float, probe: Any, diagnostics: Any) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{what} within {timeout_s} s; {diagnostics()}")

"""A first call works from the docs alone: the local-call block of README.md (the same as deploy/README.md's,
found by its ``<!-- first-call`` marker) is run as written, step by step, and a real browser joins the call.

Each numbered step of the block is a terminal: its lines run in one ``bash -e`` (exports, then the
long-running command), in its own session, from the repository root, on the documented ports (7880, 7882/udp
and 8000: the test skips locally, and fails in CI, when one is taken). Only where things are installed is
replaced: ``.tools/bin/livekit-server`` by the binary the LiveKit tests use and ``.venv/bin/`` by this
interpreter's folder. The browser step is done by headless Chromium as a person would: open the URL, type
the access key, press Join — and before the agent of the last step brings the avatar in. The test then
waits for the avatar's video (non-black, moving) and audio, and checks what the docs promise besides: every
TCP port the started processes listen on, and livekit-server's UDP media port, is on loopback; and no JWT
key-length warning was logged.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import AUDIO_JS, SAMPLE_FRAME_JS, chromium, require, wait_for
from tests.livekit.conftest import find_livekit_server
from tests.serve.conftest import REPO
from tests.sockets import beyond_loopback, listening_sockets, process_tree

MARKER = "<!-- first-call"
DOCS = (REPO / "README.md", REPO / "deploy" / "README.md")
READY_S = 90.0  # serve's start-up: the tiny default on 2 CPU cores, master + score worker
VIDEO_TIMEOUT_S = 45.0  # the agent started → the avatar's video playing in the page
JWT_WARNINGS = ("HMAC key is", "InsecureKeyLengthWarning", "secret is too short")


def first_call_block(path: Path) -> str:
    """The fenced block after the ``<!-- first-call`` marker of ``path``."""
    text = path.read_text()
    assert MARKER in text, f"{path.name} has no {MARKER} block"
    match = re.search(r"```\w*\n(.*?)```", text[text.index(MARKER) :], re.DOTALL)
    assert match, f"no fenced block after the marker in {path.name}"
    return match.group(1)


@dataclass
class Step:
    number: int
    comment: str  # the step's comment lines, joined
    commands: list[str] = field(default_factory=list)  # shell lines, continuations joined


def parse_steps(block: str) -> list[Step]:
    steps: list[Step] = []
    pending = ""
    for line in block.splitlines():
        heading = re.match(r"#\s*(\d+)\.\s*(.*)", line)
        if heading:
            steps.append(Step(int(heading.group(1)), heading.group(2)))
        elif line.startswith("#"):
            steps[-1].comment += " " + line.lstrip("# ")
        elif line.strip():
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
            else:
                steps[-1].commands.append(pending)
                pending = ""
    return steps


def _port_free(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no owner
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@dataclass
class Terminal:
    step: Step
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> None:
        code = self.proc.poll()
        assert code is None, f"step {self.step.number} exited with {code}:\n{self.log()}"

    def stop(self) -> None:
        tree = process_tree(self.proc.pid)
        # 5 s of grace: enough for the agent (it ends its session) and serve; livekit-server would wait 20 s
        # for its room to drain.
        for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        for pid in tree[1:]:  # anything the step left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def terminals(tmp_path: Path) -> Iterator[list[Terminal]]:
    started: list[Terminal] = []
    yield started
    for terminal in reversed(started):
        terminal.stop()


def _run_step(step: Step, tmp_path: Path, binary: Path) -> Terminal:
    script = "\n".join(step.commands)
    script = script.replace(".tools/bin/livekit-server", shlex.quote(str(binary)))
    script = script.replace(".venv/bin/", shlex.quote(str(Path(sys.executable).parent)) + "/")
    log_path = tmp_path / f"step{step.number}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["bash", "-ec", script],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1"),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Terminal(step, proc, log_path)


def test_readme_and_deploy_readme_carry_the_same_first_call_block() -> None:
    assert first_call_block(DOCS[0]) == first_call_block(DOCS[1])


def test_the_documented_first_call_shows_the_avatar_in_the_browser(
    browser_prerequisites: None, terminals: list[Terminal], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = find_livekit_server()
    require(binary is not None and binary.is_file(), "no livekit-server: deploy/install_livekit_server.sh")
    assert binary is not None
    steps = parse_steps(first_call_block(DOCS[0]))
    assert [s.number for s in steps] == [1, 2, 3, 4]
    livekit_step, serve_step, browser_step, agent_step = steps
    assert "livekit-server" in livekit_step.commands[-1] and "serve" in serve_step.commands[-1]
    assert not browser_step.commands and "echo_agent" in agent_step.commands[-1]
    livekit_url = re.search(r"--url (ws://\S+)", agent_step.commands[-1]).group(1)
    api_url = re.search(r"--api-url (http://\S+)", agent_step.commands[-1]).group(1)
    page_url = re.search(r"(http://\S+/call\S*?),? ", browser_step.comment).group(1)
    access_key = re.search(r"access key (\S+?),? ", browser_step.comment).group(1)
    ports = [(int(livekit_url.rsplit(":", 1)[1]), socket.SOCK_STREAM), (7882, socket.SOCK_DGRAM),
             (int(api_url.rsplit(":", 1)[1]), socket.SOCK_STREAM)]
    taken = [port for port, kind in ports if not _port_free(port, kind)]
    require(not taken, f"the documented ports {taken} are in use on this machine")

    started = time.monotonic()
    terminals.append(_run_step(livekit_step, tmp_path, binary))
    wait_for("livekit-server answering", 20, lambda: terminals[0].alive() or _http_ok(
        livekit_url.replace("ws://", "http://") + "/"), terminals[0].log)
    terminals.append(_run_step(serve_step, tmp_path, binary))
    wait_for("serve ready", READY_S, lambda: terminals[1].alive() or _http_ok(f"{api_url}/readyz"),
             terminals[1].log)
    servers_up_s = time.monotonic() - started

    monkeypatch.setenv("SE_OFFLINE", "true")
    # As a person's browser: no flag for loopback candidates (the SFU's node_ip is 127.0.0.1; Chromium's own
    # candidates are its interfaces' addresses, and loopback answers them).
    with chromium(tmp_path, loopback_candidates=False) as browser:
        browser.get(page_url)
        browser.find_element("id", "key-input").send_keys(access_key)
        browser.find_element("id", "join-button").click()

        def page() -> str:
            state = browser.find_element("id", "connection-state").text
            error = browser.find_element("id", "error").text
            frame = browser.execute_script(SAMPLE_FRAME_JS)
            return f"page state {state!r}, page error {error!r}, frame {frame}"

        wait_for("the page did not connect", 20,
                 lambda: browser.find_element("id", "connection-state").text == "Connected", page)

        agent_started = time.monotonic()
        terminals.append(_run_step(agent_step, tmp_path, binary))

        def diagnostics() -> str:
            agent, serve = terminals[2].log()[-3000:], terminals[1].log()[-3000:]
            return f"{page()}\n--- agent:\n{agent}\n--- serve:\n{serve}"

        first = wait_for("the avatar video did not show a non-black frame", VIDEO_TIMEOUT_S,
                         lambda: (s := browser.execute_script(SAMPLE_FRAME_JS)) and s["mean"] > 8 and s,
                         diagnostics)
        video_after_s = time.monotonic() - agent_started

        def moving() -> dict[str, Any] | None:
            now = browser.execute_script(SAMPLE_FRAME_JS)
            differs = sum(abs(a - b) for a, b in zip(now["cells"], first["cells"], strict=True)) > 64
            return now if now["time"] > first["time"] + 0.5 and differs else None

        later = wait_for("the avatar video did not move", 15, moving, diagnostics)
        assert (later["width"], later["height"]) == (64, 64) and later["paused"] is False
        audio = wait_for(
            "no avatar audio arrived",
            30,
            lambda: (a := browser.execute_async_script(AUDIO_JS))
            and a.get("subscribed", 0) >= 1 and a["audioBytesReceived"] > 0 and a["audioLevel"] > 0.001 and a,
            lambda: f"stats {browser.execute_async_script(AUDIO_JS)}",
        )
        # TCP listeners of every step, and livekit-server's UDP media sockets. (Our server and the agent are
        # WebRTC clients: their ICE gathers UDP host candidates on every interface, like any browser.)
        exposed = {
            t.step.number: beyond_loopback(listening_sockets(process_tree(t.proc.pid), udp=t is terminals[0]))
            for t in terminals
        }
    for terminal in terminals:
        terminal.alive()
    assert exposed == {1: [], 2: [], 4: []}, f"listening beyond loopback: {exposed}"
    for terminal in terminals:
        warned = [w for w in JWT_WARNINGS if w in terminal.log()]
        assert not warned, f"step {terminal.step.number} logged a key-length warning: {warned}"
    print(f"\nservers up {servers_up_s:.1f} s; avatar video {video_after_s:.1f} s after the agent started; "
          f"audio level {audio['audioLevel']:.3f}")

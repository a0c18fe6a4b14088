"""Fixtures of the ``talkingmachines serve`` end-to-end tests: the real server as a process tree.

``ServeProcess`` runs ``python -m server.cli serve --config FILE`` — the production entry, with the real
serving group (``--decoder colocated`` is one process; ``dedicated`` spawns score-worker ranks as children) —
and waits for ``/readyz``. The LiveKit tests reuse the real ``livekit-server`` fixture of tests/livekit.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.livekit.conftest import livekit_server  # noqa: F401  (the real SFU, session-scoped)

REPO = Path(__file__).resolve().parents[2]
API_KEY = "serve-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PORTRAIT = REPO / "examples" / "portrait.png"
SPEECH = REPO / "examples" / "speech.wav"


def portrait_base64() -> str:
    return base64.b64encode(PORTRAIT.read_bytes()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServeProcess:
    """One ``talkingmachines serve`` process tree on a free port."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=AUTH, timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def start_serve(
    tmp: Path,
    *extra: str,
    api: dict[str, str] | None = None,
    ready_s: float = 90,
    env: dict[str, str] | None = None,
) -> ServeProcess:
    """Start the server with an ``[api]`` table (API key, plus ``api``) and wait until it is ready.
    ``env``: extra environment variables (``PYTHONPATH`` defaults to the repository).

    ``drain_timeout_s`` is 0 unless ``api`` sets it: ``stop()``'s SIGTERM then ends live sessions at once, as
    fixtures expect (tests/serve/test_serve_drain.py covers the drain)."""
    port = _free_port()
    table = {"api_key": API_KEY, "drain_timeout_s": "0", **(api or {})}
    config = tmp / "serve.toml"
    config.write_text("[api]\n" + "".join(f'{k} = "{v}"\n' for k, v in table.items()))
    log_path = tmp / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server.cli",
                "serve",
                "--config",
                str(config),
                "--port",
                str(port),
                "--threads",
                "1",
                "--device",
                "cpu",
                *extra,
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = ServeProcess(proc, port, log_path)
    deadline = time.monotonic() + ready_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode} before it was ready:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"serve was not ready within {ready_s} s:\n{server.log()}")


@pytest.fixture(scope="module")
def serve_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def dedicated_server(serve_tmp: Path) -> Iterator[ServeProcess]:
    """A disaggregated 1 + 1 serving group (master process + one score-worker process), file outputs in
    ``serve_tmp / "out"``."""
    out = serve_tmp / "out"
    out.mkdir()
    server = start_serve(
        serve_tmp, "--decoder", "dedicated", "--score-workers", "1", api={"file_output_dir": str(out)}
    )
    yield server
    server.stop()


def worker_pids(server: ServeProcess) -> list[int]:
    """Pids of the score-worker ranks the server spawned (its children running the serve entry)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == server.proc.pid and "server.serve:main" in cmdline:
            pids.append(int(entry.name))
    return pids

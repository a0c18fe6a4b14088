"""A real ``livekit-server --dev`` on loopback for the LiveKit integration tests.

The binary is taken from ``$TM_LIVEKIT_SERVER``, else ``<repo>/.tools/bin/livekit-server`` (what
``deploy/install_livekit_server.sh`` installs), else ``livekit-server`` on PATH. Without it the tests skip
locally and FAIL in CI (``CI=true``), so a broken install can never pass silently.

Everything listens on 127.0.0.1 only: the signal/HTTP port and the single WebRTC UDP port are free ports
picked per server. ICE/TCP is switched off (``rtc.tcp_port: 0``) because livekit-server 1.13.5 binds its
TCP mux on all interfaces; UDP on loopback is all a local test needs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEV_API_KEY = "devkey"
DEV_API_SECRET = "secret"
_START_TIMEOUT_S = 20.0


def find_livekit_server() -> Path | None:
    env = os.environ.get("TM_LIVEKIT_SERVER")
    if env:
        return Path(env)
    local = REPO_ROOT / ".tools" / "bin" / "livekit-server"
    if local.is_file():
        return local
    on_path = shutil.which("livekit-server")
    return Path(on_path) if on_path else None


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveKitServer:
    """One livekit-server process; ``stop()`` then ``start()`` restarts it on the same ports."""

    binary: Path
    port: int
    udp_port: int
    log_path: Path
    api_key: str = DEV_API_KEY
    api_secret: str = DEV_API_SECRET
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def _config(self) -> str:
        return (
            f"port: {self.port}\n"
            "bind_addresses: ['127.0.0.1']\n"
            "rtc:\n"
            "  tcp_port: 0\n"
            f"  udp_port: {self.udp_port}\n"
            "  node_ip: 127.0.0.1\n"
            "  use_external_ip: false\n"
            "  enable_loopback_candidate: true\n"
            "  ips:\n"
            "    includes: ['127.0.0.1/32']\n"
            "logging:\n"
            "  level: warn\n"
        )

    def start(self) -> None:
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [str(self.binary), "--dev", "--config-body", self._config()],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"livekit-server exited with code {self._proc.returncode} at start; see {self.log_path}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"livekit-server did not answer on port {self.port} in {_START_TIMEOUT_S} s")

    def stop(self, *, hard: bool = False) -> None:
        """Stop the server; ``hard=True`` kills it like a crash (clients get no goodbye)."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def _require_binary() -> Path:
    binary = find_livekit_server()
    if binary is not None and binary.is_file() and os.access(binary, os.X_OK):
        return binary
    where = f"TM_LIVEKIT_SERVER={binary}" if binary else "TM_LIVEKIT_SERVER, .tools/bin or PATH"
    message = f"no livekit-server binary ({where}); install it with deploy/install_livekit_server.sh"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message} — CI must run the LiveKit tests", pytrace=False)
    pytest.skip(message)


def _make_server(tmp_path: Path) -> LiveKitServer:
    return LiveKitServer(
        binary=_require_binary(),
        port=_free_port(socket.SOCK_STREAM),
        udp_port=_free_port(socket.SOCK_DGRAM),
        log_path=tmp_path / "livekit-server.log",
    )


@pytest.fixture(scope="session")
def livekit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveKitServer]:
    """A livekit-server shared by the whole test session (tests use distinct rooms)."""
    server = _make_server(tmp_path_factory.mktemp("livekit"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def restartable_livekit_server(tmp_path: Path) -> Iterator[LiveKitServer]:
    """A private livekit-server that a test may kill and start again on the same ports."""
    server = _make_server(tmp_path)
    server.start()
    yield server
    server.stop()

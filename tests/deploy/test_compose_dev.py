"""The local-development stack: deploy/compose.yaml and deploy/livekit/livekit-dev.yaml agree with each other,
with the server's settings and the echo agent's command line, and the LiveKit config runs a real server; the
by-hand set-up (deploy/livekit/livekit-local.yaml, deploy/serve.dev.toml) binds loopback, and every doc
gives the same dev credentials. (tests/browser/test_first_call_docs.py runs the documented call.)"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from livekit import rtc

from deploy.agent.echo_agent import _build_parser as echo_parser
from deploy.agent.echo_agent import agent_token
from server.settings import ApiSettings
from tests.livekit.conftest import _require_binary

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
LIVEKIT = yaml.safe_load((DEPLOY / "livekit" / "livekit-dev.yaml").read_text())
LIVEKIT_LOCAL = yaml.safe_load((DEPLOY / "livekit" / "livekit-local.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]

pytestmark = pytest.mark.filterwarnings("ignore:The HMAC key is 6 bytes long")


def _host_path(volume: str) -> Path:
    return (DEPLOY / volume.split(":")[0]).resolve()


def _container_path(service: str, host_file: str) -> str:
    for volume in SERVICES[service]["volumes"]:
        if _host_path(volume) == (DEPLOY / host_file).resolve():
            return volume.split(":")[1]
    raise AssertionError(f"{host_file} is not mounted into {service}")


def test_every_mounted_file_exists() -> None:
    for service in SERVICES.values():
        for volume in service.get("volumes", []):
            assert _host_path(volume).exists(), volume


def test_published_ports_cover_signalling_ice_tcp_and_the_whole_udp_range() -> None:
    ports = SERVICES["livekit"]["ports"]
    rtc_config = LIVEKIT["rtc"]
    udp = f"{rtc_config['port_range_start']}-{rtc_config['port_range_end']}"
    assert f"127.0.0.1:{udp}:{udp}/udp" in ports
    assert f"127.0.0.1:{LIVEKIT['port']}:{LIVEKIT['port']}" in ports
    assert f"127.0.0.1:{rtc_config['tcp_port']}:{rtc_config['tcp_port']}" in ports
    assert rtc_config["node_ip"] == "127.0.0.1"


def test_server_and_agent_share_the_livekit_network_namespace() -> None:
    assert SERVICES["server"]["network_mode"] == "service:livekit"
    assert SERVICES["echo-agent"]["network_mode"] == "service:livekit"
    assert "127.0.0.1:8000:8000" in SERVICES["livekit"]["ports"]


def test_everyone_uses_the_livekit_key_pair_of_the_dev_config() -> None:
    (key, secret), = LIVEKIT["keys"].items()
    server_env = SERVICES["server"]["environment"]
    agent_env = SERVICES["echo-agent"]["environment"]
    assert server_env["TALKINGMACHINES_LIVEKIT_API_KEY"] == key
    assert server_env["TALKINGMACHINES_LIVEKIT_API_SECRET"] == secret
    assert (agent_env["LIVEKIT_API_KEY"], agent_env["LIVEKIT_API_SECRET"]) == (key, secret)
    assert agent_env["TALKINGMACHINES_API_KEY"] == server_env["TALKINGMACHINES_API_KEY"]


def test_server_config_loads_with_the_compose_environment() -> None:
    server = SERVICES["server"]
    command = server["command"]
    config_in_container = command[command.index("--config") + 1]
    assert _container_path("server", "serve.dev.toml") == config_in_container
    settings = ApiSettings.load(DEPLOY / "serve.dev.toml", server["environment"])
    assert settings.host == "0.0.0.0"
    assert settings.port == 8000


def test_echo_agent_command_parses_and_its_media_are_mounted() -> None:
    agent = SERVICES["echo-agent"]
    assert agent["entrypoint"][-2:] == ["-m", "deploy.agent.echo_agent"]
    args = echo_parser().parse_args(agent["command"])
    media_volume = next(v for v in agent["volumes"] if v.split(":")[1] == "/media")
    for in_container in (args.image, args.wav):
        assert (_host_path(media_volume) / Path(in_container).relative_to("/media")).is_file()
    assert args.url == f"ws://127.0.0.1:{LIVEKIT['port']}"
    assert agent["depends_on"]["server"]["condition"] == "service_healthy"


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dev_config_runs_livekit_server_and_its_key_admits_an_agent(tmp_path: Path) -> None:
    binary = _require_binary()
    port, tcp = _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_STREAM)
    udp = _free_port(socket.SOCK_DGRAM)
    text = (DEPLOY / "livekit" / "livekit-dev.yaml").read_text()
    text = re.sub(r"(?m)^port: \d+", f"port: {port}", text)
    text = re.sub(r"tcp_port: \d+", f"tcp_port: {tcp}", text)
    text = re.sub(r"port_range_start: \d+", f"port_range_start: {udp}", text)
    text = re.sub(r"port_range_end: \d+", f"port_range_end: {udp}", text)
    text = text.replace("- 0.0.0.0", "- 127.0.0.1")
    config = tmp_path / "livekit.yaml"
    config.write_text(text)
    log = (tmp_path / "livekit.log").open("wb")
    process = subprocess.Popen([str(binary), "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, (tmp_path / "livekit.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "livekit-server did not answer within 20 s"
                time.sleep(0.1)
        (key, secret), = LIVEKIT["keys"].items()

        async def join() -> str:
            room = rtc.Room()
            await room.connect(f"ws://127.0.0.1:{port}", agent_token(key, secret, "dev-check"))
            try:
                return room.name
            finally:
                await room.disconnect()

        assert asyncio.run(join()) == "dev-check"
        assert "secret is too short" not in (tmp_path / "livekit.log").read_text()
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def test_by_hand_the_dev_server_config_binds_loopback_and_hands_the_call_page_its_livekit_url() -> None:
    settings = ApiSettings.load(DEPLOY / "serve.dev.toml", {"TALKINGMACHINES_API_KEY": "k"})
    assert settings.host == "127.0.0.1"
    agent_url = echo_parser().parse_args(SERVICES["echo-agent"]["command"]).url
    assert settings.livekit_public_url == f"ws://127.0.0.1:{LIVEKIT_LOCAL['port']}" == agent_url
    assert settings.file_output_dir is None  # no container path outside the container
    compose = ApiSettings.load(DEPLOY / "serve.dev.toml", SERVICES["server"]["environment"])
    assert compose.file_output_dir == Path("/var/lib/talkingmachines/out")  # made by deploy/Dockerfile.cpu


def test_the_local_livekit_config_listens_and_advertises_loopback_only() -> None:
    rtc_config = LIVEKIT_LOCAL["rtc"]
    assert LIVEKIT_LOCAL["bind_addresses"] == ["127.0.0.1"]
    assert rtc_config["node_ip"] == "127.0.0.1" and rtc_config["ips"]["includes"] == ["127.0.0.1/32"]
    assert rtc_config["tcp_port"] == 0  # livekit-server 1.13.5 binds ICE/TCP on every interface
    assert LIVEKIT_LOCAL["port"] == LIVEKIT["port"]


def _assignments(text: str, name: str) -> set[str]:
    """Values given to ``name`` (``NAME=value`` or ``NAME: value``), placeholders (``...``) left out."""
    values = re.findall(rf"(?<![A-Z_]){name}[=:] ?([^\s`\"',)]+)", text)
    return {v for v in values if v != "..."}


def test_one_set_of_dev_credentials_everywhere_long_enough_for_jwt() -> None:
    (key, secret), = LIVEKIT["keys"].items()
    assert LIVEKIT_LOCAL["keys"] == {key: secret}
    assert len(secret) >= 32  # shorter HMAC keys make PyJWT and livekit-server warn
    repo = DEPLOY.parent
    texts = {
        path: path.read_text()
        for path in (repo / "README.md", DEPLOY / "README.md", DEPLOY / "compose.yaml",
                     DEPLOY / "agent" / "echo_agent.py")
    }
    api_key = SERVICES["server"]["environment"]["TALKINGMACHINES_API_KEY"]
    expected = {
        "LIVEKIT_API_KEY": key,
        "LIVEKIT_API_SECRET": secret,
        "TALKINGMACHINES_LIVEKIT_API_KEY": key,
        "TALKINGMACHINES_LIVEKIT_API_SECRET": secret,
        "TALKINGMACHINES_API_KEY": api_key,
    }
    for path, text in texts.items():
        for name, value in expected.items():
            assert _assignments(text, name) <= {value}, f"{path.name} gives {name} another value"
    found = set().union(*(_assignments(t, n) for t in texts.values() for n in expected))
    assert found == {key, secret, api_key}
    for path in (repo / "README.md", DEPLOY / "README.md"):
        assert f"access key {api_key}" in texts[path] or f"access key `{api_key}`" in texts[path]
        assert "http://127.0.0.1:8000/call?room=demo" in texts[path]

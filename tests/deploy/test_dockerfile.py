"""The container images (Dockerfile, deploy/Dockerfile.cpu), checked by reading them: no Docker engine runs
here. A small parser turns each Dockerfile into instructions; the tests assert what the deployment relies
on, and the HEALTHCHECK command itself is run against a stand-in HTTP server."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
GPU_DOCKERFILE = REPO / "Dockerfile"
CPU_DOCKERFILE = REPO / "deploy" / "Dockerfile.cpu"
CONSTRAINTS = REPO / "deploy" / "constraints.txt"
USER_ID = 10001


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case, e.g. "FROM"
    value: str  # the rest of the logical line, continuations joined


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[str]:
        return [i.value for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> str:
        values = self.all(keyword)
        assert values, f"stage {self.name or self.base} has no {keyword}"
        return values[-1]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages in order)."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path}: the last instruction ends with a line continuation"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    current: list[Instruction] | None = None
    for text in logical:
        keyword, _, value = text.partition(" ")
        instruction = Instruction(keyword.upper(), value.strip())
        if instruction.keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", instruction.value, re.IGNORECASE)
            assert match, f"{path}: cannot read FROM {instruction.value!r}"
            current = []
            stages.append(Stage(match[1], match[2], ()))
        elif current is None:
            assert instruction.keyword == "ARG", f"{path}: {instruction.keyword} before the first FROM"
            name, _, default = instruction.value.partition("=")
            global_args[name] = default
            continue
        current.append(instruction)
        stages[-1] = Stage(stages[-1].base, stages[-1].name, tuple(current))
    return global_args, stages


def _pins() -> dict[str, str]:
    """constraints.txt as {normalised name: version}."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[_normalise(name)] = version.strip()
    return pins


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def _exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"expected the exec (JSON array) form, got {value!r}"
    return parsed


def _healthcheck_command(stage: Stage) -> list[str]:
    value = stage.last("HEALTHCHECK")
    return _exec_form(value[value.index("CMD") + 3 :].strip())


@pytest.fixture(scope="module")
def cuda_image() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(GPU_DOCKERFILE)


@pytest.fixture(scope="module")
def cpu_image() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(CPU_DOCKERFILE)


def test_gpu_image_runs_on_the_cuda_runtime_base(cuda_image) -> None:
    global_args, stages = cuda_image
    final = stages[-1]
    base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], final.base)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+", base), base


def test_gpu_image_cuda_major_matches_the_pinned_torch_wheel(cuda_image) -> None:
    global_args, _ = cuda_image
    pins = _pins()
    cuda_major = global_args["CUDA_VERSION"].split(".")[0]
    assert pins["nvidia-cuda-runtime"].split(".")[0] == cuda_major
    assert global_args["CUDA_VERSION"] <= pins["cuda-toolkit"]


def test_flash_attn_is_a_build_argument_off_by_default(cuda_image) -> None:
    global_args, stages = cuda_image
    assert global_args["FLASH_ATTN"] == "0"
    names = {s.name for s in stages}
    selector = next(s for s in stages if s.base.startswith("flash-attn-"))
    for value in ("0", "1"):
        assert selector.base.replace("${FLASH_ATTN}", value) in names
    with_flash = next(s for s in stages if s.name == "flash-attn-1")
    assert "-devel-" in with_flash.base
    assert any("flash-attn==" in run for run in with_flash.all("RUN"))
    without = next(s for s in stages if s.name == "flash-attn-0")
    assert not any("flash-attn" in run for run in without.all("RUN"))


@pytest.mark.parametrize("which", ["cuda_image", "cpu_image"])
def test_package_is_installed_with_the_pinned_constraints(which: str, request: pytest.FixtureRequest) -> None:
    _, stages = request.getfixturevalue(which)
    package_install = re.compile(r"pip install .*\s\"?\.(\[\w+\])?\"?$")
    installs = [run for s in stages for run in s.all("RUN") if package_install.search(run)]
    assert installs, "no `pip install .` of the package"
    for run in installs:
        assert "--constraint deploy/constraints.txt" in run


@pytest.mark.parametrize("which", ["cuda_image", "cpu_image"])
def test_every_package_of_the_project_is_copied_into_the_build(
    which: str, request: pytest.FixtureRequest
) -> None:
    _, stages = request.getfixturevalue(which)
    copied = {shlex.split(v)[0] for s in stages for v in s.all("COPY") if not v.startswith("--from")}
    includes = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for pattern in includes["include"]:
        assert pattern.rstrip("*") in copied
    for source in copied:
        assert (REPO / source).exists(), f"COPY source {source} does not exist in the repository"


def test_constraints_agree_with_every_exact_pin_of_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _pins()
    declared = list(project["dependencies"]) + list(project["optional-dependencies"]["agent"])
    for requirement in declared:
        name, _, version = requirement.partition("==")
        assert pins.get(_normalise(name)) == version.strip(), f"{requirement} vs constraints.txt"


@pytest.mark.parametrize("which", ["cuda_image", "cpu_image"])
def test_image_runs_as_the_non_root_user_the_pod_expects(which: str, request: pytest.FixtureRequest) -> None:
    _, stages = request.getfixturevalue(which)
    final = stages[-1]
    assert final.last("USER").split(":")[0] == str(USER_ID)
    assert any(f"useradd --uid {USER_ID}" in run for run in final.all("RUN"))
    statefulset = yaml.safe_load((REPO / "deploy" / "k8s" / "statefulset.yaml").read_text())
    assert statefulset["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == USER_ID


@pytest.mark.parametrize("which", ["cuda_image", "cpu_image"])
def test_entrypoint_is_talkingmachines_serve_under_an_init(
    which: str, request: pytest.FixtureRequest
) -> None:
    _, stages = request.getfixturevalue(which)
    entrypoint = _exec_form(stages[-1].last("ENTRYPOINT"))
    assert entrypoint == ["/usr/bin/tini", "--", "talkingmachines", "serve"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "talkingmachines" in scripts
    assert any("tini" in run for run in stages[-1].all("RUN"))


def test_cpu_image_defaults_to_the_tiny_preset_on_cpu(cpu_image) -> None:
    _, stages = cpu_image
    command = _exec_form(stages[-1].last("CMD"))
    assert command[command.index("--device") + 1] == "cpu"
    assert command[command.index("--preset") + 1] == "tiny"


@contextmanager
def _health_server(status: int) -> Iterator[int]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("which", ["cuda_image", "cpu_image"])
@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_healthcheck_passes_only_when_healthz_answers_ok(
    which: str, status: int, healthy: bool, request: pytest.FixtureRequest
) -> None:
    _, stages = request.getfixturevalue(which)
    command = _healthcheck_command(stages[-1])
    assert command[0] in ("python", "python3")
    with _health_server(status) as port:
        result = subprocess.run(
            [sys.executable, *command[1:]],
            env={"TALKINGMACHINES_PORT": str(port)},
            capture_output=True,
            timeout=30,
        )
    assert (result.returncode == 0) is healthy


@pytest.mark.parametrize("which", ["cuda_image", "cpu_image"])
def test_server_listens_on_all_interfaces_inside_the_container(
    which: str, request: pytest.FixtureRequest
) -> None:
    _, stages = request.getfixturevalue(which)
    env = " ".join(stages[-1].all("ENV"))
    assert "TALKINGMACHINES_HOST=0.0.0.0" in env
    assert stages[-1].last("EXPOSE") == "8000"

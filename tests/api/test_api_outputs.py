"""Bad session inputs are 4xx with a message, and a created session has a writable output (issue 20, item 2):
the output path is checked at create (NUL bytes, missing folder, a folder, names too long, another live
session's file), never discovered by a failing session after its 201."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from proto.api import Face, SessionCreate, SessionInfo
from server.api import create_app
from tests.api.api_fakes import AUTH, FakeBackend, make_settings, session_body


@pytest.fixture
def out(tmp_path: Path) -> Path:
    root = tmp_path / "out"
    (root / "calls").mkdir(parents=True)
    (root / "folder.mp4").mkdir()
    return root


@pytest.fixture
def files(backend: FakeBackend, out: Path) -> Iterator[TestClient]:
    with TestClient(create_app(backend, make_settings(file_output_dir=out))) as client:
        yield client


def _create(client: TestClient, path: str, **extra: object) -> object:
    return client.post(
        "/v1/sessions", json=session_body(output={"type": "file", "path": path}, **extra), headers=AUTH
    )


def test_a_plain_string_prompt_over_the_prompt_limit_is_422(client: TestClient, backend: FakeBackend) -> None:
    response = client.post("/v1/sessions", json=session_body(prompt="x" * 2001), headers=AUTH)
    assert response.status_code == 422, response.text  # today: 201 here, 500 from the real backend
    assert "prompt" in response.json()["detail"] and "2000" in response.json()["detail"]
    assert client.post("/v1/sessions", json=session_body(prompt="x" * 2000), headers=AUTH).status_code == 201


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("a\x00b.mp4", "control character"),  # today: 500 (ValueError: embedded null byte)
        ("nope/x.mp4", "does not exist"),  # today: 201 here, 500 from the real backend
        ("folder.mp4", "folder"),  # today: 201, then the session fails (Is a directory)
        ("x" * 300 + ".mp4", "longer than"),  # today: 201, then the session fails (File name too long)
        ("calls/" + "y" * 252 + ".mp4", "longer than"),
        ("../escape.mp4", "inside the output directory"),
        ("calls/a.mov", "must end in .mp4"),
    ],
    ids=[
        "nul",
        "missing-folder",
        "a-folder",
        "name-too-long",
        "name-too-long-in-folder",
        "escape",
        "not-mp4",
    ],
)
def test_an_unusable_output_path_is_422_naming_the_problem(
    files: TestClient, backend: FakeBackend, path: str, says: str
) -> None:
    response = _create(files, path)
    assert response.status_code == 422, response.text
    assert says in response.json()["detail"]
    assert backend.created == []


def test_two_live_sessions_cannot_share_an_output_file(files: TestClient, backend: FakeBackend) -> None:
    first = _create(files, "calls/same.mp4")
    second = _create(files, "calls/./same.mp4")  # the same file, spelled differently
    assert first.status_code == 201
    assert second.status_code == 409, second.text  # today: 201, and one recording is silently lost
    assert second.json()["code"] == "output_in_use" and first.json()["id"] in second.json()["detail"]
    assert _create(files, "calls/other.mp4").status_code == 201
    files.delete(f"/v1/sessions/{first.json()['id']}", headers=AUTH)
    assert _create(files, "calls/same.mp4").status_code == 201  # free again once the first one ended


def test_a_session_that_failed_frees_its_output_file(files: TestClient, backend: FakeBackend) -> None:
    first = _create(files, "calls/same.mp4").json()
    backend.fail(first["id"], "score worker died")
    assert _create(files, "calls/same.mp4").status_code == 201


class _OpenFails(FakeBackend):
    """The output folder disappears between the check and the backend opening the file."""

    def create_session(self, spec: SessionCreate, image: np.ndarray, faces: Sequence[Face]) -> SessionInfo:
        raise FileNotFoundError(2, "No such file or directory", spec.output.path)  # type: ignore[union-attr]


def test_an_output_that_cannot_be_opened_by_the_backend_is_still_4xx(out: Path) -> None:
    with TestClient(create_app(_OpenFails(), make_settings(file_output_dir=out))) as client:
        response = _create(client, "calls/a.mp4")
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_output"


@pytest.mark.parametrize("field", ["room", "identity", "agent_identity"])
def test_a_blank_livekit_name_is_422_not_a_500(backend: FakeBackend, field: str) -> None:
    # Found by the fuzzer: a whitespace-only identity reached the token minting and raised (500).
    settings = make_settings(livekit_api_key="devkey", livekit_api_secret="secret-of-32-characters-or-more-0")
    output = {"type": "livekit", "url": "ws://127.0.0.1:7880", "room": "r", "identity": "avatar"}
    output |= {"agent_identity": "agent", field: " "}
    with TestClient(create_app(backend, settings), raise_server_exceptions=False) as client:
        response = client.post("/v1/sessions", json=session_body(output=output), headers=AUTH)
    assert response.status_code == 422, response.text
    assert field in response.json()["detail"] and "blank" in response.json()["detail"]

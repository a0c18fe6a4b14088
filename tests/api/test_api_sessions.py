"""Sessions API: create, get, list, speakers, clear, delete — success and error paths."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from livekit import api as lkapi

from server.api import create_app
from tests.api.api_fakes import AUTH, FakeBackend, blank_image, make_settings, png_base64, session_body


def test_create_session_decodes_the_image_and_falls_back_to_a_central_face(
    client: TestClient, backend: FakeBackend
) -> None:
    response = client.post("/v1/sessions", json=session_body(), headers=AUTH)
    assert response.status_code == 201
    body = response.json()
    assert body["state"] == "running"
    assert body["livekit_identity"] == "tm-avatar"
    assert body["faces"] == [
        {
            "box": [32, 14, 96, 72],
            "box_norm": [32 / 128, 14 / 96, 96 / 128, 72 / 96],
            "source": "fallback",
            "name": None,
        }
    ]
    spec, image, faces = backend.created[0]
    np.testing.assert_array_equal(image, blank_image())
    assert spec.output.token.get_secret_value() == "jwt-from-the-agent"
    assert spec.prompt_spec().text == "a friendly face"
    assert len(faces) == 1


def test_create_session_uses_the_given_character_boxes(client: TestClient, backend: FakeBackend) -> None:
    characters = [{"box": [0, 0, 40, 50], "name": "left"}, {"box": [60, 10, 128, 96]}]
    response = client.post(
        "/v1/sessions", json=session_body(characters=characters, speaking=[1]), headers=AUTH
    )
    assert response.status_code == 201
    faces = response.json()["faces"]
    assert [f["box"] for f in faces] == [[0, 0, 40, 50], [60, 10, 128, 96]]
    assert [f["source"] for f in faces] == ["given", "given"]
    assert faces[0]["name"] == "left"
    assert backend.created[0][0].speaking == [1]


def test_a_box_outside_the_image_is_422_naming_the_box(client: TestClient) -> None:
    response = client.post(
        "/v1/sessions", json=session_body(characters=[{"box": [0, 0, 200, 50]}]), headers=AUTH
    )
    assert response.status_code == 422
    assert "characters[0].box [0, 0, 200, 50]" in response.json()["detail"]
    assert "128x96" in response.json()["detail"]


def test_an_inverted_box_is_422(client: TestClient) -> None:
    response = client.post(
        "/v1/sessions", json=session_body(characters=[{"box": [50, 0, 10, 50]}]), headers=AUTH
    )
    assert response.status_code == 422
    assert "x0 < x1" in response.json()["detail"]


def test_a_speaking_index_without_a_character_is_422(client: TestClient, backend: FakeBackend) -> None:
    response = client.post("/v1/sessions", json=session_body(speaking=[0, 3]), headers=AUTH)
    assert response.status_code == 422
    assert "[3]" in response.json()["detail"]
    assert backend.created == []


def test_invalid_base64_image_is_422(client: TestClient) -> None:
    response = client.post("/v1/sessions", json=session_body(image="not base64!!"), headers=AUTH)
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_request"
    assert "base64" in response.json()["detail"]


def test_bytes_that_are_no_image_are_422_with_the_reason(client: TestClient) -> None:
    garbage = base64.b64encode(b"GIF89a definitely not a png").decode()
    response = client.post("/v1/sessions", json=session_body(image=garbage), headers=AUTH)
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_image"
    assert "could not be decoded" in response.json()["detail"]


def test_a_data_url_image_is_accepted(client: TestClient) -> None:
    data_url = "data:image/png;base64," + png_base64(blank_image())
    assert client.post("/v1/sessions", json=session_body(image=data_url), headers=AUTH).status_code == 201


def test_an_image_over_the_pixel_limit_is_422_naming_the_limit(backend: FakeBackend) -> None:
    with TestClient(create_app(backend, make_settings(max_image_pixels=100 * 100))) as client:
        response = client.post("/v1/sessions", json=session_body(), headers=AUTH)
    assert response.status_code == 422
    assert "128x96" in response.json()["detail"] and "10000" in response.json()["detail"]


def test_an_image_over_the_byte_limit_is_413(backend: FakeBackend) -> None:
    noisy = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)  # incompressible PNG
    with TestClient(create_app(backend, make_settings(max_image_bytes=20_000))) as client:
        response = client.post("/v1/sessions", json=session_body(image=png_base64(noisy)), headers=AUTH)
    assert response.status_code == 413
    assert response.json()["code"] in ("image_too_large", "too_large")
    assert backend.created == []


def test_a_session_body_over_the_limit_is_413_before_parsing(backend: FakeBackend) -> None:
    settings = make_settings(max_image_bytes=3000)
    with TestClient(create_app(backend, settings)) as client:
        response = client.post(
            "/v1/sessions",
            json=session_body(image="A" * (settings.max_session_body_bytes + 10)),
            headers=AUTH,
        )
    assert response.status_code == 413
    assert str(settings.max_session_body_bytes) in response.json()["detail"]


def test_unknown_fields_are_422(client: TestClient) -> None:
    response = client.post("/v1/sessions", json=session_body(colour="blue"), headers=AUTH)
    assert response.status_code == 422
    assert "colour" in response.json()["detail"]


def test_the_session_limit_answers_503_with_retry_after(backend: FakeBackend) -> None:
    with TestClient(create_app(backend, make_settings(max_sessions=1, retry_after_s=7))) as client:
        assert client.post("/v1/sessions", json=session_body(), headers=AUTH).status_code == 201
        response = client.post("/v1/sessions", json=session_body(), headers=AUTH)
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "7"
        assert response.json()["code"] == "no_capacity"
        # Ending the live session frees the slot.
        client.delete(f"/v1/sessions/{next(iter(backend.sessions))}", headers=AUTH)
        assert client.post("/v1/sessions", json=session_body(), headers=AUTH).status_code == 201


def test_backend_no_capacity_answers_503_with_its_retry_after(
    client: TestClient, backend: FakeBackend
) -> None:
    backend.no_capacity_retry_s = 2.5
    response = client.post("/v1/sessions", json=session_body(), headers=AUTH)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "3"
    assert response.json()["retry_after_s"] == 3.0


def test_a_livekit_output_without_token_is_422_when_the_server_cannot_mint(client: TestClient) -> None:
    body = session_body()
    del body["output"]["token"]
    response = client.post("/v1/sessions", json=body, headers=AUTH)
    assert response.status_code == 422
    assert "livekit_api_key" in response.json()["detail"]


def test_the_server_mints_a_publish_on_behalf_token_when_none_is_sent(backend: FakeBackend) -> None:
    settings = make_settings(livekit_api_key="devkey", livekit_api_secret="s" * 32)
    body = session_body()
    del body["output"]["token"]
    with TestClient(create_app(backend, settings)) as client:
        assert client.post("/v1/sessions", json=body, headers=AUTH).status_code == 201
    token = backend.created[0][0].output.token.get_secret_value()
    claims = lkapi.TokenVerifier("devkey", "s" * 32).verify(token)
    assert claims.identity == "tm-avatar"
    assert claims.kind == "agent"
    assert claims.attributes == {"lk.publish_on_behalf": "agent-1"}
    assert claims.video.room == "call-1"


def test_the_avatar_and_agent_identities_must_differ(client: TestClient) -> None:
    body = session_body()
    body["output"]["identity"] = body["output"]["agent_identity"]
    response = client.post("/v1/sessions", json=body, headers=AUTH)
    assert response.status_code == 422
    assert "agent_identity" in response.json()["detail"]


def test_file_outputs_are_refused_unless_an_output_dir_is_configured(client: TestClient) -> None:
    response = client.post(
        "/v1/sessions", json=session_body(output={"type": "file", "path": "a.mp4"}), headers=AUTH
    )
    assert response.status_code == 422
    assert "file_output_dir" in response.json()["detail"]


def test_a_file_output_resolves_inside_the_output_dir(backend: FakeBackend, tmp_path: Path) -> None:
    (tmp_path / "calls").mkdir()
    with TestClient(create_app(backend, make_settings(file_output_dir=tmp_path))) as client:
        ok = client.post(
            "/v1/sessions", json=session_body(output={"type": "file", "path": "calls/a.mp4"}), headers=AUTH
        )
        escape = client.post(
            "/v1/sessions", json=session_body(output={"type": "file", "path": "../evil.mp4"}), headers=AUTH
        )
    assert ok.status_code == 201
    assert backend.created[0][0].output.path == str(tmp_path.resolve() / "calls" / "a.mp4")
    assert ok.json()["livekit_identity"] is None
    assert escape.status_code == 422
    assert "inside the output directory" in escape.json()["detail"]


def test_get_returns_the_session_and_404_for_an_unknown_id(client: TestClient, session_id: str) -> None:
    response = client.get(f"/v1/sessions/{session_id}", headers=AUTH)
    assert response.status_code == 200
    assert response.json()["id"] == session_id
    missing = client.get("/v1/sessions/nope", headers=AUTH)
    assert missing.status_code == 404
    assert missing.json()["code"] == "unknown_session"
    assert "'nope'" in missing.json()["detail"]


def test_list_returns_every_session(client: TestClient, session_id: str) -> None:
    response = client.get("/v1/sessions", headers=AUTH)
    assert [s["id"] for s in response.json()["sessions"]] == [session_id]


def test_a_failed_session_reports_its_reason(
    client: TestClient, backend: FakeBackend, session_id: str
) -> None:
    backend.fail(session_id, "score worker rank 1 died (exit code -9)")
    body = client.get(f"/v1/sessions/{session_id}", headers=AUTH).json()
    assert (body["state"], body["reason"]) == ("failed", "score worker rank 1 died (exit code -9)")


def test_speakers_reach_the_backend(client: TestClient, backend: FakeBackend, session_id: str) -> None:
    response = client.post(f"/v1/sessions/{session_id}/speakers", json={"speaking": []}, headers=AUTH)
    assert response.status_code == 200
    assert response.json()["speaking"] == []
    assert backend.speakers == [(session_id, [])]


def test_speakers_beyond_the_characters_are_422(
    client: TestClient, backend: FakeBackend, session_id: str
) -> None:
    response = client.post(f"/v1/sessions/{session_id}/speakers", json={"speaking": [2]}, headers=AUTH)
    assert response.status_code == 422
    assert backend.speakers == []


def test_duplicate_or_negative_speakers_are_422(client: TestClient, session_id: str) -> None:
    for speaking in ([0, 0], [-1]):
        response = client.post(
            f"/v1/sessions/{session_id}/speakers", json={"speaking": speaking}, headers=AUTH
        )
        assert response.status_code == 422


def test_speakers_for_an_unknown_session_are_404(client: TestClient) -> None:
    assert client.post("/v1/sessions/nope/speakers", json={"speaking": [0]}, headers=AUTH).status_code == 404


def test_clear_reaches_the_backend_once(client: TestClient, backend: FakeBackend, session_id: str) -> None:
    response = client.post(f"/v1/sessions/{session_id}/clear", headers=AUTH)
    assert response.status_code == 204
    assert backend.clears == [session_id]
    assert client.post("/v1/sessions/nope/clear", headers=AUTH).status_code == 404


def test_delete_ends_the_session_and_later_commands_are_409(
    client: TestClient, backend: FakeBackend, session_id: str
) -> None:
    response = client.delete(f"/v1/sessions/{session_id}", headers=AUTH)
    assert response.status_code == 200
    assert response.json()["state"] == "ended"
    assert backend.closed == [session_id]
    after = client.post(f"/v1/sessions/{session_id}/clear", headers=AUTH)
    assert after.status_code == 409
    assert after.json()["code"] == "session_ended"
    assert client.delete("/v1/sessions/nope", headers=AUTH).status_code == 404


def test_openapi_documents_the_endpoints(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert {
        "/v1/sessions",
        "/v1/sessions/{session_id}",
        "/v1/sessions/{session_id}/audio",
        "/v1/sessions/{session_id}/speakers",
        "/v1/sessions/{session_id}/clear",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= set(schema["paths"])
    assert "SessionCreate" in schema["components"]["schemas"]
    assert (
        "audio/pcm; rate=16000; channels=1"
        in schema["paths"]["/v1/sessions/{session_id}/audio"]["post"]["requestBody"]["content"]
    )

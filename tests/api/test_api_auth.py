"""Authentication and CORS of the control plane."""

from __future__ import annotations

from fastapi.testclient import TestClient

from server.api import create_app
from server.settings import ApiSettings
from tests.api.api_fakes import AUTH, FakeBackend, make_settings, session_body


def test_v1_routes_without_a_key_are_401_with_a_bearer_challenge(
    client: TestClient, backend: FakeBackend
) -> None:
    for method, path in [
        ("POST", "/v1/sessions"),
        ("GET", "/v1/sessions"),
        ("GET", "/v1/sessions/x"),
        ("POST", "/v1/sessions/x/audio"),
        ("POST", "/v1/sessions/x/speakers"),
        ("POST", "/v1/sessions/x/clear"),
        ("DELETE", "/v1/sessions/x"),
    ]:
        response = client.request(method, path, json=session_body() if path == "/v1/sessions" else None)
        assert response.status_code == 401, (method, path)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.json()["code"] == "unauthorized"
    assert backend.created == []


def test_a_wrong_key_is_401(client: TestClient, backend: FakeBackend) -> None:
    response = client.post("/v1/sessions", json=session_body(), headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401
    assert "wrong" in response.json()["detail"]
    assert backend.created == []


def test_health_readiness_and_metrics_need_no_key(client: TestClient) -> None:
    assert [client.get(p).status_code for p in ("/healthz", "/readyz", "/metrics")] == [200, 200, 200]


def test_auth_disabled_accepts_requests_without_a_key(backend: FakeBackend) -> None:
    settings = ApiSettings(auth_disabled=True)
    with TestClient(create_app(backend, settings)) as client:
        assert client.post("/v1/sessions", json=session_body()).status_code == 201


def test_cors_is_closed_by_default(client: TestClient) -> None:
    headers = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    preflight = client.options("/v1/sessions", headers=headers)
    simple = client.get("/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-origin" not in simple.headers


def test_cors_allows_only_the_configured_origins(backend: FakeBackend) -> None:
    with TestClient(create_app(backend, make_settings(cors_origins=("https://app.example",)))) as client:
        allowed = client.get("/v1/sessions", headers={**AUTH, "Origin": "https://app.example"})
        foreign = client.get("/v1/sessions", headers={**AUTH, "Origin": "https://evil.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in foreign.headers

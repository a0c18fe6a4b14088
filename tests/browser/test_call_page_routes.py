"""The call page's routes on the control-plane app (``server.call_page``): the page and its assets, the
not-built answer, and the call token for a human participant (who may join, with which grants)."""

from __future__ import annotations

import base64
import json
import logging
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.api import create_app
from server.call_page import CallTickets, add_call_routes
from server.http_guard import RedactQueryFilter
from server.settings import ApiSettings
from tests.api.api_fakes import FakeBackend

API_KEY, CALL_KEY = "api-key", "call-key"
LK_KEY, LK_SECRET = "devkey", "secret-of-at-least-32-characters-0123"


def _client(static_dir: Path, **settings: Any) -> TestClient:
    values: dict[str, Any] = {
        "api_key": API_KEY,
        "call_access_key": CALL_KEY,
        "livekit_api_key": LK_KEY,
        "livekit_api_secret": LK_SECRET,
        "livekit_public_url": "wss://lk.example.com",
        **settings,
    }
    app = FastAPI()
    add_call_routes(app, ApiSettings(**values), static_dir=static_dir)
    return TestClient(app)


@pytest.fixture
def built(tmp_path: Path) -> Path:
    (tmp_path / "assets").mkdir()
    (tmp_path / "index.html").write_text("<!doctype html><title>call</title>")
    (tmp_path / "assets" / "call.js").write_text("console.log('call')")
    (tmp_path / "outside.js").write_text("not an asset: outside assets/")
    return tmp_path


def _token(client: TestClient, key: str | None, **body: Any) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return client.post("/v1/call/token", json={"room": "demo", **body}, headers=headers)


def test_the_page_and_its_script_are_served_when_built(built: Path) -> None:
    client = _client(built)
    page = client.get("/call")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    script = client.get("/call/assets/call.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert script.text == "console.log('call')"


def test_an_unbuilt_page_answers_503_naming_the_build_script(tmp_path: Path) -> None:
    client = _client(tmp_path / "missing")
    for path in ("/call", "/call/assets/call.js"):
        response = client.get(path)
        assert response.status_code == 503
        assert "deploy/build_web.sh" in response.text


@pytest.mark.parametrize(
    "name", ["..%2Foutside.js", "%2E%2E%2Foutside.js", "missing.js", ".hidden.js", "x.html"]
)
def test_assets_outside_the_built_files_are_404(built: Path, name: str) -> None:
    assert _client(built).get(f"/call/assets/{name}").status_code == 404


def test_the_call_token_lets_a_standard_participant_join_only_that_room(built: Path) -> None:
    response = _token(_client(built), CALL_KEY, name="Ada")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["url"] == "wss://lk.example.com"
    assert body["room"] == "demo"
    assert body["identity"].startswith("user-")
    claims = jwt.decode(body["token"], LK_SECRET, algorithms=["HS256"])
    assert claims["iss"] == LK_KEY
    assert claims["sub"] == body["identity"]
    assert claims["name"] == "Ada"
    assert claims.get("kind", "standard") == "standard"
    video = claims["video"]
    assert video["room"] == "demo" and video["roomJoin"] is True
    assert sorted(video["canPublishSources"]) == ["camera", "microphone"]
    assert video.get("roomAdmin") is not True and video.get("roomCreate") is not True
    assert 0 < claims["exp"] - claims["nbf"] <= 2 * 3600


def test_the_api_key_also_gets_a_call_token(built: Path) -> None:
    assert _token(_client(built), API_KEY).status_code == 200


@pytest.mark.parametrize("key", [None, "wrong"])
def test_a_missing_or_wrong_key_gets_401(built: Path, key: str | None) -> None:
    response = _token(_client(built), key)
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"


def test_without_livekit_credentials_the_token_is_422_naming_the_settings(built: Path) -> None:
    client = _client(built, livekit_api_key=None, livekit_api_secret=None)
    response = _token(client, CALL_KEY)
    assert response.status_code == 422
    assert "livekit_api_key" in response.json()["detail"]


@pytest.mark.parametrize("room", ["", "../x", "a b", "x" * 129])
def test_a_malformed_room_name_is_422(built: Path, room: str) -> None:
    assert _token(_client(built), CALL_KEY, room=room).status_code == 422


# ---- call links: a short-lived signed ticket instead of a key in the URL (issue 20) ----


def _link(client: TestClient, key: str | None, **body: Any) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return client.post("/v1/call/link", json={"room": "demo", **body}, headers=headers)


def test_a_call_link_carries_a_ticket_in_its_fragment_that_gets_tokens_for_its_room_only(built: Path) -> None:
    client = _client(built)
    link = _link(client, CALL_KEY, name="Ada", ttl_s=60)
    assert link.status_code == 200, link.text
    body = link.json()
    path, _, fragment = body["url"].partition("#")
    assert path == "/call?room=demo&name=Ada" and fragment == f"ticket={body['ticket']}"
    assert CALL_KEY not in body["url"] and API_KEY not in body["url"]
    assert 0 < body["expires_at"] - time.time() <= 60
    assert _token(client, body["ticket"]).status_code == 200
    other = _token(client, body["ticket"], room="another")
    assert other.status_code == 403 and "demo" in other.json()["detail"]


def test_a_ticket_is_refused_once_expired_or_altered(built: Path) -> None:
    client = _client(built)
    tickets = CallTickets(ApiSettings(api_key=API_KEY))
    expired, _ = tickets.mint("demo", 60, now=time.time() - 61)
    assert _token(client, expired).status_code == 401
    good, _ = tickets.mint("demo", 60)
    version, _, signature = good.split(".")
    forged = json.dumps({"room": "demo", "exp": int(time.time()) + 10**6}, separators=(",", ":")).encode()
    altered = f"{version}.{base64.urlsafe_b64encode(forged).rstrip(b'=').decode()}.{signature}"
    assert _token(client, altered).status_code == 401
    assert _token(client, good).status_code == 200
    # Signed with a key derived from the API key: another server key does not accept it.
    assert CallTickets(ApiSettings(api_key="other-key")).room_of(good) is None


def test_a_link_lives_at_most_call_link_ttl_s_and_needs_a_key(built: Path) -> None:
    client = _client(built, call_link_ttl_s=30)
    assert _link(client, None).status_code == 401
    body = _link(client, API_KEY, ttl_s=10**6).json()
    assert body["expires_at"] - time.time() <= 30


def test_a_key_in_the_page_url_is_refused(built: Path) -> None:
    response = _client(built).get(f"/call?room=demo&key={CALL_KEY}")
    assert response.status_code == 400
    assert response.json()["code"] == "key_in_url"


def test_the_full_app_takes_a_ticket_for_the_token_route_only() -> None:
    settings = ApiSettings(api_key=API_KEY, livekit_api_key=LK_KEY, livekit_api_secret=LK_SECRET)
    with TestClient(create_app(FakeBackend(), settings)) as client:
        ticket = _link(client, API_KEY).json()["ticket"]
        assert _token(client, ticket).status_code == 200
        assert client.get("/v1/sessions", headers={"Authorization": f"Bearer {ticket}"}).status_code == 401


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("/call?room=demo&key=s3cret&autojoin=1", "/call?room=demo&key=REDACTED&autojoin=1"),
        (
            "/v1/sessions/x/audio?sample_rate=16000&api_key=s3cret",
            "/v1/sessions/x/audio?sample_rate=16000&api_key=REDACTED",
        ),
        ("/anything?token=s3cret", "/anything?token=REDACTED"),
        ("/healthz", "/healthz"),
    ],
)
def test_access_log_lines_never_show_query_values_but_the_harmless_ones(line: str, shown: str) -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("1.2.3.4:5", "GET", line, "1.1", 200),
        None,
    )
    assert RedactQueryFilter().filter(record)
    assert record.getMessage() == f'1.2.3.4:5 - "GET {shown} HTTP/1.1" 200'
    assert "s3cret" not in record.getMessage()

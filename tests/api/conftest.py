"""Fixtures of the API tests: a recording fake backend, a metrics recorder, a client, a live session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from server.api import create_app
from server.metrics import Metrics
from tests.api.api_fakes import AUTH, FakeBackend, make_settings, session_body


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def client(backend: FakeBackend, metrics: Metrics) -> Iterator[TestClient]:
    with TestClient(create_app(backend, make_settings(), metrics)) as test_client:
        yield test_client


@pytest.fixture
def session_id(client: TestClient) -> str:
    response = client.post("/v1/sessions", json=session_body(), headers=AUTH)
    assert response.status_code == 201, response.text
    return response.json()["id"]

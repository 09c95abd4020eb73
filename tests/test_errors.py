"""graph/errors.py: every error body is one short line in one shape; an unexpected exception becomes a clean 500."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from graph import errors
from graph.errors import APIError, one_line


@pytest.fixture(scope="module")
def client():
    app = FastAPI()
    errors.install(app)

    @app.get("/boom")
    async def boom():
        raise RuntimeError('failed reading "/home/ray/models/unet.safetensors" from 10.1.2.3:9000\nTraceback ...')

    @app.get("/long")
    async def long():
        raise APIError(422, "invalid_value", "prompt " + "x" * 5000 + "\nsecond line", "prompt")

    @app.get("/store-down")
    async def store_down():
        from lora_registry.errors import RegistryUnavailableError

        raise RegistryUnavailableError(
            "S3 upload s3://bucket/jobs/app/x.json failed: Could not connect to http://10.1.2.3:9000/",
            code="store_unreachable",
        )

    return TestClient(app, raise_server_exceptions=False)


def test_an_unexpected_exception_is_a_one_line_500_with_the_request_id(client):
    r = client.get("/boom", headers={"x-request-id": "req-42<script>\r"})
    assert r.status_code == 500 and len(r.content) < 500
    body = r.json()
    assert body == {
        "error": {
            "code": "internal_error",
            "message": "internal error (request id req-42script); the server log has the details",
            "field": None,
        }
    }
    for leak in ("Traceback", "/home", "10.1.2.3", "safetensors"):
        assert leak not in r.text


def test_messages_are_one_line_and_bounded(client):
    r = client.get("/long")
    message = r.json()["error"]["message"]
    assert r.status_code == 422 and "\n" not in message and len(message) == errors.MAX_MESSAGE_CHARS
    assert message.endswith("…")


@pytest.mark.parametrize(
    "text, out",
    [("a\nb\t c", "a b c"), ("x" * 10, "x" * 10), ("y" * 12, "y" * 9 + "…")],
)
def test_one_line(text, out):
    assert one_line(text, limit=10) == out


def test_a_store_outage_answers_503_without_the_stores_address(client):
    r = client.get("/store-down")
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json()["error"] == {
        "code": "store_unreachable",
        "message": "the server's storage (adapter registry, job records) is unavailable; retry later",
        "field": None,
    }
    for leak in ("s3://", "10.1.2.3", "bucket"):
        assert leak not in r.text

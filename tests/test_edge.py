"""The ingress's edge, in-process (the real app, fake graph): inputs that once gave 500s, limits checked
before any work (body caps, prompt length, the admin token before an upload is read), and HTTP hygiene
(security headers, CSP, HEAD, OpenAPI's bearer scheme, internal ids hidden)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json

import pytest

from ingress_helpers import ADMIN, app_config, error_of, is_error_shape, make_ingress, png_bytes

MB = 1 << 20
CHUNK = 64 * 1024


@pytest.fixture(scope="module")
def served(tmp_path_factory, cache_dir):
    mp = pytest.MonkeyPatch()
    client, ingress = make_ingress(app_config(tmp_path_factory.mktemp("edge"), cache_dir), mp)
    yield client, ingress
    mp.undo()


@pytest.fixture
def client(served):
    return served[0]


def post_json(client, path, text: str):
    return client.post(
        path, content=text.encode("utf-8", "surrogatepass"), headers={"content-type": "application/json"}
    )


# -- inputs that gave 500s or the wrong shape (issue 16, D2 and D7) -----------------------------------

PNG = base64.b64encode(png_bytes(64, 64)).decode()
SURROGATE = '"\\ud800"'  # a lone surrogate, as JSON carries it


@pytest.mark.parametrize(
    "path, extra",
    [
        ("/v1/generate", ""),
        ("/v1/images/generations", ""),
        ("/v1/img2img", f', "image": "{PNG}"'),
        ("/v1/inpaint", f', "image": "{PNG}", "mask": "{PNG}"'),
        ("/v1/jobs", ""),
        ("/sdapi/v1/txt2img", ""),
        ("/sdapi/v1/img2img", f', "init_images": ["{PNG}"]'),
    ],
)
def test_a_lone_surrogate_in_negative_prompt_is_a_422_on_every_route(client, path, extra):
    r = post_json(client, path, '{"prompt": "a boat", "negative_prompt": ' + SURROGATE + extra + "}")
    assert r.status_code == 422, r.text
    message = "negative_prompt is not valid Unicode text: a lone surrogate at character 0"
    assert r.json()["error"] == error_of(path, "invalid_value", message, "negative_prompt")


def test_a_lone_surrogate_in_an_ignored_a1111_field_is_a_422(client):
    r = post_json(client, "/sdapi/v1/txt2img", '{"prompt": "a boat", "steps": 2, "styles": [' + SURROGATE + "]}")
    assert r.status_code == 422 and r.json()["error"]["field"] == "styles", r.text


@pytest.mark.parametrize("size", ["²x64", "64x²", "６４x６４", "64x６４"])
def test_openai_sizes_take_ascii_digits_only(client, size):
    r = client.post("/v1/images/generations", json={"prompt": "a boat", "size": size})
    assert r.status_code == 422 and r.json()["error"]["param"] == "size", r.text
    assert r.json()["error"]["code"] == "invalid_value"


@pytest.mark.parametrize("model", ["tiny-sd:x@0", "tiny-sd:x@²", "tiny-sd:x@６"])
def test_openai_model_versions_take_ascii_digits_only(client, model):
    r = client.post("/v1/images/generations", json={"prompt": "a boat", "model": model})
    assert r.status_code == 422 and r.json()["error"]["param"] == "model", r.text


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_an_adapter_ref_with_a_superscript_version_is_a_422(client, method):
    r = client.request(method, "/v1/adapters/name@%C2%B2", headers=ADMIN)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_ref", r.text


def test_a_deeply_nested_adapter_config_is_a_422(client):
    deep = "[" * 100_000 + "]" * 100_000
    r = client.post(
        "/v1/adapters",
        headers=ADMIN,
        files={"file": ("a.safetensors", b"x" * 16)},
        data={"name": "a", "adapter_config": deep},
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"] == {
        "code": "invalid_value",
        "message": "adapter_config is 200000 characters; the limit is 65536",
        "field": "adapter_config",
    }
    nested = "[" * 5000 + "]" * 5000  # within the length limit, too deep for the parser
    r = client.post(
        "/v1/adapters",
        headers=ADMIN,
        files={"file": ("a.safetensors", b"x" * 16)},
        data={"name": "a", "adapter_config": nested},
    )
    assert r.status_code == 422 and r.json()["error"]["message"] == "adapter_config is nested too deeply", r.text


@pytest.mark.parametrize(
    "body, message",
    [
        ("[" * 100_000 + "]" * 100_000, "request body is not valid JSON: it is nested too deeply"),
        (
            '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}",
            "request body is not valid JSON: it is nested too deeply",
        ),
        ('{"prompt": "a",', "request body is not valid JSON: JSON decode error"),
    ],
)
def test_unparsable_json_is_invalid_json(client, body, message):
    r = post_json(client, "/v1/generate", body)
    assert r.status_code == 400 and r.json()["error"] == {"code": "invalid_json", "message": message, "field": None}


def test_bytes_that_are_not_utf8_are_invalid_json(client):
    r = client.post("/v1/generate", content=b'{"prompt": "\xff"}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text


@pytest.mark.parametrize("route, field", [("/v1/img2img", "image"), ("/sdapi/v1/img2img", "init_images")])
def test_image_messages_name_the_field_once(client, route, field):
    small = base64.b64encode(png_bytes(8, 8)).decode()
    r = client.post(route, json={"prompt": "a boat", field: [small] if field == "init_images" else small})
    message = r.json()["error"]["message"]
    assert r.status_code == 422 and message.startswith(f"{field} is 8x8: its width"), message
    assert f"{field} {field}" not in message and "image image" not in message


# -- limits before work ---------------------------------------------------------------------------------


def call_asgi(app, method: str, path: str, headers: dict, chunks, root_path: str = ""):
    """Drive the ASGI app with a body streamed from ``chunks`` (a generator: nothing big in memory).

    Returns ``(status, response headers, body, bytes the app pulled)``: what the server really read.
    """

    async def run():
        pulled = 0
        source = iter(chunks)
        done = False
        response = {"status": None, "headers": {}, "body": b""}

        async def receive():
            nonlocal pulled, done
            if done:
                await asyncio.Event().wait()  # the client has nothing more to send; wait to be cancelled
            chunk = next(source, None)
            if chunk is None:
                done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            pulled += len(chunk)
            return {"type": "http.request", "body": chunk, "more_body": True}

        async def send(message):
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                response["headers"] = {k.decode().lower(): v.decode() for k, v in message["headers"]}
            elif message["type"] == "http.response.body":
                response["body"] += message.get("body", b"")

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": root_path + path,
            "raw_path": (root_path + path).encode(),
            "root_path": root_path,
            "query_string": b"",
            "headers": [(k.lower().encode(), str(v).encode()) for k, v in headers.items()],
            "client": ("127.0.0.1", 1234),
            "server": ("127.0.0.1", 8000),
        }
        await app(scope, receive, send)
        return response["status"], response["headers"], response["body"], pulled

    return asyncio.run(run())


def zeros(total: int, chunk: int = CHUNK):
    """``total`` bytes of upload, made as they are sent."""
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        sent += n
        yield b"\0" * n


PROMPT_HEAD, PROMPT_TAIL = b'{"steps": 2, "width": 64, "height": 64, "prompt": "', b'"}'


def prompt_body(prompt_bytes: int, chunk: int = CHUNK):
    """``{"prompt": "aaaa...", "steps": 2}`` with a prompt of ``prompt_bytes`` bytes, made as it is sent."""
    yield PROMPT_HEAD
    yield from (part.replace(b"\0", b"a") for part in zeros(prompt_bytes, chunk))
    yield PROMPT_TAIL


@pytest.fixture
def tokenizer_calls(monkeypatch):
    """How often the planner tokenized a prompt (graph.planning's tokenize_chunks)."""
    from graph import planning

    calls = []
    real = planning.tokenize_chunks

    def counted(tokenizer, text, *args, **kwargs):
        calls.append(len(text))
        return real(tokenizer, text, *args, **kwargs)

    monkeypatch.setattr(planning, "tokenize_chunks", counted)
    return calls


def app():
    from graph.ingress import app

    return app


def test_a_declared_oversized_body_is_refused_unread(served, tokenizer_calls):
    _, ingress = served
    size = 5_000_000
    status, headers, body, pulled = call_asgi(
        app(),
        "POST",
        "/v1/generate",
        {"content-type": "application/json", "content-length": size + 60},
        prompt_body(size),
    )
    assert status == 413 and pulled == 0
    assert json.loads(body)["error"] == {
        "code": "body_too_large",
        "message": "request body is larger than 1048576 bytes, the limit for POST /v1/generate (limits.max_body_bytes)",
        "field": None,
    }
    assert headers["x-content-type-options"] == "nosniff"
    assert tokenizer_calls == [] and ingress.graph.plans == []


def test_caps_apply_under_a_route_prefix(served):
    """An app deployed at a route prefix (``serve.run(..., route_prefix="/failures")``): the same caps."""
    status, _, body, pulled = call_asgi(
        app(), "POST", "/v1/generate", {"content-length": 5_000_000}, prompt_body(5_000_000), root_path="/failures"
    )
    assert (status, pulled) == (413, 0)
    assert "the limit for POST /v1/generate (limits.max_body_bytes)" in json.loads(body)["error"]["message"]


def test_a_chunked_body_is_refused_once_it_passes_the_cap(served, tokenizer_calls):
    _, ingress = served
    plans_before = len(ingress.graph.plans)
    status, _, body, pulled = call_asgi(
        app(), "POST", "/v1/generate", {"content-type": "application/json"}, prompt_body(5_000_000)
    )
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    assert 1 * MB < pulled <= 1 * MB + CHUNK + 64  # read up to the cap and one chunk, no further
    assert tokenizer_calls == [] and len(ingress.graph.plans) == plans_before


def test_a_5mb_prompt_under_a_larger_body_cap_is_refused_before_tokenizing(tmp_path, cache_dir, tokenizer_calls):
    mp = pytest.MonkeyPatch()
    try:
        config = app_config(tmp_path, cache_dir, limits={"max_body_bytes": 8 * MB})
        client, ingress = make_ingress(config, mp)
        status, _, body, pulled = call_asgi(
            app(), "POST", "/v1/generate", {"content-type": "application/json"}, prompt_body(5 * MB)
        )
        assert status == 422 and pulled == 5 * MB + len(PROMPT_HEAD + PROMPT_TAIL)
        assert json.loads(body)["error"] == {
            "code": "prompt_too_long",
            "message": f"prompt is {5 * MB} characters; the limit is 8192 (limits.max_prompt_chars)",
            "field": "prompt",
        }
        assert tokenizer_calls == [] and ingress.graph.plans == []
        # The same route tokenizes an ordinary prompt (the spy sees the planner's calls).
        assert (
            client.post("/v1/generate", json={"prompt": "a boat", "steps": 2, "width": 64, "height": 64}).status_code
            == 200
        )
        assert tokenizer_calls == [6, 0] and len(ingress.graph.plans) == 1
    finally:
        mp.undo()


@pytest.mark.parametrize(
    "prompt, field, message",
    [
        ("a" * 8193, "prompt", "prompt is 8193 characters; the limit is 8192 (limits.max_prompt_chars)"),
        ("€" * 8000, "prompt", "prompt is 24000 bytes in UTF-8; the limit is 16384 (limits.max_prompt_bytes)"),
    ],
)
def test_prompt_length_in_characters_and_bytes(tmp_path, cache_dir, tokenizer_calls, prompt, field, message):
    mp = pytest.MonkeyPatch()
    try:
        client, _ = make_ingress(app_config(tmp_path, cache_dir, limits={"max_prompt_bytes": 16384}), mp)
        for negative in (False, True):
            body = {"prompt": "a boat", "negative_prompt": prompt} if negative else {"prompt": prompt}
            r = client.post("/v1/images/generations", json=body)
            name = "negative_prompt" if negative else field
            assert r.status_code == 422, r.text
            assert r.json()["error"] == error_of(
                "/v1/images/generations", "prompt_too_long", message.replace("prompt", name, 1), name
            )
        assert tokenizer_calls == []
    finally:
        mp.undo()


UPLOAD_HEADERS = {"content-type": "multipart/form-data; boundary=xyz"}


def upload_body(file_bytes: int):
    """A well-formed multipart upload (name + a file of ``file_bytes`` zeros), made as it is sent."""
    yield b'--xyz\r\ncontent-disposition: form-data; name="name"\r\n\r\nbig\r\n'
    yield b'--xyz\r\ncontent-disposition: form-data; name="file"; filename="big.safetensors"\r\n\r\n'
    yield from zeros(file_bytes)
    yield b"\r\n--xyz--\r\n"


@pytest.mark.parametrize(
    "auth, status, code",
    [({}, 401, "unauthorized"), ({"authorization": "Bearer wrong"}, 403, "forbidden")],
)
@pytest.mark.parametrize("declared", [True, False])
def test_an_upload_without_the_admin_token_is_refused_unread(served, auth, status, code, declared):
    size = 200_000_000
    headers = {**UPLOAD_HEADERS, **auth, **({"content-length": size} if declared else {})}
    got, _, body, pulled = call_asgi(app(), "POST", "/v1/adapters", headers, upload_body(size))
    assert (got, json.loads(body)["error"]["code"], pulled) == (status, code, 0)


def test_an_upload_is_capped_while_it_streams(tmp_path, cache_dir):
    mp = pytest.MonkeyPatch()
    try:
        make_ingress(app_config(tmp_path, cache_dir, limits={"max_upload_bytes": 2 * MB}), mp)
        headers = {**UPLOAD_HEADERS, "authorization": ADMIN["Authorization"]}
        status, _, body, pulled = call_asgi(app(), "POST", "/v1/adapters", headers, upload_body(200_000_000))
        assert status == 413 and 2 * MB < pulled <= 2 * MB + CHUNK
        assert json.loads(body)["error"]["message"] == (
            "request body is larger than 2097152 bytes, the limit for POST /v1/adapters (limits.max_upload_bytes)"
        )
    finally:
        mp.undo()


def test_body_caps_per_route(served):
    _, ingress = served
    policy = ingress.edge
    assert policy.body_limit("POST", "/v1/generate") == (1_048_576, "limits.max_body_bytes")
    assert policy.body_limit("POST", "/sdapi/v1/txt2img") == (1_048_576, "limits.max_body_bytes")
    for route in ("/v1/img2img", "/v1/inpaint", "/v1/jobs", "/sdapi/v1/img2img"):
        assert policy.body_limit("POST", route) == (48_000_000, "limits.max_image_body_bytes")
    # No served model has ip_adapter here: the text-to-image routes carry no style image.
    assert policy.style_images is False
    style = dataclasses.replace(policy, style_images=True)
    for route in ("/v1/generate", "/sdapi/v1/txt2img", "/v1/images/generations"):
        assert style.body_limit("POST", route) == (48_000_000, "limits.max_image_body_bytes")
    assert style.body_limit("GET", "/v1/models") == (1_048_576, "limits.max_body_bytes")
    # The default upload cap: the registry's adapter cap and 1 MiB for the form's other fields.
    assert policy.body_limit("POST", "/v1/adapters") == ((512 << 20) + MB, "limits.max_upload_bytes")


def test_an_image_route_cap_too_small_for_its_images_is_a_config_error():
    from graph.config import AppConfig, ConfigError

    with pytest.raises(
        ConfigError, match="limits: Value error, max_image_body_bytes \\(20000000\\) must be >= 40065544"
    ):
        AppConfig.load({"limits": {"max_image_body_bytes": 20_000_000}})


# -- HTTP hygiene --------------------------------------------------------------------------------------

API_CSP = "default-src 'none'; frame-ancestors 'none'"


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/healthz", 200),
        ("POST", "/v1/generate", 422),
        ("GET", "/v1/nowhere", 404),
        ("DELETE", "/v1/adapters/x", 401),
        ("GET", "/v1/models", 200),
    ],
)
def test_security_headers_on_api_responses(client, method, path, status):
    r = client.request(method, path, json={} if method == "POST" else None)
    assert r.status_code == status
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["content-security-policy"] == API_CSP


def test_an_unexpected_error_is_a_500_with_the_headers(served, monkeypatch):
    client, ingress = served

    async def boom(plan):
        raise RuntimeError("at /home/ray/x.py from 10.0.0.1")

    monkeypatch.setattr(ingress.graph, "run", boom)
    r = client.post("/v1/generate", json={"prompt": "a boat", "steps": 2, "width": 64, "height": 64})
    assert r.status_code == 500 and is_error_shape(r.json()) and "10.0.0.1" not in r.text
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["content-security-policy"] == API_CSP


def test_the_page_gets_a_csp_that_allows_only_itself(client):
    from graph.edge import PAGE_CSP

    for path in ("/", "/static/app.js", "/static/style.css"):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-security-policy"] == PAGE_CSP
        assert r.headers["x-frame-options"] == "DENY"
    assert (
        "default-src 'self'" in PAGE_CSP and "'unsafe-inline'" not in PAGE_CSP and "frame-ancestors 'none'" in PAGE_CSP
    )


def test_the_page_runs_under_its_csp(client):
    """No inline script or style, no handler attribute, nothing from another origin: what the CSP forbids."""
    import re

    html = client.get("/").text
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, flags=re.S)
    assert scripts, html[:200]
    for attrs, content in scripts:
        # Only external scripts of this origin (relative to the page, so it works under a route prefix), and the
        # JSON config block (data: never executed).
        assert ('src="static/' in attrs and not content.strip()) or 'type="application/json"' in attrs, attrs
    assert "<style" not in html and not re.search(r"\sstyle=", html)
    assert not re.search(r"\son[a-z]+=", html)
    assert not re.search(r"(src|href)=\"(https?:)?//", html)


def test_docs_pages_keep_working_without_the_page_csp(client):
    r = client.get("/docs")
    assert r.status_code == 200 and "content-security-policy" not in r.headers
    assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path, status", [("/healthz", 200), ("/readyz", 503)])
def test_head_on_health_routes(client, path, status):
    r = client.head(path)
    assert r.status_code == status and r.content == b""
    assert r.headers["x-content-type-options"] == "nosniff"


def test_openapi_declares_the_bearer_scheme_on_admin_routes(client):
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["adminToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "The admin token (admin.token or $LORAFLEET_ADMIN_TOKEN).",
    }
    secured = {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if op.get("security") == [{"adminToken": []}]
    }
    assert secured == {
        ("POST", "/v1/adapters"),
        ("GET", "/v1/adapters"),
        ("GET", "/v1/adapters/{ref}"),
        ("DELETE", "/v1/adapters/{ref}"),
        ("POST", "/v1/admin/keys"),
        ("GET", "/v1/admin/keys"),
        ("PATCH", "/v1/admin/keys/{name}"),
        ("DELETE", "/v1/admin/keys/{name}"),
    }


def test_internal_uris_are_for_admins_only(client):
    public = client.get("/v1/models").json()["data"][0]
    assert "uri" not in public and public["id"] == "tiny-sd"
    assert client.get("/v1/models", headers=ADMIN).json()["data"][0]["uri"] == "builtin:tiny-sd"
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).json()["data"][0].keys() == public.keys()
    assert client.get("/sdapi/v1/sd-models").json()[0]["filename"] == "tiny-sd"
    assert client.get("/sdapi/v1/sd-models", headers=ADMIN).json()[0]["filename"] == "builtin:tiny-sd"


def test_traces_name_replicas_by_alias_for_non_admins(served, monkeypatch):
    from dataclasses import replace

    from deployments.messages import Trace
    from graph.ingress import replica_alias

    client, ingress = served
    real = ingress.graph.run

    async def traced(plan):
        return replace(await real(plan), trace=Trace(denoiser_replica="abc123", denoiser_adapter_loads=2))

    monkeypatch.setattr(ingress.graph, "run", traced)
    body = {"prompt": "a boat", "steps": 2, "width": 64, "height": 64}
    public = client.post("/v1/generate", json=body).json()["trace"]
    assert public == {"denoiser_replica": replica_alias("abc123"), "denoiser_adapter_loads": 2}
    assert public["denoiser_replica"].startswith("r-") and "abc123" not in public["denoiser_replica"]
    assert replica_alias("abc124") != public["denoiser_replica"]
    assert client.post("/v1/generate", json=body, headers=ADMIN).json()["trace"]["denoiser_replica"] == "abc123"


class _Counter:
    def __init__(self):
        self.calls = []

    def inc(self, value=1.0, tags=None):
        self.calls.append((value, tags))

    def observe(self, value, tags=None):
        self.calls.append((value, tags))


def test_every_outcome_is_counted_by_route_and_status(served, monkeypatch):
    """lorafleet_requests_total: answers, refusals before the route (413, 401) and unhandled exceptions (500)."""
    from types import SimpleNamespace

    from graph import ingress as ingress_module

    client, ingress = served
    fake = SimpleNamespace(
        requests=_Counter(), request_latency=_Counter(), request_body_bytes=_Counter(), registry_ops=_Counter()
    )
    monkeypatch.setattr(ingress_module, "metrics", lambda: fake)

    async def boom(plan):
        raise RuntimeError("unexpected")

    body = {"prompt": "a boat", "steps": 2, "width": 64, "height": 64}
    assert client.post("/v1/generate", json=body).status_code == 200
    assert client.post("/v1/generate", json={"steps": 2}).status_code == 422
    assert client.post("/v1/adapters", content=b"x" * 10).status_code == 401
    assert client.post("/v1/generate", content=b"x" * (2 * MB)).status_code == 413
    monkeypatch.setattr(ingress.graph, "run", boom)
    assert client.post("/v1/generate", json=body).status_code == 500
    assert [tags for _, tags in fake.requests.calls] == [
        {"route": "/v1/generate", "status": "200", "model": "tiny-sd"},
        {"route": "/v1/generate", "status": "422", "model": "-"},  # refused before a model was picked
        {"route": "/v1/adapters", "status": "401", "model": "-"},
        {"route": "/v1/generate", "status": "413", "model": "-"},
        {"route": "/v1/generate", "status": "500", "model": "tiny-sd"},
    ]
    assert [tags["route"] for _, tags in fake.request_latency.calls] == ["/v1/generate"]  # successes only

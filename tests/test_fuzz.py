"""Property-based fuzzing of every route, in-process (the real ingress app, fake graph): whatever the
request, never a 5xx, and every 4xx in the documented shape ``{"error": {"code", "message", "field"}}``.
Deterministic (``derandomize``): the same examples on every run and machine."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_bodies import ADAPTER_FORMS, JSON_ROUTES, NASTY_TEXT, json_payloads, url_part
from ingress_helpers import ADMIN, app_config, is_error_shape, make_ingress

FUZZ = settings(
    max_examples=200,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def client(tmp_path_factory, cache_dir):
    mp = pytest.MonkeyPatch()
    client, _ = make_ingress(app_config(tmp_path_factory.mktemp("fuzz"), cache_dir), mp)
    yield client
    mp.undo()


def check(r) -> None:
    """No 5xx; a 4xx is one line in the documented shape, with the security headers."""
    assert r.status_code < 500, (r.status_code, r.text[:300])
    assert r.headers.get("x-content-type-options") == "nosniff"
    if r.status_code >= 400 and r.request.method != "HEAD":
        assert is_error_shape(r.json(), openai=r.request.url.path.startswith("/v1/images/")), r.text[:300]
        assert len(r.content) < 1000


@pytest.mark.parametrize("route", JSON_ROUTES, ids=lambda r: r.path)
def test_json_routes_never_5xx(client, route):
    @FUZZ
    @given(body=json_payloads(route), content_type=st.sampled_from(["application/json", "text/plain", None]))
    def run(body, content_type):
        headers = {"content-type": content_type} if content_type else {}
        check(client.post(route.path, content=body, headers=headers))

    run()


@FUZZ
@given(ref=NASTY_TEXT, method=st.sampled_from(["GET", "DELETE"]), admin=st.booleans())
def test_adapter_refs_never_5xx(client, ref, method, admin):
    check(client.request(method, "/v1/adapters/" + url_part(ref), headers=ADMIN if admin else {}))


@FUZZ
@given(
    params=st.dictionaries(st.sampled_from(["tag", "limit", "after", "x"]), NASTY_TEXT.map(url_part), max_size=3),
    admin=st.booleans(),
)
def test_adapter_listing_never_5xx(client, params, admin):
    query = "&".join(f"{k}={v}" for k, v in params.items())
    check(client.get("/v1/adapters?" + query, headers=ADMIN if admin else {}))


@FUZZ
@given(job_id=NASTY_TEXT, previews=NASTY_TEXT, method=st.sampled_from(["GET", "DELETE", "EVENTS"]))
def test_job_routes_never_5xx(client, job_id, previews, method):
    path = "/v1/jobs/" + url_part(job_id)
    if method == "EVENTS":
        check(client.get(path + "/events?previews=" + url_part(previews)))
    else:
        check(client.request(method, path))


@FUZZ
@given(form=ADAPTER_FORMS, file=st.binary(max_size=256) | st.none(), admin=st.booleans())
def test_adapter_uploads_never_5xx(client, form, file, admin):
    files = {"file": ("lora.safetensors", file)} if file is not None else None
    check(client.post("/v1/adapters", data=form, files=files, headers=ADMIN if admin else {}))


@FUZZ
@given(path=NASTY_TEXT.map(url_part), method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]))
def test_any_path_never_5xx(client, path, method):
    for prefix in ("/", "/static/", "/v1/", "/sdapi/v1/"):
        check(client.request(method, prefix + path))


# -- the parsers of text fields, directly: every digit of every script, many examples ---------------

DIGITS = st.characters(categories=["Nd", "No", "Nl"]) | st.sampled_from("0123456789")
NUMBERS = st.text(DIGITS, min_size=1, max_size=3)
PARSER = settings(max_examples=1000, derandomize=True, database=None, deadline=None)


@PARSER
@given(
    size=st.tuples(NUMBERS, st.sampled_from(["x", "X", "", "xx"]), NUMBERS).map("".join) | st.text(DIGITS, max_size=6)
)
def test_openai_size_is_ascii_digits_or_a_422(size):
    from graph.errors import APIError
    from graph.openai_images import parse_size

    try:
        width, height = parse_size(size)
    except APIError as e:
        assert (e.status, e.field) == (422, "size")
        return
    w, _, h = size.lower().partition("x")
    assert (width, height) == (int(w), int(h)) and (w + h).isascii()


@PARSER
@given(version=NUMBERS | st.just(""), name=st.sampled_from(["x", "", "ink"]))
def test_openai_model_versions_are_ascii_numbers_or_a_422(version, name):
    from graph.errors import APIError
    from graph.openai_images import parse_openai_model

    try:
        _, loras = parse_openai_model(f"tiny-sd:{name}@{version}")
    except APIError as e:
        assert (e.status, e.field) == (422, "model")
        return
    assert loras[0].version is None if version == "" else str(loras[0].version) == version


@PARSER
@given(
    ref=st.tuples(
        st.sampled_from(["ink", "a.b", "ink\n", "Ink", "²", ""]), st.sampled_from(["@", "", "@@"]), NUMBERS
    ).map("".join)
)
def test_adapter_refs_parse_or_raise_invalid_adapter(ref):
    from lora_registry.errors import InvalidAdapterError
    from lora_registry.manifest import parse_ref

    try:
        name, version = parse_ref(ref)
    except InvalidAdapterError:
        return
    assert ref.isascii() and "\n" not in ref and ref == (name if version is None else f"{name}@{version}")

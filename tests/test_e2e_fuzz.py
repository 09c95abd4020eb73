"""Property-based fuzzing over real HTTP, through Ray Serve's proxy and the whole graph: never a 5xx, every
4xx in the documented shape. Bounded for CI (a few dozen examples per route, derandomized); bodies that
pass validation are cheap to run (2 steps, 64 pixels, one image). The wide search is in-process
(tests/test_fuzz.py)."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_bodies import ADAPTER_FORMS, JSON_ROUTES, NASTY_TEXT, json_payloads, url_part
from ingress_helpers import is_error_shape

pytestmark = pytest.mark.e2e

OVER_HTTP = settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


def check(r) -> None:
    assert r.status_code < 500, (r.request.method, r.request.url, r.status_code, r.text[:300])
    if r.status_code >= 400 and r.request.method != "HEAD":
        openai = urlparse(r.request.url).path.startswith("/v1/images/")
        assert is_error_shape(r.json(), openai=openai), r.text[:300]
        assert len(r.content) < 1000 and r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("route", JSON_ROUTES, ids=lambda r: r.path)
def test_json_routes_never_5xx_over_http(cluster, route):
    @OVER_HTTP
    @given(body=json_payloads(route, cheap=True))
    def run(body):
        check(
            requests.post(
                cluster.url + route.path, data=body, headers={"content-type": "application/json"}, timeout=120
            )
        )

    run()


@OVER_HTTP
@given(ref=NASTY_TEXT, method=st.sampled_from(["GET", "DELETE"]), admin=st.booleans())
def test_adapter_refs_never_5xx_over_http(cluster, ref, method, admin):
    headers = cluster.admin if admin else {}
    if method == "DELETE":
        ref = "fuzz-" + ref  # never one of the session's real adapters
    check(requests.request(method, cluster.url + "/v1/adapters/" + url_part(ref), headers=headers, timeout=60))


@OVER_HTTP
@given(form=ADAPTER_FORMS, file=st.binary(max_size=256) | st.none(), admin=st.booleans())
def test_adapter_uploads_never_5xx_over_http(cluster, form, file, admin):
    files = {"file": ("lora.safetensors", file)} if file is not None else None
    check(
        requests.post(
            cluster.url + "/v1/adapters", data=form, files=files, headers=cluster.admin if admin else {}, timeout=60
        )
    )


@OVER_HTTP
@given(job_id=NASTY_TEXT, method=st.sampled_from(["GET", "DELETE"]))
def test_job_ids_never_5xx_over_http(cluster, job_id, method):
    check(requests.request(method, cluster.url + "/v1/jobs/" + url_part(job_id), timeout=60))

"""The edge through Ray Serve's proxy and real HTTP: a forced 500 is counted in
ray_lorafleet_requests_total and the shipped dashboard's error panel reads that series; an upload without
the admin token is refused before the ingress reads a byte of it; body caps, headers and HEAD."""

from __future__ import annotations

import json
import re
import select
import socket
from urllib.parse import urlparse

import pytest
import requests

from conftest import ROOT

pytestmark = pytest.mark.e2e
BOOM = "/boom"


@pytest.fixture(scope="module")
def boom_url(cluster):
    """A one-route app on the same Serve instance, with lorafleet's own edge (``install_edge``: the error
    handlers and the request metric of the real ingress) and a route that raises an unexpected exception."""
    from fastapi import FastAPI
    from ray import serve

    from graph.ingress import install_edge

    boom_app = FastAPI()
    install_edge(boom_app, lambda: None)

    @serve.deployment(name="Boom", ray_actor_options={"num_cpus": 0})
    @serve.ingress(boom_app)
    class Boom:
        @boom_app.get("/explode")
        async def explode(self):
            raise RuntimeError("failed reading /home/ray/secret.safetensors from 10.1.2.3")

    serve.run(Boom.bind(), name="boom", route_prefix=BOOM)
    yield cluster.url + BOOM
    serve.delete("boom")


def error_panel_expr() -> str:
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    panels = [p for row in dashboard["panels"] for p in [row, *row.get("panels", [])]]
    (panel,) = [p for p in panels if p.get("title", "").lower().startswith("error ratio")]
    (target,) = [t for t in panel["targets"] if "5.." in t["expr"]]  # the other one is the 503 share
    return target["expr"]


def selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """``name{label op "value", ...}`` selectors of a PromQL expression: [(name, {label: (op, value)})]."""
    out = []
    for name, body in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr):
        matchers = {k: (op, v) for k, op, v in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', body)}
        out.append((name, matchers))
    for name in re.findall(r"rate\(([a-zA-Z_:][a-zA-Z0-9_:]*)\[", expr):
        out.append((name, {}))
    return out


def matches(matchers: dict[str, tuple[str, str]], labels: dict[str, str]) -> bool:
    for key, (op, value) in matchers.items():
        have = labels.get(key, "")
        ok = {
            "=": have == value,
            "!=": have != value,
            "=~": re.fullmatch(value, have) is not None,  # PromQL regexes are anchored
            "!~": re.fullmatch(value, have) is None,
        }[op]
        if not ok:
            return False
    return True


def test_a_forced_500_is_counted_and_the_dashboard_error_panel_reads_it(cluster, boom_url):
    from test_e2e_metrics import scrape, total, wait_for

    before = total(scrape(cluster), "ray_lorafleet_requests", "_total", route="/explode", status="500")
    for _ in range(3):
        r = requests.get(boom_url + "/explode", timeout=30)
        assert r.status_code == 500 and len(r.content) < 500
        assert r.json()["error"]["code"] == "internal_error"
        assert "10.1.2.3" not in r.text and "/home" not in r.text and "Traceback" not in r.text
        assert r.headers["x-content-type-options"] == "nosniff"
    families = wait_for(
        cluster, lambda f: total(f, "ray_lorafleet_requests", "_total", route="/explode", status="500") >= before + 3
    )
    assert total(families, "ray_lorafleet_requests", "_total", route="/explode", status="500") == before + 3

    # The shipped dashboard's error-ratio panel: its numerator selects this series, its denominator all.
    expr = error_panel_expr()
    (numerator, num_matchers), (denominator, den_matchers) = selectors(expr)
    samples = [s for s in families["ray_lorafleet_requests"] if s.name == numerator]
    assert numerator == denominator == "ray_lorafleet_requests_total" and den_matchers == {}
    selected = [s for s in samples if matches(num_matchers, s.labels)]
    assert any(s.labels == {**s.labels, "route": "/explode", "status": "500"} for s in selected), expr
    assert sum(s.value for s in selected if s.labels.get("route") == "/explode") == before + 3
    for status, is_error in (("500", True), ("503", True), ("200", False), ("422", False), ("413", False)):
        assert matches(num_matchers, {"status": status}) is is_error, (status, expr)


def raw_upload(url: str, headers: dict[str, str], total_bytes: int, chunk: int = 1 << 20) -> tuple[int, int, bytes]:
    """POST ``total_bytes`` of multipart upload over a raw socket, chunk by chunk, stopping as soon as
    the server answers (a client library would keep sending, then fail on the closed connection).
    Returns (status, bytes sent before the answer came, the answer's body)."""
    parsed = urlparse(url)
    sock = socket.create_connection((parsed.hostname, parsed.port), timeout=60)
    head = [f"POST {parsed.path} HTTP/1.1", f"Host: {parsed.hostname}:{parsed.port}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    sent = 0
    payload = b"\0" * chunk
    try:
        while sent < total_bytes:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            sock.sendall(payload[: min(chunk, total_bytes - sent)])
            sent += min(chunk, total_bytes - sent)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):  # the server answered and stopped reading
        pass
    answer = b""
    try:
        while chunk_in := sock.recv(65536):
            answer += chunk_in
    except (ConnectionResetError, TimeoutError):
        pass
    sock.close()
    status_line, _, rest = answer.partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), sent, body


def test_an_upload_without_the_token_is_refused_before_the_ingress_reads_it(cluster, tiny, tmp_path):
    from test_e2e_metrics import scrape, total, wait_for

    size = 200_000_000
    read_before = total(scrape(cluster), "ray_lorafleet_request_body_bytes", "_total", route="/v1/adapters")
    headers = {"Content-Type": "multipart/form-data; boundary=xyz", "Content-Length": str(size)}
    status, sent, body = raw_upload(cluster.url + "/v1/adapters", headers, size)
    assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized"
    assert sent < size  # the answer came while the client was still sending
    # Then an upload the ingress does read: an authorized one of known size (an invalid file: 422). Metric
    # updates arrive in order, so once its bytes show, the refused upload's would have too.
    form = b'--xyz\r\ncontent-disposition: form-data; name="name"\r\n\r\nnot-a-lora\r\n'
    form += b'--xyz\r\ncontent-disposition: form-data; name="file"; filename="x.safetensors"\r\n\r\n'
    form += b"\0" * 4096 + b"\r\n--xyz--\r\n"
    r = requests.post(
        cluster.url + "/v1/adapters",
        data=form,
        headers={"Content-Type": "multipart/form-data; boundary=xyz", **cluster.admin},
        timeout=60,
    )
    assert r.status_code == 422, r.text
    families = wait_for(
        cluster,
        lambda f: (
            total(f, "ray_lorafleet_request_body_bytes", "_total", route="/v1/adapters") >= read_before + len(form)
        ),
    )
    assert total(families, "ray_lorafleet_request_body_bytes", "_total", route="/v1/adapters") == read_before + len(
        form
    )


def test_body_caps_and_headers_over_http(cluster):
    big = b'{"prompt": "' + b"a" * (2 << 20) + b'"}'
    r = requests.post(cluster.url + "/v1/generate", data=big, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413, r.text[:300]
    assert r.json()["error"] == {
        "code": "body_too_large",
        "message": "request body is larger than 1048576 bytes, the limit for POST /v1/generate (limits.max_body_bytes)",
        "field": None,
    }
    r = requests.post(
        cluster.url + "/v1/generate", json={"prompt": "a" * 9000, "steps": 2, "width": 64, "height": 64}, timeout=60
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "prompt_too_long"
    for method, path in (("HEAD", "/healthz"), ("HEAD", "/readyz"), ("GET", "/v1/models"), ("GET", "/")):
        r = requests.request(method, cluster.url + path, timeout=30)
        assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff", (method, path)
        assert (
            r.headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in r.headers["content-security-policy"]
        )
    assert "uri" not in requests.get(cluster.url + "/v1/models", timeout=30).json()["data"][0]

"""Tenant keys and quotas (graph/auth.py, lora_registry/keys.py): the token bucket on an injected clock, the
key store on a local directory and on S3 (moto), the identity precedence, and the ingress's 401 / 429 answers
in-process (graph/ingress.py over FastAPI's TestClient; the graph is a fake)."""

from __future__ import annotations

import json

import pytest
from starlette.requests import Request

from graph.auth import Tenant, TenantGate, TokenBucket
from graph.config import AuthConfig, QuotaConfig
from graph.errors import APIError
from graph.planning import tenant_of
from lora_registry.keys import KeyStore, KeyStoreError, key_hash

from ingress_helpers import ADMIN, app_config, is_error_shape, make_ingress
from registry_helpers import store_keys

pytest_plugins = ["registry_helpers"]


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- token bucket ----------------------------------------------------------------------------


def test_token_bucket_spends_its_burst_then_refills_at_the_rate():
    clock = Clock()
    bucket = TokenBucket(2.0, 3, clock)
    assert [bucket.take() for _ in range(3)] == [None, None, None]
    assert bucket.take() == pytest.approx(0.5)  # empty: one token in 1/rate
    clock.now += 0.25
    assert bucket.take() == pytest.approx(0.25)  # half a token saved
    clock.now += 0.25
    assert bucket.take() is None
    clock.now += 100.0  # a long idle: capped at the burst
    assert [bucket.take() for _ in range(4)] == [None, None, None, pytest.approx(0.5)]


# -- key store -------------------------------------------------------------------------------


def test_key_store_creates_lists_revokes_and_keeps_only_hashes(adapter_store):
    keys = KeyStore(adapter_store, clock=lambda: 1234.0)
    raw, record = keys.create("alice", weight=2.0, quota={"rate_per_s": 5, "max_images_in_flight": 2})
    assert raw.startswith("lf_") and len(raw) > 40
    assert record.sha256 == key_hash(raw) and record.name == "alice" and record.weight == 2.0
    assert record.quota == {"rate_per_s": 5.0, "max_images_in_flight": 2}
    assert store_keys(adapter_store) == [f"keys/{key_hash(raw)}.json"]
    stored = adapter_store.get_bytes(f"keys/{key_hash(raw)}.json")
    assert raw.encode() not in stored and raw[3:].encode() not in stored  # the key itself is never stored
    assert keys.lookup(raw) == record
    assert keys.lookup(raw + "x") is None
    raw_b, _ = keys.create("bob")
    assert [r.public()["name"] for r in keys.list()] == ["alice", "bob"]
    assert "sha256" not in keys.list()[0].public() and keys.list()[0].public()["id"] == record.id
    with pytest.raises(KeyStoreError, match="already exists") as e:
        keys.create("alice")
    assert e.value.code == "key_exists"
    changed = keys.set("alice", weight=4.0, quota={"rate_per_s": None, "burst": 7})
    assert (changed.weight, changed.quota) == (4.0, {"max_images_in_flight": 2, "burst": 7})
    assert keys.lookup(raw).quota == {"max_images_in_flight": 2, "burst": 7}
    revoked = keys.revoke("alice")
    assert revoked.revoked and keys.lookup(raw).revoked and not keys.lookup(raw_b).revoked
    keys.create("alice")  # the name is free again once its key is revoked
    with pytest.raises(KeyStoreError) as e:
        keys.revoke("nobody")
    assert e.value.code == "key_not_found"


@pytest.mark.parametrize(
    "name, weight, quota, message",
    [
        ("", 1.0, {}, "key name must be 1-64"),
        ("a b", 1.0, {}, "key name must be 1-64"),
        ("a", 0, {}, "weight must be a number in (0, 1000]"),
        ("a", 1.0, {"rate": 1}, "unknown quota field 'rate'"),
        ("a", 1.0, {"burst": 1.5}, "quota burst must be a whole number"),
        ("a", 1.0, {"rate_per_s": -1}, "quota rate_per_s must be a positive number"),
    ],
)
def test_key_store_refuses_bad_names_weights_and_quotas(tmp_path, name, weight, quota, message):
    from lora_registry.stores.local import LocalStore

    with pytest.raises(KeyStoreError, match=message.replace("(", r"\(").replace("]", r"\]")):
        KeyStore(LocalStore(tmp_path)).create(name, weight, quota)


# -- identity --------------------------------------------------------------------------------


def http_request(headers: dict[str, str], client: str = "10.0.0.7") -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "headers": raw, "client": (client, 5)})


def _h(secret: str) -> str:
    import hashlib

    return hashlib.sha256(secret.encode()).hexdigest()[:12]


@pytest.mark.parametrize(
    "headers, user, expected",
    [
        ({"Authorization": "Bearer k1"}, "ann", f"key:{_h('k1')}"),  # the key wins over user
        ({"Authorization": "Basic dTpw"}, "ann", f"basic:{_h('dTpw')}"),  # A1111's credentials
        ({}, "ann", "user:ann"),
        ({"Authorization": "Bearer "}, "ann", "user:ann"),  # an empty key is no key
        ({}, None, "addr:10.0.0.7"),
        ({"X-Forwarded-For": "1.2.3.4"}, None, "addr:10.0.0.7"),  # headers other than the key change nothing
    ],
)
def test_identity_precedence(headers, user, expected):
    assert tenant_of(http_request(headers), user) == expected


def test_a1111_callers_and_tenants_are_one_identity():
    from graph.a1111_options import caller_of

    for headers in ({"Authorization": "Bearer k1"}, {"Authorization": "Basic dTpw"}, {}):
        assert caller_of(http_request(headers)) == tenant_of(http_request(headers), None)


def test_gate_quotas_key_record_over_config_over_default_and_rereads_after_the_ttl(tmp_path):
    from lora_registry.stores.local import LocalStore

    keys = KeyStore(LocalStore(tmp_path))
    raw, _ = keys.create("alice", quota={"burst": 1})
    config = AuthConfig(
        require_keys=True,
        default_quota=QuotaConfig(rate_per_s=1.0, max_images_in_flight=8),
        quotas={"alice": QuotaConfig(rate_per_s=2.0, burst=5)},
        key_cache_ttl_s=5.0,
    )
    clock = Clock()
    gate = TenantGate(config, keys, clock=clock)
    tenant = gate.identify(http_request({"Authorization": f"Bearer {raw}"}), "mallory")
    assert tenant.id == "key:alice" and tenant.quota == QuotaConfig(rate_per_s=2.0, burst=1, max_images_in_flight=8)
    keys.set("alice", weight=3.0, quota={"max_images_in_flight": 1})
    clock.now += 4.9  # within the TTL: the cached record
    assert gate.identify(http_request({"Authorization": f"Bearer {raw}"}), None).weight == 1.0
    clock.now += 0.2
    tenant = gate.identify(http_request({"Authorization": f"Bearer {raw}"}), None)
    assert (tenant.weight, tenant.quota.max_images_in_flight) == (3.0, 1)


def test_images_in_flight_hold_and_release():
    gate = TenantGate(AuthConfig(), None)
    alice = Tenant("key:alice", "alice", 1.0, QuotaConfig(max_images_in_flight=3))
    gate.hold(alice, 2)
    with pytest.raises(APIError) as e:
        gate.hold(alice, 2)
    assert (e.value.status, e.value.headers) == (429, {"Retry-After": "1"})
    assert e.value.message == "images in flight limit: 3 for key 'alice' (2 generating, 2 asked)"
    assert gate.in_flight == {"key:alice": 2}
    gate.hold(alice, 1)
    gate.release(alice, 3)
    assert gate.in_flight == {}


# -- the ingress, in-process -----------------------------------------------------------------


@pytest.fixture
def keyed(tmp_path, cache_dir, monkeypatch):
    config = app_config(
        tmp_path,
        cache_dir,
        auth={"require_keys": True, "default_quota": {"rate_per_s": 2.0, "burst": 2}, "key_cache_ttl_s": 5.0},
    )
    client, ingress = make_ingress(config, monkeypatch)
    clock = Clock()
    ingress.gate.clock = clock
    return client, ingress, clock


def create_key(client, name: str, **fields) -> str:
    r = client.post("/v1/admin/keys", json={"name": name, **fields}, headers=ADMIN)
    assert r.status_code == 201, r.text
    body = r.json()
    assert set(body) == {"key", "id", "name", "weight", "quota", "created", "revoked"}
    return body["key"]


GENERATE = {"prompt": "a red fox", "steps": 2, "width": 64, "height": 64}


def test_keys_required_401_for_missing_malformed_unknown_and_revoked_keys(keyed):
    client, ingress, clock = keyed
    raw = create_key(client, "alice")
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Basic dTpw"}, {"Authorization": "Bearer x"}):
        r = client.post("/v1/generate", json=GENERATE, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (headers, r.text)
        assert is_error_shape(r.json()) and r.json()["error"]["code"] == "unauthorized"
    assert ingress.graph.plans == []
    r = client.post("/v1/generate", json=GENERATE, headers={"Authorization": f"Bearer {raw}"})
    assert r.status_code == 200, r.text
    assert ingress.graph.plans[-1].tenant == "key:alice"
    listed = client.get("/v1/admin/keys", headers=ADMIN).json()["data"]
    assert [(k["name"], k["revoked"]) for k in listed] == [("alice", False)] and raw not in json.dumps(listed)
    r = client.delete("/v1/admin/keys/alice", headers=ADMIN)
    assert r.status_code == 200 and r.json()["revoked"] is True
    clock.now += 5.0  # the ingress re-reads the record after auth.key_cache_ttl_s
    r = client.post("/v1/generate", json=GENERATE, headers={"Authorization": f"Bearer {raw}"})
    assert r.status_code == 401 and r.json()["error"]["message"] == f"API key '{listed[0]['id']}' was revoked"
    assert raw not in r.text


def test_admin_keys_routes_need_the_admin_token(keyed):
    client, _, _ = keyed
    assert client.get("/v1/admin/keys").status_code == 401
    assert client.post("/v1/admin/keys", json={"name": "a"}, headers={"Authorization": "Bearer no"}).status_code == 403
    assert client.post("/v1/admin/keys", json={"name": "a b"}, headers=ADMIN).status_code == 422
    create_key(client, "a")
    r = client.post("/v1/admin/keys", json={"name": "a"}, headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"]["code"] == "key_exists"
    assert client.delete("/v1/admin/keys/zz", headers=ADMIN).status_code == 404


def test_over_the_rate_429_with_retry_after_naming_the_limit_and_a_quota_change_applies(keyed):
    client, ingress, clock = keyed
    raw = create_key(client, "alice")
    headers = {"Authorization": f"Bearer {raw}"}
    assert [client.post("/v1/generate", json=GENERATE, headers=headers).status_code for _ in range(2)] == [200, 200]
    r = client.post("/v1/generate", json=GENERATE, headers=headers)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"] == {
        "code": "rate_limited",
        "message": "rate limit: 2 requests/s for key 'alice'",
        "field": None,
    }
    clock.now += 0.5
    assert client.post("/v1/generate", json=GENERATE, headers=headers).status_code == 200
    r = client.patch("/v1/admin/keys/alice", json={"quota": {"rate_per_s": 0.1, "burst": 1}}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["quota"] == {"rate_per_s": 0.1, "burst": 1}
    clock.now += 5.0
    assert client.post("/v1/generate", json=GENERATE, headers=headers).status_code == 200
    r = client.post("/v1/generate", json=GENERATE, headers=headers)
    assert r.status_code == 429 and r.headers["retry-after"] == "10"
    assert r.json()["error"]["message"] == "rate limit: 0.1 requests/s for key 'alice'"


def test_images_in_flight_limit_and_release_on_errors(keyed):
    client, ingress, clock = keyed
    raw = create_key(client, "alice", quota={"max_images_in_flight": 2, "rate_per_s": 100, "burst": 100})
    headers = {"Authorization": f"Bearer {raw}"}
    assert client.post("/v1/generate", json={**GENERATE, "num_images": 2}, headers=headers).status_code == 200
    assert ingress.gate.in_flight == {}  # released after the run
    alice = ingress.gate.admitted("key:alice")
    ingress.gate.hold(alice, 1)  # another of alice's images generating
    r = client.post("/v1/generate", json={**GENERATE, "num_images": 2}, headers=headers)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["message"] == "images in flight limit: 2 for key 'alice' (1 generating, 2 asked)"
    assert client.post("/v1/generate", json=GENERATE, headers=headers).status_code == 200
    ingress.gate.release(alice, 1)

    async def failing(plan, **_):
        raise RuntimeError("the denoiser fell over")

    ingress.graph.inner.run = failing
    assert client.post("/v1/generate", json=GENERATE, headers=headers).status_code == 500
    assert ingress.gate.in_flight == {}


def test_no_request_field_raises_weight_or_quota(keyed):
    client, ingress, clock = keyed
    raw = create_key(client, "alice", weight=1.0, quota={"rate_per_s": 100, "burst": 100})
    headers = {"Authorization": f"Bearer {raw}", "X-Tenant": "admin", "X-Forwarded-For": "127.0.0.1"}
    calls = [
        ("/v1/generate", {**GENERATE, "user": "admin"}),
        ("/v1/jobs", {**GENERATE, "user": "admin"}),
        ("/v1/images/generations", {"prompt": "p", "size": "64x64", "user": "admin", "safety_identifier": "admin"}),
        (
            "/sdapi/v1/txt2img",
            {"prompt": "p", "steps": 2, "width": 64, "height": 64, "user": "admin",
             "override_settings": {"tenant": "admin", "weight": 100}},
        ),
    ]  # fmt: skip
    for path, body in calls:
        r = client.post(path, json=body, headers=headers)
        assert r.status_code in (200, 202), (path, r.text)
    tenants = [p.tenant for p in ingress.graph.plans] + [p.tenant for p in ingress.jobs.submitted]
    assert tenants == ["key:alice"] * 4
    assert ingress.gate.admitted("key:alice").weight == 1.0
    assert ingress.gate.admitted("key:alice").quota.rate_per_s == 100


def test_without_require_keys_generation_stays_open(tmp_path, cache_dir, monkeypatch):
    client, ingress = make_ingress(app_config(tmp_path, cache_dir), monkeypatch)
    assert client.post("/v1/generate", json={**GENERATE, "user": "ann"}).status_code == 200
    assert client.post("/v1/generate", json=GENERATE, headers={"Authorization": "Bearer k1"}).status_code == 200
    assert [p.tenant for p in ingress.graph.plans] == ["user:ann", f"key:{_h('k1')}"]


def test_a_user_field_outside_ascii_is_a_tenant_and_an_ascii_metric_label(tmp_path, cache_dir, monkeypatch):
    """Ray's metric tags are ASCII: a ``user`` of any Unicode (here U+10000, a surrogate pair in JSON) is the
    tenant ``user:<it>`` on the plan, and its metric label is ``user:sha256-<prefix>`` (was a 500)."""
    from deployments.metrics import safe_label

    client, ingress = make_ingress(app_config(tmp_path, cache_dir), monkeypatch)
    r = client.post(
        "/v1/generate",
        content=b'{"prompt": "a boat", "steps": 2, "width": 64, "height": 64, "user": "\\ud800\\udc00"}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 200, r.text
    assert [p.tenant for p in ingress.graph.plans] == ["user:\U00010000"]
    label = safe_label("user:\U00010000")
    assert label.startswith("user:sha256-") and label.isascii() and safe_label("user:ann") == "user:ann"


def test_keys_cli_create_list_set_revoke(tmp_path, capsys):
    from graph.cli import main

    registry = ["--registry", str(tmp_path / "reg"), "--json"]
    assert main(["keys", "create", "alice", "--weight", "2", "--rate", "3", *registry]) == 0
    created = json.loads(capsys.readouterr().out)
    assert (created["name"], created["weight"], created["quota"]) == ("alice", 2.0, {"rate_per_s": 3.0})
    keys = KeyStore(__import__("lora_registry.stores.local", fromlist=["LocalStore"]).LocalStore(tmp_path / "reg"))
    assert keys.lookup(created["key"]).name == "alice"
    assert main(["keys", "set", "alice", "--max-images-in-flight", "4", *registry]) == 0
    assert json.loads(capsys.readouterr().out)["quota"] == {"rate_per_s": 3.0, "max_images_in_flight": 4}
    assert main(["keys", "list", *registry]) == 0
    listed = capsys.readouterr().out
    assert created["key"] not in listed and [k["name"] for k in json.loads(listed)] == ["alice"]
    assert main(["keys", "revoke", created["id"], *registry]) == 0
    assert json.loads(capsys.readouterr().out)["revoked"] is True
    assert main(["keys", "create", "bad name", *registry]) == 2
    assert "key name must be 1-64" in capsys.readouterr().err


def test_a_stream_over_its_images_in_flight_gets_429_before_the_stream_starts(keyed):
    client, ingress, _ = keyed
    raw = create_key(client, "alice", quota={"max_images_in_flight": 1, "rate_per_s": 100, "burst": 100})
    ingress.gate.hold(ingress.gate.admitted("key:alice"), 1)
    body = {"prompt": "p", "size": "64x64", "stream": True, "partial_images": 1}
    r = client.post("/v1/images/generations", json=body, headers={"Authorization": f"Bearer {raw}"})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["message"] == "images in flight limit: 1 for key 'alice' (1 generating, 1 asked)"


def test_a_keys_weight_reaches_the_denoisers_fair_queue_and_an_admin_change_follows(keyed):
    client, ingress, clock = keyed
    raw = create_key(client, "alice", weight=3.0)
    headers = {"Authorization": f"Bearer {raw}"}
    assert client.post("/v1/generate", json={**GENERATE, "user": "bob"}, headers=headers).status_code == 200
    assert client.post("/v1/jobs", json=GENERATE, headers=headers).status_code == 202
    plans = [ingress.graph.plans[-1], ingress.jobs.submitted[-1]]
    assert [(p.tenant, p.tenant_weight, p.denoise_params().tenant_weight) for p in plans] == [
        ("key:alice", 3.0, 3.0)
    ] * 2
    assert client.patch("/v1/admin/keys/alice", json={"weight": 0.5}, headers=ADMIN).json()["weight"] == 0.5
    clock.now += 5.0
    assert client.post("/v1/generate", json=GENERATE, headers=headers).status_code == 200
    assert ingress.graph.plans[-1].denoise_params().tenant_weight == 0.5


def test_without_keys_the_plan_carries_no_weight(tmp_path, cache_dir, monkeypatch):
    client, ingress = make_ingress(app_config(tmp_path, cache_dir), monkeypatch)
    assert client.post("/v1/generate", json={**GENERATE, "user": "ann"}).status_code == 200
    assert ingress.graph.plans[-1].denoise_params().tenant_weight is None  # denoiser.tenant_weights decides


def test_fair_queue_takes_a_weight_with_a_push():
    from deployments.engine.fair_queue import FairQueue

    q = FairQueue({"key:b": 1.0})
    for k in range(4):
        q.push("key:a", f"a{k}", cost=1.0, weight=3.0)  # the key's weight beats the config's default
        q.push("key:b", f"b{k}", cost=1.0)
    assert q.weight("key:a") == 3.0
    # Finish times a: 1/3, 2/3, 1, 4/3; b: 1, 2, ... (ties by arrival): 3 of a's for each of b's (weight 1: a0 b0 a1 b1)
    assert [q.pop() for _ in range(5)] == ["a0", "a1", "b0", "a2", "a3"]
    with pytest.raises(ValueError, match="tenant weight must be > 0"):
        q.push("key:a", "x", cost=1.0, weight=0.0)


def test_a_cancelled_run_releases_its_images():
    """A client that goes away: Serve cancels the route's task, and the run's images are released."""
    import asyncio
    from types import SimpleNamespace

    from graph.auth import GatedGraph

    gate = TenantGate(AuthConfig(default_quota=QuotaConfig(max_images_in_flight=4)), None)
    started = asyncio.Event()

    class Blocked:
        async def run(self, plan, **_):
            started.set()
            await asyncio.Event().wait()  # never answers

    async def scenario():
        graph = GatedGraph(Blocked(), gate)
        task = asyncio.create_task(graph.run(SimpleNamespace(tenant="user:ann", num_images=3)))
        await started.wait()
        assert gate.in_flight == {"user:ann": 3}
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert gate.in_flight == {}

    asyncio.run(scenario())


def test_a_job_holds_its_images_until_its_event_stream_ends():
    import asyncio
    from types import SimpleNamespace

    from graph import auth
    from graph.auth import held_job

    class Stream:
        def __init__(self, ended):
            self.ended = ended

        def __aiter__(self):
            return self

        async def __anext__(self):
            await self.ended.wait()  # the job's last event: the stream ends
            raise StopAsyncIteration

        def cancel(self):
            pass

    class Jobs:
        def __init__(self):
            self.ended = asyncio.Event()
            self.followed = []

        def options(self, stream):
            return self

        @property
        def events(self):
            return SimpleNamespace(remote=lambda job_id, *_: self.followed.append(job_id) or Stream(self.ended))

    async def created():
        return SimpleNamespace(body=b'{"id": "j1"}')

    async def scenario():
        limited = TenantGate(AuthConfig(default_quota=QuotaConfig(max_images_in_flight=2)), None)
        jobs = Jobs()
        plan = SimpleNamespace(tenant="user:ann", num_images=2)
        await held_job(limited, jobs, plan, created)
        assert limited.in_flight == {"user:ann": 2}
        with pytest.raises(APIError):
            await held_job(limited, jobs, SimpleNamespace(tenant="user:ann", num_images=1), created)
        jobs.ended.set()
        await asyncio.gather(*auth._waiting)
        assert limited.in_flight == {} and jobs.followed == ["j1"]

        unlimited, other = TenantGate(AuthConfig(), None), Jobs()
        await held_job(unlimited, other, plan, created)
        assert unlimited.in_flight == {} and other.followed == [] and not auth._waiting

    asyncio.run(scenario())

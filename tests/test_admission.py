"""Admission control (graph/admission.py): the policy with an injected clock, the ingress's gate around a fake
graph, and the in-process HTTP ingress's 503. Nothing sleeps: waits are futures the test releases."""

from __future__ import annotations

import asyncio
import math

import pytest

from graph.admission import Admission, ModelAdmission, Overloaded, Throughput
from graph.config import AdmissionConfig
from graph.errors import APIError


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def config(**fields) -> AdmissionConfig:
    return AdmissionConfig(enabled=True, **fields)


def run(coro):
    return asyncio.run(coro)


def measured(images: float, busy_s: float, half_life_s: float = 30.0) -> float:
    """The rate ``Throughput`` reports for ``images`` completed at the end of one busy period of ``busy_s``."""
    tau = half_life_s / math.log(2)
    return images / (tau * (1 - math.exp(-busy_s / tau)))


# -- the measured throughput --------------------------------------------------------------------


def test_throughput_is_images_per_busy_second_and_idle_time_does_not_count():
    clock = Clock()
    t = Throughput(30.0, clock)
    assert t.rate() is None
    t.busy(True)
    clock.now = 4.0
    t.completed(8)
    assert t.rate() == pytest.approx(measured(8, 4.0)) and 2.0 < t.rate() < 2.2
    t.busy(False)
    clock.now = 34.0  # idle for a half-life: neither faster nor slower
    assert t.rate() == pytest.approx(measured(8, 4.0))
    t.busy(True)
    clock.now = 38.0
    t.completed(4)  # slower now: 1 image/s. Both periods count, the older at half its weight (then decayed 4 s)
    tau = 30.0 / math.log(2)
    d = math.exp(-4.0 / tau)
    images = 8 * 0.5 * d + 4
    busy_s = tau * (1 - d) * 0.5 * d + tau * (1 - d)
    assert t.rate() == pytest.approx(images / busy_s)
    assert 1.0 < t.rate() < 2.0


def test_capacity_is_measured_throughput_times_target_queue_with_a_floor():
    clock = Clock()
    m = ModelAdmission(config(target_queue_s=5.0, min_images_in_flight=4), clock=clock)
    assert m.capacity() == 4  # cold: the floor
    ticket = m.enter("a", 2)
    clock.now = 1.0
    m.leave(ticket, completed=True)  # 2 images in 1 busy second: 2.02/s as measured (a decayed average)
    assert m.capacity() == math.floor(measured(2, 1.0) * 5.0) == 10
    fixed = ModelAdmission(config(max_images_in_flight=3), clock=clock)
    assert fixed.capacity() == 3


# -- the decision -------------------------------------------------------------------------------


def test_under_capacity_everyone_is_admitted_at_once():
    m = ModelAdmission(config(max_images_in_flight=8), clock=Clock())
    tickets = [m.enter("heavy", 2), m.enter("heavy", 2), m.enter("light", 1), m.enter("heavy", 3)]
    assert [t.granted for t in tickets] == [True] * 4
    assert m.in_flight == {"heavy": 7, "light": 1}


def test_past_capacity_over_its_share_is_refused_within_it_waits():
    async def scenario():
        m = ModelAdmission(config(max_images_in_flight=4), clock=Clock())
        for _ in range(4):
            assert m.enter("heavy", 1).granted
        # heavy holds 4 of 4: alone, its share is all 4, and past capacity 4 + 1 > 4 is refused.
        with pytest.raises(Overloaded) as refused:
            m.enter("heavy", 1)
        assert (refused.value.held, refused.value.images, refused.value.share, refused.value.capacity) == (4, 1, 4, 4)
        # light has nothing: admitted, and it waits (past capacity).
        light = m.enter("light", 1)
        assert not light.granted and m.queued == {"light": 1}
        # Now two tenants have work: heavy's share is 2 of 4; light's 2, and it holds 1: a second one waits too.
        light2 = m.enter("light", 1)
        assert not light2.granted and m.queued == {"light": 2}
        with pytest.raises(Overloaded):
            m.enter("light", 1)  # 2 + 1 > 2
        return m

    run(scenario())


def test_a_tenants_first_request_is_admitted_even_if_larger_than_its_share():
    async def scenario():
        m = ModelAdmission(config(max_images_in_flight=4), clock=Clock())
        m.enter("heavy", 4)
        big = m.enter("light", 4)  # share 2, but it holds nothing
        assert not big.granted

    run(scenario())


def test_weights_from_keys_over_configured_weights_over_one():
    async def scenario():
        m = ModelAdmission(config(max_images_in_flight=12), {"gold": 3.0}, clock=Clock())
        m.enter("plain", 6)
        m.enter("gold", 6)
        # Shares among plain (1) and gold (3): 3 and 9 of 12. Both hold 6 and capacity is reached.
        assert m.share("plain", 12) == 3 and m.share("gold", 12) == 9
        with pytest.raises(Overloaded):
            m.enter("plain", 1)
        assert not m.enter("gold", 1).granted  # 7 <= 9: waits
        # A key's weight (Tenant.weight) wins over denoiser.tenant_weights: plain's key says 5.
        assert not m.enter("plain", 1, weight=5.0).granted
        assert m.weight("plain") == 5.0 and m.weight("gold") == 3.0 and m.weight("nobody") == 1.0

    run(scenario())


def test_retry_after_from_the_measured_throughput():
    async def scenario():
        clock = Clock()
        m = ModelAdmission(config(max_images_in_flight=4, target_queue_s=5.0), clock=clock)
        ticket = m.enter("heavy", 4)
        with pytest.raises(Overloaded) as cold:
            m.enter("heavy", 1)
        assert cold.value.retry_after_s == 5  # nothing measured yet: target_queue_s
        # 4 images done in 2 busy seconds: 2 images/s.
        clock.now = 2.0
        m.leave(ticket, completed=True)
        assert m.throughput.rate() == pytest.approx(measured(4, 2.0))
        for _ in range(4):
            m.enter("heavy", 1)
        m.enter("light", 1)  # waits; heavy's share is now 2 of 4
        with pytest.raises(Overloaded) as refused:
            m.enter("heavy", 2)
        # heavy is 4 + 2 - 2 = 4 images over its share, served at half of 2.05 images/s: 3.9 s, so 4.
        assert 4 / (measured(4, 2.0) / 2) == pytest.approx(3.91, abs=0.01)
        assert refused.value.retry_after_s == 4
        error = refused.value.api_error()
        assert error.status == 503 and error.code == "overloaded" and error.headers == {"Retry-After": "4"}
        assert error.message == (
            "overloaded: your requests hold 4 images in flight or waiting and this one asks 2, past your fair "
            "share of 2 of the 4 the server takes now; retry after 4 s"
        )

    run(scenario())


def test_retry_after_is_at_least_one_and_capped():
    clock = Clock()
    m = ModelAdmission(config(max_images_in_flight=1, max_retry_after_s=7, target_queue_s=9.0), clock=clock)
    assert m.retry_after_s("a", 0.001, 1) == 7  # nothing measured: target_queue_s, capped
    m.throughput.busy(True)
    clock.now = 1.0
    m.throughput.completed(1000)
    assert m.retry_after_s("a", 0.001, 1) == 1
    assert m.retry_after_s("a", 1e9, 1) == 7


# -- the fair wait --------------------------------------------------------------------------------


def test_waiters_are_released_in_weighted_fair_order_as_images_complete():
    async def scenario():
        m = ModelAdmission(config(max_images_in_flight=6), {"b": 2.0}, clock=Clock())
        running = [m.enter("x", 1) for _ in range(6)]  # under capacity: all granted
        assert all(t.granted for t in running)
        # Past capacity: a (weight 1) and b (weight 2) are within their shares, so they wait; FIFO would be
        # a1 a2 b1 b2 b3. Finish tags (cost 1 / weight, from virtual time 0): a 1, 2; b 0.5, 1, 1.5.
        a1, a2 = m.enter("a", 1), m.enter("a", 1)
        b1, b2, b3 = m.enter("b", 1), m.enter("b", 1), m.enter("b", 1)
        with pytest.raises(Overloaded):
            m.enter("a", 1)  # a holds 2, and its share is now 6 * 1/4 = 1.5
        waiters = {"a1": a1, "a2": a2, "b1": b1, "b2": b2, "b3": b3}
        assert {name: m.position(t)[0] for name, t in waiters.items()} == {"b1": 0, "a1": 1, "b2": 2, "b3": 3, "a2": 4}
        released = []
        for done in running[:5]:  # one image completes at a time: one waiter goes in
            m.leave(done, completed=True)
            released += [name for name, t in waiters.items() if t.granted and name not in released]
        assert released == ["b1", "a1", "b2", "b3", "a2"]
        assert m.in_flight == {"x": 1, "a": 2, "b": 3} and m.queued == {} and len(m.waiting) == 0

    run(scenario())


def test_a_heavy_backlog_does_not_delay_a_light_tenant():
    async def scenario():
        m = ModelAdmission(config(max_images_in_flight=4), clock=Clock())
        running = [m.enter("heavy", 1) for _ in range(4)]
        # Tenants with work: heavy alone until light comes; heavy over its share is refused before it queues.
        with pytest.raises(Overloaded):
            m.enter("heavy", 1)
        light = m.enter("light", 1)
        assert m.position(light)[0] == 0
        m.leave(running[0], completed=True)
        assert light.granted  # the first image to complete makes room for it

    run(scenario())


def test_a_waiter_that_goes_away_leaves_the_queue():
    async def scenario():
        a = Admission(config(max_images_in_flight=1), clock=Clock())
        first = await a.admit("m", "x", 1)
        waiter = asyncio.ensure_future(a.admit("m", "y", 1))
        await asyncio.sleep(0)
        assert a.model("m").queued == {"y": 1}
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert a.model("m").queued == {} and a.model("m").in_flight == {"x": 1}
        a.leave(first, completed=True)
        assert a.model("m").in_flight == {}

    run(scenario())


def test_position_and_eta():
    async def scenario():
        clock = Clock()
        m = ModelAdmission(config(max_images_in_flight=2), clock=clock)
        t = m.enter("a", 2)
        clock.now = 1.0
        m.leave(t, completed=True)  # 2 images/s
        m.enter("a", 2)
        w1 = m.enter("b", 1)
        w2 = m.enter("c", 1)
        rate = measured(2, 1.0)
        assert m.position(w1) == (0, pytest.approx(1 / rate))  # 2 in flight + 1 - 2 = 1 image to complete first
        assert m.position(w2) == (1, pytest.approx(2 / rate))

    run(scenario())


def test_off_admits_everything_and_holds_nothing():
    async def scenario():
        a = Admission(AdmissionConfig(max_images_in_flight=1))
        assert await a.admit("m", "x", 5) is None
        a.check("m", "x", 5)
        assert a.hold("m", "x", 5) is None
        assert a.models == {}

    run(scenario())


def test_refusal_is_a_503_counted_for_the_tenant():
    class Metrics:
        def __init__(self):
            self.calls = []

        def request(self, tenant, outcome):
            self.calls.append((tenant, outcome))

        def queue_wait(self, tenant, stage, ms):
            self.calls.append((tenant, stage, ms))

        def admission(self, model, capacity, in_flight, waiting):
            self.calls.append((model, capacity, in_flight, waiting))

    async def scenario():
        metrics = Metrics()
        a = Admission(config(max_images_in_flight=1), clock=Clock(), metrics=metrics)
        await a.admit("m", "x", 1)
        with pytest.raises(APIError) as refused:
            await a.admit("m", "x", 1)
        assert refused.value.status == 503 and refused.value.headers["Retry-After"] == "5"
        assert metrics.calls == [("x", "admission", 0.0), ("m", 1, 1, 0), ("x", "overloaded")]

    run(scenario())


# -- the ingress: every generation path is admitted -----------------------------------------------------


def _overloaded_ingress(tmp_path, cache_dir, monkeypatch, flood: str = "user:flood"):
    from ingress_helpers import app_config, make_ingress

    config = app_config(tmp_path, cache_dir, admission={"enabled": True, "max_images_in_flight": 2})
    client, ingress = make_ingress(config, monkeypatch)
    model = ingress.admission.model(ingress.models.default.name)
    held = [model.enter(flood, 1), model.enter(flood, 1)]  # its requests still running
    return client, ingress, model, held


@pytest.mark.parametrize(
    "path, body, flood",
    [
        ("/v1/generate", {"prompt": "a fox", "steps": 2, "user": "flood"}, "user:flood"),
        ("/v1/images/generations", {"prompt": "a fox", "user": "flood"}, "user:flood"),
        ("/sdapi/v1/txt2img", {"prompt": "a fox", "steps": 2}, "addr:testclient"),  # A1111: the client address
        ("/v1/jobs", {"prompt": "a fox", "steps": 2, "user": "flood"}, "user:flood"),
    ],
)
def test_a_flooding_tenant_gets_503_overloaded_on_every_path(tmp_path, cache_dir, monkeypatch, path, body, flood):
    client, ingress, model, held = _overloaded_ingress(tmp_path, cache_dir, monkeypatch, flood)
    r = client.post(path, json=body)
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"] == "5"  # nothing measured yet: admission.target_queue_s
    text = r.text
    assert "overloaded" in text and "fair share of 2 of the 2" in text
    assert "flood" not in text and "testclient" not in text  # no tenant id, key or address
    assert ingress.graph.inner.plans == [] and ingress.jobs.submitted == []  # nothing reached the graph
    assert model.in_flight == {flood: 2} and model.queued == {}


def test_a_light_tenant_is_admitted_and_a_job_holds_its_images_until_it_ends(tmp_path, cache_dir, monkeypatch):
    client, ingress, model, held = _overloaded_ingress(tmp_path, cache_dir, monkeypatch)
    model.leave(held.pop(), completed=True)  # room for one image
    r = client.post("/v1/generate", json={"prompt": "a fox", "steps": 2, "user": "light"})
    assert r.status_code == 200, r.text
    r = client.post("/v1/jobs", json={"prompt": "a fox", "steps": 2, "user": "light"})
    assert r.status_code == 202, r.text
    # The fake Jobs handle has no event stream: the job counts as ended at once, and its images leave.
    assert model.in_flight == {"user:flood": 1} and model.queued == {}


# -- the stages' queue waits ---------------------------------------------------------------------------


def test_a_batchers_queue_wait_is_from_submit_to_its_batch_start():
    from deployments.engine.fair_batcher import FairBatcher

    async def scenario():
        clock = Clock()
        gate = asyncio.Event()
        batches = []

        async def batch_fn(items):
            batches.append(items)
            if len(batches) == 1:
                await gate.wait()
            return [x.upper() for x in items]

        batcher = FairBatcher(batch_fn, 1, 0.0, clock=clock)
        first = asyncio.ensure_future(batcher.submit_timed("heavy", "a"))
        for _ in range(5):
            await asyncio.sleep(0)
        assert batches == [["a"]]
        clock.now = 1.0
        second = asyncio.ensure_future(batcher.submit_timed("light", "b"))
        for _ in range(5):
            await asyncio.sleep(0)
        clock.now = 3.5  # the first batch ends; the second starts now
        gate.set()
        assert await first == ("A", 0.0)
        assert await second == ("B", 2500.0)
        batcher.close()

    run(scenario())


def test_the_stages_waits_are_observed_per_tenant():
    from deployments.messages import DecodedImages
    from graph.auth import TenantMetrics

    observed = []
    metrics = TenantMetrics.__new__(TenantMetrics)
    metrics.queue_wait = lambda tenant, stage, ms: observed.append((tenant, stage, ms))
    result = DecodedImages((b"x",), 40.0, 7.0, 100.0, 30.0, encode_wait_ms=12.0, decode_wait_ms=3.0)
    metrics.stage_waits("key:ann", result)
    assert observed == [("key:ann", "encode", 12.0), ("key:ann", "denoise", 7.0), ("key:ann", "decode", 3.0)]

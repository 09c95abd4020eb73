"""Tenant isolation end to end (issue 21, item 4, at CI scale): a light tenant below its fair share, barely
touched by a flooding tenant, through real Ray Serve and HTTP (the session's app, one replica per stage).

Nothing here reads a clock. The Denoiser is held (``HeldDenoiser``: its batch full of two long jobs) while the
tenants' requests queue, so what each request finds is a fixed state, not a race; the light tenant's latency
is counted in a unit no machine speed changes: **the other tenants' images completed between its submission
and its completion** (the Jobs replica records each job's end, in order).

The bound, from the weighted-fair policy (``deployments/engine/fair_queue.py``). Alone, the light request
queues behind the held batch and nothing of anyone else's completes before it: count 0. Under the flood, the
flooder has its whole queue waiting (``denoiser.max_queued_images``, 8 in the e2e config) when the light
request arrives; both tenants weigh 1 and every request is the same work (cost c), so the flooder's waiting
images carry finish tags V + c, V + 2c, ... and the light one V + c: it ranks second, behind the flooder's
first image only (``FairQueue.position``, which the job reports as its ``position``). On release the waiting
images are admitted in that order, ``max_rows_per_tick / rows per image`` (8 / 2 = 4, guidance doubles the
rows) at a time, so the light image is in the first batch and at most the other 3 images of that batch can
complete before it. The check is the issue's "p95 at most 2x alone" in that unit:

    count under the flood <= 2 x count alone + (the batch it joins - 1) = 2 x 0 + 3

First come, first served would admit it after the flooder's 8 images: count 8, and the test fails.

The flooder offers 2x what the stack takes from one tenant: its 8 queued images, then 8 more requests while
its queue is full, each answered 503 ``overloaded`` with ``Retry-After``; the light tenant is never refused.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import HeldDenoiser, wait_until

pytestmark = pytest.mark.e2e

# Every request the same work: one 64x64 image, 2 steps, guidance (2 UNet rows).
BODY = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2, "num_images": 1}
ROWS_PER_IMAGE = 2
FLOOD_QUEUE = 8  # denoiser.max_queued_images in the e2e config (conftest.E2E_OVERRIDES)


def _create(cluster, user: str, seed: int) -> str:
    r = requests.post(cluster.url + "/v1/jobs", json={**BODY, "user": user, "seed": seed}, timeout=60)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _job(cluster, job_id: str) -> dict:
    r = requests.get(f"{cluster.url}/v1/jobs/{job_id}", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _finished(cluster, job_ids: list[str]) -> list[dict]:
    """Every job once all have finished (in any way)."""

    def all_finished():
        jobs = [_job(cluster, i) for i in job_ids]
        return all(j["status"] in ("done", "failed", "cancelled") for j in jobs) and jobs

    return wait_until(all_finished, "the jobs to finish")


def _others_done_before(light: dict, others: list[dict]) -> int:
    """Other tenants' images completed between the light job's submission and its completion (the Jobs
    replica's record of when each job ended: one process's order of events, not a latency)."""
    assert light["status"] == "done", light
    return sum(
        len(o["images"])
        for o in others
        if o["status"] == "done" and light["created"] <= o["updated"] < light["updated"]
    )


def _fair_rank(flooded: int) -> int:
    """The light request's rank by the policy itself: ``flooded`` equal requests of the flooder, then it."""
    from deployments.engine.fair_queue import FairQueue

    q = FairQueue()
    for i in range(flooded):
        q.push("flooder", ("flooder", i), cost=1.0)
    q.push("light", "light", cost=1.0)
    return q.position("light")


def _flood_queue(cluster, flooder: str) -> list[str]:
    """The flooder's ``FLOOD_QUEUE`` jobs, queued in the held Denoiser one at a time (each reaches the queue
    before the next is sent: their order in the flooder's FIFO is known)."""
    flood_tenant = f"user:{flooder}"
    ids = []
    for i in range(FLOOD_QUEUE):
        ids.append(_create(cluster, flooder, 300 + i))
        wait_until(
            lambda i=i: cluster.stats("Denoiser")["waiting_by_tenant"].get(flood_tenant) == i + 1,
            f"flood image {i + 1} to queue",
        )
    return ids


def test_a_light_tenant_is_served_in_full_and_within_2x_its_alone_latency_while_another_floods(cluster):
    tag = uuid.uuid4().hex[:8]  # tenants of their own: no virtual-time history from other tests
    light_user, flooder = f"light-{tag}", f"flooder-{tag}"
    light_tenant, flood_tenant = f"user:{light_user}", f"user:{flooder}"

    # -- alone: the light request behind the held batch, nobody else waiting --------------------------
    with HeldDenoiser(cluster) as held:
        alone_id = _create(cluster, light_user, 1)
        held.wait_waiting(1)
        alone_queued = wait_until(lambda: (j := _job(cluster, alone_id))["position"] is not None and j, "its position")
        held.release()
    (alone,) = _finished(cluster, [alone_id])
    alone_count = _others_done_before(alone, [])
    assert (alone_queued["status"], alone_queued["position"], alone_count) == ("queued", 0, 0)

    # -- under the flood ---------------------------------------------------------------------------------
    with HeldDenoiser(cluster) as held:
        flood_ids = _flood_queue(cluster, flooder)
        # Past what the stack takes from it: as many again, each refused at once, 503 with Retry-After.
        with ThreadPoolExecutor(FLOOD_QUEUE) as pool:
            refused = list(
                pool.map(
                    lambda i: requests.post(
                        cluster.url + "/v1/generate", json={**BODY, "user": flooder, "seed": 200 + i}, timeout=120
                    ),
                    range(FLOOD_QUEUE),
                )
            )
        for r in refused:
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
            assert int(r.headers["Retry-After"]) >= 1
        light_id = _create(cluster, light_user, 2)
        stats = held.wait_waiting(FLOOD_QUEUE + 1)
        assert stats["waiting_by_tenant"] == {flood_tenant: FLOOD_QUEUE, light_tenant: 1}
        # Item 5: the light job reports its fair rank, not the flooder's backlog.
        queued = wait_until(lambda: (j := _job(cluster, light_id))["position"] is not None and j, "its position")
        assert (queued["status"], queued["position"]) == ("queued", _fair_rank(FLOOD_QUEUE))
        assert _fair_rank(FLOOD_QUEUE) == 1 < FLOOD_QUEUE
        held.release()
    jobs = _finished(cluster, [light_id, *flood_ids])
    light, flood = jobs[0], jobs[1:]

    # (a) the light tenant: everything it asked for, nothing refused
    assert light["status"] == "done" and len(light["images"]) == 1, light
    # the flooder's queued images are served too (it is refused only past its queue)
    assert [j["status"] for j in flood] == ["done"] * FLOOD_QUEUE
    # (c) its latency in other tenants' images completed meanwhile: within 2x alone plus the batch it joins
    rows_per_tick = 8  # denoiser.max_rows_per_tick in the e2e config
    batch = rows_per_tick // ROWS_PER_IMAGE
    count = _others_done_before(light, flood)
    assert count <= 2 * alone_count + batch - 1, (count, alone_count, batch)
    # and the flooder's backlog did not all go first (first come, first served: all 8 before it)
    assert sum(1 for j in flood if j["updated"] > light["updated"]) >= FLOOD_QUEUE - (batch - 1)


def test_the_page_shows_a_tenant_its_fair_position_behind_a_flood_not_the_backlog(cluster, browser):
    """Item 5 on the page: a person's job (tenant: their address) behind a flooder's full queue is told it is
    second (its fair rank, ``_fair_rank``), with an ETA, not that the flooder's 8 images are ahead of it."""
    from page_helpers import by_id, fill, wait

    flooder = f"flooder-{uuid.uuid4().hex[:8]}"
    browser.get(cluster.url + "/")
    wait(browser, lambda d: "tiny-sd" in by_id(d, "model-line").text, 30, "the page never listed its model")
    browser.execute_script(
        """
        window.statuses = [];
        const line = document.getElementById("job-status");
        new MutationObserver(() => window.statuses.push(line.textContent))
          .observe(line, {childList: true, characterData: true, subtree: true});
        """
    )
    fill(browser, "prompt", BODY["prompt"])  # the same work as each flood image: its rank is by the policy alone
    for element_id in ("steps", "width", "height", "num_images"):
        fill(browser, element_id, BODY[element_id])
    with HeldDenoiser(cluster) as held:
        flood_ids = _flood_queue(cluster, flooder)
        by_id(browser, "submit").click()
        held.wait_waiting(FLOOD_QUEUE + 1)
        expected = f"Queued: {_fair_rank(FLOOD_QUEUE)} ahead of you, about "
        wait(
            browser,
            lambda d: any(s.startswith(expected) for s in d.execute_script("return window.statuses")),
            message=f"the page never showed {expected!r}",
        )
    _finished(cluster, flood_ids)
    wait(browser, lambda d: by_id(d, "job-status").text == "Done.", 120, "the page's job never finished")
    statuses = browser.execute_script("return window.statuses")
    queued = {s for s in statuses if s.startswith("Queued: ")}
    assert queued and all(s.startswith(("Queued: 1 ahead of you, about ", "Queued: 0 ahead of you")) for s in queued)
    assert not any(s.startswith(f"Queued: {FLOOD_QUEUE} ahead") for s in statuses), statuses


# -- with admission control at the ingress (graph/admission.py) ----------------------------------------

ADMIT_APP, ADMIT_PREFIX = "lorafleet-admission", "/admission"
CAPACITY = 8  # admission.max_images_in_flight: a fixed capacity, so the test does not depend on a measurement


@pytest.fixture(scope="module")
def admitting(cluster, cache_dir, tmp_path_factory):
    """A second app (``/admission``, tiny-sd, one replica per stage) with admission control on and a fixed
    capacity of ``CAPACITY`` images; a ``Cluster`` for it, so that ``HeldDenoiser`` holds its Denoiser."""
    from ray import serve

    from graph.app import build_app

    from conftest import Cluster

    root = tmp_path_factory.mktemp("admission-app")
    config = {
        "model": {"uri": "builtin:tiny-sd", "cache_dir": str(cache_dir)},
        "text_encoder": {"autoscaling": None, "num_replicas": 1},
        "denoiser": {
            "autoscaling": None,
            "num_replicas": 1,
            "max_rows_per_tick": 8,
            "max_queued_images": 64,
            "preempt": False,  # HeldDenoiser's batch stays held (conftest.E2E_OVERRIDES)
        },
        "vae": {"autoscaling": None, "num_replicas": 1},
        "registry": {"uri": str(root / "registry"), "cache_dir": str(root / "adapter-cache")},
        "admission": {"enabled": True, "max_images_in_flight": CAPACITY},
    }
    serve.run(build_app(config), name=ADMIT_APP, route_prefix=ADMIT_PREFIX)
    target = Cluster(cluster.url + ADMIT_PREFIX, ADMIT_APP, cluster.s3)

    def ready() -> bool:
        try:
            return requests.get(target.url + "/readyz", timeout=10).status_code == 200
        except requests.RequestException:
            return False

    wait_until(ready, "the admission app to be ready", timeout_s=300, interval_s=1.0)
    try:
        yield target
    finally:
        serve.delete(ADMIT_APP)


def test_admission_refuses_the_flood_past_its_share_and_admits_the_light_tenant(admitting):
    """The same scene behind admission control with a capacity of 8 images. The held batch (2 jobs of 2
    images, one tenant) holds 4; the flooder's jobs are admitted while they fit (4 more: 8 in all), then,
    past capacity with the flooder at its fair share (8 x 1/2 among the two tenants with work), its next
    requests, job or synchronous, get 503 ``overloaded`` with ``Retry-After`` before any stage sees them.
    The light tenant holds nothing, so it is admitted past capacity; it queues behind the flooder's 4
    images at rank 1 and completes within the bound of the first test (at most 3 of the flooder's images
    before it)."""
    target = admitting
    tag = uuid.uuid4().hex[:8]
    light_user, flooder = f"light-{tag}", f"flooder-{tag}"
    with HeldDenoiser(target) as held:
        admitted, refused = [], []
        for i in range(2 * CAPACITY):  # the flooder offers twice the capacity, one job at a time
            r = requests.post(target.url + "/v1/jobs", json={**BODY, "user": flooder, "seed": 400 + i}, timeout=60)
            if r.status_code == 202:
                admitted.append(r.json()["id"])
                wait_until(
                    lambda n=len(admitted): target.stats("Denoiser")["waiting_by_tenant"].get(f"user:{flooder}") == n,
                    f"flood job {len(admitted)} to queue",
                )
            else:
                refused.append(r)
        sync = requests.post(target.url + "/v1/generate", json={**BODY, "user": flooder, "seed": 499}, timeout=120)
        for r in [*refused, sync]:
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
            assert int(r.headers["Retry-After"]) >= 1
        holding = HeldDenoiser.ROWS // 2  # the held batch's images
        share = CAPACITY // 2  # two tenants with work, equal weights
        assert (len(admitted), len(refused)) == (min(share, CAPACITY - holding), 2 * CAPACITY - len(admitted))

        light_id = _create(target, light_user, 3)
        stats = held.wait_waiting(len(admitted) + 1)
        assert stats["waiting_by_tenant"] == {f"user:{flooder}": len(admitted), f"user:{light_user}": 1}
        queued = wait_until(lambda: (j := _job(target, light_id))["position"] is not None and j, "its position")
        assert (queued["status"], queued["position"]) == ("queued", _fair_rank(len(admitted)))
        held.release()
    jobs = _finished(target, [light_id, *admitted])
    light, flood = jobs[0], jobs[1:]
    assert light["status"] == "done" and len(light["images"]) == 1, light
    assert [j["status"] for j in flood] == ["done"] * len(admitted)
    batch = 8 // ROWS_PER_IMAGE  # max_rows_per_tick / rows per image
    assert _others_done_before(light, flood) <= 2 * 0 + batch - 1

"""Job webhooks against a real HTTP receiver on 127.0.0.1: signed, retried with backoff, once per job end."""

from __future__ import annotations

import asyncio
import json

import pytest

from graph.job_store import JobManager, JobStore
from graph.webhooks import WebhookSender, check_webhook_url, sign, verify

from conftest import WebhookReceiver, until

SECRET = b"webhook-test-secret"


@pytest.fixture
def receiver():
    made = []

    def make(statuses=(200,)):
        made.append(WebhookReceiver(statuses))
        return made[-1]

    yield make
    for r in made:
        r.close()


def sender(**kw) -> tuple[WebhookSender, list[float]]:
    waits: list[float] = []

    async def sleep(s: float) -> None:  # the backoff, recorded instead of waited
        waits.append(s)

    return WebhookSender(SECRET, sleep=sleep, clock=lambda: 1_764_460_800, **kw), waits


@pytest.mark.parametrize(
    "url, ok",
    [
        ("https://example.com/hooks/lorafleet", True),
        ("http://127.0.0.1:8080/x?y=1", True),
        ("ftp://example.com/x", False),
        ("/relative/path", False),
        ("https://", False),
        ("https://exa mple.com", False),
        ("https://ex\u00e4mple.com", False),
        ("https://example.com/" + "a" * 2100, False),
    ],
)
def test_check_webhook_url(url, ok):
    assert (check_webhook_url(url) is None) is ok


def test_signature_is_an_hmac_of_timestamp_and_body():
    sig = sign(SECRET, "100", b'{"a":1}')
    assert sig.startswith("sha256=") and len(sig) == 7 + 64
    assert verify(SECRET, "100", b'{"a":1}', sig)
    assert not verify(SECRET, "101", b'{"a":1}', sig)  # another time: a replay with a new timestamp fails
    assert not verify(b"other", "100", b'{"a":1}', sig)


def test_a_delivery_is_signed_and_retried_with_backoff_until_accepted(receiver):
    hook = receiver([503, 500, 200])
    s, waits = sender(backoff_s=1.0)
    ok = asyncio.run(s.deliver(hook.url, "job.done", {"id": "j1", "status": "done"}))
    assert ok and (s.delivered, s.failed) == (1, 0)
    assert waits == [1.0, 2.0]
    assert len(hook.requests) == 3
    deliveries = {h["x-lorafleet-delivery"] for h, _ in hook.requests}
    assert len(deliveries) == 1  # one delivery, three tries
    assert [h["x-lorafleet-attempt"] for h, _ in hook.requests] == ["1", "2", "3"]
    for headers, body in hook.requests:
        assert verify(SECRET, headers["x-lorafleet-timestamp"], body, headers["x-lorafleet-signature"])
        assert json.loads(body) == {"event": "job.done", "job": {"id": "j1", "status": "done"}}


def test_a_refusal_ends_a_delivery_and_the_last_try_gives_up(receiver):
    refused = receiver([400])
    s, waits = sender()
    assert not asyncio.run(s.deliver(refused.url, "job.failed", {"id": "j"}))
    assert len(refused.requests) == 1 and waits == []
    down = receiver([503])
    s, waits = sender(max_attempts=3, backoff_s=0.5)
    assert not asyncio.run(s.deliver(down.url, "job.failed", {"id": "j"}))
    assert len(down.requests) == 3 and waits == [0.5, 1.0] and s.failed == 1


def test_an_unreachable_receiver_is_retried_too():
    s, waits = sender(max_attempts=2, timeout_s=2.0)
    assert not asyncio.run(s.deliver("http://127.0.0.1:9/closed", "job.done", {"id": "j"}))  # port 9: refused
    assert waits == [1.0] and [status for _, status in s.attempts] == [None, None]


def test_a_job_posts_its_job_object_once_when_it_ends(receiver):
    from test_jobs import FakeGraph, finished, plan

    hook = receiver([200])

    async def main():
        graph = FakeGraph()
        s, _ = sender()
        manager = JobManager(JobStore(10, 60), graph.run, webhooks=s)
        j = manager.submit(plan(), webhook_url=hook.url)
        plain = manager.submit(plan())  # no webhook_url: nothing is sent for it
        await graph.events.put(finished(b"png-0", b"png-1"))
        await graph.events.put(finished(b"png-0", b"png-1"))
        await until(lambda: j.finished and plain.finished and not manager.deliveries)
        return j

    j = asyncio.run(main())
    assert len(hook.requests) == 1
    payload = json.loads(hook.requests[0][1])
    assert payload["event"] == "job.done" and payload["job"]["id"] == j.id
    assert [im["b64"] for im in payload["job"]["images"]] == ["cG5nLTA=", "cG5nLTE="]


def test_a_webhook_url_without_a_sender_is_refused():
    from test_jobs import FakeGraph, plan

    manager = JobManager(JobStore(10, 60), FakeGraph().run)
    with pytest.raises(ValueError, match="webhook_secret"):
        manager.submit(plan(), webhook_url="https://example.com/x")

"""graph/chain.py without a cluster: a Plan through fake TextEncoder/Denoiser/VAE handles.

Error mapping (what clients see for each failure), retry-once when a replica dies, cancellation of
every call in flight when the caller goes away or the deadline passes, and no cancellation after a
failed call (Serve's ``cancel()`` re-raises that call's error).
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import torch
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from deployments.engine.adapter_slots import AdapterBudgetError
from deployments.engine.adapters import SlotWaitTimeoutError
from deployments.engine.conditioning import ImageInputError
from deployments.engine.step_scheduler import NonFiniteLatentsError, QueueFullError
from deployments.messages import DecodedImages, Denoised, DenoiseParams, EncodeRequest, PromptEmbeddings, Step
from graph.chain import GraphClient
from graph.config import LimitsConfig
from graph.errors import APIError
from lora_registry.errors import AdapterNotFoundError, RegistryUnavailableError

from conftest import make_plan


class Response:
    """A DeploymentResponse stand-in: awaitable, cancellable, counted."""

    def __init__(self, coro, log: Counter):
        self._task = asyncio.ensure_future(coro)
        self._log = log

    def __await__(self):
        return self._task.__await__()

    def cancel(self):
        self._log["cancel"] += 1
        self._task.cancel()


class Stream:
    """A streaming DeploymentResponseGenerator stand-in."""

    def __init__(self, agen, log: Counter):
        self._agen = agen
        self._log = log

    def __aiter__(self):
        return self._agen

    def cancel(self):
        self._log["cancel"] += 1


async def resolved(value):
    return await value if isinstance(value, Response) else value


class Method:
    def __init__(self, fn, log: Counter, name: str, stream: bool = False):
        self.fn, self.log, self.name, self.stream = fn, log, name, stream

    def remote(self, *args):
        self.log[self.name] += 1
        return Stream(self.fn(*args), self.log) if self.stream else Response(self.fn(*args), self.log)


class Handle:
    def __init__(self, log: Counter, stream: bool = False, **methods):
        self._log, self._methods, self._stream = log, methods, stream

    def options(self, stream: bool = False, **_):
        return Handle(self._log, stream, **self._methods)

    def __getattr__(self, name):
        return Method(self._methods[name], self._log, name, self._stream)


class Metrics:
    def __init__(self):
        self.counts = Counter()
        self.stages = []
        outer = self

        class _Metric:
            def __init__(self, name):
                self.name = name

            def inc(self, n=1, tags=None):
                outer.counts[(self.name, tuple(sorted((tags or {}).items())))] += n

            def observe(self, value, tags=None):
                outer.stages.append(tags["stage"])

        self.replica_failures = _Metric("replica_failures")
        self.images = _Metric("images")
        self.stage_latency = _Metric("stage_latency")


PLAN = make_plan(
    negative_prompt="fog", seed=7, scheduler="ddim", unet_adapters=(("ink@2", 0.5),), text_adapters=(("ink@2", 0.5),)
)


def graph(denoise=None, timeout_s: float = 60.0, encode=None):
    """A GraphClient over fakes; ``denoise(encoded, params, conditioning)`` may raise or wait."""
    log, metrics, seen = Counter(), Metrics(), []

    async def _encode(request: EncodeRequest):
        seen.append(request)
        if encode is not None:
            await encode()
        return PromptEmbeddings(torch.zeros(77, 8), torch.zeros(77, 8), encode_ms=1.0)

    async def _denoise(encoded, params: DenoiseParams, conditioning):
        encoded = await resolved(encoded)
        seen.append(params)
        if denoise is not None:
            await denoise(log)
        return Denoised(torch.zeros(params.num_images, 4, 8, 8), encoded.encode_ms, queue_ms=2.0, denoise_ms=3.0)

    async def _stream(encoded, params, preview_every_steps, conditioning):
        yield Step(step=1, steps=params.steps, eta_s=1.0)
        yield await _denoise(encoded, params, conditioning)

    async def _decode(denoised, params):
        denoised = await resolved(denoised)
        return DecodedImages(
            tuple(b"png" for _ in range(denoised.latents.shape[0])), 1.0, 2.0, 3.0, decode_ms=4.0, trace=denoised.trace
        )

    client = GraphClient(
        Handle(log, encode=_encode),
        Handle(log, denoise=_denoise, denoise_stream=_stream),
        Handle(log, decode=_decode),
        LimitsConfig(request_timeout_s=timeout_s),
        lambda: metrics,
    )
    return client, log, metrics, seen


def test_a_plan_goes_through_the_three_stages_as_typed_messages():
    client, log, metrics, seen = graph()
    result = asyncio.run(client.run(PLAN))
    assert result.images == (b"png", b"png") and result.decode_ms == 4.0
    encode, params = seen
    assert encode == EncodeRequest("a boat", "fog", adapters=PLAN.encode_request().adapters, steps=PLAN.steps)
    assert (params.seed, params.num_images, [a.ref for a in params.adapters]) == (7, 2, ["ink@2"])
    assert log == Counter({"encode": 1, "denoise": 1, "decode": 1})  # nothing cancelled
    assert metrics.counts[("images", (("model", ""),))] == 2 and metrics.stages == [
        "encode",
        "queue",
        "denoise",
        "decode",
    ]


def test_the_stream_reports_progress_then_decodes():
    client, log, _, _ = graph()
    events = []
    result = asyncio.run(client.run(PLAN, on_event=events.append))
    assert events == [Step(step=1, steps=4, eta_s=1.0)] and result.images == (b"png", b"png")
    assert log["denoise_stream"] == 1 and log["cancel"] == 0


def raising(error):
    async def denoise(log):
        raise error

    return denoise


@pytest.mark.parametrize(
    "error, status, code, field, retry_after",
    [
        (QueueFullError(8, 8, 12.4), 503, "overloaded", None, "12"),
        (BackPressureError(num_queued_requests=3, max_queued_requests=3), 503, "overloaded", None, "2"),
        (SlotWaitTimeoutError(60), 503, "adapter_slots_busy", "loras", "5"),
        (
            AdapterBudgetError("5 adapters in one request; a replica holds at most 4 at once"),
            422,
            "adapters_exceed_memory",
            "loras",
            None,
        ),
        (AdapterNotFoundError("no adapter 'ink'"), 404, "not_found", "loras", None),
        (NonFiniteLatentsError(("ink@2",), 20), 422, "non_finite_image", "loras", None),
        (NonFiniteLatentsError((), 20), 500, "internal_error", None, None),
        (RegistryUnavailableError("registry down"), 503, "unavailable", "loras", None),
        (ImageInputError("image", "is not a PNG"), 422, "invalid_image", "image", None),
    ],
)
def test_errors_become_what_clients_see(error, status, code, field, retry_after):
    client, log, _, _ = graph(denoise=raising(error))
    with pytest.raises(APIError) as e:
        asyncio.run(client.run(PLAN))
    assert (e.value.status, e.value.code, e.value.field) == (status, code, field)
    assert e.value.headers.get("Retry-After") == retry_after
    assert log["cancel"] == 0  # a failed call fails the rest of the chain; nothing is cancelled


def test_an_error_behind_ray_wrappers_is_found():
    wrapped = RuntimeError("task failed")
    wrapped.__cause__ = QueueFullError(2, 2, 3.0)
    client, _, _, _ = graph(denoise=raising(wrapped))
    with pytest.raises(APIError, match="denoiser queue is full") as e:
        asyncio.run(client.run(PLAN))
    assert e.value.status == 503


def test_an_unexpected_error_is_raised_as_it_is():
    client, _, _, _ = graph(denoise=raising(ValueError("bug")))
    with pytest.raises(ValueError, match="bug"):
        asyncio.run(client.run(PLAN))


def test_a_replica_death_retries_the_whole_chain_once_with_the_same_seed():
    deaths = [ActorDiedError()]

    async def denoise(log):
        if deaths:
            raise deaths.pop()

    client, log, metrics, seen = graph(denoise=denoise)
    result = asyncio.run(client.run(PLAN))
    assert result.images == (b"png", b"png")
    assert log["encode"] == 2 and log["denoise"] == 2 and log["decode"] == 2
    first, second = (p for p in seen if isinstance(p, DenoiseParams))
    assert first == second  # same seed: the retry makes the same image
    assert metrics.counts[("replica_failures", (("attempt", "1"), ("model", "")))] == 1


def test_a_second_replica_death_is_a_503():
    async def denoise(log):
        raise ActorDiedError()

    client, log, metrics, _ = graph(denoise=denoise)
    with pytest.raises(APIError) as e:
        asyncio.run(client.run(PLAN))
    assert (e.value.status, e.value.code, e.value.headers) == (503, "replica_failed", {"Retry-After": "5"})
    assert e.value.message == "a replica failed twice while serving this request; retry later"  # no replica named
    assert log["denoise"] == 2
    assert metrics.counts[("replica_failures", (("attempt", "2"), ("model", "")))] == 1


def test_a_cancelled_caller_cancels_every_call_in_flight():
    async def main():
        started = asyncio.Event()

        async def denoise(log):
            started.set()
            await asyncio.Event().wait()  # never finishes on its own

        client, log, _, _ = graph(denoise=denoise)
        task = asyncio.create_task(client.run(PLAN))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return log

    log = asyncio.run(main())
    assert log["cancel"] == 3  # encode, denoise and decode


def test_the_deadline_is_a_504_and_cancels_the_calls():
    async def denoise(log):
        await asyncio.Event().wait()  # never finishes: only the deadline can end the request

    client, log, _, _ = graph(denoise=denoise, timeout_s=0.01)
    with pytest.raises(APIError) as e:
        asyncio.run(client.run(PLAN))
    assert (e.value.status, e.value.code) == (504, "timeout")
    assert log["cancel"] == 3


LEAKS = ("Traceback", "ray::", "/home/ray", "10.1.2.3", "pid=")


def ray_wrapped(error: Exception) -> Exception:
    """What a handle raises when a replica raised ``error``: Ray's dual subclass, its text the remote traceback."""
    from ray.exceptions import RayTaskError

    traceback = 'Traceback (most recent call last):\n  File "/home/ray/lorafleet/deployments/denoiser.py", line 1\n'
    task = RayTaskError(
        "ray::ServeReplica:Denoiser", traceback, error, proctitle="ray::Denoiser", pid=4321, ip="10.1.2.3"
    )
    return task.as_instanceof_cause()


@pytest.mark.parametrize(
    "error, code",
    [
        (QueueFullError(8, 8, 23.0), "overloaded"),
        (SlotWaitTimeoutError(60), "adapter_slots_busy"),
        (RegistryUnavailableError("store s3://bucket/adapters at http://10.1.2.3:9000 unreachable"), "unavailable"),
        (AdapterNotFoundError("no adapter named 'ink'"), "not_found"),
        (ImageInputError("image", "is not a PNG, JPEG or WebP image"), "invalid_image"),
    ],
)
def test_errors_raised_through_ray_reach_clients_as_one_clean_line(error, code):
    wrapped = ray_wrapped(error)
    assert any(leak in str(wrapped) for leak in LEAKS)  # what used to reach clients
    client, _, _, _ = graph(denoise=raising(wrapped))
    with pytest.raises(APIError) as e:
        asyncio.run(client.run(PLAN))
    message = e.value.message
    assert e.value.code == code and "\n" not in message and len(message) < 200
    assert not any(leak in message for leak in (*LEAKS, "s3://", "http://"))

"""The ingress side of async jobs: HTTP answers from the ``Jobs`` deployment's (202, 404, SSE), and the
image files it holds for the OpenAI API's ``response_format: "url"``.

Event streams are FastAPI's own Server-Sent Events (``fastapi.sse``): the route is an async generator of
``ServerSentEvent`` with ``response_class=EventSourceResponse``, and FastAPI writes the frames, adds its
``: ping`` keep-alive on an idle stream and the no-buffering headers. Each event carries an ``id`` (a
reconnecting ``EventSource`` sends it back as ``Last-Event-ID``: the stream resumes after it) and the
first one a ``retry:`` (the client's reconnection delay).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse
from fastapi.sse import ServerSentEvent
from ray.serve.handle import DeploymentHandle

from .errors import APIError
from .job_store import JobEvent
from .planning import Plan

# A reconnecting EventSource waits this long (the ``retry:`` field, in milliseconds).
RECONNECT_MS = 2000


def _not_found(job_id: str) -> APIError:
    return APIError(404, "job_not_found", f"no job {job_id!r}: unknown, expired or removed", None)


def _store_full(rejected: dict) -> APIError:
    return APIError(
        503, "job_store_full", rejected["message"], None, {"Retry-After": str(round(rejected["retry_after_s"]))}
    )


async def create(
    jobs: DeploymentHandle, plan: Plan, webhook_url: str | None = None, root_path: str = ""
) -> JSONResponse:
    """Start a job for a validated plan: 202 with its id and URLs, or 503 ``job_store_full``.

    ``root_path``: the application's route prefix (``/sdxl`` for an app served under it), so the URLs work."""
    answer = await jobs.submit.remote(plan, webhook_url)
    if "rejected" in answer:
        raise _store_full(answer["rejected"])
    job_id = answer["job"]["id"]
    return JSONResponse(
        {
            "id": job_id,
            "status": answer["job"]["status"],
            "url": f"{root_path.rstrip('/')}/v1/jobs/{job_id}",
            "events_url": f"{root_path.rstrip('/')}/v1/jobs/{job_id}/events",
        },
        status_code=202,
    )


async def fetch(jobs: DeploymentHandle, job_id: str) -> dict:
    job = await jobs.get.remote(job_id)
    if job is None:
        raise _not_found(job_id)
    return job


async def cancel(jobs: DeploymentHandle, job_id: str) -> dict:
    job = await jobs.cancel.remote(job_id)
    if job is None:
        raise _not_found(job_id)
    return job


async def require(jobs: DeploymentHandle, job_id: str) -> None:
    """404 ``job_not_found`` unless the job exists: checked before an event stream starts (a 200 is final)."""
    if await jobs.get.remote(job_id, images=False) is None:
        raise _not_found(job_id)


def sse_event(event: JobEvent, first: bool = False) -> ServerSentEvent:
    """A ``JobEvent`` as FastAPI frames it; the first event of a stream also sets the client's ``retry``."""
    return ServerSentEvent(
        event=event.event,
        data=event.data,
        id=event.id,
        comment=event.comment,
        retry=RECONNECT_MS if first else None,
    )


async def events(
    jobs: DeploymentHandle, job_id: str, previews: bool, last_event_id: str | None = None
) -> AsyncIterator[ServerSentEvent]:
    """The job's events, relayed from the Jobs replica as they come (``require`` first: this is the body)."""
    stream = jobs.options(stream=True).events.remote(job_id, previews, last_event_id)
    first = True
    try:
        async for event in stream:
            yield sse_event(event, first)
            first = False
    finally:  # the client went away (or the job ended): stop the Jobs replica's generator
        stream.cancel()


async def keep(jobs: DeploymentHandle, plan: Plan, images: tuple[bytes, ...], ttl_s: float) -> str:
    """Have the Jobs store hold ``images`` for ``ttl_s``; the id their URLs name (503 when the store is full)."""
    answer = await jobs.keep.remote(plan, images, ttl_s)
    if "rejected" in answer:
        raise _store_full(answer["rejected"])
    return answer["job"]["id"]


async def image(jobs: DeploymentHandle, job_id: str, index: int) -> bytes | None:
    """Image ``index`` of a done job (or held images), None if there is none."""
    return await jobs.image.remote(job_id, index)

"""The ingress side of async jobs: HTTP answers from the ``Jobs`` deployment's (202, 404, SSE)."""

from __future__ import annotations

from fastapi.responses import JSONResponse, StreamingResponse
from ray.serve.handle import DeploymentHandle

from .errors import APIError
from .planning import Plan


def _not_found(job_id: str) -> APIError:
    return APIError(404, "job_not_found", f"no job {job_id!r}: unknown, expired or removed", None)


async def create(
    jobs: DeploymentHandle, plan: Plan, webhook_url: str | None = None, root_path: str = ""
) -> JSONResponse:
    """Start a job for a validated plan: 202 with its id and URLs, or 503 ``job_store_full``.

    ``root_path``: the application's route prefix (``/sdxl`` for an app served under it), so the URLs work."""
    answer = await jobs.submit.remote(plan, webhook_url)
    if "rejected" in answer:
        rejected = answer["rejected"]
        raise APIError(
            503, "job_store_full", rejected["message"], None, {"Retry-After": str(round(rejected["retry_after_s"]))}
        )
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


async def event_stream(jobs: DeploymentHandle, job_id: str, previews: bool) -> StreamingResponse:
    """``text/event-stream`` of the job's events, relayed from the Jobs replica as they come."""
    if await jobs.get.remote(job_id, images=False) is None:
        raise _not_found(job_id)
    stream = jobs.options(stream=True).events.remote(job_id, previews)

    async def relay():
        try:
            async for chunk in stream:
                yield chunk
        finally:  # the client went away (or the job ended): stop the Jobs replica's generator
            stream.cancel()

    return StreamingResponse(
        relay(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )

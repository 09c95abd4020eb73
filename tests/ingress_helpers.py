"""The real HTTP ingress (``graph.ingress``) in-process, without Ray: FastAPI's TestClient over the app,
the ``Ingress`` class built on the embedded model and a local registry, the graph and the Jobs store
replaced by fakes that answer at once. What it exercises is everything the ingress does itself:
parsing, validation, limits, auth, headers, errors. Milliseconds per request, so fuzzing is cheap."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from types import SimpleNamespace

from PIL import Image

from deployments.messages import DecodedImages


def png_bytes(width: int = 8, height: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


class FakeGraph:
    """``GraphClient.run`` answered at once with tiny PNGs; counts the plans it got."""

    def __init__(self):
        self.plans = []

    async def run(self, plan, **progress):  # progress: on_event, preview_every_steps (A1111 routes pass them)
        self.plans.append(plan)
        return DecodedImages(tuple(png_bytes() for _ in range(plan.num_images)), 0.0, 0.0, 0.0, 0.0)


class _Call:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        return _Done(self.fn(*args, **kwargs))


class _Done:
    def __init__(self, value):
        self.value = value

    def __await__(self):
        yield from ()
        return self.value


@dataclass
class FakeJobs:
    """The Jobs deployment's handle: accepts every job, knows none."""

    submitted: list = field(default_factory=list)

    def __getattr__(self, name):
        if name == "submit":
            return _Call(self._submit)
        if name in ("get", "cancel"):
            return _Call(lambda *a, **k: None)
        raise AttributeError(name)

    def _submit(self, plan, webhook_url):
        self.submitted.append(plan)
        return {"job": {"id": f"job{len(self.submitted)}", "status": "queued"}}


def make_ingress(config, monkeypatch):
    """``(TestClient, ingress)`` for the real app with ``config`` (an ``AppConfig``)."""
    from fastapi.testclient import TestClient
    from ray import serve

    from graph import ingress as ingress_module

    cls = ingress_module.Ingress.func_or_class.__bases__[0]  # the class under @serve.ingress's wrapper
    ingress = cls.__new__(cls)
    cls.__init__(ingress, None, config, FakeJobs())
    ingress.graph = FakeGraph()
    # Serve's class-based view finds the instance through the replica context.
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=ingress))
    return TestClient(ingress_module.app, raise_server_exceptions=False), ingress


def app_config(tmp_path, cache_dir, **sections):
    """The shipped defaults on the embedded model, a local registry under ``tmp_path``."""
    from graph.config import AppConfig

    args = {
        "model": {"uri": "builtin:tiny-sd", "cache_dir": str(cache_dir)},
        "registry": {"uri": str(tmp_path / "registry"), "cache_dir": str(tmp_path / "adapter-cache")},
        "admin": {"token": ADMIN_TOKEN},
    }
    for name, values in sections.items():
        args.setdefault(name, {}).update(values)
    return AppConfig.load(args)


ADMIN_TOKEN = "in-process-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def error_of(path: str, code: str, message: str, field: str | None) -> dict:
    """The ``error`` object a route answers: lorafleet's shape, OpenAI's on the OpenAI routes (``/v1/images/``)."""
    if path.startswith("/v1/images/"):
        return {"message": message, "type": "invalid_request_error", "param": field, "code": code}
    return {"code": code, "message": message, "field": field}


def is_error_shape(body, openai: bool = False) -> bool:
    """The documented error body: ``{"error": {"code": str, "message": str, "field": str | None}}``, one line;
    with ``openai`` (the OpenAI routes) OpenAI's: ``{"error": {"message", "type", "param", "code"}}``."""
    if not isinstance(body, dict) or set(body) != {"error"}:
        return False
    err = body["error"]
    if openai:
        return (
            isinstance(err, dict)
            and set(err) == {"message", "type", "param", "code"}
            and isinstance(err["type"], str)
            and isinstance(err["code"], str)
            and isinstance(err["message"], str)
            and "\n" not in err["message"]
            and (err["param"] is None or isinstance(err["param"], str))
        )
    return (
        isinstance(err, dict)
        and set(err) == {"code", "message", "field"}
        and isinstance(err["code"], str)
        and err["code"] != ""
        and isinstance(err["message"], str)
        and "\n" not in err["message"]
        and (err["field"] is None or isinstance(err["field"], str))
    )

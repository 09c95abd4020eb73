"""The chaos soak's traffic: mixed operations, each of which ends in exactly one outcome.

Operations (``KINDS``), drawn by weight:

* ``generate``: ``POST /v1/generate`` or the OpenAI route (``TrafficConfig.openai_share``), the
  request drawn from the load test's traffic model (``traffic.RequestFactory``);
* ``disconnect``: the same, but the client hangs up after a random delay (the server must cancel
  its denoising); answered before the delay, it counts as an ordinary request;
* ``job``: ``POST /v1/jobs``, then polled until it ends;
* ``job_cancel``: a job cancelled with ``DELETE`` after a random delay, then read back.

Outcomes (``OUTCOMES``):

* ``ok``: images came back (or the job is ``done``);
* ``failed``: a 4xx/5xx, or a ``failed`` job, with the documented error shape: one line
  ``{"error": {"code", "message", "field"}}`` (``error_shape_problem``);
* ``cancelled``: the client hung up, or its ``DELETE`` cancelled the job (and it reads
  ``cancelled`` afterwards);
* ``lost``: no final answer: the connection failed without an HTTP answer, or a job vanished
  (404 for an id the server gave out, and never deleted);
* ``hung``: no final answer within ``hung_after_s``;
* ``unclean``: an answer, but not a clean one (an error without the documented shape, a 200
  without images, a job that ended ``cancelled`` though nobody cancelled it).

Every request carries ``X-Request-Id: soak-<run>-<op>`` (polls ``...-p<k>``), so each op in the
report can be found in the server's log.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from dataclasses import asdict, dataclass, field

import requests

from .traffic import RequestFactory, TrafficConfig, Weighted, count_images, parse_tenants

KINDS = ("generate", "disconnect", "job", "job_cancel")
OUTCOMES = ("ok", "failed", "cancelled", "lost", "hung", "unclean")
JOB_FINAL = ("done", "failed", "cancelled")
MAX_ERROR_BODY_BYTES = 500
MAX_MESSAGE_CHARS = 300
# What an error body must never show (issue 16, point 1): tracebacks, Ray's internals, paths, addresses.
_LEAKS = (
    ("Traceback", re.compile(r"Traceback")),
    ("ray::", re.compile(r"ray::")),
    ("a path", re.compile(r"(?:^|[\s'\"(=])/(?:[\w.@+-]+/)+[\w.@+-]*")),
    ("an IP address", re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")),
    ("an actor id", re.compile(r"\b[0-9a-f]{32,}\b")),
)


def error_shape_problem(body: bytes | str | dict) -> str | None:
    """None if ``body`` is the documented error, else what is wrong with it.

    The shape: ``{"error": {"code": str, "message": str, "field": str | null}}``, the body under
    500 bytes, the message one line of at most 300 characters with no traceback, ``ray::``,
    path, IP address or actor id in it.

    >>> error_shape_problem(b'{"error": {"code": "overloaded", "message": "retry later", "field": null}}') is None
    True
    >>> error_shape_problem(b'Internal Server Error')
    'not JSON'
    """
    if isinstance(body, dict):
        payload, size = body, len(json.dumps(body))
    else:
        raw = body.encode() if isinstance(body, str) else body
        size = len(raw)
        try:
            payload = json.loads(raw)
        except ValueError:
            return "not JSON"
    if size >= MAX_ERROR_BODY_BYTES:
        return f"{size} bytes (limit {MAX_ERROR_BODY_BYTES})"
    if not isinstance(payload, dict) or set(payload) != {"error"} or not isinstance(payload["error"], dict):
        return 'not {"error": {...}}'
    return error_problem(payload["error"])


def error_problem(error: dict) -> str | None:
    """What is wrong with an ``error`` object (``{"code", "message", "field"}``, or OpenAI's ``{"message",
    "type", "param", "code"}`` on ``/v1/images/``), None if nothing."""
    if set(error) == {"code", "message", "type", "param"}:
        if not isinstance(error["type"], str) or not error["type"]:
            return "type must be a non-empty string"
        error = {"code": error["code"], "message": error["message"], "field": error["param"]}
    if set(error) != {"code", "message", "field"}:
        return f"error keys {sorted(error)}"
    code, message, fld = error["code"], error["message"], error["field"]
    if not isinstance(code, str) or not code or not isinstance(message, str) or not message:
        return "code and message must be non-empty strings"
    if fld is not None and not isinstance(fld, str):
        return "field must be a string or null"
    if "\n" in message or len(message) > MAX_MESSAGE_CHARS:
        return f"message is not one line of at most {MAX_MESSAGE_CHARS} characters"
    for what, pattern in _LEAKS:
        if pattern.search(message):
            return f"message shows {what}"
    return None


@dataclass
class Op:
    """One operation as the client saw it (a JSON line of ``ops.jsonl``)."""

    id: int
    kind: str
    api: str
    tenant: str
    request_id: str
    t: float  # wall-clock start
    ms: float | None = None  # until the final answer
    outcome: str | None = None
    status: int | None = None  # the HTTP status of the final answer
    code: str | None = None  # the error code of a failed answer
    detail: str | None = None  # what made it lost / hung / unclean, or a job's final status
    job_id: str | None = None
    images: int = 0
    removed: bool = False  # a job DELETEd after it finished: gone from the store, rightly
    unclean_answers: list[dict] = field(default_factory=list)  # non-final answers of the wrong shape (polls)

    def end(self, outcome: str, **fields) -> Op:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        self.outcome = outcome
        self.ms = (time.time() - self.t) * 1000.0
        for name, value in fields.items():
            setattr(self, name, value)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def parse_mix(spec: str) -> Weighted:
    """``"generate=5,job=3"`` -> a weighted draw over ``KINDS``."""
    from .traffic import parse_weighted

    items = parse_weighted(spec)
    unknown = [k for k, _ in items if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown operation {unknown[0]!r} in {spec!r}; expected some of {', '.join(KINDS)}")
    return Weighted(items)


class SoakClient:
    """Runs operations against ``url``; thread-safe (one draw at a time, each op in its caller's thread)."""

    def __init__(
        self,
        url: str,
        traffic: TrafficConfig,
        mix: str = "generate=5,disconnect=1,job=3,job_cancel=1",
        *,
        hung_after_s: float = 120.0,
        poll_s: float = 0.5,
        cancel_after_s: tuple[float, float] = (0.2, 2.0),
        run_id: str = "run",
        seed: int = 0,
    ):
        self.url = url.rstrip("/")
        self.factory = RequestFactory(traffic, random.Random(seed))
        self.tenants = Weighted([(t, t.weight) for t in parse_tenants(traffic.tenants)])
        self.mix = parse_mix(mix)
        self.openai_share = traffic.openai_share
        self.hung_after_s = hung_after_s
        self.poll_s = poll_s
        self.cancel_after_s = cancel_after_s
        self.run_id = run_id
        self.rng = random.Random(seed + 1)
        self._lock = threading.Lock()
        self._next_id = 0

    # -- drawing -------------------------------------------------------------------------------------
    def draw(self, kind: str | None = None):
        """(op, planned request, cancel delay) for the next operation, ``kind`` drawn from the mix if None."""
        with self._lock:
            kind = kind or self.mix(self.rng)
            tenant = self.tenants(self.rng)
            api = "openai" if kind in ("generate", "disconnect") and self.rng.random() < self.openai_share else "native"
            planned = self.factory.make(api, tenant)
            cancel_s = self.rng.uniform(*self.cancel_after_s)
            op_id = self._next_id
            self._next_id += 1
        op = Op(op_id, kind, api, tenant.name, f"soak-{self.run_id}-{op_id:05d}", time.time())
        return op, planned, cancel_s

    def run(self, kind: str | None = None) -> Op:
        op, planned, cancel_s = self.draw(kind)
        try:
            if op.kind in ("generate", "disconnect"):
                return self._generate(op, planned, cancel_s if op.kind == "disconnect" else None)
            return self._job(op, planned.body, planned.headers, cancel_s if op.kind == "job_cancel" else None)
        except Exception as e:  # noqa: BLE001 - a client bug must not pass for a server outcome
            return op.end("unclean", detail=f"client error: {type(e).__name__}: {e}"[:300])

    # -- synchronous requests ------------------------------------------------------------------------
    def _headers(self, op: Op, base: dict, suffix: str = "") -> dict:
        return {**base, "X-Request-Id": op.request_id + suffix}

    def _generate(self, op: Op, planned, hang_up_s: float | None) -> Op:
        read_s = hang_up_s if hang_up_s is not None else self.hung_after_s
        try:
            r = requests.post(
                self.url + planned.path, json=planned.body, headers=self._headers(op, planned.headers),
                timeout=(10.0, read_s),
            )  # fmt: skip
        except requests.ReadTimeout:
            if hang_up_s is not None:  # the client went away; requests closed the connection
                return op.end("cancelled", detail=f"hung up after {hang_up_s:.2f} s")
            return op.end("hung", detail=f"no answer within {self.hung_after_s:.0f} s")
        except requests.RequestException as e:
            return op.end("lost", detail=f"no HTTP answer: {type(e).__name__}")
        if r.status_code == 200:
            try:
                images = count_images(op.api, r.json())
            except ValueError:
                images = 0
            if images < 1:
                return op.end("unclean", status=200, detail="200 without images")
            return op.end("ok", status=200, images=images)
        return self._error(op, r)

    def _error(self, op: Op, r: requests.Response) -> Op:
        problem = error_shape_problem(r.content)
        if problem is not None:
            return op.end("unclean", status=r.status_code, detail=f"{problem}: {r.text[:200]!r}")
        return op.end("failed", status=r.status_code, code=r.json()["error"]["code"])

    # -- jobs ----------------------------------------------------------------------------------------
    def _call(self, op: Op, method: str, path: str, suffix: str, headers: dict | None = None, **kwargs):
        """One call of a job's life: the response, or None when no HTTP answer came (retried by the caller)."""
        try:
            return requests.request(
                method, self.url + path, headers=self._headers(op, headers or {}, suffix), timeout=(10.0, 60.0),
                **kwargs,
            )  # fmt: skip
        except requests.RequestException:
            return None

    def _note_unclean(self, op: Op, r: requests.Response, suffix: str) -> None:
        problem = error_shape_problem(r.content)
        if problem is not None:
            answer = {"request_id": op.request_id + suffix, "status": r.status_code, "problem": problem}
            op.unclean_answers.append({**answer, "body": r.text[:200]})

    def _job(self, op: Op, body: dict, headers: dict, cancel_s: float | None) -> Op:
        deadline = op.t + self.hung_after_s
        r = self._call(op, "POST", "/v1/jobs", "", headers, json=body)
        if r is None:
            return op.end("lost", detail="no HTTP answer to POST /v1/jobs")
        if r.status_code != 202:
            return self._error(op, r)
        op.job_id = r.json()["id"]
        cancel_at = None if cancel_s is None else time.time() + cancel_s
        polls = 0
        while time.time() < deadline:
            if cancel_at is not None and time.time() >= cancel_at:
                ended = self._cancel(op, deadline)
                if ended is not None:
                    return ended
                cancel_at = None  # the DELETE was answered with the job still unfinished? keep reading
            polls += 1
            r = self._call(op, "GET", f"/v1/jobs/{op.job_id}", f"-p{polls}")
            if r is not None:
                if r.status_code == 404:
                    return op.end("lost", status=404, detail=f"job {op.job_id} vanished (404 while polling)")
                if r.status_code == 200:
                    job = r.json()
                    if job["status"] in JOB_FINAL:
                        return self._job_final(op, job, cancelled_by_us=False)
                else:  # e.g. 503 while the Jobs replica restarts: transient, keep polling
                    self._note_unclean(op, r, f"-p{polls}")
            pause = self.poll_s if cancel_at is None else min(self.poll_s, max(0.0, cancel_at - time.time()))
            time.sleep(pause)
        return op.end("hung", detail=f"job {op.job_id} not finished within {self.hung_after_s:.0f} s")

    def _cancel(self, op: Op, deadline: float) -> Op | None:
        """DELETE the job (retried until answered); the op's end, or None to keep polling."""
        tries = 0
        while time.time() < deadline:
            tries += 1
            r = self._call(op, "DELETE", f"/v1/jobs/{op.job_id}", f"-d{tries}")
            if r is not None and r.status_code == 404:
                return op.end("lost", status=404, detail=f"job {op.job_id} vanished (404 on DELETE)")
            if r is not None and r.status_code == 200:
                job = r.json()
                if job["status"] in ("done", "failed"):  # it ended before the DELETE, which removed it
                    op.removed = True
                    return self._job_final(op, job, cancelled_by_us=False)
                if job["status"] != "cancelled":
                    return None
                # Read it back: a cancelled job stays in the store until its TTL.
                reads = 0
                while time.time() < deadline:
                    reads += 1
                    g = self._call(op, "GET", f"/v1/jobs/{op.job_id}", f"-c{reads}")
                    if g is not None and g.status_code == 200:
                        return self._job_final(op, g.json(), cancelled_by_us=True)
                    if g is not None and g.status_code == 404:
                        return op.end("lost", status=404, detail=f"cancelled job {op.job_id} vanished (404)")
                    if g is not None:
                        self._note_unclean(op, g, f"-c{reads}")
                    time.sleep(self.poll_s)
                return op.end("hung", detail=f"cancelled job {op.job_id} unreadable within {self.hung_after_s:.0f} s")
            if r is not None:
                self._note_unclean(op, r, f"-d{tries}")
            time.sleep(self.poll_s)
        return op.end("hung", detail=f"DELETE of job {op.job_id} unanswered within {self.hung_after_s:.0f} s")

    def _job_final(self, op: Op, job: dict, cancelled_by_us: bool) -> Op:
        status = job["status"]
        if status == "done":
            images = len(job.get("images") or [])
            if images < 1:
                return op.end("unclean", status=200, detail="done job without images")
            return op.end("ok", status=200, images=images, detail="done")
        if status == "failed":
            problem = error_problem(job.get("error") or {})
            if problem is not None:
                return op.end("unclean", status=200, detail=f"failed job's error: {problem}")
            return op.end("failed", status=200, code=job["error"]["code"], detail="failed")
        if status == "cancelled" and cancelled_by_us:
            return op.end("cancelled", status=200, detail="cancelled")
        return op.end("unclean", status=200, detail=f"job ended {status} though nobody cancelled it")

    def reread(self, op: Op) -> str | None:
        """After the run: does a finished job still read as it ended? None if so, else what changed."""
        if op.job_id is None or op.removed or op.outcome not in ("ok", "failed", "cancelled"):
            return None
        r = self._call(op, "GET", f"/v1/jobs/{op.job_id}", "-r")
        if r is None:
            return "no HTTP answer"
        if r.status_code == 404:
            return f"vanished (404), had ended {op.detail}"
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {r.text[:120]!r}"
        job = r.json()
        if job["status"] != op.detail:
            error = (job.get("error") or {}).get("code")
            return f"had ended {op.detail}, now reads {job['status']}" + (f" ({error})" if error else "")
        if job["status"] == "done" and len(job.get("images") or []) != op.images:
            return "its images are gone"
        return None


class Arrivals:
    """Open-loop Poisson arrivals at ``rate_rps`` from a thread; each op runs in its own thread.

    At most ``concurrency`` ops are in flight: an arrival that finds them all busy is skipped
    and counted (a stalled server cannot make the client queue an unbounded burst).
    """

    def __init__(self, client: SoakClient, rate_rps: float, concurrency: int, seed: int = 0):
        if rate_rps <= 0 or concurrency < 1:
            raise ValueError(f"rate_rps must be > 0 and concurrency >= 1, got {rate_rps}, {concurrency}")
        self.client = client
        self.rate_rps = rate_rps
        self.rng = random.Random(seed + 2)
        self.slots = threading.BoundedSemaphore(concurrency)
        self.ops: list[Op] = []
        self.skipped = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._emitter: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> Arrivals:
        self._emitter = threading.Thread(target=self._emit, name="soak-arrivals", daemon=True)
        self._emitter.start()
        return self

    def _emit(self) -> None:
        at = time.monotonic()
        while True:
            at += self.rng.expovariate(self.rate_rps)
            if self._stop.wait(max(0.0, at - time.monotonic())):
                return
            if not self.slots.acquire(blocking=False):
                self.skipped += 1
                continue
            t = threading.Thread(target=self._one, daemon=True)
            with self._lock:
                self._threads.append(t)
            t.start()

    def _one(self) -> None:
        try:
            op = self.client.run()
            with self._lock:
                self.ops.append(op)
        finally:
            self.slots.release()

    def stop(self, drain_timeout_s: float) -> int:
        """Stop arrivals, wait for the ops in flight; returns how many were still running after the wait."""
        self._stop.set()
        if self._emitter is not None:
            self._emitter.join()
        deadline = time.monotonic() + drain_timeout_s
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        return sum(t.is_alive() for t in threads)


def probe_capacity(client: SoakClient, concurrency: int, seconds: float) -> tuple[dict, list[Op]]:
    """Closed loop: ``concurrency`` clients run ops of the soak's own mix back to back for ``seconds``.

    The server's capacity for this mix is the ops that ended well (images, or the client's own
    cancellation) within the window, per second: jobs' polling, event streams and hang-ups cost
    what they cost in the soak itself. Returns the figures and the probe's ops.
    """
    started = time.time()
    end = started + seconds
    done: list[Op] = []
    lock = threading.Lock()

    def loop():
        while time.time() < end:
            op = client.run()
            with lock:
                done.append(op)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + client.hung_after_s + 30)
    good = [op for op in done if op.outcome in ("ok", "cancelled") and op.t + op.ms / 1000.0 <= end]
    outcomes = {o: sum(op.outcome == o for op in done) for o in OUTCOMES}
    figures = {
        "capacity_rps": len(good) / seconds,
        "seconds": seconds,
        "concurrency": concurrency,
        "outcomes": outcomes,
    }
    return figures, done

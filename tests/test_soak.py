"""The chaos soak (loadtest/soak.py): its pieces against fakes, then the short soak end to end.

The end-to-end test runs ``python -m loadtest.soak --short`` in its own process (its own Ray
instance and moto server on 127.0.0.1): traffic at 80 % of the capacity it measures, clients
hanging up and cancelling jobs, a Denoiser, TextEncoder, VAE and Jobs replica killed, S3 down
for a few seconds. Whatever the machine's speed, nothing may be lost or hang, and every failure
must carry the documented one-line error; latency is reported, never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT

CLEAN = {"error": {"code": "overloaded", "message": "the server is at capacity; retry later", "field": None}}


# -- the error shape ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, problem",
    [
        (CLEAN, None),
        ({"error": {"code": "invalid_value", "message": "loras[0].scale must be in [0, 4]", "field": "loras"}}, None),
        (b"Internal Server Error", "not JSON"),
        ({"detail": "nope"}, 'not {"error": {...}}'),
        ({"error": {"code": "x", "message": "m"}}, "error keys ['code', 'message']"),
        ({"error": {"message": "no result in 60s", "type": "server_error", "param": None, "code": "timeout"}}, None),
        ({"error": {"message": "m", "type": "", "param": None, "code": "x"}}, "type must be"),
        ({"error": {"code": "x", "message": "two\nlines", "field": None}}, "message is not one line"),
        ({"error": {"code": "x", "message": "Traceback (most recent call last)", "field": None}}, "Traceback"),
        ({"error": {"code": "x", "message": "ray::ServeReplica died", "field": None}}, "ray::"),
        ({"error": {"code": "x", "message": "at /home/u/.venv/lib/x.py line 3", "field": None}}, "a path"),
        ({"error": {"code": "x", "message": "node 10.0.3.17 is gone", "field": None}}, "an IP address"),
        ({"error": {"code": "x", "message": "actor " + "ab12" * 9 + " died", "field": None}}, "an actor id"),
        ({"error": {"code": "", "message": "m", "field": None}}, "non-empty"),
        ({"error": {"code": "x", "message": "m", "field": 3}}, "field must be"),
        ({"error": {"code": "x", "message": "m" * 290, "field": "f" * 200}}, "bytes (limit 500)"),
    ],
)
def test_error_shape(body, problem):
    from loadtest.soak_client import error_shape_problem

    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    found = error_shape_problem(raw)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found, found


def test_requests_per_second_in_a_message_is_not_a_path():
    from loadtest.soak_client import error_problem

    assert error_problem({"code": "overloaded", "message": "3 requests/s at most; retry", "field": None}) is None


# -- the S3 outage -----------------------------------------------------------------------------------


def test_s3_outage_refuses_connections_and_keeps_every_object():
    import boto3
    import botocore.config
    import botocore.exceptions

    from loadtest.faults import OutageS3Server

    s3 = OutageS3Server().up()
    config = botocore.config.Config(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=10)
    client = boto3.client("s3", config=config, **s3.credentials.client_kwargs())
    try:
        client.create_bucket(Bucket="soak-test")
        for i in range(5):
            client.put_object(Bucket="soak-test", Key=f"k{i}", Body=bytes([i]) * 10)
        port = s3.port
        s3.down()
        assert not s3.is_up
        with pytest.raises(botocore.exceptions.EndpointConnectionError):
            client.get_object(Bucket="soak-test", Key="k1")
        assert s3.object_count("soak-test") == 5  # moto's state is this process's, listener or not
        s3.up()
        assert s3.port == port
        assert client.get_object(Bucket="soak-test", Key="k3")["Body"].read() == bytes([3]) * 10
        assert sorted(o["Key"] for o in client.list_objects_v2(Bucket="soak-test")["Contents"]) == [
            f"k{i}" for i in range(5)
        ]
    finally:
        s3.down()


# -- the client's outcomes, against a scripted server ------------------------------------------------


class ScriptedServer:
    """A local HTTP server answering each (method, path prefix) with a scripted handler."""

    def __init__(self, routes):
        self.routes = routes
        self.seen: list[tuple[str, str, str]] = []  # (method, path, X-Request-Id)
        self.release = threading.Event()  # held handlers wait on it (set at close)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                outer.seen.append((self.command, self.path, self.headers.get("X-Request-Id")))
                for (method, prefix), handler in outer.routes.items():
                    if self.command == method and self.path.startswith(prefix):
                        answer = handler(self.path, body)
                        break
                else:
                    answer = (404, {"error": {"code": "not_found", "message": "no route", "field": None}})
                if answer == "hold":
                    outer.release.wait(30)
                    return
                if answer == "drop":  # close without answering
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                status, payload = answer
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _any  # noqa: N815 - http.server's names

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _client(url, mix="generate=1", hung_after_s=60.0):
    from loadtest.soak_client import SoakClient
    from loadtest.traffic import TrafficConfig

    traffic = TrafficConfig(adapters=0, openai_share=0.0, tenants="a=1")
    return SoakClient(url, traffic, mix, hung_after_s=hung_after_s, poll_s=0.01, cancel_after_s=(0.05, 0.05))


IMAGES = {"images": [{"b64": "AA==", "seed": 1, "width": 64, "height": 64}]}


@pytest.mark.parametrize(
    "answer, outcome, code",
    [
        ((200, IMAGES), "ok", None),
        ((503, CLEAN), "failed", "overloaded"),
        ((500, b"Internal Server Error"), "unclean", None),
        ((200, {"images": []}), "unclean", None),
        ("drop", "lost", None),
    ],
)
def test_generate_outcomes(answer, outcome, code):
    server = ScriptedServer({("POST", "/v1/generate"): lambda path, body: answer})
    try:
        op = _client(server.url).run("generate")
    finally:
        server.close()
    assert (op.outcome, op.code) == (outcome, code), op
    assert server.seen[0][2] == op.request_id and op.request_id.startswith("soak-")


def test_no_answer_within_the_bound_is_hung_and_a_hang_up_is_cancelled():
    server = ScriptedServer({("POST", "/v1/generate"): lambda path, body: "hold"})
    try:
        hung = _client(server.url, hung_after_s=0.3).run("generate")
        cancelled = _client(server.url).run("disconnect")  # hangs up after cancel_after_s (0.05 s)
    finally:
        server.close()
    assert hung.outcome == "hung"
    assert cancelled.outcome == "cancelled"


def _jobs_server(final: dict | None):
    """POST /v1/jobs -> 202 with id j1; GET: running twice, then ``final`` (None: 404, the job vanished)."""
    polls = {"n": 0}
    gone = (404, {"error": {"code": "job_not_found", "message": "no job", "field": None}})

    def get(path, body):
        polls["n"] += 1
        if polls["n"] <= 2:
            return 200, {"id": "j1", "status": "running"}
        return gone if final is None else (200, final)

    return ScriptedServer({("POST", "/v1/jobs"): lambda path, body: (202, {"id": "j1", "status": "queued"}),
                           ("GET", "/v1/jobs/"): get})  # fmt: skip


@pytest.mark.parametrize(
    "final, outcome, code",
    [
        ({"id": "j1", "status": "done", **IMAGES}, "ok", None),
        (
            {"id": "j1", "status": "failed", "error": {"code": "interrupted", "message": "resubmit", "field": None}},
            "failed",
            "interrupted",
        ),  # fmt: skip
        (
            {"id": "j1", "status": "failed", "error": {"code": "x", "message": "Traceback ...\n", "field": None}},
            "unclean",
            None,
        ),  # fmt: skip
        ({"id": "j1", "status": "cancelled"}, "unclean", None),  # nobody cancelled it
        (None, "lost", None),  # vanished
    ],
)
def test_job_outcomes(final, outcome, code):
    server = _jobs_server(final)
    try:
        op = _client(server.url, mix="job=1").run()
    finally:
        server.close()
    assert (op.kind, op.outcome, op.code, op.job_id) == ("job", outcome, code, "j1"), op


def test_a_cancelled_job_is_read_back_as_cancelled():
    deleted = threading.Event()

    def delete(path, body):
        deleted.set()
        return 200, {"id": "j1", "status": "cancelled"}

    def get(path, body):
        return 200, {"id": "j1", "status": "cancelled" if deleted.is_set() else "running"}

    server = ScriptedServer(
        {
            ("POST", "/v1/jobs"): lambda path, body: (202, {"id": "j1", "status": "queued"}),
            ("GET", "/v1/jobs/"): get,
            ("DELETE", "/v1/jobs/"): delete,
        }
    )
    try:
        client = _client(server.url, mix="job_cancel=1")
        op = client.run()
        assert (op.outcome, op.detail) == ("cancelled", "cancelled"), op
        assert client.reread(op) is None  # still reads cancelled
    finally:
        server.close()
    assert [m for m, _, _ in server.seen].count("DELETE") == 1


def test_reread_reports_a_finished_job_that_changed():
    from loadtest.soak_client import Op

    server = ScriptedServer(
        {
            ("GET", "/v1/jobs/"): lambda path, body: (
                200,
                {"id": "j1", "status": "failed", "error": {"code": "interrupted"}},
            )
        }
    )
    try:
        client = _client(server.url)
        op = Op(
            1, "job", "native", "a", "soak-x-00001", time.time(), outcome="ok", detail="done", job_id="j1", images=1
        )
        assert client.reread(op) == "had ended done, now reads failed (interrupted)"
    finally:
        server.close()


# -- the report --------------------------------------------------------------------------------------


def _op(i, t, outcome="ok", ms=100.0, kind="generate", code=None):
    return {"id": i, "kind": kind, "t": t, "ms": ms, "outcome": outcome, "code": code, "unclean_answers": []}


def test_windows_around_each_fault():
    from loadtest.soak_report import markdown, summarize

    ops = [_op(0, 1.0, ms=100), _op(1, 2.0, ms=200)]  # before the kill
    ops += [_op(2, 11.0, ms=5000), _op(3, 12.0, "failed", code="replica_failed")]  # during it
    ops += [_op(4, 25.0, ms=300), _op(5, 31.0, "cancelled", kind="disconnect")]  # after it / before the outage
    ops += [_op(6, 41.0, "failed", code="registry_unavailable"), _op(7, 55.0, ms=150, kind="job")]
    faults = [
        {"name": "denoiser", "kind": "replica_kill", "start": 10.0, "end": 20.0},
        {"name": "s3", "kind": "s3_outage", "start": 40.0, "end": 50.0},
    ]
    s = summarize(ops, faults, 0.0, 60.0)
    assert (s["sent"], s["succeeded"], s["failed_clean"], s["cancelled"], s["lost"], s["hung"]) == (8, 5, 2, 1, 0, 0)
    assert s["passed"] is True
    kill, outage = s["faults"]
    assert [kill[w]["ops"] for w in ("before", "during", "after")] == [2, 2, 2]
    assert kill["during"]["failed_codes"] == {"replica_failed": 1}
    assert kill["during"]["p95_ms"] == 5000.0 and kill["before"]["p95_ms"] == 195.0
    assert [outage[w]["ops"] for w in ("before", "during", "after")] == [2, 1, 1]  # from the kill's end on
    assert outage["after"]["p95_ms"] is None and outage["after"]["jobs_p95_ms"] == 150.0  # jobs apart
    assert "| denoiser | 10 | 10.0 | 195 | 5000 | 300 | replica_failed 1 |" in markdown(s)


def test_a_lost_op_or_an_unhealed_fault_fails_the_soak():
    from loadtest.soak_report import markdown, summarize

    lost = _op(0, 1.0, "lost")
    lost["detail"] = "job j1 vanished (404 while polling)"
    s = summarize([lost, _op(1, 2.0)], [{"name": "vae", "kind": "replica_kill", "start": 1.5, "end": None}], 0.0, 3.0)
    assert s["passed"] is False and s["lost"] == 1
    assert s["problems"]["faults_not_recovered"] == ["vae"]
    report = markdown(s)
    assert "FAILED" in report and "vanished" in report and "not recovered" in report


def test_faults_run_one_at_a_time_each_after_the_previous_healed(monkeypatch):
    import loadtest.soak as soak

    def fake_inject(name, args, s3, log):  # a fault that takes 0.1 s to heal; the S3 one never heals
        start = time.time()
        time.sleep(0.1)
        return {"name": name, "start": start, "end": None if name == "s3" else time.time()}

    monkeypatch.setattr(soak, "inject", fake_inject)
    args = soak.parse_args(["--duration-s", "0.4", "--min-gap-s", "0.05", "--faults", "vae,denoiser,s3,jobs"])
    started = time.time()
    faults = soak.run_faults(args, None, started, log=print)
    ended = time.time()
    assert [f["name"] for f in faults] == ["vae", "denoiser", "s3", "jobs"]
    assert faults[0]["start"] >= started + 0.4 / 5
    assert faults[1]["start"] >= faults[0]["end"] + 0.05  # not before the VAE healed
    assert faults[3]["start"] >= faults[2]["start"] + 0.1  # after the unhealed one, in turn
    assert ended >= max(started + 0.4, faults[3]["end"] + 0.05)


def test_short_keeps_what_the_command_line_says():
    from loadtest.soak import SHORT, parse_args

    args = parse_args(["--short", "--s3-outage-s", "3"])
    assert (args.duration_s, args.s3_outage_s, args.probe_s) == (SHORT["duration_s"], 3.0, SHORT["probe_s"])
    assert args.hung_after_s == 2 * args.request_timeout_s + 30
    assert parse_args([]).duration_s == 300.0 and parse_args([]).s3_outage_s == 20.0
    with pytest.raises(SystemExit):
        parse_args(["--faults", "denoiser,gpu"])


# -- end to end --------------------------------------------------------------------------------------

# Serving bugs the soak found (docs/benchmarks.md, "Chaos soak"), told apart from anything new by their
# exact signature. While they are there the test xfails, naming them; any other problem fails it.
STORE_UNREACHABLE_LEAK = (
    "POST /v1/jobs while S3 is down answers 503 store_unreachable whose message shows the job record's "
    "S3 URL and the endpoint's address (graph/errors.py _registry_error passes RegistryError.message through)"
)
FINAL_RECORD_NOT_DURABLE = (
    "a job that ends while S3 is down keeps only its creation record (the final write fails and is never "
    "retried): after the Jobs replica restarts it reads failed/interrupted, its images gone (graph/job_store.py)"
)

ORPHAN_JOB = (
    "a job whose POST /v1/jobs got that 503 runs anyway and keeps a record no client knows (JobManager.submit "
    "starts the task before Jobs.submit learns that the creation record failed)"
)


def known_bug(op: dict, outage: dict, poll_s: float) -> str | None:
    """Which known serving bug explains this op's problem, if one does."""
    detail = op.get("detail") or ""
    if op["outcome"] == "unclean" and op["status"] == 503 and '"code":"store_unreachable"' in detail:
        return STORE_UNREACHABLE_LEAK
    if op["outcome"] == "lost" and "now reads failed (interrupted)" in detail and op["job_id"]:
        ended = op["t"] + op["ms"] / 1000.0  # seen by the client at most one poll after the server ended it
        if outage["start"] - 1.0 <= ended <= outage["end"] + poll_s + 2.0:
            return FINAL_RECORD_NOT_DURABLE
    return None


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_short_chaos_soak(cache_dir, tmp_path):
    out = tmp_path / "soak"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_NAMESPACE")}
    env.update({"LORAFLEET_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT)})
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.soak", "--short", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1400,
    )  # fmt: skip
    assert (out / "summary.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    report = (out / "report.md").read_text()
    ops = [json.loads(line) for line in (out / "ops.jsonl").read_text().splitlines()]
    assert [f["name"] for f in s["faults"]] == ["denoiser", "text_encoder", "vae", "s3", "jobs"]
    assert all(f["end"] is not None for f in s["faults"]), report  # every replica replaced, S3 back
    kills = [f for f in s["faults"] if f["kind"] == "replica_kill"]
    assert all(f["killed"].startswith(f"SERVE_REPLICA::lorafleet#{f['deployment']}#") for f in kills)
    (outage,) = [f for f in s["faults"] if f["kind"] == "s3_outage"]
    assert outage["objects_after"] == outage["objects_before"] > 0  # same port, same state
    assert s["client_threads_stuck"] == 0
    assert s["server_after"]["drained"], report
    assert len(ops) == s["sent"] == sum(s["outcomes"].values()) and s["succeeded"] > 0
    assert {op["kind"] for op in ops} == {"generate", "disconnect", "job", "job_cancel"}
    assert not s["problems"]["unclean_answers"], report  # polls and DELETEs answered cleanly too
    known: dict[str, int] = {}
    for op in ops:
        if op["outcome"] in ("lost", "hung", "unclean"):
            bug = known_bug(op, outage, s["args"]["poll_s"])
            assert bug is not None, f"{op}\n{report}"  # lost, hung or unclean, and not a known bug
            known[bug] = known.get(bug, 0) + 1
        else:
            assert op["outcome"] in ("ok", "failed", "cancelled"), op
            assert op["outcome"] != "failed" or op["code"], op  # a clean error names its code
    if s["problems"]["orphan_jobs"]:
        known[ORPHAN_JOB] = len(s["problems"]["orphan_jobs"])
    if known:
        pytest.xfail("; ".join(f"{n}: {bug}" for bug, n in known.items()))
    assert s["lost"] == 0 and s["hung"] == 0 and s["unclean"] == 0, report
    assert s["passed"] and proc.returncode == 0, report

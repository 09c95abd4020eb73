"""The chaos soak: ``make soak`` or ``python -m loadtest.soak``.

    python -m loadtest.soak                        # 5 minutes of traffic, every fault once
    python -m loadtest.soak --short                # the CI version: about 75 s, shorter phases
    python -m loadtest.soak --rate-rps 2 --faults denoiser,s3 --duration-s 120

Everything on 127.0.0.1 and owned by this process: moto's S3 server (``faults.OutageS3Server``,
the adapter registry and the job records in a bucket), a Ray instance of its own
(``ray.init(address="local")``, shut down at the end) with lorafleet deployed from
``serve_config.yaml``, one replica per stage (so that each kill takes the whole stage away).

1. Synthetic adapters are registered (into S3), the graph warmed up.
2. Capacity: ``--probe-concurrency`` closed-loop clients run ops of the soak's mix for
   ``--probe-s`` seconds (or ``--rate-rps`` is given); the soak offers ``--load`` (80 %) of it.
3. Traffic (``soak_client``): open-loop Poisson arrivals of a mix of synchronous requests
   (native and OpenAI), clients hanging up mid-request, jobs polled to their end, and jobs
   cancelled with ``DELETE``.
4. Faults, one at a time, evenly spread over ``--duration-s``: a Denoiser, TextEncoder, VAE and
   Jobs replica killed (``ray.kill``; the fault lasts until Serve runs a replacement), and S3
   down for ``--s3-outage-s`` (same port, same objects afterwards). A fault waits for the
   previous one to be over, so the run can last longer than ``--duration-s``.
5. Then: arrivals stop, the ops in flight finish (each bounded by ``--hung-after-s``), every
   finished job is read again (a job that vanished or changed is *lost*), and the Denoiser and
   the Jobs replica must drain (nothing left running or waiting).

Writes ``summary.json``, ``report.md`` and ``ops.jsonl`` (every op, with its ``X-Request-Id``)
into ``--out`` (default ``.lorafleet/soak/<time>``). Exits 1 when an op was lost, hung or
answered without the documented error shape, a fault did not heal, or the server did not drain.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = "lorafleet"
BUCKET = "lorafleet-soak"
JOB_RECORDS = f"registry/jobs/{APP}/"  # the Jobs deployment's records, beside the adapters (jobs.durable)
# fault name -> Serve deployment whose replica is killed (s3: the outage)
FAULTS = {"denoiser": "Denoiser", "text_encoder": "TextEncoder", "vae": "VAE", "jobs": "Jobs", "s3": None}
DEFAULT_FAULTS = "denoiser,text_encoder,vae,s3,jobs"  # Jobs last: its restart reads back every job record
SHORT = {  # --short: the CI version
    "duration_s": 75.0,
    "s3_outage_s": 8.0,
    "probe_s": 10.0,
    "min_gap_s": 4.0,
    "adapters": 4,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="run directory (default .lorafleet/soak/<time>)")
    p.add_argument("--short", action="store_true", help=f"the CI version: {SHORT}")
    p.add_argument("--duration-s", type=float, default=300.0, help="traffic time over which the faults spread")
    p.add_argument("--faults", default=DEFAULT_FAULTS, help=f"in order, from {', '.join(FAULTS)}; '' for none")
    p.add_argument("--s3-outage-s", type=float, default=20.0)
    p.add_argument("--min-gap-s", type=float, default=10.0, help="at least this between a fault's end and the next")
    p.add_argument("--rate-rps", type=float, default=None, help="offered ops/s (default: --load x measured capacity)")
    p.add_argument("--load", type=float, default=0.8, help="share of the measured capacity to offer")
    p.add_argument("--probe-s", type=float, default=20.0, help="capacity probe length")
    p.add_argument("--probe-concurrency", type=int, default=12)
    p.add_argument("--mix", default="generate=5,disconnect=1,job=3,job_cancel=1", help="operations, weighted")
    p.add_argument("--cancel-after-s", default="0.2-2.0", help="hang-up / DELETE delay range LO-HI")
    p.add_argument("--poll-s", type=float, default=1.0, help="how often a job is read while it runs")
    p.add_argument("--concurrency", type=int, default=256, help="ops in flight at most (more arrivals are skipped)")
    p.add_argument("--request-timeout-s", type=float, default=60.0, help="the server's limits.request_timeout_s")
    p.add_argument("--hung-after-s", type=float, default=None, help="no final answer by then: hung (default 2x +30)")
    p.add_argument("--recovery-timeout-s", type=float, default=240.0, help="bound on a replica's replacement")
    p.add_argument("--drain-timeout-s", type=float, default=90.0, help="bound on the server's drain at the end")
    p.add_argument("--adapters", type=int, default=8, help="synthetic adapters (0: no LoRA traffic)")
    p.add_argument("--config", default=str(ROOT / "serve_config.yaml"), help="serve config (its args)")
    p.add_argument("--seed", type=int, default=0)
    if p.parse_args(argv).short:  # shorter defaults; options given on the command line still win
        p.set_defaults(**SHORT)
    args = p.parse_args(argv)
    if args.hung_after_s is None:
        args.hung_after_s = 2 * args.request_timeout_s + 30
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        p.error(f"unknown fault {unknown[0]!r}; expected some of {', '.join(FAULTS)}")
    args.fault_list = faults
    return args


def overrides(args, s3) -> dict:
    """What the soak changes in the serve config: S3 registry, one replica per stage, a shorter request bound."""
    one = {"num_replicas": 1, "autoscaling": None}
    return {
        "registry": {
            "uri": f"s3://{BUCKET}/registry",
            "s3_endpoint_url": s3.credentials.endpoint_url,
            "s3_region": s3.credentials.region_name,
        },
        "limits": {"request_timeout_s": args.request_timeout_s},
        "text_encoder": one,
        "denoiser": one,
        "vae": one,
    }


def start_cluster(args, out: Path, s3):
    """lorafleet on a Ray instance of this process's own (never one another program started)."""
    from .cluster import LocalCluster

    # boto3's credential chain in every replica finds moto's dummy keys (workers inherit the environment).
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "local"  # a new instance, even if `ray start` left an address file behind
    try:
        return LocalCluster.start(Path(args.config), out / "cluster", overrides(args, s3))
    finally:
        if previous is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = previous


def inject(name: str, args, s3, log) -> dict:
    """Run one fault to its end; returns ``{"name", "kind", "start", "end", ...}`` (``end`` None: not healed)."""
    from .faults import kill_replica, wait_replaced

    deployment = FAULTS[name]
    fault: dict = {"name": name, "kind": "s3_outage" if deployment is None else "replica_kill", "start": time.time()}
    if deployment is None:
        before = s3.object_count(BUCKET)
        fault["connections_reset"] = s3.down()
        log(f"S3 down for {args.s3_outage_s:.0f} s ({before} objects in the bucket)")
        time.sleep(args.s3_outage_s)
        s3.up()
        fault["end"] = time.time()
        fault["objects_before"], fault["objects_after"] = before, s3.object_count(BUCKET)
        log(f"S3 up again on the same port: {fault['objects_after']} objects")
        return fault
    killed = kill_replica(APP, deployment)
    fault.update(deployment=deployment, killed=killed)
    log(f"killed {killed}")
    try:
        waited = wait_replaced(APP, deployment, killed, 1, args.recovery_timeout_s)
        fault["end"] = time.time()
        log(f"{deployment}: a replacement runs after {waited:.1f} s")
    except TimeoutError as e:
        fault["end"] = None
        fault["error"] = str(e)
        log(f"{deployment}: NOT replaced: {e}")
    return fault


def run_faults(args, s3, traffic_start: float, log) -> list[dict]:
    """The faults, one at a time, spread evenly over ``--duration-s`` (each waits for the previous one to
    heal, plus ``--min-gap-s``); returns when the traffic should stop."""
    faults: list[dict] = []
    n = len(args.fault_list)
    for k, name in enumerate(args.fault_list):
        at = traffic_start + args.duration_s * (k + 1) / (n + 1)
        if faults and faults[-1]["end"] is not None:
            at = max(at, faults[-1]["end"] + args.min_gap_s)
        time.sleep(max(0.0, at - time.time()))
        faults.append(inject(name, args, s3, log))
    end_at = traffic_start + args.duration_s
    if faults:
        end_at = max(end_at, (faults[-1]["end"] or time.time()) + args.min_gap_s)
    time.sleep(max(0.0, end_at - time.time()))
    return faults


def server_drained(timeout_s: float) -> dict:
    """Wait until the Denoiser holds no image and the Jobs replica no unfinished job; their last stats."""
    from ray import serve

    denoiser = serve.get_deployment_handle("Denoiser", app_name=APP)
    jobs = serve.get_deployment_handle("Jobs", app_name=APP)
    deadline = time.monotonic() + timeout_s
    last: dict = {}
    while True:
        try:
            d = denoiser.stats.remote().result(timeout_s=30)
            j = jobs.stats.remote().result(timeout_s=30)
            last = {
                "denoiser_active": d["active"],
                "denoiser_waiting": d["waiting"],
                "denoiser_cancelled": d["cancelled"],
                "jobs_unfinished": j["unfinished"],
                "jobs_in_store": j["jobs"],
                "jobs_recovered": j["recovered"],
            }
            if d["active"] == 0 and d["waiting"] == 0 and j["unfinished"] == 0:
                return {**last, "drained": True}
        except Exception as e:  # noqa: BLE001 - reported as not drained
            last = {**last, "error": f"{type(e).__name__}"}
        if time.monotonic() > deadline:
            return {**last, "drained": False}
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import boto3

    from .adapters import register_adapters, write_adapters
    from .faults import OutageS3Server
    from .run import machine_info, warm_up
    from .soak_client import Arrivals, SoakClient, probe_capacity
    from .soak_report import markdown, summarize
    from .traffic import TrafficConfig, adapter_names, parse_range

    out = Path(args.out or ROOT / ".lorafleet" / "soak" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def log(message: str) -> None:
        print(f"[soak {time.time() - started:6.1f}s] {message}", flush=True)

    log(f"writing to {out}")
    machine = machine_info()
    s3 = OutageS3Server().up()
    boto3.client("s3", **s3.credentials.client_kwargs()).create_bucket(Bucket=BUCKET)
    cluster = None
    info: dict = {"args": {k: v for k, v in vars(args).items()}, "machine": machine}
    try:
        log("starting lorafleet on a Ray instance of its own (127.0.0.1), registry in S3 (moto) ...")
        cluster = start_cluster(args, out, s3)
        prefix = "soak-"
        names = adapter_names(args.adapters, prefix)
        if names:
            files = write_adapters(cluster.model_dir, out / "adapters", names)
            register_adapters(cluster.url, cluster.admin_token, files)
        log(f"lorafleet at {cluster.url}; {len(names)} adapters registered; warming up ...")
        warm_up(cluster.url, cluster.model_name, names)
        traffic = TrafficConfig(adapters=args.adapters, adapter_prefix=prefix, model_name=cluster.model_name)
        run_id = time.strftime("%H%M%S")
        client = SoakClient(
            cluster.url, traffic, args.mix, hung_after_s=args.hung_after_s,
            cancel_after_s=parse_range(args.cancel_after_s), poll_s=args.poll_s, run_id=run_id, seed=args.seed,
        )  # fmt: skip
        probe_jobs: set[str] = set()
        if args.rate_rps is not None:
            rate, capacity = args.rate_rps, None
        else:
            log(f"measuring capacity: {args.probe_concurrency} closed-loop clients for {args.probe_s:.0f} s ...")
            probe, probe_ops = probe_capacity(client, args.probe_concurrency, args.probe_s)
            probe_jobs = {op.job_id for op in probe_ops if op.job_id}
            info["probe"] = probe
            capacity = probe["capacity_rps"]
            if capacity <= 0:
                raise RuntimeError(f"the capacity probe completed nothing: {probe}")
            rate = args.load * capacity
        log(f"offering {rate:.2f} ops/s" + (f" ({args.load:.0%} of {capacity:.2f} ops/s)" if capacity else ""))

        arrivals = Arrivals(client, rate, args.concurrency, seed=args.seed).start()
        traffic_start = time.time()
        faults = run_faults(args, s3, traffic_start, log)
        traffic_end = time.time()
        log(f"traffic stops after {traffic_end - traffic_start:.0f} s; waiting for the ops in flight ...")
        still_running = arrivals.stop(drain_timeout_s=args.hung_after_s + 60)
        ops = [op.to_dict() for op in sorted(arrivals.ops, key=lambda op: op.id)]
        rereads = {}
        for op in arrivals.ops:
            changed = client.reread(op)
            if changed is not None:
                rereads[op.id] = changed
        for op in ops:
            if op["id"] in rereads:  # a job that ended, then vanished or changed: lost
                op.update(outcome="lost", detail=f"after the run: {rereads[op['id']]}")
        with open(out / "ops.jsonl", "w") as f:
            for op in ops:
                f.write(json.dumps(op) + "\n")
        log("waiting for the server to drain ...")
        server_after = server_drained(args.drain_timeout_s)
        # Job records no client was ever given an id for: a job the server refused, yet started.
        given = {op["job_id"] for op in ops if op["job_id"]} | probe_jobs
        records = s3.object_keys(BUCKET, JOB_RECORDS)
        orphans = sorted({k.removeprefix(JOB_RECORDS).removesuffix(".json") for k in records} - given)
        machine_line = (
            f"{machine['cpu']}, {machine['cpus']} vCPU, {machine['memory_gib']} GiB; torch "
            f"{machine['versions']['torch']}, ray {machine['versions']['ray']}"
        )
        summary = summarize(
            ops, faults, traffic_start, traffic_end,
            rate_rps=rate, capacity_rps=capacity, load_share=args.load if capacity else None,
            traffic_s=traffic_end - traffic_start, mix=args.mix, skipped_arrivals=arrivals.skipped,
            client_threads_stuck=still_running, server_after=server_after, machine_line=machine_line,
            job_records=len(records), jobs_reread_changed=len(rereads), **info,
        )  # fmt: skip
        summary["problems"]["orphan_jobs"] = orphans
        summary["problems"]["server_not_drained"] = [] if server_after.get("drained") else [server_after]
        summary["problems"]["client_threads_stuck"] = [still_running] if still_running else []
        summary["passed"] = not any(summary["problems"].values())
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        report = markdown(summary)
        (out / "report.md").write_text(report)
        print("\n" + report, flush=True)
        log(f"report: {out / 'report.md'}")
        return 0 if summary["passed"] else 1
    finally:
        if cluster is not None:
            log("shutting the local cluster down ...")
            try:
                cluster.shutdown()
            except Exception as e:  # noqa: BLE001 - the summary is written; say why the teardown failed
                log(f"teardown: {type(e).__name__}: {e}")
        s3.down()


if __name__ == "__main__":
    sys.exit(main())

"""The ``lorafleet`` command.

lorafleet serve [--config serve_config.yaml]   start a local Ray head on 127.0.0.1 and serve
lorafleet export-model builtin:tiny-sdxl DIR   write a builtin model (tiny-sd, tiny-sdxl, their -inpaint
                                               variants) out as a diffusers directory
lorafleet export-model builtin:tiny-sd OUT --single-file   ... as one .safetensors in the original (LDM/SGM)
                                               layout: OUT/tiny-sd.safetensors, or OUT itself if it ends so
lorafleet adapters register|list|show|delete|pull|gc ...   the LoRA registry (see docs/registry.md)
lorafleet keys create|list|revoke|set ...   tenant API keys in the registry's store (see docs/security.md)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from .app import build_app
    from .config import AppConfig, ConfigError, load_serve_config

    http_options, app_args = load_serve_config(args.config)
    try:
        config = AppConfig.load(app_args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    host = http_options.get("host", "127.0.0.1")
    port = int(args.port or http_options.get("port", 8000))
    pidfile = Path(args.pidfile)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(str(os.getpid()))
    stop = threading.Event()
    try:
        ray.init(
            _node_ip_address="127.0.0.1",
            include_dashboard=args.dashboard,
            dashboard_host="127.0.0.1",
            num_cpus=args.num_cpus,
        )
        serve.start(http_options={"host": host, "port": port})
        print("deploying lorafleet (first start builds the embedded model) ...", flush=True)
        serve.run(build_app(config), name="lorafleet", route_prefix="/")
        # After ray.init, which installs handlers of its own: Ctrl-C and `make stop` shut down cleanly.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        served = ", ".join(
            s.model.uri if s.name is None else f"{s.name} ({s.model.uri})" for s in config.served_models()
        )
        print(f"lorafleet is serving {served} at http://{host}:{port}  (docs: /docs; Ctrl-C stops)", flush=True)
        stop.wait()
        print("stopping ...", flush=True)
        serve.shutdown()
    finally:
        ray.shutdown()
        pidfile.unlink(missing_ok=True)
    return 0


def _export(args: argparse.Namespace) -> int:
    from deployments.engine.builtin import BUILTIN_PREFIX, builtin_name, write_builtin

    if not args.uri.startswith(BUILTIN_PREFIX):
        print("error: only builtin:* models can be exported", file=sys.stderr)
        return 2
    try:
        builtin_name(args.uri)
    except ValueError as e:  # "unknown builtin model 'builtin:x'; known: [...]"
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.single_file:
        path = write_builtin(args.uri, args.directory)
        print(f"wrote {args.uri} to {path}")
        return 0
    import tempfile

    from deployments.engine.single_file import SINGLE_FILE_SUFFIX, export_single_file, is_single_file

    out = Path(args.directory)
    if not is_single_file(str(out)):
        out = out / f"{builtin_name(args.uri)}{SINGLE_FILE_SUFFIX}"
    with tempfile.TemporaryDirectory(prefix="lorafleet-export-") as tmp:
        path = export_single_file(write_builtin(args.uri, Path(tmp) / "model"), out)
    print(f"wrote {args.uri} to {path} (single file, original layout)")
    return 0


def _base_spec(model_uri: str):
    """The registry validates adapters against the model at ``model_uri`` (any URI the server takes)."""
    from deployments.engine.models import resolve_model_dir
    from lora_registry.base_model import base_model_spec_from_dir

    return base_model_spec_from_dir(resolve_model_dir(model_uri))


def _served_targets(serve_config: str | None):
    """The modules the server gives adapter slots: ``lora`` of ``serve_config`` (a serve_config.yaml), or the
    defaults. ``lorafleet adapters register`` then refuses what the server could never apply, as HTTP does."""
    from deployments.engine.adapters import served_targets
    from deployments.engine.config import LoRAConfig

    if serve_config is None:
        return served_targets(LoRAConfig())
    from .config import AppConfig, load_serve_config

    _, args = load_serve_config(serve_config)
    return served_targets(AppConfig.load(args).lora)


def _keys(args: argparse.Namespace) -> int:
    """``lorafleet keys ...``: tenant keys in the registry's store, as ``/v1/admin/keys`` keeps them."""
    import json

    from lora_registry.config import RegistryConfig, default_registry_uri
    from lora_registry.keys import KeyStore, KeyStoreError
    from lora_registry.stores import open_store

    config = RegistryConfig(uri=args.registry or default_registry_uri(), s3_endpoint_url=args.s3_endpoint_url)
    keys = KeyStore(open_store(config.uri, **config.s3_options()))
    quota = {
        "rate_per_s": getattr(args, "rate", None),
        "burst": getattr(args, "burst", None),
        "max_images_in_flight": getattr(args, "max_images_in_flight", None),
    }
    try:
        if args.keys_command == "create":
            raw, record = keys.create(args.name, args.weight, {k: v for k, v in quota.items() if v is not None})
            payload, text = {"key": raw, **record.public()}, f"{raw}\n(shown once: give it to {args.name!r})"
        elif args.keys_command == "list":
            records = keys.list()
            payload = [r.public() for r in records]
            text = "\n".join(
                f"{r.name}  id {r.id}  weight {r.weight:g}  quota {r.quota or '-'}{'  revoked' if r.revoked else ''}"
                for r in records
            )
        elif args.keys_command == "revoke":
            record = keys.revoke(args.name)
            payload, text = record.public(), f"revoked {record.name} (id {record.id})"
        else:
            record = keys.set(args.name, args.weight, {k: v for k, v in quota.items() if v is not None})
            payload, text = record.public(), f"{record.name}  weight {record.weight:g}  quota {record.quota or '-'}"
    except KeyStoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(payload, indent=2) if args.json else text)
    return 0


def _add_keys_parser(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--registry", default=None, help="s3://bucket/prefix or a directory (default: $LORAFLEET_REGISTRY)"
    )
    common.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint (default: the AWS chain)")
    common.add_argument("--json", action="store_true", help="print JSON")
    quota = argparse.ArgumentParser(add_help=False)
    quota.add_argument("--rate", type=float, default=None, help="requests per second (auth quota rate_per_s)")
    quota.add_argument("--burst", type=int, default=None, help="requests at once before the rate applies")
    quota.add_argument("--max-images-in-flight", type=int, default=None, help="images generating at once")
    keys = sub.add_parser("keys", help="tenant API keys: create, list, revoke, set (weight, quotas)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    p = keys_sub.add_parser("create", parents=[common, quota], help="a new key (printed once; stored hashed)")
    p.add_argument("name")
    p.add_argument("--weight", type=float, default=1.0, help="fair-share weight (default 1)")
    keys_sub.add_parser("list", parents=[common], help="every key: name, id, weight, quota, revoked")
    p = keys_sub.add_parser("revoke", parents=[common], help="revoke a key (by name or id)")
    p.add_argument("name")
    p = keys_sub.add_parser("set", parents=[common, quota], help="change a key's weight or quotas (by name or id)")
    p.add_argument("name")
    p.add_argument("--weight", type=float, default=None)
    keys.set_defaults(func=_keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorafleet", description="lorafleet: text-to-image serving on Ray Serve")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run a local single-node cluster bound to 127.0.0.1")
    p.add_argument("--config", default="serve_config.yaml")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs for Ray (default: all)")
    p.add_argument("--dashboard", action="store_true", help="start Ray's dashboard on 127.0.0.1:8265")
    p.add_argument("--pidfile", default=".lorafleet/serve.pid")
    p.set_defaults(func=_serve)
    p = sub.add_parser("export-model", help="write a builtin model as a diffusers directory (or a single file)")
    p.add_argument(
        "uri", help="builtin:tiny-sd, builtin:tiny-sd-inpaint, builtin:tiny-sdxl or builtin:tiny-sdxl-inpaint"
    )
    p.add_argument("directory", help="the diffusers directory; with --single-file, a directory or a .safetensors path")
    p.add_argument(
        "--single-file",
        action="store_true",
        help="one .safetensors in the original SD/SDXL key layout (model.diffusion_model.*, ...), as model.uri takes",
    )
    p.set_defaults(func=_export)
    from lora_registry.cli import add_adapters_parser

    add_adapters_parser(sub, _base_spec, _served_targets)
    _add_keys_parser(sub)
    from training.cli import add_train_parser

    add_train_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

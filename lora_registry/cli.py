"""``lorafleet adapters ...``: register, list, show, delete, pull and gc LoRA adapters.

    lorafleet adapters register style.safetensors --name watercolor --trigger-words "wc style,paint" --tags art
    lorafleet adapters list [--tag art]
    lorafleet adapters show watercolor@2
    lorafleet adapters delete watercolor@2          # or every version: delete watercolor
    lorafleet adapters pull watercolor -o watercolor.safetensors

Every command takes ``--registry URI`` (default ``$LORAFLEET_REGISTRY``, else
``~/.cache/lorafleet/registry``) and ``--json``. ``register`` validates against
``--base-model`` (default ``builtin:tiny-sd``), turned into a ``BaseModelSpec``
by the ``base_spec_provider`` the top-level ``lorafleet`` command supplies
(this package cannot build models itself; it sits below the engine).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from .base_model import BaseModelSpec, base_model_spec_from_dir
from .config import RegistryConfig, default_registry_uri, open_registry
from .errors import RegistryError
from .manifest import Manifest
from .registry import Registry
from .targets import ServedTargets

BaseSpecProvider = Callable[[str], BaseModelSpec]
# serve config path (or None: the defaults) -> the modules the server gives adapter slots, or None: no check
TargetsProvider = Callable[[str | None], ServedTargets | None]
DEFAULT_BASE_MODEL = "builtin:tiny-sd"


def _split_list(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def _progress_bar(desc: str, total: int | None, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
        disable=None if enabled else True, leave=False,
    )  # fmt: skip


def _open(
    args: argparse.Namespace, base: BaseModelSpec | None = None, targets: ServedTargets | None = None
) -> Registry:
    fields = {"uri": args.registry or default_registry_uri(), "s3_endpoint_url": args.s3_endpoint_url}
    if getattr(args, "max_rank", None) is not None:
        fields["max_rank"] = args.max_rank
    return open_registry(RegistryConfig(**fields), base=base, caches=False, targets=targets)


def _print(args: argparse.Namespace, payload, text: str) -> None:
    print(json.dumps(payload, indent=2) if args.json else text)


def _summary(m: Manifest) -> str:
    size_kib = m.size_bytes / 1024
    return (
        f"{m.ref}  rank {m.rank}  alpha {m.alpha:g}  {m.dtype}  {size_kib:,.0f} KiB  "
        f"{len(m.target_modules)} modules{' (+text encoder)' if m.has_text_encoder else ''}  "
        f"from {m.source_format}  sha256 {m.sha256[:12]}"
    )


def _cmd_register(
    args: argparse.Namespace, base_spec_provider: BaseSpecProvider, targets_provider: TargetsProvider | None = None
) -> int:
    adapter_config = None
    if args.adapter_config:
        adapter_config = json.loads(Path(args.adapter_config).read_text())
    base = base_spec_provider(args.base_model)
    # As the server's own registration does: refuse what its replicas could never apply.
    targets = targets_provider(args.serve_config) if targets_provider is not None else None
    registry = _open(args, base, targets)
    with _progress_bar(f"upload {args.name}", None, not args.no_progress) as bar:
        manifest = registry.register(
            args.file,
            name=args.name,
            description=args.description,
            trigger_words=_split_list(args.trigger_words),
            tags=_split_list(args.tags),
            adapter_config=adapter_config,
            source_format=args.format,
            progress=bar.update,
        )
    _print(args, manifest.to_dict(), f"registered {_summary(manifest)}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    listings, cursor = _open(args).list(tag=args.tag, limit=args.limit, after=args.after)
    if args.json:
        _print(args, {"data": [entry.to_dict() for entry in listings], "next": cursor}, "")
        return 0
    rows = [("NAME", "LATEST", "VERSIONS", "RANK", "SIZE", "TAGS", "DESCRIPTION")]
    for entry in listings:
        m = entry.latest
        rows.append(
            (
                entry.name,
                str(m.version),
                ",".join(map(str, entry.versions)),
                str(m.rank),
                f"{m.size_bytes / 1024:,.0f} KiB",
                ",".join(m.tags),
                m.description[:40],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if cursor is not None:
        print(f"(more: --after {cursor})")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    manifest = _open(args).resolve(args.ref)
    print(json.dumps(manifest.to_dict(), indent=2))
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    deleted = _open(args).delete(args.ref)
    _print(args, {"deleted": [m.ref for m in deleted]}, "\n".join(f"deleted {m.ref}" for m in deleted))
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    registry = _open(args)
    manifest = registry.resolve(args.ref)
    dest = Path(args.output or f"{manifest.name}@{manifest.version}.safetensors")
    with _progress_bar(f"download {manifest.ref}", manifest.size_bytes, not args.no_progress) as bar:
        manifest = registry.pull(manifest.ref, dest, progress=bar.update)
    _print(args, {"ref": manifest.ref, "path": str(dest), "sha256": manifest.sha256}, f"wrote {dest} ({manifest.ref})")
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    report = _open(args).gc(staging_older_than_s=args.staging_older_than_s, blobs_older_than_s=args.blobs_older_than_s)
    payload = {"staging": report.staging, "blobs": report.blobs}
    _print(args, payload, f"removed {len(report.staging)} staging objects, {len(report.blobs)} unreferenced blobs")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``adapters`` command; registry errors become a message and exit status 1."""
    try:
        return args.adapters_func(args)
    except RegistryError as e:
        keys = f" (keys: {', '.join(e.keys)})" if e.keys else ""
        print(f"error: {e.code}: {e.message}{keys}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def add_adapters_parser(
    subparsers, base_spec_provider: BaseSpecProvider, targets_provider: TargetsProvider | None = None
) -> argparse.ArgumentParser:
    """Add ``adapters`` to a ``lorafleet`` sub-parser set; ``base_spec_provider(model_uri)`` builds base specs,
    ``targets_provider(serve_config_path)`` the modules the server carries slots on (``None``: no such check).

    The command's handler is ``args.func(args) -> int`` (exit status).
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=None, help="s3://bucket/prefix or a directory (default: %(default)s)")
    common.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint (default: the AWS chain)")
    common.add_argument("--json", action="store_true", help="print JSON")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    common.set_defaults(registry=None)

    parser = subparsers.add_parser("adapters", help="register, list, show, delete and pull LoRA adapters")
    sub = parser.add_subparsers(dest="adapters_command", required=True)

    p = sub.add_parser("register", parents=[common], help="validate, convert and store a LoRA file")
    p.add_argument("file", help="a .safetensors LoRA file (diffusers/PEFT or kohya)")
    p.add_argument("--name", required=True, help="adapter name, ^[a-z0-9][a-z0-9._-]{0,63}$")
    p.add_argument("--description", default="")
    p.add_argument("--trigger-words", default="", help="comma-separated")
    p.add_argument("--tags", default="", help="comma-separated")
    p.add_argument("--adapter-config", default=None, help="PEFT adapter_config.json that came with the file")
    p.add_argument("--format", choices=["diffusers", "kohya"], default=None, help="insist on a format")
    p.add_argument("--base-model", default=DEFAULT_BASE_MODEL, help="base model URI (default: %(default)s)")
    p.add_argument("--max-rank", type=int, default=None, help="highest rank accepted (default: 128)")
    p.add_argument(
        "--serve-config",
        default=None,
        help="the serve config whose lora.*_target_modules the server runs (default: lorafleet's defaults)",
    )
    p.set_defaults(
        adapters_func=partial(_cmd_register, base_spec_provider=base_spec_provider, targets_provider=targets_provider)
    )

    p = sub.add_parser("list", parents=[common], help="adapters with their latest version")
    p.add_argument("--tag", default=None)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--after", default=None, help="cursor from the previous page")
    p.set_defaults(adapters_func=_cmd_list)

    p = sub.add_parser("show", parents=[common], help="a version's manifest")
    p.add_argument("ref", help="NAME or NAME@VERSION")
    p.set_defaults(adapters_func=_cmd_show)

    p = sub.add_parser("delete", parents=[common], help="delete a version (NAME@V) or all versions (NAME)")
    p.add_argument("ref")
    p.set_defaults(adapters_func=_cmd_delete)

    p = sub.add_parser("pull", parents=[common], help="download a version's canonical weights")
    p.add_argument("ref")
    p.add_argument("-o", "--output", default=None, help="file to write (default: NAME@V.safetensors)")
    p.set_defaults(adapters_func=_cmd_pull)

    p = sub.add_parser("gc", parents=[common], help="remove old staging objects and unreferenced blobs")
    p.add_argument("--staging-older-than-s", type=float, default=3600.0)
    p.add_argument("--blobs-older-than-s", type=float, default=86400.0)
    p.set_defaults(adapters_func=_cmd_gc)

    parser.set_defaults(func=run)
    return parser


def spec_from_directory(model_uri: str) -> BaseModelSpec:
    """The stand-alone default provider: diffusers directories only (``lorafleet`` also resolves builtin: and s3:)."""
    path = Path(model_uri.removeprefix("file://")).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"base model {model_uri!r} is not a local diffusers directory; use the lorafleet command for "
            "builtin: and s3:// models"
        )
    return base_model_spec_from_dir(path)


def main(argv: list[str] | None = None, base_spec_provider: BaseSpecProvider | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorafleet", description="lorafleet adapter registry")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_adapters_parser(subparsers, base_spec_provider or spec_from_directory)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

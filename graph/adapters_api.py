"""Adapters at the edge: resolve a request's ``loras`` against the registry, check them against the
served model and the slot layout, and serve the admin API's reads and writes."""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass

from fastapi import Request

from deployments.engine.config import LoRAConfig
from lora_registry.base_model import BaseModelSpec
from lora_registry.manifest import Manifest
from lora_registry.registry import Registry

from .config import AdminConfig
from .errors import APIError


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _suffix_match(path: str, targets) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


@dataclass
class AdapterResolver:
    registry: Registry
    base: BaseModelSpec
    lora: LoRAConfig

    def resolve(self, loras: list, field: str = "loras"):
        """``[LoRASpec]`` -> (unet adapters, text-encoder adapters, applied), each ``((ref, scale), ...)``.

        Unknown adapter or version -> 404 naming it; an adapter this server cannot apply
        (another base model, modules without slots, rank over the slot size) -> 422.
        """
        cfg = self.lora
        if len(loras) > cfg.max_loras_per_request:
            raise APIError(
                422,
                "invalid_value",
                f"{field}: at most {cfg.max_loras_per_request} adapters per request, got {len(loras)}",
                field,
            )
        unet, text, applied = [], [], []
        seen = set()
        for i, spec in enumerate(loras):
            where = f"{field}[{i}]" if field == "loras" else field
            if not 0 <= spec.scale <= cfg.max_scale:
                raise APIError(
                    422,
                    "invalid_value",
                    f"{where}.scale must be in [0, {cfg.max_scale}], got {spec.scale}",
                    f"{where}.scale" if field == "loras" else field,
                )
            ref = spec.name if spec.version is None else f"{spec.name}@{spec.version}"
            try:
                manifest = self.registry.resolve(ref)
            except Exception as e:
                from lora_registry.errors import AdapterNotFoundError, InvalidAdapterError

                if isinstance(e, AdapterNotFoundError):
                    raise APIError(404, "adapter_not_found", f"unknown adapter {ref!r}: {e.message}", where) from e
                if isinstance(e, InvalidAdapterError):  # a malformed name
                    raise APIError(422, "invalid_value", f"{where}.name: {e.message}", where) from e
                raise
            if manifest.ref in seen:
                raise APIError(422, "invalid_value", f"{where}: adapter {manifest.ref} is listed twice", where)
            seen.add(manifest.ref)
            self.check_compatible(manifest, where)
            applied.append((manifest.ref, float(spec.scale)))
            if any(m.startswith("unet.") for m in manifest.target_modules):
                unet.append((manifest.ref, float(spec.scale)))
            if manifest.has_text_encoder:
                text.append((manifest.ref, float(spec.scale)))
        return tuple(unet), tuple(text), tuple(applied)

    def check_compatible(self, manifest: Manifest, where: str) -> None:
        if manifest.base_model.fingerprint != self.base.fingerprint:
            raise APIError(
                422,
                "adapter_incompatible",
                f"adapter {manifest.ref} was registered for base model {manifest.base_model.family} "
                f"({manifest.base_model.fingerprint}), not the served one ({self.base.fingerprint})",
                where,
            )
        if manifest.rank > self.lora.max_rank:
            raise APIError(
                422,
                "adapter_incompatible",
                f"adapter {manifest.ref} has rank {manifest.rank}; this server's slots hold rank <= "
                f"{self.lora.max_rank} (lora.max_rank)",
                where,
            )
        unsupported = []
        for module in manifest.target_modules:
            component, _, path = module.partition(".")
            targets = self.lora.unet_target_modules if component == "unet" else self.lora.text_encoder_target_modules
            if not _suffix_match(path, targets):
                unsupported.append(module)
        if unsupported:
            raise APIError(
                422,
                "adapter_incompatible",
                f"adapter {manifest.ref} targets modules this server does not adapt "
                f"(lora.unet_target_modules / lora.text_encoder_target_modules): {unsupported[:5]}",
                where,
            )

    # -- admin API ------------------------------------------------------------------------

    def register(self, fileobj, name, description, trigger_words, tags, adapter_config) -> Manifest:
        config = None
        if adapter_config:
            try:
                config = json.loads(adapter_config)
            except json.JSONDecodeError as e:
                raise APIError(422, "invalid_value", f"adapter_config is not valid JSON: {e}", "adapter_config") from e
        return self.registry.register(
            fileobj,
            name=name,
            description=description,
            trigger_words=_split_list(trigger_words),
            tags=_split_list(tags),
            adapter_config=config,
        )

    def list(self, tag: str | None, limit: int, after: str | None) -> dict:
        if not 1 <= limit <= 1000:
            raise APIError(422, "invalid_value", f"limit must be in [1, 1000], got {limit}", "limit")
        listings, cursor = self.registry.list(tag=tag, limit=limit, after=after)
        return {"data": [item.to_dict() for item in listings], "next": cursor}

    def show(self, ref: str) -> dict:
        manifest = self.registry.resolve(ref)
        out = manifest.to_dict()
        out["ref"] = manifest.ref
        out["versions"] = [m.version for m in self.registry.versions(manifest.name)]
        return out

    def delete(self, ref: str) -> dict:
        return {"deleted": [m.ref for m in self.registry.delete(ref)]}


@dataclass
class AdminAuth:
    config: AdminConfig

    def check(self, request: Request, *, write: bool) -> None:
        """Writes (and reads, if configured) need ``Authorization: Bearer <admin token>``."""
        if not write and not self.config.protect_reads:
            return
        token = self.config.resolved_token()
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer ") or not header[7:].strip():
            raise APIError(
                401,
                "unauthorized",
                "this endpoint needs Authorization: Bearer <admin token>",
                None,
                {"WWW-Authenticate": "Bearer"},
            )
        if token is None:
            raise APIError(
                403,
                "forbidden",
                "registry writes are disabled: no admin token is configured (admin.token or LORAFLEET_ADMIN_TOKEN)",
                None,
            )
        if not hmac.compare_digest(header[7:].strip().encode(), token.encode()):
            raise APIError(403, "forbidden", "wrong admin token", None)

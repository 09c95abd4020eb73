"""Adapters at the edge: resolve a request's ``loras`` against the registry, check them against the
served model and the slot layout, and serve the admin API's reads and writes."""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from fastapi import Request

from deployments.engine.adapters import served_targets
from deployments.engine.config import LoRAConfig
from lora_registry.base_model import BaseModelSpec
from lora_registry.errors import AdapterNotFoundError, InvalidAdapterError, RegistryError
from lora_registry.manifest import Manifest
from lora_registry.registry import Registry

from .config import AdminConfig
from .errors import APIError, FieldError
from .schemas import LoRASpec


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


MAX_ADAPTER_CONFIG_CHARS = 65_536  # a PEFT adapter_config.json is about 1 KB


def parse_adapter_config(text: str) -> dict:
    """A PEFT ``adapter_config.json``'s text -> its object; 422 ``adapter_config`` for anything else.

    Bounded before parsing (length), and nesting too deep for the parser is a 422 too, not a crash.
    """

    def bad(message: str) -> APIError:
        return APIError(422, "invalid_value", f"adapter_config {message}", "adapter_config")

    if len(text) > MAX_ADAPTER_CONFIG_CHARS:
        raise bad(f"is {len(text)} characters; the limit is {MAX_ADAPTER_CONFIG_CHARS}")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad(f"is not valid JSON: {e}") from e
    except RecursionError as e:
        raise bad("is nested too deeply") from e
    if not isinstance(config, dict):
        raise bad(f"must be a JSON object, got {type(config).__name__}")
    return config


# Which part of the model a canonical module name belongs to: its first dotted component.
# ("text_encoder_2.x" starts with "text_encoder" but not with "text_encoder.": split, never prefix-match.)
UNET, TEXT_ENCODER, TEXT_ENCODER_2 = "unet", "text_encoder", "text_encoder_2"


def components(target_modules) -> set[str]:
    """The model parts an adapter has weights on, from its manifest's canonical module names.

    >>> sorted(components(["unet.mid.to_q", "text_encoder_2.text_model.fc1"]))
    ['text_encoder_2', 'unet']
    """
    return {module.partition(".")[0] for module in target_modules}


@dataclass(frozen=True)
class Adapters:
    """A request's adapters, each ``((ref, scale), ...)`` in the request's order; refs are pinned ``name@version``."""

    unet: tuple[tuple[str, float], ...] = ()  # those with UNet weights
    text: tuple[tuple[str, float], ...] = ()  # those with weights on the (first) text encoder
    applied: tuple[tuple[str, float], ...] = ()  # all of them
    text_2: tuple[tuple[str, float], ...] = ()  # SDXL: those with weights on text_encoder_2

    def __add__(self, other: Adapters) -> Adapters:
        return Adapters(
            self.unet + other.unet, self.text + other.text, self.applied + other.applied, self.text_2 + other.text_2
        )


@dataclass
class AdapterResolver:
    registry: Registry
    base: BaseModelSpec
    lora: LoRAConfig
    # The served model, for errors: its kind ("sd1", "sdxl"; default: the base spec's family) and name.
    served_kind: str = ""
    served_name: str = ""
    # Every base model the ingress serves, fingerprint -> name (``ServedModels``): an adapter for another of
    # them gets a 422 naming both models.
    served_bases: dict[str, str] = field(default_factory=dict)

    def resolve(self, loras: list[LoRASpec], field: str = "loras", indexed: bool = True) -> Adapters:
        """``[LoRASpec]`` -> ``Adapters``, checked against the limits, the registry and the served model.

        Errors name ``field``: with ``indexed``, the item's path (``loras[1]``, ``loras[1].scale``);
        without (``<lora:...>`` tags, ``field="prompt"``), the field itself. Unknown adapter or
        version -> 404 naming it; an adapter this server cannot apply (another base model, modules
        without slots, rank over the slot size) -> 422; the registry unreachable -> its 503.
        """
        cfg = self.lora
        limit = min(cfg.max_loras_per_request, cfg.max_loras_per_replica)  # a replica holds them all at once
        if len(loras) > limit:
            raise FieldError(
                422,
                "invalid_value",
                field,
                "{field}: at most {limit} adapters per request, got {count}",
                limit=limit,
                count=len(loras),
            )
        unet, text, text_2, applied = [], [], [], []
        seen = set()
        for i, spec in enumerate(loras):
            where = f"{field}[{i}]" if indexed else field
            if not 0 <= spec.scale <= cfg.max_scale:
                raise FieldError(
                    422,
                    "invalid_value",
                    f"{where}.scale" if indexed else where,
                    "{field} must be in [0, {high}], got {value}",
                    high=cfg.max_scale,
                    value=spec.scale,
                )
            manifest = self._manifest(spec, field, where)
            if manifest.ref in seen:
                raise FieldError(
                    422, "invalid_value", where, "{field}: adapter {ref} is listed twice", ref=manifest.ref
                )
            seen.add(manifest.ref)
            self.check_compatible(manifest, where)
            use = (manifest.ref, float(spec.scale))
            applied.append(use)
            parts = components(manifest.target_modules)
            for component, uses in ((UNET, unet), (TEXT_ENCODER, text), (TEXT_ENCODER_2, text_2)):
                if component in parts:
                    uses.append(use)
        return Adapters(tuple(unet), tuple(text), tuple(applied), tuple(text_2))

    def _manifest(self, spec: LoRASpec, field: str, where: str) -> Manifest:
        ref = spec.name if spec.version is None else f"{spec.name}@{spec.version}"
        try:
            return self.registry.resolve(ref)
        except AdapterNotFoundError as e:
            raise FieldError(
                404, "adapter_not_found", where, "unknown adapter {ref!r}: {detail}", ref=ref, detail=e.message
            ) from e
        except InvalidAdapterError as e:
            if e.code in ("invalid_name", "invalid_ref"):  # a malformed name
                raise FieldError(422, "invalid_value", where, "{field}.name: {detail}", detail=e.message) from e
            raise FieldError(422, e.code, where, "{field}: {detail}", detail=e.message) from e  # e.g. base_mismatch
        except RegistryError as e:  # unreachable, corrupt: the registry's own status and code
            raise FieldError(e.status, e.code, field, "{detail}", detail=e.message) from e

    def check_compatible(self, manifest: Manifest, where: str) -> None:
        """422 ``adapter_incompatible`` unless this server can apply ``manifest``: the served base model,
        rank within the slots, only modules that carry slots.

        The registry this server opens refuses the last two at registration already (``open_model_registry``
        passes it ``lora``); this check covers versions registered before, or under another configuration."""

        def incompatible(template: str, **values) -> FieldError:
            return FieldError(
                422, "adapter_incompatible", where, "adapter {ref} " + template, ref=manifest.ref, **values
            )

        other = self.served_bases.get(manifest.base_model.fingerprint)
        if manifest.base_model.fingerprint != self.base.fingerprint and other is not None:
            # "adapter ink@1 is for model tiny-sd (sd1); the request's model is tiny-sdxl (sdxl)"
            raise incompatible(
                "is for model {other} ({family}); the request's model is {name} ({served})",
                other=other,
                family=manifest.base_model.family,
                name=self.served_name,
                served=self.served_kind or self.base.family,
            )
        if manifest.base_model.fingerprint != self.base.fingerprint:
            # "adapter ink@1 is for sd1 (base model 3f2a...); this server serves sdxl (tiny-sdxl, base model 9c0d...)"
            name = f"{self.served_name}, " if self.served_name else ""
            raise incompatible(
                "is for {family} (base model {fingerprint}); "
                "this server serves {served} ({name}base model {served_fp})",
                family=manifest.base_model.family,
                fingerprint=manifest.base_model.fingerprint,
                served=self.served_kind or self.base.family,
                name=name,
                served_fp=self.base.fingerprint,
            )
        if manifest.rank > self.lora.max_rank:
            raise incompatible(
                "has rank {rank}; this server's slots hold rank <= {max_rank} (lora.max_rank)",
                rank=manifest.rank,
                max_rank=self.lora.max_rank,
            )
        unsupported = served_targets(self.lora).unreached(manifest.target_modules)
        if unsupported:
            raise incompatible(
                "targets modules this server does not adapt "
                "(lora.unet_target_modules / lora.text_encoder_target_modules): {modules}",
                modules=unsupported[:5],
            )

    # -- admin API ------------------------------------------------------------------------

    def register(self, fileobj, name, description, trigger_words, tags, adapter_config) -> Manifest:
        config = parse_adapter_config(adapter_config) if adapter_config else None
        return self.registry.register(
            fileobj,
            name=name,
            description=description,
            trigger_words=_split_list(trigger_words),
            tags=_split_list(tags),
            adapter_config=config,
        )

    def list(self, tag: str | None, limit: int, after: str | None, only_this_base: bool = False) -> dict:
        """A page of adapters; with ``only_this_base``, those whose latest version is for this model's base
        (such a page may come back short: page on until ``next`` is null)."""
        if not 1 <= limit <= 1000:
            raise APIError(422, "invalid_value", f"limit must be in [1, 1000], got {limit}", "limit")
        listings, cursor = self.registry.list(tag=tag, limit=limit, after=after)
        if only_this_base:
            listings = [item for item in listings if item.latest.base_model.fingerprint == self.base.fingerprint]
        return {"data": [self.listed(item) for item in listings], "next": cursor}

    def listed(self, item) -> dict:
        """A listing entry, with ``model``: the served model its latest version is for (null: none served)."""
        return {**item.to_dict(), "model": self.model_of(item.latest.base_model.fingerprint)}

    def model_of(self, fingerprint: str) -> str | None:
        """The name of the served model with this base, or None."""
        if fingerprint in self.served_bases:
            return self.served_bases[fingerprint]
        return (self.served_name or None) if fingerprint == self.base.fingerprint else None

    def show(self, ref: str) -> dict:
        manifest = self.registry.resolve(ref)
        out = manifest.to_dict()
        out["ref"] = manifest.ref
        out["model"] = self.model_of(manifest.base_model.fingerprint)
        out["versions"] = [m.version for m in self.registry.versions(manifest.name)]
        return out

    def delete(self, ref: str) -> dict:
        return {"deleted": [m.ref for m in self.registry.delete(ref)]}


@dataclass
class AdminAuth:
    config: AdminConfig

    def check(self, request: Request, *, write: bool) -> None:
        """Writes (and reads, if configured) need ``Authorization: Bearer <admin token>``."""
        problem = self.problem(request.headers, write=write)
        if problem is not None:
            raise problem

    def problem(self, headers: Mapping[str, str], *, write: bool) -> APIError | None:
        """What is wrong with these headers for this access (401, 403), or None. Headers only, so
        ``graph/edge.py`` can refuse an upload before reading it."""
        if not write and not self.config.protect_reads:
            return None
        token = self.config.resolved_token()
        header = headers.get("authorization", "")
        if not header.lower().startswith("bearer ") or not header[7:].strip():
            return APIError(
                401,
                "unauthorized",
                "this endpoint needs Authorization: Bearer <admin token>",
                None,
                {"WWW-Authenticate": "Bearer"},
            )
        if token is None:
            return APIError(
                403,
                "forbidden",
                "registry writes are disabled: no admin token is configured (admin.token or LORAFLEET_ADMIN_TOKEN)",
                None,
            )
        if not hmac.compare_digest(header[7:].strip().encode(), token.encode()):
            return APIError(403, "forbidden", "wrong admin token", None)
        return None

    def is_admin(self, headers: Mapping[str, str]) -> bool:
        """The headers carry the configured admin token (it sees internal URIs and ids)."""
        token = self.config.resolved_token()
        header = headers.get("authorization", "")
        return (
            token is not None
            and header.lower().startswith("bearer ")
            and hmac.compare_digest(header[7:].strip().encode(), token.encode())
        )

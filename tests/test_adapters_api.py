"""Adapters at the edge (graph/adapters_api.py), in-process against a local-directory registry:
the admin token check, resolving a request's adapters (errors at canonical field paths), and the
admin API's register / list / show / delete."""

from __future__ import annotations

import io
import json

import pytest
from starlette.requests import Request

from deployments.engine.config import LoRAConfig
from graph.adapters_api import AdapterResolver, Adapters, AdminAuth
from graph.config import AdminConfig
from graph.errors import APIError, FieldError
from graph.schemas import LoRASpec
from lora_registry import Registry
from lora_registry.base_model import BaseModelSpec
from lora_registry.errors import AdapterNotFoundError, InvalidAdapterError, RegistryUnavailableError

from registry_helpers import GatedStore, fresh_registry, make_store, small_lora_bytes

pytest_plugins = ["registry_helpers"]


def request_with(authorization: str | None) -> Request:
    headers = [] if authorization is None else [(b"authorization", authorization.encode())]
    return Request({"type": "http", "method": "GET", "path": "/v1/adapters", "headers": headers})


# -- AdminAuth ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token, protect_reads, write, authorization, expected",
    [
        # writes always need the token
        ("secret", False, True, None, (401, "unauthorized")),
        ("secret", False, True, "Bearer ", (401, "unauthorized")),
        ("secret", False, True, "Basic c2VjcmV0", (401, "unauthorized")),
        ("secret", False, True, "Bearer wrong", (403, "forbidden")),
        ("secret", False, True, "Bearer secret", None),
        ("secret", False, True, "bearer  secret ", None),
        (None, False, True, "Bearer secret", (403, "forbidden")),  # no token configured: writes are off
        # reads only when protect_reads
        ("secret", False, False, None, None),
        (None, False, False, None, None),
        ("secret", True, False, None, (401, "unauthorized")),
        ("secret", True, False, "Bearer wrong", (403, "forbidden")),
        ("secret", True, False, "Bearer secret", None),
    ],
)
def test_admin_auth(monkeypatch, token, protect_reads, write, authorization, expected):
    monkeypatch.delenv("LORAFLEET_ADMIN_TOKEN", raising=False)
    auth = AdminAuth(AdminConfig(token=token, protect_reads=protect_reads))
    if expected is None:
        auth.check(request_with(authorization), write=write)
        return
    with pytest.raises(APIError) as e:
        auth.check(request_with(authorization), write=write)
    assert (e.value.status, e.value.code, e.value.field) == (*expected, None)
    if expected[0] == 401:
        assert e.value.headers == {"WWW-Authenticate": "Bearer"}
        assert "Authorization: Bearer <admin token>" in e.value.message
    elif token is None:
        assert "no admin token is configured" in e.value.message
    else:
        assert e.value.message == "wrong admin token"


def test_admin_token_from_the_environment(monkeypatch):
    monkeypatch.setenv("LORAFLEET_ADMIN_TOKEN", "from-env")
    auth = AdminAuth(AdminConfig())
    auth.check(request_with("Bearer from-env"), write=True)
    with pytest.raises(APIError) as e:
        auth.check(request_with("Bearer other"), write=True)
    assert e.value.status == 403


# -- resolving a request's adapters -----------------------------------------------------------


def resolver_for(registry: Registry, spec: BaseModelSpec | None = None, **lora) -> AdapterResolver:
    return AdapterResolver(registry, spec or registry.base, LoRAConfig(**lora))


def specs(*items) -> list[LoRASpec]:
    """``"ink"``, ``"ink@1"``, ``("ink", 0.5)``: LoRASpecs."""
    out = []
    for item in items:
        ref, scale = item if isinstance(item, tuple) else (item, 1.0)
        name, _, version = ref.partition("@")
        out.append(LoRASpec(name=name, version=int(version) if version else None, scale=scale))
    return out


def test_resolve_pins_versions_and_sorts_adapters_by_the_weights_they_have(served_adapters):
    adapters = resolver_for(served_adapters).resolve(specs(("pastel", 0.5), "ink@1", ("ink", 2.0)))
    assert adapters == Adapters(
        unet=(("pastel@1", 0.5), ("ink@1", 1.0), ("ink@2", 2.0)),
        text=(("pastel@1", 0.5),),
        applied=(("pastel@1", 0.5), ("ink@1", 1.0), ("ink@2", 2.0)),
    )
    assert resolver_for(served_adapters).resolve([]) == Adapters()
    assert Adapters((("a@1", 1.0),), (), (("a@1", 1.0),)) + adapters == Adapters(
        (("a@1", 1.0), *adapters.unet), adapters.text, (("a@1", 1.0), *adapters.applied)
    )


@pytest.mark.parametrize("scale", [0.0, 4.0])
def test_scales_from_zero_to_max_scale_are_accepted(served_adapters, scale):
    assert resolver_for(served_adapters).resolve(specs(("ink", scale))).applied == (("ink@2", scale),)


@pytest.mark.parametrize(
    "loras, lora, status, code, field, message",
    [
        (["nosuch"], {}, 404, "adapter_not_found", "loras[0]", "unknown adapter 'nosuch': no adapter named 'nosuch'"),
        (["ink", "ink@9"], {}, 404, "adapter_not_found", "loras[1]", "unknown adapter 'ink@9': adapter ink@9 does"),
        (["Bad Name!"], {}, 422, "invalid_value", "loras[0]", "loras[0].name: "),
        (["ink@1", ("pastel", 4.5)], {}, 422, "invalid_value", "loras[1].scale", "loras[1].scale must be in [0, 4.0]"),
        ([("ink", 2.5)], {"max_scale": 2.0}, 422, "invalid_value", "loras[0].scale", "got 2.5"),
        (["ink", "pastel", "wide"], {"max_loras_per_request": 2}, 422, "invalid_value", "loras", "at most 2"),
        (["ink", "ink@2"], {}, 422, "invalid_value", "loras[1]", "loras[1]: adapter ink@2 is listed twice"),
        (["ink", "wide"], {"max_rank": 4}, 422, "adapter_incompatible", "loras[1]", "wide@1 has rank 8"),
        (
            ["ink"],
            {"unet_target_modules": ("to_q", "to_k", "to_v")},
            422,
            "adapter_incompatible",
            "loras[0]",
            "adapter ink@2 targets modules this server does not adapt",
        ),
        (
            ["pastel"],
            {"text_encoder_target_modules": ("q_proj",)},
            422,
            "adapter_incompatible",
            "loras[0]",
            "text_encoder.text_model.encoder.layers.0.self_attn.k_proj",
        ),
    ],
)
def test_resolve_errors_name_the_adapter_at_its_canonical_path(
    served_adapters, loras, lora, status, code, field, message
):
    with pytest.raises(FieldError) as e:
        resolver_for(served_adapters, **lora).resolve(specs(*loras))
    assert (e.value.status, e.value.code, e.value.field) == (status, code, field)
    assert message in e.value.message


def test_an_adapter_for_another_base_model_is_incompatible(served_adapters, registry_tiny_spec):
    other = BaseModelSpec("sd2", registry_tiny_spec.modules)
    with pytest.raises(FieldError) as e:
        resolver_for(served_adapters, spec=other).resolve(specs("ink"))
    assert (e.value.status, e.value.code, e.value.field) == (422, "adapter_incompatible", "loras[0]")
    assert f"is for sd1 (base model {registry_tiny_spec.fingerprint})" in e.value.message
    assert f"this server serves sd2 (base model {other.fingerprint})" in e.value.message


def test_tags_are_named_by_the_field_they_came_in(served_adapters):
    # <lora:...> tags: not a list of their own, so errors name the prompt itself.
    with pytest.raises(FieldError) as e:
        resolver_for(served_adapters).resolve(specs("ink", "nosuch"), field="prompt", indexed=False)
    assert (e.value.status, e.value.field) == (404, "prompt")
    with pytest.raises(FieldError) as e:
        resolver_for(served_adapters, max_loras_per_request=1).resolve(
            specs("ink", "wide"), field="prompt", indexed=False
        )
    assert (e.value.field, e.value.message) == ("prompt", "prompt: at most 1 adapters per request, got 2")


def test_an_unreachable_registry_is_its_own_503_on_the_field(registry_tiny_spec, tmp_path):
    store = GatedStore(make_store("local", tmp_path))
    reg = fresh_registry(registry_tiny_spec, tmp_path, store)

    def down(*args):
        raise RegistryUnavailableError("connection refused", code="store_unreachable")

    store.hooks["list"] = down
    with pytest.raises(FieldError) as e:
        resolver_for(reg).resolve(specs("ink"))
    assert (e.value.status, e.value.code, e.value.field) == (503, "store_unreachable", "loras")
    assert "'ink'" in e.value.message and "connection refused" in e.value.message


# -- the admin API ----------------------------------------------------------------------------


@pytest.fixture
def admin(registry_tiny_spec, tmp_path) -> AdapterResolver:
    """A resolver over an empty registry of its own."""
    return resolver_for(fresh_registry(registry_tiny_spec, tmp_path))


def register(admin, name, seed=0, **fields):
    form = {"description": "", "trigger_words": "", "tags": "", "adapter_config": None, **fields}
    data = io.BytesIO(small_lora_bytes(admin.base, seed=seed))
    return admin.register(data, name, form["description"], form["trigger_words"], form["tags"], form["adapter_config"])


def test_register_splits_the_form_lists_and_reads_the_peft_config(admin):
    manifest = register(
        admin,
        "ink",
        description="ink wash",
        trigger_words=" ink style, brush ,,",
        tags="art",
        adapter_config=json.dumps({"r": 4, "lora_alpha": 8}),
    )
    assert (manifest.ref, manifest.description, manifest.alpha) == ("ink@1", "ink wash", 8.0)
    assert (manifest.trigger_words, manifest.tags) == (("ink style", "brush"), ("art",))
    assert register(admin, "ink", seed=1).ref == "ink@2"


def test_register_refuses_a_config_that_is_not_json_naming_the_field(admin):
    with pytest.raises(APIError) as e:
        register(admin, "ink", adapter_config="{not json")
    assert (e.value.status, e.value.code, e.value.field) == (422, "invalid_value", "adapter_config")
    assert e.value.message.startswith("adapter_config is not valid JSON")
    with pytest.raises(InvalidAdapterError):  # the registry's own refusal: errors.py answers it with its status
        register(admin, "Bad Name!")
    assert admin.list(None, 50, None) == {"data": [], "next": None}


def test_list_pages_by_name_and_filters_by_tag(admin):
    for i, (name, tags) in enumerate([("b", "art"), ("a", ""), ("c", "art,ink"), ("b", "")]):
        register(admin, name, seed=i, tags=tags)
    page = admin.list(None, 2, None)
    assert [(d["name"], d["versions"]) for d in page["data"]] == [("a", [1]), ("b", [1, 2])]
    assert page["next"] == "b"
    assert [d["name"] for d in admin.list(None, 2, "b")["data"]] == ["c"]
    assert admin.list(None, 2, "b")["next"] is None
    assert [d["name"] for d in admin.list("art", 50, None)["data"]] == ["c"]  # b's latest has no tag
    assert page["data"][1]["latest"]["version"] == 2


@pytest.mark.parametrize("limit", [0, 1001])
def test_list_limit_is_checked(admin, limit):
    with pytest.raises(APIError) as e:
        admin.list(None, limit, None)
    assert (e.value.status, e.value.field) == (422, "limit")
    assert e.value.message == f"limit must be in [1, 1000], got {limit}"


def test_show_and_delete(admin):
    for seed in range(3):
        register(admin, "ink", seed=seed)
    shown = admin.show("ink")
    assert (shown["ref"], shown["versions"], shown["name"]) == ("ink@3", [1, 2, 3], "ink")
    assert admin.show("ink@1")["ref"] == "ink@1"
    assert admin.delete("ink@3") == {"deleted": ["ink@3"]}
    assert admin.show("ink")["ref"] == "ink@2"
    assert admin.resolve(specs("ink")).applied == (("ink@2", 1.0),)
    assert admin.delete("ink") == {"deleted": ["ink@1", "ink@2"]}
    with pytest.raises(AdapterNotFoundError):
        admin.show("ink")
    with pytest.raises(FieldError) as e:
        admin.resolve(specs("ink"))
    assert (e.value.status, e.value.code) == (404, "adapter_not_found")


def test_more_adapters_than_a_replica_holds_is_refused_at_planning(served_adapters):
    with pytest.raises(FieldError) as e:
        resolver_for(served_adapters, max_loras_per_request=4, max_loras_per_replica=1).resolve(specs("ink", "wide"))
    assert (e.value.status, e.value.field, e.value.message) == (
        422,
        "loras",
        "loras: at most 1 adapters per request, got 2",
    )

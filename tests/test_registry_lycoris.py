"""The LoRA zoo (issue 18): LyCORIS LoCon / Tucker LoCon / LoHa / LoKr converted exactly at registration and
served in mixed batches; DoRA and modules the server does not target refused at registration.

References are independent of lorafleet's conversion: peft's ``LoHaConfig`` / ``LoKrConfig`` layers
(``get_delta_weight`` and their forward) for LoHa and LoKr, written out in LyCORIS's key layout; LyCORIS's own
Tucker formula (``rebuild_tucker``) and the three-convolution forward for Tucker LoCon.
"""

from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from deployments.engine.adapters import open_model_registry, served_targets
from deployments.engine.config import LoRAConfig
from deployments.engine.multi_lora import MultiLoRAModel
from lora_registry import Registry, RegistryConfig
from lora_registry.errors import InvalidAdapterError
from lora_registry.targets import ServedTargets
from lora_registry.validation import prepare_adapter

from lora_helpers import (
    UNET_ATTN,
    export_lycoris_state,
    lycoris_layers,
    make_peft_lora_file,
    peft_lycoris_model,
    tucker_locon_state,
)
from registry_helpers import diffusers_state, random_lora, store_keys, to_bytes

pytest_plugins = ["registry_helpers"]

CONVS = ["conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "conv_in", "conv_out"]
LINEARS = [*UNET_ATTN, "time_emb_proj", "ff.net.2"]
ATTENTION_ONLY = ServedTargets(
    {"unet": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")},
    config_keys={"unet": "lora.unet_target_modules"},
)


def _peft_configs():
    from peft import LoHaConfig, LoKrConfig

    targets = CONVS + LINEARS
    return {
        "loha": LoHaConfig(r=3, alpha=5, target_modules=targets, init_weights=False),
        "loha-tucker": LoHaConfig(r=2, alpha=3, target_modules=targets, init_weights=False, use_effective_conv2d=True),
        # w1 full, w2 = w2_a @ w2_b (r=2 is below half of every w2 side)
        "lokr": LoKrConfig(r=2, alpha=3, target_modules=targets, init_weights=False),
        # decompose_factor 8: w1 [8, 8] factorised too; w2 small and full
        "lokr-both": LoKrConfig(
            r=2, alpha=6, target_modules=targets, init_weights=False, decompose_both=True, decompose_factor=8
        ),
        # r=4 makes both factors full: LyCORIS's scale 1, peft's alpha / r folded in by the exporter
        "lokr-full": LoKrConfig(r=4, alpha=2, target_modules=targets, init_weights=False),
        "lokr-tucker": LoKrConfig(r=2, alpha=3, target_modules=targets, init_weights=False, use_effective_conv2d=True),
    }


@pytest.fixture(scope="module")
def peft_models(tiny):
    return {
        name: peft_lycoris_model(tiny["unet"], config, seed=i)
        for i, (name, config) in enumerate(_peft_configs().items())
    }


@pytest.fixture(scope="module")
def lycoris_files(peft_models):
    return {name: to_bytes(export_lycoris_state(model)) for name, model in peft_models.items()}


# -- exact conversion --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(_peft_configs()))
def test_loha_lokr_convert_exactly(name, peft_models, lycoris_files, registry_tiny_spec):
    """Every module's canonical update (alpha / r * B @ A) equals peft's ``get_delta_weight``."""
    model, data = peft_models[name], lycoris_files[name]
    keys = safetensors.torch.load(data).keys()
    assert any(".hada_" in k for k in keys) == name.startswith("loha")
    if name == "loha-tucker":
        assert any(k.endswith(".hada_t1") for k in keys)
    if name == "lokr-tucker":
        assert any(k.endswith(".lokr_t2") for k in keys)
    if name == "lokr-both":
        assert any(k.endswith(".lokr_w1_a") for k in keys)
    if name == "lokr-full":
        full = {k.removesuffix(".lokr_w2") for k in keys if k.endswith(".lokr_w2")}
        assert any(f"{m}.lokr_w1" in keys for m in full)  # modules with both factors full: scale 1 in LyCORIS
    adapter = prepare_adapter(data, registry_tiny_spec).adapter
    layers = lycoris_layers(model)
    assert sorted(adapter.component("unet")) == sorted(layers)
    assert adapter.dtype == torch.float32
    kinds = set()
    for path, layer in layers.items():
        want = layer.get_delta_weight("default").detach()
        got = adapter.component("unet")[path].delta_weight()
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item()), path
        kinds.add(type(layer.get_base_layer()).__name__ + str(getattr(layer.get_base_layer(), "kernel_size", "")))
    assert {"Linear", "Conv2d(3, 3)", "Conv2d(1, 1)"} <= kinds  # convs, 1x1 convs and linears all covered


def test_loha_rank_is_the_product_of_its_factors(lycoris_files, registry_tiny_spec):
    adapter = prepare_adapter(lycoris_files["loha"], registry_tiny_spec).adapter
    assert {w.rank for w in adapter.modules.values()} == {9}  # r1 * r2 = 3 * 3
    assert {round(w.scale, 6) for w in adapter.modules.values()} == {round(5 / 3, 6)}  # alpha / r, as peft's


def test_tucker_locon_converts_exactly(registry_tiny_spec):
    """``A' = mid ∘ down`` keeps the rank; the update equals LyCORIS's ``rebuild_tucker`` and the layer's
    output equals ``up(mid(down(x)))`` run as three convolutions."""
    state = tucker_locon_state(registry_tiny_spec, seed=3, rank=4)
    assert any(k.endswith(".lora_mid.weight") for k in state)
    adapter = prepare_adapter(to_bytes(state), registry_tiny_spec).adapter
    checked = 0
    for name, w in adapter.modules.items():
        kohya = "lora_unet_" + name.removeprefix("unet.").replace(".", "_")
        mid = state.get(f"{kohya}.lora_mid.weight")
        if mid is None:
            continue
        down, up, alpha = state[f"{kohya}.lora_down.weight"], state[f"{kohya}.lora_up.weight"], state[f"{kohya}.alpha"]
        scale = float(alpha) / down.shape[0]
        # LyCORIS: rebuild_tucker(t, wa, wb) = einsum("i j k l, i p, j r -> p r k l", mid, up^T, down)
        want = scale * torch.einsum("ijkl,ip,jr->prkl", mid, up.flatten(1).T, down.flatten(1))
        assert w.rank == 4 and w.A.shape[2:] == mid.shape[2:]
        assert (w.delta_weight() - want).abs().max().item() <= 1e-6
        shape = registry_tiny_spec.modules[name]
        x = torch.randn(2, shape.in_features, 8, 8)
        pad = 1  # the UNet's 3x3 convs pad by 1 (stride 1 or 2)
        stride = 2 if "downsamplers" in name else 1
        three = F.conv2d(F.conv2d(F.conv2d(x, down), mid, stride=stride, padding=pad), up) * scale
        one = F.conv2d(x, w.delta_weight(), stride=stride, padding=pad)
        assert (three - one).abs().max().item() <= 1e-5
        checked += 1
    assert checked >= 10


def test_converted_rank_above_max_rank_is_refused(adapter_store, lycoris_files, registry_tiny_spec):
    """A LoHa of rank 3 is a LoRA of rank 9: a registry whose max_rank is 8 refuses it, saying why."""
    registry = Registry(adapter_store, base=registry_tiny_spec, max_rank=8)
    with pytest.raises(InvalidAdapterError) as e:
        registry.register(lycoris_files["loha"], name="loha")
    assert e.value.code == "rank_too_high"
    assert "LoHa 3 x 3" in e.value.message and "max_rank=8" in e.value.message and "product" in e.value.message
    assert store_keys(adapter_store) == []
    assert (
        Registry(adapter_store, base=registry_tiny_spec, max_rank=9).register(lycoris_files["loha"], name="loha").rank
        == 9
    )


@pytest.mark.parametrize(
    "edit, code, key",
    [
        (lambda s, k: s.pop(f"{k}.hada_w2_b"), "incomplete_pairs", "unet."),
        (lambda s, k: s.update({f"{k}.hada_w1_b": torch.zeros(3, 7)}), "shape_mismatch", ".hada_w1_b"),
        (lambda s, k: s.update({f"{k}.lokr_w1": torch.zeros(2, 2)}), "unsupported_keys", "unet."),  # mixes algos
        (lambda s, k: s.update({f"{k}.diff": torch.zeros(2, 2)}), "unsupported_keys", ".diff"),  # LyCORIS "full"
    ],
    ids=["missing-factor", "wrong-shape", "mixed-algorithms", "full-diff"],
)
def test_malformed_lycoris_is_refused(lycoris_files, registry_tiny_spec, edit, code, key):
    state = safetensors.torch.load(lycoris_files["loha"])
    module = sorted(k for k in state if k.endswith("attn1_to_q.hada_w1_a"))[0].removesuffix(".hada_w1_a")
    edit(state, module)
    with pytest.raises(InvalidAdapterError) as e:
        prepare_adapter(to_bytes(state), registry_tiny_spec)
    assert e.value.code == code
    assert any(key in k for k in e.value.keys)


# -- DoRA: refused at registration, in every form ------------------------------------------------------------------


def _dora_peft(spec):
    state = diffusers_state(random_lora(spec))
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    state[f"{q}.lora_magnitude_vector"] = torch.ones(32)
    return to_bytes(state), None


def _dora_lycoris(spec):
    state = tucker_locon_state(spec, seed=1, rank=2)
    name = sorted(k for k in state if k.endswith(".lora_down.weight"))[0].removesuffix(".lora_down.weight")
    state[f"{name}.dora_scale"] = torch.ones(state[f"{name}.lora_up.weight"].shape[0], 1, 1, 1)
    return to_bytes(state), None


def _dora_config(spec):
    return to_bytes(diffusers_state(random_lora(spec))), {"r": 4, "lora_alpha": 4, "use_dora": True}


def _dora_metadata(spec):
    import json

    state = diffusers_state(random_lora(spec))
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 4, "unet.use_dora": True})}
    return safetensors.torch.save({k: v.contiguous() for k, v in state.items()}, metadata=meta), None


@pytest.mark.parametrize("make", [_dora_peft, _dora_lycoris, _dora_config, _dora_metadata])
def test_dora_is_refused_at_registration(adapter_registry, registry_tiny_spec, make):
    data, config = make(registry_tiny_spec)
    with pytest.raises(InvalidAdapterError) as e:
        adapter_registry.register(data, name="dora", adapter_config=config)
    assert (e.value.status, e.value.code) == (422, "dora_unsupported")
    assert "DoRA" in e.value.message and "scale" in e.value.message
    assert store_keys(adapter_registry.store) == []


# -- what the server targets decides what registers -------------------------------------------------------------


def test_untargeted_modules_are_refused_at_registration(adapter_store, registry_tiny_spec):
    """A LoCon adapter on a registry whose server carries slots on attention only: 422 at registration, naming
    the modules and the config key; the same file registers where the targets reach it (the default)."""
    data = to_bytes(tucker_locon_state(registry_tiny_spec, seed=2, rank=2))
    narrow = Registry(adapter_store, base=registry_tiny_spec, targets=ATTENTION_ONLY)
    with pytest.raises(InvalidAdapterError) as e:
        narrow.register(data, name="locon")
    assert (e.value.status, e.value.code) == (422, "untargeted_modules")
    assert "lora.unet_target_modules" in e.value.message
    assert "unet.conv_in" in e.value.keys and all(
        ".resnets." in k or "sampl" in k or "conv_" in k for k in e.value.keys
    )
    assert store_keys(adapter_store) == []
    wide = Registry(adapter_store, base=registry_tiny_spec, targets=served_targets(LoRAConfig()))
    assert "unet.conv_in" in wide.register(data, name="locon").target_modules


def test_default_targets_reach_every_unet_module(registry_tiny_spec, tiny_sdxl_dir):
    """The default ``lora.unet_target_modules`` covers every Linear / Conv2d of the SD1.x / SD2.x / SDXL UNets."""
    from lora_registry import base_model_spec_from_dir
    from lora_registry.families import reference_spec

    targets = served_targets(LoRAConfig())
    specs = [registry_tiny_spec, base_model_spec_from_dir(tiny_sdxl_dir), *map(reference_spec, ("sd1", "sd2", "sdxl"))]
    for spec in specs:
        unet = [m for m in spec.modules if m.startswith("unet.")]
        assert targets.unreached(unet) == [], spec.label
    # text encoders: everything CLIP has but SDXL's text_projection
    xl = base_model_spec_from_dir(tiny_sdxl_dir)
    assert targets.unreached(m for m in xl.modules if not m.startswith("unet.")) == ["text_encoder_2.text_projection"]


def test_open_model_registry_passes_the_serving_limits(tmp_path, tiny_dir, registry_tiny_spec):
    lora = LoRAConfig(max_rank=16, unet_target_modules=("to_q",))
    registry, spec = open_model_registry(
        RegistryConfig(uri=str(tmp_path / "r"), cache_dir=str(tmp_path / "c")), tiny_dir, lora
    )
    assert registry.max_rank == 16 and registry.targets.suffixes["unet"] == ("to_q",)
    with pytest.raises(InvalidAdapterError) as e:
        registry.register(to_bytes(diffusers_state(random_lora(spec))), name="attn")  # to_q, to_k, to_v, to_out.0
    assert e.value.code == "untargeted_modules"
    plain, _ = open_model_registry(RegistryConfig(uri=str(tmp_path / "r"), cache_dir=str(tmp_path / "c")), tiny_dir)
    assert plain.targets is None


# -- served end to end: mixed batches through the engine's multi-LoRA layers -------------------------------------


@pytest.mark.parametrize("kernel", ["grouped", "gather", "row-invariant"])
def test_mixed_batch_equals_peft_per_row(
    kernel, tiny, tiny_dir, registry_tiny_spec, peft_models, lycoris_files, tmp_path
):
    """One UNet forward over rows with LoHa, LoKr, Tucker LoCon, a plain LoRA, two adapters at once and none:
    each row equals peft's model (or the merged reference) for that row alone."""
    from lora_registry.canonical import merge_into

    plain_file = make_peft_lora_file(tiny, tmp_path / "plain", seed=7, rank=4, alpha=8, unet_targets=UNET_ATTN)
    locon_state = tucker_locon_state(registry_tiny_spec, seed=5, rank=3, scale=0.05)
    canonical = {
        "loha": prepare_adapter(lycoris_files["loha-tucker"], registry_tiny_spec).adapter,
        "lokr": prepare_adapter(lycoris_files["lokr"], registry_tiny_spec).adapter,
        "plain": prepare_adapter(plain_file.read_bytes(), registry_tiny_spec).adapter,
        "locon": prepare_adapter(to_bytes(locon_state), registry_tiny_spec).adapter,
    }
    unet = copy.deepcopy(tiny["unet"])
    lora = MultiLoRAModel(
        unet,
        LoRAConfig().unet_target_modules,
        num_slots=5,
        max_rank=64,
        kernel=kernel,
        deterministic=kernel == "row-invariant",
    )
    slot = {}
    for i, (name, adapter) in enumerate(canonical.items(), start=1):
        lora.load(i, {p: (w.A, w.B, w.alpha) for p, w in adapter.component("unet").items()})
        slot[name] = i
    rows = [
        (("loha", 1.0),),
        (("plain", 0.7),),
        (),
        (("lokr", 1.0),),
        (("locon", 1.3),),
        (("plain", 1.0), ("loha", 1.0)),
    ]
    g = torch.Generator().manual_seed(0)
    n = len(rows)
    x = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.tensor([999, 500, 10, 250, 750, 600])
    c = torch.randn(n, 77, 64, generator=g)
    with torch.no_grad(), lora.routed([tuple((slot[a], s) for a, s in row) for row in rows]):
        batch = unet(x, t, encoder_hidden_states=c).sample

    def reference(row: int, adapters) -> torch.Tensor:
        if len(adapters) == 1 and adapters[0] == ("loha", 1.0):
            model = peft_models["loha-tucker"]
        elif len(adapters) == 1 and adapters[0] == ("lokr", 1.0):
            model = peft_models["lokr"]
        else:  # merged canonical weights (merge_into is the canonical form's reference semantics)
            model = copy.deepcopy(tiny["unet"])
            for name, scale in adapters:
                merge_into(canonical[name], {"unet": model}, scale=scale)
        with torch.no_grad():
            return model(x[row : row + 1], t[row : row + 1], encoder_hidden_states=c[row : row + 1]).sample[0]

    base = reference(2, ())
    for i, adapters in enumerate(rows):
        want = reference(i, adapters)
        assert (batch[i] - want).abs().max().item() <= 1e-4, (i, adapters)
        if adapters:
            assert (want - base).abs().max().item() > 1e-3  # the adapter really changes the output

"""Formats: diffusers/PEFT and kohya files become one canonical form that means what diffusers means.

The equivalence test builds a PEFT LoRA on the tiny model's UNet and text
encoder, saves it the diffusers way and as a kohya file, registers both, and
checks that the canonical weights, merged into the base model, give the same
UNet and text-encoder outputs as diffusers' ``load_lora_weights`` on each file.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from lora_registry import load_canonical, merge_into, prepare_adapter, save_canonical
from lora_registry.canonical import CanonicalAdapter, LoraWeights
from lora_registry.errors import InvalidAdapterError

from registry_helpers import (
    diffusers_state,
    kohya_name,
    kohya_state,
    random_lora,
    spec_paths,
    to_bytes,
)

pytest_plugins = ["registry_helpers"]

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]  # proj_in is a 1x1 Conv2d in SD1
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def _load_parts(tiny_dir):
    from deployments.engine.models import load_text_encoder, load_unet

    cpu = torch.device("cpu")
    return load_unet(tiny_dir, cpu, torch.float32), load_text_encoder(tiny_dir, cpu, torch.float32)


def _inputs():
    g = torch.Generator().manual_seed(7)
    sample = torch.randn(1, 4, 16, 16, generator=g)  # [batch, latent_channels, h, w]
    context = torch.randn(1, 8, 64, generator=g)  # [batch, tokens, cross_attention_dim]
    input_ids = torch.tensor([[49406, 320, 1125, 539, 49407]])  # [batch, tokens]
    return sample, context, input_ids


@torch.no_grad()
def _outputs(unet, text_encoder):
    sample, context, input_ids = _inputs()
    eps = unet(sample, 10, encoder_hidden_states=context).sample
    hidden = text_encoder(input_ids).last_hidden_state
    return eps, hidden


@pytest.fixture(scope="module")
def peft_lora(tiny_dir, tmp_path_factory):
    """A PEFT LoRA (r=4, alpha=8, random A and B) on the tiny UNet and text encoder, in three file layouts."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    unet, text_encoder = _load_parts(tiny_dir)
    torch.manual_seed(1234)
    unet_config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=UNET_TARGETS)
    unet.add_adapter(unet_config)
    te_config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TE_TARGETS)
    text_encoder = inject_adapter_in_model(te_config, text_encoder)
    unet_state = get_peft_model_state_dict(unet)  # "down_blocks...to_q.lora_A.weight"
    te_state = get_peft_model_state_dict(text_encoder)  # "encoder.layers.0...q_proj.lora_A.weight" (transformers 5)

    root = tmp_path_factory.mktemp("peft-lora")
    StableDiffusionPipeline.save_lora_weights(
        root / "diffusers",
        unet_lora_layers=unet_state,
        text_encoder_lora_layers=te_state,
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict(),
    )
    kohya = {}
    for prefix, state in (("unet.", unet_state), ("text_encoder.text_model.", te_state)):
        for key, tensor in state.items():
            module, _, rest = key.partition(".lora_")
            name = kohya_name(prefix + module.removeprefix("text_model."))
            kohya[f"{name}.lora_{'down' if rest.startswith('A') else 'up'}.weight"] = tensor
            kohya[f"{name}.alpha"] = torch.tensor(8.0)
    (root / "kohya").mkdir()
    (root / "kohya" / "style.safetensors").write_bytes(to_bytes(kohya))
    (root / "peft").mkdir()
    (root / "peft" / "adapter_model.safetensors").write_bytes(to_bytes(unet_state))
    (root / "peft" / "adapter_config.json").write_text(json.dumps(unet_config.to_dict(), default=list))
    # Ground truth: the PEFT-adapted models that produced the weights.
    return {"root": root, "peft_outputs": _outputs(unet, text_encoder)}


def _diffusers_reference(tiny_dir, directory, weight_name):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), local_files_only=True, safety_checker=None)
    pipe.load_lora_weights(str(directory), weight_name=weight_name)
    return _outputs(pipe.unet, pipe.text_encoder)


def _merged(tiny_dir, adapter: CanonicalAdapter, components=("unet", "text_encoder")):
    unet, text_encoder = _load_parts(tiny_dir)
    models = {"unet": unet, "text_encoder": text_encoder}
    merge_into(adapter, {c: models[c] for c in components})
    return _outputs(unet, text_encoder)


def test_kohya_and_diffusers_files_serve_what_diffusers_loads(tiny_dir, peft_lora, adapter_registry):
    diffusers_file = peft_lora["root"] / "diffusers" / "pytorch_lora_weights.safetensors"
    kohya_file = peft_lora["root"] / "kohya" / "style.safetensors"
    m_diffusers = adapter_registry.register(diffusers_file, name="from-diffusers")
    m_kohya = adapter_registry.register(kohya_file, name="from-kohya")

    assert (m_diffusers.source_format, m_kohya.source_format) == ("diffusers", "kohya")
    # 10 transformer blocks (3 down, 1 mid, 6 up) x (2 attentions x 4 projections + proj_in); 4 text layers x 5
    assert len(m_kohya.target_modules) == 10 * 9 + 4 * 5
    assert (m_kohya.rank, m_kohya.alpha, m_kohya.has_text_encoder) == (4, 8.0, True)
    # Same weights, same alpha -> byte-identical canonical blobs.
    assert m_kohya.sha256 == m_diffusers.sha256

    base_eps, base_hidden = _outputs(*_load_parts(tiny_dir))
    for ref, directory, weight_name in [
        ("from-diffusers", diffusers_file.parent, diffusers_file.name),
        ("from-kohya", kohya_file.parent, kohya_file.name),
    ]:
        ref_eps, ref_hidden = _diffusers_reference(tiny_dir, directory, weight_name)
        _, adapter = adapter_registry.load(ref)
        eps, hidden = _merged(tiny_dir, adapter)
        assert (ref_eps - base_eps).abs().max() > 1e-2  # the LoRA really changes the output
        assert (ref_hidden - base_hidden).abs().max() > 1e-2
        assert (eps - ref_eps).abs().max().item() <= 1e-5, ref
        assert (hidden - ref_hidden).abs().max().item() <= 1e-5, ref
        peft_eps, peft_hidden = peft_lora["peft_outputs"]
        assert (eps - peft_eps).abs().max().item() <= 1e-5, ref
        assert (hidden - peft_hidden).abs().max().item() <= 1e-5, ref


def test_peft_adapter_dir_with_config_matches_peft(tiny_dir, peft_lora, adapter_registry):
    """A bare PEFT adapter (unprefixed keys + adapter_config.json) means what PEFT means: alpha from the config."""
    peft_dir = peft_lora["root"] / "peft"
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    manifest = adapter_registry.register(peft_dir / "adapter_model.safetensors", name="peft-dir", adapter_config=config)
    assert (manifest.rank, manifest.alpha, manifest.has_text_encoder) == (4, 8.0, False)
    _, adapter = adapter_registry.load("peft-dir")
    eps, _ = _merged(tiny_dir, adapter, components=("unet",))
    peft_eps, _ = peft_lora["peft_outputs"]
    assert (eps - peft_eps).abs().max().item() <= 1e-5


Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"


def _alphas(prepared) -> dict[str, float]:
    return {name: w.alpha for name, w in prepared.adapter.modules.items() if name in (Q, K)}


def _metadata(**config) -> dict[str, str]:
    return {"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()})}


@pytest.mark.parametrize(
    "fmt, metadata, adapter_config, alpha_tensor, expected",
    [
        ("diffusers", None, None, None, {Q: 4.0, K: 4.0}),  # nothing anywhere: alpha = r (scale 1)
        ("diffusers", _metadata(r=4, lora_alpha=8), None, None, {Q: 8.0, K: 8.0}),
        ("diffusers", _metadata(r=4, lora_alpha=8, alpha_pattern={"attn1.to_q": 2}), None, None, {Q: 2.0, K: 8.0}),
        ("diffusers", None, {"r": 4, "lora_alpha": 16}, None, {Q: 16.0, K: 16.0}),
        ("diffusers", _metadata(lora_alpha=8), {"lora_alpha": 16}, None, {Q: 16.0, K: 16.0}),  # config wins
        ("diffusers", None, {"lora_alpha": 8, "use_rslora": True}, None, {Q: 16.0, K: 16.0}),  # 8 * sqrt(4)
        ("diffusers", None, None, 3.0, {Q: 3.0, K: 3.0}),  # diffusers-converted kohya: unet.<m>.alpha
        ("kohya", None, None, 1.0, {Q: 1.0, K: 1.0}),
        ("kohya", None, None, None, {Q: 4.0, K: 4.0}),
    ],
)
def test_alpha_sources(registry_tiny_spec, fmt, metadata, adapter_config, alpha_tensor, expected):
    weights = random_lora(registry_tiny_spec, rank=4, unet_targets=("attn1.to_q", "attn1.to_k"))
    if fmt == "kohya":
        state = kohya_state(weights, alpha_tensor)
    else:
        state = diffusers_state(weights)
        if alpha_tensor is not None:
            state.update({f"{name}.alpha": torch.tensor(alpha_tensor) for name in weights})
    prepared = prepare_adapter(to_bytes(state, metadata), registry_tiny_spec, adapter_config=adapter_config)
    assert _alphas(prepared) == expected
    assert prepared.source_format == fmt


def test_canonical_layout_shapes_and_round_trip(registry_tiny_spec):
    weights = random_lora(registry_tiny_spec, rank=3, unet_targets=("attn2.to_k", "proj_in", "conv_in"))
    prepared = prepare_adapter(to_bytes(kohya_state(weights, 6.0)), registry_tiny_spec)
    adapter = prepared.adapter
    to_k = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    proj_in = "unet.down_blocks.1.attentions.0.proj_in"
    assert tuple(adapter.modules[to_k].A.shape) == (3, 64)  # [r, in_features = cross_attention_dim]
    assert tuple(adapter.modules[to_k].B.shape) == (64, 3)  # [out_features, r]
    assert tuple(adapter.modules[proj_in].A.shape) == (3, 64, 1, 1)  # [r, in_channels, 1, 1]
    assert tuple(adapter.modules["unet.conv_in"].A.shape) == (3, 4, 3, 3)  # [r, in_channels, kh, kw]
    assert tuple(adapter.modules["unet.conv_in"].B.shape) == (32, 3, 1, 1)  # [out_channels, r, 1, 1]
    assert adapter.modules["unet.conv_in"].scale == 2.0

    back = load_canonical(prepared.blob)
    assert sorted(back.modules) == sorted(adapter.modules)
    for name, w in adapter.modules.items():
        assert torch.equal(back.modules[name].A, w.A) and torch.equal(back.modules[name].B, w.B)
        assert back.modules[name].alpha == w.alpha
    assert save_canonical(back, {"base_fingerprint": registry_tiny_spec.fingerprint}) == prepared.blob
    # The canonical file's own keys: "<module>.lora_A" / ".lora_B" / ".alpha" (0-d float32).
    import safetensors.torch

    state = safetensors.torch.load(prepared.blob)
    assert set(state) == {f"{m}.{s}" for m in adapter.modules for s in ("lora_A", "lora_B", "alpha")}
    assert state["unet.conv_in.alpha"].shape == () and state["unet.conv_in.alpha"].dtype == torch.float32


def test_conv_delta_matches_peft_composition():
    g = torch.Generator().manual_seed(0)
    w = LoraWeights(A=torch.randn(2, 3, 3, 3, generator=g), B=torch.randn(5, 2, 1, 1, generator=g), alpha=4.0)
    x = torch.randn(1, 3, 8, 8, generator=g)
    # PEFT's Conv2d LoRA: lora_B(lora_A(x)) * scale, with lora_A a 3x3 conv and lora_B a 1x1 conv.
    expected = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, w.A, padding=1), w.B) * (4.0 / 2)
    got = torch.nn.functional.conv2d(x, w.delta_weight(), padding=1)
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "dtypes, expected",
    [
        ((torch.float16, torch.float16), torch.float16),
        ((torch.float32, torch.float32), torch.float32),
        ((torch.bfloat16, torch.bfloat16), torch.float32),
        ((torch.float16, torch.float32), torch.float32),
    ],
)
def test_dtype_kept_or_widened(registry_tiny_spec, dtypes, expected):
    weights = random_lora(registry_tiny_spec, unet_targets=("attn1.to_q", "attn1.to_k"))
    state = diffusers_state(weights)
    for i, key in enumerate(sorted(k for k in state if k.endswith("lora_A.weight"))):
        state[key] = state[key].to(dtypes[i % 2])
    for key in (k for k in state if k.endswith("lora_B.weight")):
        state[key] = state[key].to(dtypes[0])
    adapter = prepare_adapter(to_bytes(state), registry_tiny_spec).adapter
    assert {w.A.dtype for w in adapter.modules.values()} == {expected}
    assert {w.B.dtype for w in adapter.modules.values()} == {expected}


def test_kohya_linear_weights_stored_as_1x1_conv_are_accepted(registry_tiny_spec):
    weights = random_lora(registry_tiny_spec, unet_targets=("attn1.to_q",))
    state = {k: v[..., None, None] for k, v in kohya_state(weights, 4.0).items() if not k.endswith(".alpha")}
    adapter = prepare_adapter(to_bytes(state), registry_tiny_spec).adapter
    assert {tuple(w.A.shape) for w in adapter.modules.values()} == {(4, 32), (4, 64)}


def test_text_encoder_only_adapter(registry_tiny_spec):
    weights = random_lora(registry_tiny_spec, unet_targets=(), te_targets=("q_proj",))
    adapter = prepare_adapter(to_bytes(kohya_state(weights, 2.0)), registry_tiny_spec).adapter
    assert sorted(adapter.modules) == [f"text_encoder.text_model.encoder.layers.{i}.self_attn.q_proj" for i in range(4)]
    assert adapter.has_text_encoder and adapter.rank == 4 and math.isclose(adapter.alpha, 2.0)


def test_spec_paths_helper_covers_attention(registry_tiny_spec):
    assert len(spec_paths(registry_tiny_spec, "unet", ("to_q",))) == 20  # attn1 + attn2 in 10 blocks


def test_dora_config_is_refused(registry_tiny_spec):
    data = to_bytes(diffusers_state(random_lora(registry_tiny_spec)))
    with pytest.raises(InvalidAdapterError) as e:
        prepare_adapter(data, registry_tiny_spec, adapter_config={"lora_alpha": 8, "use_dora": True})
    assert e.value.code == "dora_unsupported"

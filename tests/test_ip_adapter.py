"""IP-Adapter per row (issue 22): the engine's latents equal diffusers' pipeline with ``load_ip_adapter`` +
``set_ip_adapter_scale`` on the same weights, seed and reference image, alone and in mixed batches with LoRA
rows, plain rows, img2img rows and rows with other images and scales; rows without an image get exactly the
base result; weights that do not fit the UNet fail at load with one line naming the key."""

from __future__ import annotations

import dataclasses
import types
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from deployments.engine.batch_invariance import _linear_forward, invariant_attention, make_batch_invariant
from deployments.engine.builtin import IP_ADAPTER_FILES, save_ip_adapter_file, write_builtin_ip_adapter
from deployments.engine.ip_adapter import (
    IPAdapterError,
    IPAdapterModel,
    IPAdapterRowsProcessor,
    IPAdapterWeights,
    encode_image,
    read_ip_adapter_file,
    resolve_ip_adapter_dir,
)
from deployments.engine.multi_lora import MultiLoRAModel
from lora_registry.base_model import base_model_spec_from_dir
from lora_registry.validation import prepare_adapter

from engine_helpers import Engine
from lora_helpers import UNET_ATTN, make_peft_lora_file

STEPS, SIZE = 3, 64
# InstantStyle's style-only transfer, for this UNet's layout (up block 1 has two attention layers).
STYLE_ONLY = {"up": {"block_1": [0.0, 1.0]}}


@pytest.fixture(scope="module")
def ip_dir(cache_dir):
    return resolve_ip_adapter_dir("builtin:tiny-sd", cache_dir)


@pytest.fixture(scope="module")
def image_encoder(ip_dir):
    from transformers import CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection.from_pretrained(ip_dir / "image_encoder").eval()


@pytest.fixture(scope="module")
def lora_file(tiny, tmp_path_factory):
    return make_peft_lora_file(
        tiny, tmp_path_factory.mktemp("ip-lora"), seed=1, rank=4, alpha=8, unet_targets=UNET_ATTN
    )


def pixels(seed: int) -> torch.Tensor:
    """A reference image as the CLIP encoder's input (pixel values [1, 3, 32, 32])."""
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 4 - 2


class IPEngine(Engine):
    """The engine with IP-Adapter rows (and, given a LoRA file, a multi-LoRA UNet with it in slot 1)."""

    def __init__(self, tiny, tiny_dir, ip_dir, variant="plain", lora_file=None):
        super().__init__(tiny)
        if lora_file is not None:
            adapter = prepare_adapter(lora_file.read_bytes(), base_model_spec_from_dir(tiny_dir)).adapter
            self.lora = MultiLoRAModel(self.unet, UNET_ATTN, num_slots=2, max_rank=8, deterministic=True)
            self.lora.load(1, {p: (w.A, w.B, w.alpha) for p, w in adapter.component("unet").items()})
            self.steps.lora = self.lora
        weights = IPAdapterWeights.from_file(ip_dir / IP_ADAPTER_FILES[variant], self.unet)
        self.ip = IPAdapterModel(self.unet, weights, max_rows=16)
        self.ip.install()
        self.steps.ip_adapter = self.ip

    def ip_request(self, prompt, embeds=None, *, scale=1.0, seed=0, guidance_scale=7.5, lora=None, **kw):
        request = self.request(
            prompt, size=SIZE, steps=STEPS, seed=seed, scheduler="ddim", guidance_scale=guidance_scale
        )
        if lora is not None:
            request = dataclasses.replace(request, adapters=((1, lora),))
        if embeds is None:
            return dataclasses.replace(request, **kw)
        pos, neg = embeds
        return dataclasses.replace(
            request, ip_adapter_embeds=pos[0], negative_ip_adapter_embeds=neg[0], ip_adapter_scale=scale, **kw
        )


def run_latents(engine, requests) -> torch.Tensor:
    jobs = engine.steps.submit(requests)
    while not engine.steps.idle:
        engine.steps.tick()
    for j in jobs:
        assert j.error is None, j.error
    return torch.cat([j.x_t for j in jobs])


class _InvariantF:
    """``torch.nn.functional`` for diffusers' attention processors, with ``scaled_dot_product_attention`` through the
    engine's batch-invariant kernel (the same function; the rounding of the engine's deterministic mode)."""

    def __getattr__(self, name):
        return getattr(F, name)

    @staticmethod
    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False):
        assert dropout_p == 0.0 and not is_causal
        return invariant_attention(query, key, value, attn_mask)


class InvariantIPAdapter:
    """Run diffusers' own ``IPAdapterAttnProcessor2_0`` on the engine's batch-invariant kernels, as the LoRA tests
    give peft's layers those kernels: its ``to_k_ip``/``to_v_ip`` linears and its attention calls. Its arithmetic
    is unchanged; only last-bit rounding (which guidance amplifies) then matches the engine's."""

    def __init__(self, pipe):
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

        for proc in pipe.unet.attn_processors.values():
            if isinstance(proc, IPAdapterAttnProcessor2_0):
                for linear in [*proc.to_k_ip, *proc.to_v_ip]:
                    linear.forward = types.MethodType(_linear_forward, linear)

    def __enter__(self):
        from diffusers.models import attention_processor

        self._patch = mock.patch.object(attention_processor, "F", _InvariantF())
        self._patch.__enter__()
        return self

    def __exit__(self, *exc):
        self._patch.__exit__(*exc)


def reference_pipe(tiny, ip_dir, image_encoder, *, image, scale, variant="plain", lora=None, cls=None):
    """diffusers alone: ``StableDiffusionPipeline`` (or ``cls``) + ``load_ip_adapter`` (from the builtin's
    files) + ``set_ip_adapter_scale``, the same UNet weights (batch-invariant kernels, as the engine's)."""
    from diffusers import StableDiffusionPipeline

    ref = Engine(tiny)
    pipe = (cls or StableDiffusionPipeline)(
        vae=ref.vae,
        text_encoder=ref.text_encoder,
        tokenizer=ref.tokenizer,
        unet=ref.unet,
        scheduler=ref.schedulers.create("ddim"),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=image_encoder,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        name, file, weight = lora
        pipe.load_lora_weights(str(file), adapter_name=name)
        pipe.set_adapters([name], adapter_weights=[weight])
        make_batch_invariant(pipe.unet)  # peft's layers get the engine's kernels (before the IP processors)
    if image is not None:
        pipe.load_ip_adapter(
            str(ip_dir), subfolder="", weight_name=IP_ADAPTER_FILES[variant], image_encoder_folder=None
        )
        pipe.set_ip_adapter_scale(scale)
    return pipe


def reference_latents(
    tiny,
    ip_dir,
    image_encoder,
    prompt,
    image=None,
    *,
    scale=1.0,
    variant="plain",
    seed=0,
    guidance_scale=7.5,
    lora=None,
):
    pipe = reference_pipe(tiny, ip_dir, image_encoder, image=image, scale=scale, variant=variant, lora=lora)
    kwargs = {} if image is None else {"ip_adapter_image": image}
    with InvariantIPAdapter(pipe):
        return pipe(
            prompt,
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
            **kwargs,
        ).images


@pytest.mark.parametrize("variant", ["plain", "plus"])
def test_alone_equals_diffusers(tiny, tiny_dir, ip_dir, image_encoder, variant):
    engine = IPEngine(tiny, tiny_dir, ip_dir, variant)
    image = pixels(1)
    embeds = encode_image(image_encoder, image, hidden_states=variant == "plus")
    ours = run_latents(engine, [engine.ip_request("a cat", embeds, scale=0.7, seed=1)])
    ref = reference_latents(tiny, ip_dir, image_encoder, "a cat", image, scale=0.7, variant=variant, seed=1)
    base = reference_latents(tiny, ip_dir, image_encoder, "a cat", seed=1)
    assert ours.shape == ref.shape == (1, 4, 8, 8)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert (ref - base).abs().max().item() > 1e-2  # the image term matters: a no-op could not pass


def test_mixed_batch_equals_diffusers_alone(tiny, tiny_dir, ip_dir, image_encoder, lora_file):
    engine = IPEngine(tiny, tiny_dir, ip_dir, "plain", lora_file=lora_file)
    img_a, img_b = pixels(1), pixels(2)
    emb_a, emb_b = (encode_image(image_encoder, x, hidden_states=False) for x in (img_a, img_b))
    cases = [
        # prompt, image, embeds, scale, seed, guidance, lora weight
        ("a cat", img_a, emb_a, 0.6, 1, 7.5, None),
        ("a cat", None, None, None, 2, 7.5, None),  # no image, beside image rows
        ("a red fox", img_b, emb_b, 1.0, 3, 7.5, 0.8),  # LoRA and an image
        ("a red fox", img_b, emb_b, STYLE_ONLY, 4, 7.5, None),  # per-block scales
        ("a house", None, None, None, 5, 7.5, 0.8),  # LoRA, no image
        ("a house", img_a, emb_a, 1.3, 6, 1.0, None),  # no guidance: one UNet row
    ]
    requests = [
        engine.ip_request(p, e, scale=s, seed=seed, guidance_scale=g, lora=w) for p, _, e, s, seed, g, w in cases
    ]
    before = engine.steps.ticks_run
    batched = run_latents(engine, requests)
    assert engine.steps.ticks_run - before == STEPS  # one batch: every request in each forward
    for i, (p, image, _, s, seed, g, w) in enumerate(cases):
        lora = None if w is None else ("style", lora_file, w)
        ref = reference_latents(tiny, ip_dir, image_encoder, p, image, scale=s, seed=seed, guidance_scale=g, lora=lora)
        assert (batched[i] - ref[0]).abs().max().item() <= 1e-4, cases[i][:2]


def test_img2img_and_inpainting_rows_with_images(tiny, tiny_dir, ip_dir, image_encoder):
    """img2img and inpainting (4-channel UNet: latent blending) rows with reference images, batched with a
    text-to-image one, equal StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline with load_ip_adapter."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
    from test_inpaint_equivalence import conditioned_request, init_image, mask_image

    engine = IPEngine(tiny, tiny_dir, ip_dir, "plain")
    img_a, img_b = pixels(4), pixels(5)
    emb_a, emb_b = (encode_image(image_encoder, x, hidden_states=False) for x in (img_a, img_b))
    init, mask = init_image(1), mask_image()
    common = dict(channels=4, scheduler="ddim", steps=4, strength=0.75)
    requests = [
        conditioned_request(engine, "a watercolor cat", image=init, mask=None, seed=1, **common),
        conditioned_request(engine, "a watercolor cat", image=init, mask=mask, seed=2, **common),
        engine.ip_request("a watercolor cat", emb_a, scale=0.8, seed=3),
    ]
    requests[0] = dataclasses.replace(requests[0], ip_adapter_embeds=emb_a[0][0], ip_adapter_scale=0.9)
    requests[1] = dataclasses.replace(requests[1], ip_adapter_embeds=emb_b[0][0], ip_adapter_scale=STYLE_ONLY)
    batched = run_latents(engine, requests)
    refs = []
    for cls, ref_image, scale, seed, extra in [
        (StableDiffusionImg2ImgPipeline, img_a, 0.9, 1, {}),
        (StableDiffusionInpaintPipeline, img_b, STYLE_ONLY, 2, {"mask_image": mask, "height": SIZE, "width": SIZE}),
    ]:
        pipe = reference_pipe(tiny, ip_dir, image_encoder, image=ref_image, scale=scale, cls=cls)
        with InvariantIPAdapter(pipe):
            ref = pipe(
                "a watercolor cat",
                image=init,
                strength=0.75,
                num_inference_steps=4,
                guidance_scale=7.5,
                generator=torch.Generator().manual_seed(seed),
                ip_adapter_image=ref_image,
                output_type="latent",
                **extra,
            ).images
        refs.append(ref)
    refs.append(reference_latents(tiny, ip_dir, image_encoder, "a watercolor cat", img_a, scale=0.8, seed=3))
    for i, ref in enumerate(refs):
        assert (batched[i] - ref[0]).abs().max().item() <= 1e-4, i


def test_rows_without_image_are_exactly_the_base(tiny, tiny_dir, ip_dir, image_encoder):
    """Bit for bit: a row without an image, batched with image rows, equals the engine without IP-Adapter."""
    plain = Engine(tiny)
    alone = run_latents(plain, [plain.request("a boat", size=SIZE, steps=STEPS, seed=7, scheduler="ddim")])
    engine = IPEngine(tiny, tiny_dir, ip_dir, "plain")
    emb = encode_image(image_encoder, pixels(3), hidden_states=False)
    batched = run_latents(
        engine,
        [engine.ip_request("a boat", emb, seed=8), engine.ip_request("a boat", seed=7), engine.ip_request("x", emb)],
    )
    assert torch.equal(batched[1], alone[0])
    assert not torch.equal(batched[0], batched[1])


def test_per_block_scales_reach_only_their_layers(tiny, tiny_dir, ip_dir):
    engine = IPEngine(tiny, tiny_dir, ip_dir, "plain")
    scales = engine.ip.layer_scales(STYLE_ONLY).tolist()
    layers = engine.ip.weights.layers
    assert dict(zip(layers, scales, strict=True)) == {
        name: (1.0 if name.startswith("up_blocks.1.attentions.1") else 0.0) for name in layers
    }
    assert engine.ip.layer_scales(0.5).tolist() == [0.5] * len(layers)
    with pytest.raises(ValueError, match="ip_adapter_scale: Expected 2 scales for up.block_1, got 3"):
        engine.ip.layer_scales({"up": {"block_1": [0.0, 1.0, 0.0]}})
    with pytest.raises(ValueError, match="ip_adapter_scale must be a number"):
        engine.ip.layer_scales("strong")
    procs = [engine.unet.get_submodule(n).get_processor() for n in layers]
    assert all(isinstance(p, IPAdapterRowsProcessor) and p.invariant for p in procs)


def test_bad_requests_fail_at_submit(tiny, tiny_dir, ip_dir, image_encoder):
    plain = Engine(tiny)
    emb = encode_image(image_encoder, pixels(1), hidden_states=False)
    request = dataclasses.replace(plain.request("a cat", size=SIZE, steps=STEPS), ip_adapter_embeds=emb[0][0])
    with pytest.raises(ValueError, match="served without IP-Adapter weights"):
        plain.steps.submit([request])
    engine = IPEngine(tiny, tiny_dir, ip_dir, "plain")
    wrong = dataclasses.replace(request, ip_adapter_embeds=torch.zeros(7))
    with pytest.raises(
        ValueError, match=r"ip_adapter_embeds is \[7\]; this plain IP-Adapter reads \[dim\] with dim 48"
    ):
        engine.steps.submit([wrong])
    engine.steps.ip_adapter = IPAdapterModel(engine.unet, engine.ip.weights, max_rows=4)
    with pytest.raises(ValueError, match="the IP-Adapter's buffers hold 4 rows; max_rows_per_tick is 16"):
        engine.steps.submit([request])
    assert engine.steps.idle


def test_bad_weights_fail_at_load_naming_the_key(tiny, ip_dir, tmp_path):
    state = read_ip_adapter_file(ip_dir / IP_ADAPTER_FILES["plain"])
    unet = tiny["unet"]
    assert IPAdapterWeights.load(state, unet).num_tokens == 4

    wrong = {"image_proj": state["image_proj"], "ip_adapter": {**state["ip_adapter"]}}
    wrong["ip_adapter"]["5.to_v_ip.weight"] = torch.zeros(32, 64)
    path = save_ip_adapter_file(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(IPAdapterError) as e:
        IPAdapterWeights.from_file(path, unet)
    assert str(e.value) == (
        "ip_adapter.5.to_v_ip.weight is [32, 64]; the served UNet's "
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2 needs [64, 64]"
    )

    missing = {"image_proj": state["image_proj"], "ip_adapter": {**state["ip_adapter"]}}
    del missing["ip_adapter"]["1.to_k_ip.weight"]
    with pytest.raises(IPAdapterError, match=r"^ip_adapter.1.to_k_ip.weight is missing: the served UNet's down_blocks"):
        IPAdapterWeights.load(missing, unet)

    extra = {
        "image_proj": state["image_proj"],
        "ip_adapter": {**state["ip_adapter"], "21.to_k_ip.weight": torch.zeros(1)},
    }
    with pytest.raises(IPAdapterError, match=r"^ip_adapter.21.to_k_ip.weight has no cross-attention layer"):
        IPAdapterWeights.load(extra, unet)

    proj = {
        "image_proj": {**state["image_proj"], "proj.weight": torch.zeros(128, 48)},
        "ip_adapter": state["ip_adapter"],
    }
    with pytest.raises(
        IPAdapterError, match=r"^image_proj.proj.weight is \[128, 48\]; the served UNet needs \[256, dim\]"
    ):
        IPAdapterWeights.load(proj, unet)

    for message in (str(e.value),):
        assert "\n" not in message


def test_builtin_ip_adapter_is_deterministic_and_cached(ip_dir, cache_dir, tmp_path):
    import hashlib

    def digest(d):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*.safetensors"))}

    again = write_builtin_ip_adapter("builtin:tiny-sd", tmp_path / "again")
    assert digest(again) == digest(ip_dir)
    assert set(digest(ip_dir)) == {"model.safetensors", *IP_ADAPTER_FILES.values()}
    assert resolve_ip_adapter_dir("builtin:tiny-sd", cache_dir) == ip_dir
    with pytest.raises(IPAdapterError, match="no such directory"):
        resolve_ip_adapter_dir(str(tmp_path / "nope"))


def test_sdxl_alone_equals_diffusers(tiny_sdxl, cache_dir):
    """``builtin:tiny-sdxl``'s IP-Adapter: the engine equals StableDiffusionXLPipeline + load_ip_adapter."""
    from transformers import CLIPVisionModelWithProjection

    from engine_helpers import SDXLEngine

    ip_dir = resolve_ip_adapter_dir("builtin:tiny-sdxl", cache_dir)
    encoder = CLIPVisionModelWithProjection.from_pretrained(ip_dir / "image_encoder").eval()
    engine = SDXLEngine(tiny_sdxl)
    ip = IPAdapterModel(engine.unet, IPAdapterWeights.from_file(ip_dir / IP_ADAPTER_FILES["plain"], engine.unet))
    ip.install()
    engine.steps.ip_adapter = ip
    image = pixels(6)
    pos, neg = encode_image(encoder, image, hidden_states=False)
    request = engine.request("a lighthouse", steps=STEPS, seed=5)
    request = dataclasses.replace(request, ip_adapter_embeds=pos[0], negative_ip_adapter_embeds=neg[0])
    ours = engine.run_latents([dataclasses.replace(request, ip_adapter_scale=0.8)])
    ref_engine = SDXLEngine(tiny_sdxl)
    base = ref_engine.reference_latents("a lighthouse", steps=STEPS, seed=5)  # before load_ip_adapter
    pipe = ref_engine.pipeline()
    pipe.register_modules(image_encoder=encoder)
    pipe.load_ip_adapter(str(ip_dir), subfolder="", weight_name=IP_ADAPTER_FILES["plain"], image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.8)
    with InvariantIPAdapter(pipe):
        ref = pipe(
            "a lighthouse",
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=6.0,
            generator=torch.Generator().manual_seed(5),
            ip_adapter_image=image,
            output_type="latent",
        ).images
    assert (ours - ref).abs().max().item() <= 1e-4
    assert (ref - base).abs().max().item() > 1e-2


def test_ticks_with_image_rows_bypass_captured_graphs(tiny, tiny_dir, ip_dir, image_encoder):
    """A captured CUDA graph knows no image rows (``IPAdapterBuffers.n`` is read on the host): such ticks run eager."""

    class Graphs:
        calls = 0

        def forward(self, *args):
            Graphs.calls += 1
            return engine.unet(args[0], args[1], encoder_hidden_states=args[2], return_dict=False)[0]

    engine = IPEngine(tiny, tiny_dir, ip_dir, "plain")
    engine.steps.step_graphs = Graphs()
    emb = encode_image(image_encoder, pixels(1), hidden_states=False)
    run_latents(engine, [engine.ip_request("a cat", emb)])
    assert Graphs.calls == 0
    run_latents(engine, [engine.ip_request("a cat")])
    assert Graphs.calls == STEPS


def test_plus_mixed_batch_equals_diffusers_alone(tiny, tiny_dir, ip_dir, image_encoder):
    """The "plus" variant (penultimate hidden states through the resampler; a zero image's for the negative row)."""
    engine = IPEngine(tiny, tiny_dir, ip_dir, "plus")
    img_a, img_b = pixels(7), pixels(8)
    emb_a, emb_b = (encode_image(image_encoder, x, hidden_states=True) for x in (img_a, img_b))
    assert emb_a[0].shape == (1, 17, 32) and emb_a[1].abs().max().item() > 0  # 16 patches + CLS; not zeros
    cases = [("a cat", img_a, emb_a, 0.5, 1), ("a cat", None, None, None, 2), ("a dog", img_b, emb_b, STYLE_ONLY, 3)]
    batched = run_latents(engine, [engine.ip_request(p, e, scale=s, seed=seed) for p, _, e, s, seed in cases])
    for i, (p, image, _, s, seed) in enumerate(cases):
        ref = reference_latents(tiny, ip_dir, image_encoder, p, image, scale=s, variant="plus", seed=seed)
        assert (batched[i] - ref[0]).abs().max().item() <= 1e-4, cases[i][:2]


@pytest.mark.parametrize("plus", [False, True])
def test_encode_image_equals_the_pipelines(tiny, ip_dir, image_encoder, plus):
    """PIL images through a CLIPImageProcessor: what StableDiffusionPipeline.encode_image makes of them."""
    from PIL import Image
    from test_inpaint_equivalence import init_image
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    images = [init_image(3), Image.new("RGB", (48, 40), (200, 30, 90))]
    ours = encode_image(image_encoder, images, hidden_states=plus, feature_extractor=processor)
    pipe = reference_pipe(tiny, ip_dir, image_encoder, image=None, scale=None)
    pipe.register_modules(feature_extractor=processor)
    theirs = pipe.encode_image(images, torch.device("cpu"), 1, plus)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0][0], ours[0][1])
    with pytest.raises(ValueError, match="needs pixel values, or PIL images and a feature_extractor"):
        encode_image(image_encoder, images, hidden_states=plus)


def test_and_parts_all_read_the_image(tiny, tiny_dir, ip_dir, image_encoder):
    """A1111's AND: the negative row reads the negative embeddings, every part's row the image's."""
    from deployments.engine.prompt_syntax import plan_prompts
    from deployments.engine.prompts import encode_prompt_schedules

    engine = IPEngine(tiny, tiny_dir, ip_dir, "plain")
    (schedule,) = encode_prompt_schedules([engine.prompts], [plan_prompts("a cat AND a [red:blue:1] dog", "", STEPS)])
    pos, neg = encode_image(image_encoder, pixels(9), hidden_states=False)
    request = dataclasses.replace(
        engine.ip_request("a cat"), prompt_schedule=schedule, ip_adapter_embeds=pos[0], ip_adapter_scale=0.7
    )
    (job,) = engine.steps.submit([request])
    tokens = job.ip_image.tokens
    projected = engine.ip.project(torch.stack([neg[0], pos[0]]))
    assert job.rows == 3 and tokens.shape == (3, 4, 64)
    assert torch.equal(tokens[0], projected[0]) and torch.equal(tokens[1], projected[1])
    assert torch.equal(tokens[2], projected[1])
    while not engine.steps.idle:
        engine.steps.tick()
    assert job.error is None and torch.isfinite(job.x_t).all()

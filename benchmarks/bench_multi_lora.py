"""Heterogeneous multi-LoRA serving on the CPU: lorafleet's engine vs diffusers and peft, same requests.

    python benchmarks/bench_multi_lora.py [--model builtin:tiny-sd] [--images 64] [--clients 8] [--steps 8]
                                          [--size 64] [--json out.json]
    python benchmarks/bench_multi_lora.py --model builtin:tiny-sdxl    # SDXL: guidance 5.0

``--model builtin:tiny-sd`` (the default, the embedded model as shipped): 64x64
images, the model's own PNDM scheduler, guidance 7.5. ``--model
builtin:tiny-sdxl``: SDXL's architecture (two text encoders, ``text_time``
added conditions), 64x64 images, its Euler scheduler, guidance 5.0,
SDXL's default micro-conditioning and an empty negative prompt (zeros, as
``force_zeros_for_empty_prompt`` says). Eight real PEFT LoRA files (rank 8,
on the UNet attention projections; two of them with text-encoder parts too,
on SDXL on both encoders where the registry takes ``text_encoder_2``) and a
fixed list of requests whose adapter is drawn from a Zipf (s=1.1)
popularity over the eight, about one request in eight with none. Eight
clients keep eight requests in flight; every system serves the same list,
in the same order, with the same seeds:

- **lorafleet**: the engine in-process as the deployments run it (PromptEncoder
  with text-encoder LoRA slots, SDXL: ``SDXLPromptEncoder`` with slots on each
  encoder; StepScheduler with UNet LoRA slots, SDXL's pooled embeddings and
  time ids per row, and ``max_rows_per_tick`` 16; VAE decode), a closed loop
  that submits a new request between ticks whenever one finishes. Measured
  with the kernels the server ships on the CPU (deterministic mode:
  batch-invariant kernels, per-image VAE decode) and without them.
- **(a) diffusers, one adapter at a time**: one ``StableDiffusionPipeline``
  (``StableDiffusionXLPipeline``) with all eight adapters loaded by
  ``load_lora_weights``; each request is one pipeline call after
  ``set_adapters([name])`` (``disable_lora()`` for none): what a server that
  holds one active adapter at a time does, the other clients queued behind it.
- **(b) peft mixed batch**: the same pipeline's modules, eight requests (16
  CFG rows) per batch, each row routed to its adapter by peft's
  ``adapter_names`` (``LoraLayer._mixed_batch_forward``). diffusers 0.42 has
  no public switch for it, so the batch runs through the pipeline's own
  arithmetic (SDXL: both encoders, ``added_cond_kwargs``) in a short loop
  here, with the pre-forward hook ``LoraModel._enable_peft_forward_hooks``
  installs (``peft.tuners.lora.model._adapter_names_pre_forward_hook``) on
  every LoRA layer.

Prints a Markdown table (images/s and ratios) and a cheap correctness check:
one batch of requests through all three systems with batch-invariant kernels,
max abs pixel difference against diffusers alone.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deployments.engine import models  # noqa: E402
from deployments.engine.batch_invariance import make_batch_invariant  # noqa: E402
from deployments.engine.config import LoRAConfig  # noqa: E402
from deployments.engine.images import decode  # noqa: E402
from deployments.engine.multi_lora import MultiLoRAModel, text_encoder_key_prefix  # noqa: E402
from deployments.engine.prompts import PromptEncoder, SDXLPromptEncoder  # noqa: E402
from deployments.engine.schedulers import SchedulerFactory  # noqa: E402
from deployments.engine.step_scheduler import DenoiseRequest, StepScheduler  # noqa: E402
from deployments.messages import MicroConditioning  # noqa: E402

# Per model: (default size in px, guidance scale). Both 64x64 (8x8 latents, the size the equivalence tests
# use); guidance: SD1's 7.5 as #4 measured it, SDXL's 5.0 (StableDiffusionXLPipeline's default).
MODELS = {"builtin:tiny-sd": (64, 7.5), "builtin:tiny-sdxl": (64, 5.0)}
UNET_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]
# The server's default slot targets (deployments/engine/config.py LoRAConfig) and slot sizing.
UNET_SLOT_TARGETS = LoRAConfig().unet_target_modules  # every Linear/Conv2d of the UNet, as the server ships
TEXT_SLOT_TARGETS = LoRAConfig().text_encoder_target_modules
SLOT_MAX_RANK = 64
NEGATIVE_PROMPT = ""  # SDXL: zeros (force_zeros_for_empty_prompt), which diffusers does for negative_prompt=None
TEXT_ADAPTED = (1, 4)  # the 2nd and 5th most popular adapters also adapt the text encoder(s)
SUBJECTS = ["a lighthouse", "a red fox", "a castle", "a teapot", "a mountain lake", "a robot", "a sailboat", "a cat"]


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    text_components: tuple[str, ...]  # (), ("text_encoder",) or, on SDXL, ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class Request:
    index: int
    prompt: str
    adapter: int | None  # index into the adapter list, None: base model
    seed: int


@dataclass(frozen=True)
class Settings:
    model: str
    images: int
    clients: int
    size: int
    steps: int
    guidance_scale: float
    rank: int
    alpha: float
    num_adapters: int
    zipf_s: float
    no_adapter_share: float
    seed: int
    text_encoder_2: bool = False  # SDXL: the text-adapted adapters also adapt the second encoder


# -- inputs ---------------------------------------------------------------------


def load_parts(model_dir: Path, sdxl: bool) -> dict:
    """Fresh float32 CPU modules (every system gets its own: the engines patch and wrap them in place)."""
    cpu = torch.device("cpu")
    parts = {
        "tokenizer": models.load_tokenizer(model_dir),
        "text_encoder": models.load_text_encoder(model_dir, cpu, torch.float32),
        "unet": models.load_unet(model_dir, cpu, torch.float32),
        "vae": models.load_vae(model_dir, cpu, torch.float32),
    }
    if sdxl:
        parts["tokenizer_2"] = models.load_tokenizer(model_dir, "tokenizer_2")
        parts["text_encoder_2"] = models.load_text_encoder(model_dir, cpu, torch.float32, "text_encoder_2")
    return parts


def text_components(s: Settings) -> tuple[str, ...]:
    """The text encoders the text-adapted adapters adapt."""
    return ("text_encoder", "text_encoder_2") if s.text_encoder_2 else ("text_encoder",)


def make_adapters(parts: dict, directory: Path, s: Settings) -> list[Adapter]:
    """Real diffusers LoRA files written with peft (non-zero B, so every adapter changes the image)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    writer = StableDiffusionXLPipeline if "text_encoder_2" in parts else StableDiffusionPipeline
    out = []
    for k in range(s.num_adapters):
        torch.manual_seed(1000 + k)
        texts = text_components(s) if k in TEXT_ADAPTED else ()
        unet_cfg = LoraConfig(r=s.rank, lora_alpha=s.alpha, target_modules=UNET_ATTN, init_lora_weights=False)
        unet = copy.deepcopy(parts["unet"])
        unet.add_adapter(unet_cfg)
        kwargs = {"unet_lora_layers": get_peft_model_state_dict(unet), "unet_lora_adapter_metadata": unet_cfg}
        for component in texts:
            te_cfg = LoraConfig(r=s.rank, lora_alpha=s.alpha, target_modules=TEXT_ATTN, init_lora_weights=False)
            te = inject_adapter_in_model(te_cfg, copy.deepcopy(parts[component]))
            kwargs[f"{component}_lora_layers"] = get_peft_model_state_dict(te)
            kwargs[f"{component}_lora_adapter_metadata"] = te_cfg
        for key in [k for k in kwargs if k.endswith("_metadata")]:
            cfg = kwargs[key].to_dict()
            kwargs[key] = {n: (sorted(v) if isinstance(v, set) else v) for n, v in cfg.items()}
        path = directory / f"style{k}"
        path.mkdir(parents=True, exist_ok=True)
        writer.save_lora_weights(path, **kwargs)
        out.append(Adapter(f"style{k}", path / "pytorch_lora_weights.safetensors", texts))
    return out


def draw_requests(s: Settings, prefix: str = "") -> list[Request]:
    """Adapter k (0-based) with probability proportional to (k + 1) ** -s; some requests with none."""
    rng = random.Random(s.seed)
    popularity = [(k + 1) ** -s.zipf_s for k in range(s.num_adapters)]
    requests = []
    for i in range(s.images):
        adapter = None if rng.random() < s.no_adapter_share else rng.choices(range(s.num_adapters), popularity)[0]
        prompt = f"{prefix}{SUBJECTS[i % len(SUBJECTS)]}, picture {i}"
        requests.append(Request(i, prompt, adapter, seed=s.seed + i))
    return requests


# -- lorafleet ------------------------------------------------------------------


class LoraFleetEngine:
    """TextEncoder + Denoiser + VAE work in one process, as the deployments do it."""

    def __init__(self, parts: dict, info: models.ModelInfo, canonical: list, s: Settings, deterministic: bool):
        prep = make_batch_invariant if deterministic else (lambda m: m)
        # As the deployments: batch-invariant kernels on the UNet first, then the adapter slots around
        # them; the text encoders run one row per call in deterministic mode (PromptEncoder.rowwise).
        self.sdxl = info.sdxl
        self.unet = prep(parts["unet"])
        self.vae = parts["vae"]
        self.deterministic = deterministic
        num_slots = s.num_adapters + 1  # slot 0 means "no adapter", as max_loras_per_replica + 1
        self.unet_lora = MultiLoRAModel(self.unet, UNET_SLOT_TARGETS, num_slots, SLOT_MAX_RANK, deterministic)
        # One set of slots per text encoder, as the TextEncoder deployment has (SDXL: two).
        components = ("text_encoder", "text_encoder_2") if self.sdxl else ("text_encoder",)
        self.text_loras = {
            c: MultiLoRAModel(
                parts[c], TEXT_SLOT_TARGETS, num_slots, SLOT_MAX_RANK, key_prefix=text_encoder_key_prefix(parts[c])
            )
            for c in components
        }
        # {component: adapter indices with weights on it}: the TextEncoder only routes those.
        self.text_adapters: dict[str, set[int]] = {c: set() for c in components}
        for k, adapter in enumerate(canonical):
            self.unet_lora.load(k + 1, {p: (w.A, w.B, w.alpha) for p, w in adapter.component("unet").items()})
            for c, lora in self.text_loras.items():
                text_w = {p: (w.A, w.B, w.alpha) for p, w in adapter.component(c).items()}
                lora.load(k + 1, text_w)
                if text_w:
                    self.text_adapters[c].add(k)
        first = PromptEncoder(
            parts["tokenizer"],
            parts["text_encoder"],
            cache_size=4096,
            lora=self.text_loras["text_encoder"],
            rowwise=deterministic,
            **({"hidden_layer": "penultimate"} if self.sdxl else {}),
        )
        if self.sdxl:
            second = PromptEncoder(
                parts["tokenizer_2"],
                parts["text_encoder_2"],
                cache_size=4096,
                lora=self.text_loras["text_encoder_2"],
                rowwise=deterministic,
                hidden_layer="penultimate",
                pooled=True,
            )
            self.prompts = SDXLPromptEncoder(
                first, second, force_zeros_for_empty_prompt=info.force_zeros_for_empty_prompt
            )
        else:
            self.prompts = first
        self.steps = StepScheduler(
            self.unet,
            SchedulerFactory(info.scheduler_class, info.scheduler_config),
            vae_scale_factor=info.vae_scale_factor,
            max_rows_per_tick=16,
            max_queued=1024,
            lora=self.unet_lora,
        )
        self.s = s

    def _text_adapters(self, r: Request, component: str) -> tuple:
        """The TextEncoder only gets the adapters that have weights on that encoder."""
        if r.adapter is None or r.adapter not in self.text_adapters[component]:
            return ()
        return ((r.adapter + 1, 1.0, f"style{r.adapter}"),)

    def _submit(self, requests: list[Request]) -> dict:
        """Encode the prompts of ``requests`` in one forward (as the TextEncoder batches them), then queue them."""
        if self.sdxl:
            return self._submit_xl(requests)
        texts, text_adapters = [], []
        for r in requests:
            a = self._text_adapters(r, "text_encoder")
            texts += [r.prompt, NEGATIVE_PROMPT]
            text_adapters += [a, a]
        embeds = self.prompts.encode_prompt(texts, text_adapters)
        return self._queue(
            requests,
            [
                {"prompt_embeds": embeds[2 * i], "negative_prompt_embeds": embeds[2 * i + 1]}
                for i in range(len(requests))
            ],
        )

    def _submit_xl(self, requests: list[Request]) -> dict:
        """SDXL: both encoders (each with its own adapters), and the Denoiser's per-image time ids."""
        encoded = self.prompts.encode_prompt_pairs(
            [r.prompt for r in requests],
            [NEGATIVE_PROMPT] * len(requests),
            [self._text_adapters(r, "text_encoder") for r in requests],
            [self._text_adapters(r, "text_encoder_2") for r in requests],
        )
        time_ids, negative_time_ids = MicroConditioning().time_ids(self.s.size, self.s.size)
        return self._queue(
            requests,
            [
                {
                    "prompt_embeds": e.prompt_embeds,
                    "negative_prompt_embeds": e.negative_prompt_embeds,
                    "pooled_prompt_embeds": e.pooled_prompt_embeds,
                    "negative_pooled_prompt_embeds": e.negative_pooled_prompt_embeds,
                    "add_time_ids": time_ids,
                    "negative_add_time_ids": negative_time_ids,
                }
                for e in encoded
            ],
        )

    def _queue(self, requests: list[Request], conditioning: list[dict]) -> dict:
        """One DenoiseRequest per request (its UNet adapter by slot); {job id: request index}."""
        jobs = {}
        for r, cond in zip(requests, conditioning, strict=True):
            adapters = () if r.adapter is None else ((r.adapter + 1, 1.0),)
            req = DenoiseRequest(
                height=self.s.size,
                width=self.s.size,
                steps=self.s.steps,
                guidance_scale=self.s.guidance_scale,
                seed=r.seed,
                adapters=adapters,
                **cond,
            )
            (job,) = self.steps.submit([req])
            jobs[job.id] = r.index
        return jobs

    def serve(self, requests: list[Request], clients: int) -> tuple[dict[int, torch.Tensor], float]:
        """Closed loop of ``clients`` outstanding requests; returns {request index: image [3, H, W]} and wall s."""
        todo = deque(requests)
        images: dict[int, torch.Tensor] = {}
        start = time.perf_counter()
        owner = self._submit([todo.popleft() for _ in range(min(clients, len(todo)))])
        while not self.steps.idle:
            finished = self.steps.tick()
            if not finished:
                continue
            for j in finished:
                if j.error is not None:
                    raise RuntimeError(f"denoise job {j.id} failed") from j.error
            pixels = decode(self.vae, torch.cat([j.x_t for j in finished]), per_image=self.deterministic)
            for j, image in zip(finished, pixels, strict=True):
                images[owner.pop(j.id)] = image
            refill = [todo.popleft() for _ in range(min(len(finished), len(todo)))]
            if refill:
                owner.update(self._submit(refill))
        return images, time.perf_counter() - start


# -- diffusers and peft ---------------------------------------------------------


def make_pipeline(parts: dict, info: models.ModelInfo, adapters: list[Adapter]):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = SchedulerFactory(info.scheduler_class, info.scheduler_config).create("default")
    if info.sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=parts["vae"],
            text_encoder=parts["text_encoder"],
            text_encoder_2=parts["text_encoder_2"],
            tokenizer=parts["tokenizer"],
            tokenizer_2=parts["tokenizer_2"],
            unet=parts["unet"],
            scheduler=scheduler,
            force_zeros_for_empty_prompt=info.force_zeros_for_empty_prompt,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=parts["vae"],
            text_encoder=parts["text_encoder"],
            tokenizer=parts["tokenizer"],
            unet=parts["unet"],
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    for a in adapters:
        pipe.load_lora_weights(str(a.path), adapter_name=a.name)
    return pipe


def serve_switching(pipe, adapters: list[Adapter], requests: list[Request], s: Settings):
    """(a): one request at a time, ``set_adapters`` to its adapter before the call (when it changes)."""
    images: dict[int, torch.Tensor] = {}
    active: object = ...  # unknown: switch before the first request
    start = time.perf_counter()
    for r in requests:
        if r.adapter != active:
            if r.adapter is None:
                pipe.disable_lora()
            else:
                pipe.enable_lora()
                pipe.set_adapters([adapters[r.adapter].name], adapter_weights=[1.0])
            active = r.adapter
        images[r.index] = pipe(
            r.prompt,
            # "" is no negative prompt: SD1 encodes "" either way; SDXL zeros it (force_zeros_for_empty_prompt)
            # only for None, and the API (and the engine) treat "" as not given.
            negative_prompt=NEGATIVE_PROMPT or None,
            height=s.size,
            width=s.size,
            num_inference_steps=s.steps,
            guidance_scale=s.guidance_scale,
            generator=torch.Generator().manual_seed(r.seed),
            output_type="pt",
        ).images[0]
    pipe.enable_lora()
    return images, time.perf_counter() - start


class MixedBatchCounter:
    """Counts ``LoraLayer._mixed_batch_forward`` calls, to prove (b) really takes peft's mixed-batch path."""

    def __init__(self):
        self.calls = 0

    @contextlib.contextmanager
    def watching(self):
        from peft.tuners.lora.layer import LoraLayer

        original = LoraLayer._mixed_batch_forward

        def counted(layer, *args, **kwargs):
            self.calls += 1
            return original(layer, *args, **kwargs)

        LoraLayer._mixed_batch_forward = counted
        try:
            yield self
        finally:
            LoraLayer._mixed_batch_forward = original


@contextlib.contextmanager
def peft_adapter_names(module: torch.nn.Module, adapter_names: list[str]):
    """What ``peft.LoraModel._enable_peft_forward_hooks`` does for ``forward(..., adapter_names=...)``.

    diffusers injects LoRA layers with ``inject_adapter_in_model`` (no ``LoraModel``
    wrapper), so the same pre-forward hook goes onto every LoRA layer by hand.
    """
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.lora.model import _adapter_names_pre_forward_hook

    hook = partial(_adapter_names_pre_forward_hook, adapter_names=adapter_names)
    handles = [
        m.register_forward_pre_hook(hook, with_kwargs=True) for m in module.modules() if isinstance(m, LoraLayer)
    ]
    if not handles:
        raise ValueError("the module has no peft LoRA layers")
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def has_lora_layers(module: torch.nn.Module) -> bool:
    from peft.tuners.lora.layer import LoraLayer

    return any(isinstance(m, LoraLayer) for m in module.modules())


@torch.inference_mode()
def mixed_batch(pipe, adapters: list[Adapter], batch: list[Request], s: Settings) -> torch.Tensor:
    """One batch through ``StableDiffusionPipeline.__call__``'s arithmetic, rows routed by ``adapter_names``."""
    if hasattr(pipe, "text_encoder_2"):
        return mixed_batch_xl(pipe, adapters, batch, s)
    names = ["__base__" if r.adapter is None else adapters[r.adapter].name for r in batch]
    n = len(batch)
    ids = pipe.tokenizer(
        [NEGATIVE_PROMPT] * n + [r.prompt for r in batch],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids  # [2n, tokens]: (negative, positive), the order of the pipeline's CFG rows
    rows = names + names
    with peft_adapter_names(pipe.text_encoder, rows):
        context = pipe.text_encoder(ids)[0]  # [2n, tokens, hidden]
    # Schedulers work elementwise, so one instance over the batch equals one per request here
    # (every request has the same steps and starts together).
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(s.steps)
    latent = s.size // pipe.vae_scale_factor
    x_t = torch.cat(
        [
            torch.randn(
                (1, pipe.unet.config.in_channels, latent, latent), generator=torch.Generator().manual_seed(r.seed)
            )
            for r in batch
        ]
    )  # [n, c, h, w]
    x_t = x_t * scheduler.init_noise_sigma
    with peft_adapter_names(pipe.unet, rows):
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(torch.cat([x_t] * 2), t)
            eps = pipe.unet(x_in, t, encoder_hidden_states=context, return_dict=False)[0]
            eps_uncond, eps_text = eps.chunk(2)
            eps = eps_uncond + s.guidance_scale * (eps_text - eps_uncond)
            x_t = scheduler.step(eps, t, x_t, return_dict=False)[0]
    return decode(pipe.vae, x_t)


@torch.inference_mode()
def mixed_batch_xl(pipe, adapters: list[Adapter], batch: list[Request], s: Settings) -> torch.Tensor:
    """One batch through ``StableDiffusionXLPipeline.__call__``'s arithmetic, rows routed by ``adapter_names``.

    ``encode_prompt``: each encoder's penultimate hidden states, concatenated, and the second
    one's pooled (projected) output; the empty negative prompt is zeros
    (``force_zeros_for_empty_prompt``), else encoded like the prompt. ``added_cond_kwargs``: the
    pooled embeddings and the six time ids of the default micro-conditioning
    (``_get_add_time_ids``: original size, crop top-left (0, 0), target size), (negative,
    positive) rows as the context.
    """
    names = ["__base__" if r.adapter is None else adapters[r.adapter].name for r in batch]
    n = len(batch)

    def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states, pooled = [], None
        for tokenizer, text_encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tokenizer(
                texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids  # [n, tokens]
            # An encoder no adapter adapts has no LoRA layers (then there is nothing to route).
            routed = (
                peft_adapter_names(text_encoder, names) if has_lora_layers(text_encoder) else contextlib.nullcontext()
            )
            with routed:
                out = text_encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])  # [n, tokens, hidden_i]
            pooled = out[0]  # the last encoder's (CLIPTextModelWithProjection) text_embeds [n, projection]
        return torch.cat(states, dim=-1), pooled  # [n, tokens, hidden_1 + hidden_2], [n, projection]

    context, pooled = encode([r.prompt for r in batch])
    if NEGATIVE_PROMPT == "" and pipe.config.force_zeros_for_empty_prompt:
        negative, negative_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
    else:
        negative, negative_pooled = encode([NEGATIVE_PROMPT] * n)
    context = torch.cat([negative, context])  # [2n, tokens, hidden]: (negative, positive), the pipeline's CFG rows
    time_ids = torch.tensor([[s.size, s.size, 0, 0, s.size, s.size]] * (2 * n), dtype=context.dtype)  # [2n, 6]
    added_cond_kwargs = {"text_embeds": torch.cat([negative_pooled, pooled]), "time_ids": time_ids}
    rows = names + names
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(s.steps)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    latent = s.size // pipe.vae_scale_factor
    x_t = torch.cat(
        [
            torch.randn(
                (1, pipe.unet.config.in_channels, latent, latent), generator=torch.Generator().manual_seed(r.seed)
            )
            for r in batch
        ]
    )  # [n, c, h, w]
    x_t = x_t * scheduler.init_noise_sigma
    with peft_adapter_names(pipe.unet, rows):
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(torch.cat([x_t] * 2), t)
            eps = pipe.unet(
                x_in, t, encoder_hidden_states=context, added_cond_kwargs=added_cond_kwargs, return_dict=False
            )[0]
            eps_uncond, eps_text = eps.chunk(2)
            eps = eps_uncond + s.guidance_scale * (eps_text - eps_uncond)
            x_t = scheduler.step(eps, t, x_t, return_dict=False)[0]
    return decode(pipe.vae, x_t)


def serve_mixed(pipe, adapters: list[Adapter], requests: list[Request], s: Settings):
    """(b): batches of ``clients`` requests, all adapters active, each row with its own via ``adapter_names``."""
    pipe.enable_lora()
    # Every adapter at weight 1: the mixed path applies each adapter's current ``scaling``.
    pipe.set_adapters([a.name for a in adapters], adapter_weights=[1.0] * len(adapters))
    images: dict[int, torch.Tensor] = {}
    start = time.perf_counter()
    for i in range(0, len(requests), s.clients):
        batch = requests[i : i + s.clients]
        for r, image in zip(batch, mixed_batch(pipe, adapters, batch, s), strict=True):
            images[r.index] = image
    return images, time.perf_counter() - start


# -- the run --------------------------------------------------------------------


def max_diff(a: dict, b: dict, keys) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in keys)


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0],
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "peft": __import__("peft").__version__,
    }


def quiet() -> None:
    """diffusers warns for every adapter without text-encoder keys, transformers prints a load report
    while peft injects layers (the weights are then loaded: the check below would catch it otherwise)."""
    import warnings

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")


def open_model(model_uri: str, cache_dir: Path | None = None):
    """``(directory, ModelInfo, the registry's BaseModelSpec, whether adapters adapt text_encoder_2)``."""
    from lora_registry.base_model import base_model_spec_from_dir

    model_dir = models.resolve_model_dir(model_uri, cache_dir)
    info = models.read_model_info(model_uri, model_dir)
    spec = base_model_spec_from_dir(model_dir)
    # SDXL adapters adapt the second text encoder too once the registry converts its weights
    # (``text_encoder_2.`` modules in the base model's spec); without that the engine could not load them.
    te2 = info.sdxl and any(m.startswith("text_encoder_2.") for m in spec.modules)
    return model_dir, info, spec, te2


def build_adapters(model_dir: Path, info: models.ModelInfo, spec, directory: Path, s: Settings):
    """The LoRA files (for diffusers and peft) and the registry's canonical form of each (for the engine)."""
    from lora_registry.validation import prepare_adapter

    adapters = make_adapters(load_parts(model_dir, info.sdxl), directory, s)
    canonical = [prepare_adapter(a.path.read_bytes(), spec).adapter for a in adapters]
    for a, c in zip(adapters, canonical, strict=True):
        kept = {name.partition(".")[0] for name in c.modules} - {"unet"}
        if kept != set(a.text_components):
            raise RuntimeError(f"{a.name}: the registry kept {sorted(kept)}, the file adapts {a.text_components}")
    return adapters, canonical


def check_equivalence(pipe, adapters: list[Adapter], check: list[Request], s: Settings, fleet_images: dict) -> dict:
    """Correctness, cheaply: ``check`` through diffusers alone (one request at a time) and peft's mixed
    batch, with batch-invariant kernels on diffusers' UNet (peft's lora_A/lora_B Linear layers included),
    against lorafleet's deterministic images ``fleet_images``; max abs pixel differences. Leaves the
    pipeline's UNet with batch-invariant kernels."""
    keys = [r.index for r in check]
    make_batch_invariant(pipe.unet)
    alone, _ = serve_switching(pipe, adapters, check, s)
    mixed, _ = serve_mixed(pipe, adapters, check, s)
    with_adapter = [r.index for r in check if r.adapter is not None]
    base_only, _ = serve_switching(
        pipe, adapters, [Request(r.index, r.prompt, None, r.seed) for r in check if r.adapter is not None], s
    )
    return {
        "requests": keys,
        "lorafleet_vs_diffusers": max_diff(fleet_images, alone, keys),
        "peft_mixed_vs_diffusers": max_diff(mixed, alone, keys),
        "adapter_effect": max_diff(alone, base_only, with_adapter) if with_adapter else float("nan"),
    }


def text_encoders_phrase(s: Settings, sdxl: bool) -> str:
    if not sdxl:
        return "the text encoder's"
    if s.text_encoder_2:
        return "both text encoders'"
    return "the first text encoder's (not text_encoder_2: the registry has no text_encoder_2 component yet)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="builtin:tiny-sd")
    p.add_argument("--images", type=int, default=64, help="requests in the timed list")
    p.add_argument("--clients", type=int, default=8, help="requests in flight at a time")
    p.add_argument("--size", type=int, default=None, help="pixels (default 64)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="timed passes per system, order alternating; best kept")
    p.add_argument("--json", type=Path, default=None, help="write the raw figures here")
    args = p.parse_args()
    default_size, guidance_scale = MODELS[args.model]
    quiet()
    load_start = os.getloadavg()[0]
    model_dir, info, spec, te2 = open_model(args.model)
    s = Settings(
        model=args.model,
        images=args.images,
        clients=args.clients,
        size=default_size if args.size is None else args.size,
        steps=args.steps,
        guidance_scale=guidance_scale,
        rank=args.rank,
        alpha=float(args.rank),
        num_adapters=8,
        zipf_s=1.1,
        no_adapter_share=1 / 8,
        seed=args.seed,
        text_encoder_2=te2,
    )
    requests = draw_requests(s)
    warmup = draw_requests(Settings(**{**asdict(s), "images": s.clients, "seed": s.seed + 10_000}), prefix="warm-up: ")
    mix = Counter("none" if r.adapter is None else f"style{r.adapter}" for r in requests)
    print(f"request mix ({s.images}): " + ", ".join(f"{k} {v}" for k, v in sorted(mix.items())), flush=True)

    images: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-multi-lora-") as tmp:
        adapters, canonical = build_adapters(model_dir, info, spec, Path(tmp), s)
        fleet_det = LoraFleetEngine(load_parts(model_dir, info.sdxl), info, canonical, s, deterministic=True)
        fleet_nondet = LoraFleetEngine(load_parts(model_dir, info.sdxl), info, canonical, s, deterministic=False)
        pipe = make_pipeline(load_parts(model_dir, info.sdxl), info, adapters)
        systems = {
            "lorafleet": lambda reqs: fleet_det.serve(reqs, s.clients),
            "lorafleet_nondet": lambda reqs: fleet_nondet.serve(reqs, s.clients),
            "diffusers": lambda reqs: serve_switching(pipe, adapters, reqs, s),
            "peft_mixed": lambda reqs: serve_mixed(pipe, adapters, reqs, s),
        }
        counter = MixedBatchCounter()
        for label, serve in systems.items():
            with counter.watching() if label == "peft_mixed" else contextlib.nullcontext():
                serve(warmup)
        if counter.calls == 0:
            raise RuntimeError("peft's mixed-batch path was never taken: (b) would be measuring something else")
        results = {label: {"wall_s": []} for label in systems}
        results["peft_mixed"]["mixed_batch_forward_calls_per_batch"] = counter.calls / -(-len(warmup) // s.clients)
        # Alternate the order between repeats and keep each system's best pass: other work on a
        # shared machine then skews one pass, not one system.
        for rep in range(args.repeats):
            order = list(systems) if rep % 2 == 0 else list(reversed(systems))
            for label in order:
                ticks = fleet_det.steps.ticks_run
                images[label], wall = systems[label](requests)
                results[label]["wall_s"].append(wall)
                if label == "lorafleet":
                    results[label]["ticks"] = fleet_det.steps.ticks_run - ticks
                print(f"pass {rep + 1}, {label}: {s.images / wall:.2f} images/s", flush=True)
        for label in systems:
            results[label]["images_per_s"] = s.images / min(results[label]["wall_s"])

        # The first batch of requests: lorafleet's images against diffusers' and peft's.
        results["check"] = check_equivalence(pipe, adapters, requests[: s.clients], s, images["lorafleet"])

    fleet, fleet_nd = results["lorafleet"]["images_per_s"], results["lorafleet_nondet"]["images_per_s"]
    a, b = results["diffusers"]["images_per_s"], results["peft_mixed"]["images_per_s"]
    m = machine()
    print()
    print(
        f"Machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']} with "
        f"{m['torch_threads']} threads; diffusers {m['diffusers']}, peft {m['peft']}. 1-min load average "
        f"{load_start:.1f} at the start, {m['load_avg_1m']:.1f} at the end (other work on the cores skews the figures)."
    )
    print(
        f"Settings: {s.model} as shipped, {s.size}x{s.size}, {s.steps} steps of {info.scheduler_class} "
        f"(the model's default), guidance {s.guidance_scale}"
        + ("; SDXL's default micro-conditioning, empty negative prompt (zeros)" if info.sdxl else "")
        + f"; {s.num_adapters} rank-{s.rank} (alpha {s.alpha:g}) "
        f"PEFT LoRAs on the UNet's {'/'.join(UNET_ATTN)} ("
        + ", ".join(f"style{k}" for k in TEXT_ADAPTED)
        + f" also on {text_encoders_phrase(s, info.sdxl)} {'/'.join(TEXT_ATTN)}), "
        f"adapter per request ~ Zipf(s={s.zipf_s}), {s.no_adapter_share:.3g} with none; "
        f"{s.images} requests, {s.clients} in flight, after a warm-up of {s.clients}; best of {args.repeats} "
        "passes per system, order alternating."
    )
    print()
    rows = [
        ("lorafleet engine, deterministic on (the shipped CPU kernels)", fleet),
        ("lorafleet engine, deterministic off", fleet_nd),
        ("(a) diffusers, `set_adapters` per request, one at a time", a),
        (f"(b) peft mixed batch (`adapter_names`), {s.clients} requests per batch", b),
    ]
    print("| system | images/s | vs (a) | vs (b) |")
    print("|---|---:|---:|---:|")
    for name, ips in rows:
        print(f"| {name} | {ips:.2f} | {ips / a:.2f}x | {ips / b:.2f}x |")
    print()
    verdict = "met" if fleet / a >= 3 else "NOT met"
    print(f"Target lorafleet >= 3x over (a), shipped kernels: {fleet / a:.2f}x, {verdict}.")
    print(
        f"(b) took peft's mixed-batch path: {results['peft_mixed']['mixed_batch_forward_calls_per_batch']:.0f} "
        "`LoraLayer._mixed_batch_forward` calls per batch of requests (counted in the warm-up)."
    )
    c = results["check"]
    print(
        f"Check (requests {c['requests']}, batch-invariant kernels on diffusers' modules): max |pixel diff| "
        f"lorafleet vs diffusers alone {c['lorafleet_vs_diffusers']:.2e}, peft mixed vs diffusers alone "
        f"{c['peft_mixed_vs_diffusers']:.2e}; the adapters themselves change pixels by up to {c['adapter_effect']:.2f}."
    )
    if args.json:
        raw = {"settings": asdict(s), "machine": {**m, "load_avg_1m_start": load_start}, "mix": dict(mix)}
        args.json.write_text(json.dumps({**raw, "results": results}, indent=2))


if __name__ == "__main__":
    main()

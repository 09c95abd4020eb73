"""Turn an HTTP request into a validated ``Plan``: limits, prompt length, seed, adapters.

Everything a request can get wrong is found here, before any work is queued. ``<lora:name:weight>``
tags in the prompt become adapters of the request here, so every endpoint understands them.
"""

import hashlib
import secrets
from dataclasses import dataclass

from fastapi import Request

from deployments.engine.conditioning import ConditioningInput
from deployments.engine.images import MIME_TYPES
from deployments.engine.models import ModelInfo
from deployments.engine.prompt_syntax import LoraTag, extract_lora_tags
from deployments.engine.prompts import chunk_count, tokenize_weighted
from deployments.messages import AdapterUse, DecodeParams, DenoiseParams, EncodeRequest, Overlay

from .adapters_api import AdapterResolver
from .config import LimitsConfig
from .errors import APIError
from .schemas import LoRASpec


@dataclass(frozen=True, eq=False)
class Plan:
    """A validated generation request, ready for the graph."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int
    scheduler: str
    output_format: str
    tenant: str = "anonymous"
    # ((ref, scale), ...): adapters with UNet / text-encoder weights, pinned name@version refs.
    unet_adapters: tuple[tuple[str, float], ...] = ()
    text_adapters: tuple[tuple[str, float], ...] = ()
    applied: tuple[tuple[str, float], ...] = ()
    # img2img / inpainting (graph/image_inputs.py): what the VAE stage encodes, and for inpainting
    # with preserve_unmasked the pixels pasted back.
    conditioning: ConditioningInput | None = None
    overlay: Overlay | None = None

    @property
    def mode(self) -> str:
        if self.conditioning is None:
            return "txt2img"
        return "inpaint" if self.conditioning.mask is not None else "img2img"

    def encode_request(self) -> EncodeRequest:
        """What the TextEncoder gets (``deployments/messages.py``)."""
        adapters = tuple(AdapterUse(ref, float(w)) for ref, w in self.text_adapters)
        return EncodeRequest(self.prompt, self.negative_prompt, adapters)

    def denoise_params(self) -> DenoiseParams:
        """What the Denoiser gets besides the embeddings."""
        return DenoiseParams(
            num_images=self.num_images,
            seed=self.seed,
            width=self.width,
            height=self.height,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            scheduler=self.scheduler,
            adapters=tuple(AdapterUse(ref, float(w)) for ref, w in self.unet_adapters),
            tenant=self.tenant,
        )

    def decode_params(self) -> DecodeParams:
        """What the VAE's decode gets besides the latents."""
        return DecodeParams(self.output_format, self.overlay)


class Planner:
    def __init__(self, info: ModelInfo, model_name: str, limits: LimitsConfig, tokenizer, resolver: AdapterResolver):
        self.info = info
        self.model_name = model_name
        self.limits = limits
        self.tokenizer = tokenizer
        self.resolver = resolver

    def plan(
        self,
        *,
        prompt: str,
        negative_prompt: str,
        model: str | None,
        width: int | None,
        height: int | None,
        steps: int,
        guidance_scale: float,
        seed: int | None,
        num_images: int,
        scheduler: str,
        output_format: str,
        loras: list[LoRASpec] = (),
        tenant: str = "anonymous",
        fields: dict[str, str] | None = None,
    ) -> Plan:
        """Check a request against the limits; ``fields`` maps names to the endpoint's own field names."""
        f = {
            "width": "width",
            "height": "height",
            "num_images": "num_images",
            "model": "model",
            "prompt": "prompt",
            "negative_prompt": "negative_prompt",
            **(fields or {}),
        }
        lim = self.limits
        if model is not None and model != self.model_name:
            raise APIError(404, "model_not_found", f"unknown model {model!r}; served: {self.model_name!r}", f["model"])
        if not prompt.strip():
            raise APIError(422, "invalid_value", "prompt must not be empty", f["prompt"])
        width = self.info.default_side if width is None else width
        height = self.info.default_side if height is None else height
        for name, value in (("width", width), ("height", height)):
            if value % 8 or not lim.min_side <= value <= lim.max_side:
                raise APIError(
                    422,
                    "invalid_value",
                    f"{name} must be a multiple of 8 in [{lim.min_side}, {lim.max_side}], got {value}",
                    f[name],
                )
        if not 1 <= steps <= lim.max_steps:
            raise APIError(422, "invalid_value", f"steps must be in [1, {lim.max_steps}], got {steps}", "steps")
        if not 0 <= guidance_scale <= lim.max_guidance_scale:
            raise APIError(
                422,
                "invalid_value",
                f"guidance_scale must be in [0, {lim.max_guidance_scale}], got {guidance_scale}",
                "guidance_scale",
            )
        if not 1 <= num_images <= lim.max_num_images:
            raise APIError(
                422,
                "invalid_value",
                f"{f['num_images']} must be in [1, {lim.max_num_images}], got {num_images}",
                f["num_images"],
            )
        # A1111 takes <lora:...> tags from the positive prompt only; in the negative prompt they stay text.
        try:
            prompt, tags = extract_lora_tags(prompt)
        except ValueError as e:
            raise APIError(422, "invalid_value", f"prompt: {e}", f["prompt"]) from e
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            self.check_prompt_length(text, f[name])
        if seed is None:
            seed = secrets.randbelow(2**31)
        unet_adapters, text_adapters, applied = self.resolver.resolve(list(loras), field=f.get("loras", "loras"))
        if tags:  # after the body's own adapters
            tag_unet, tag_text, tag_applied = self.resolver.resolve(
                self.tag_specs(tags, f["prompt"]), field=f["prompt"]
            )
            self.check_combined(applied, tag_applied, f["prompt"])
            unet_adapters, text_adapters, applied = (
                unet_adapters + tag_unet,
                text_adapters + tag_text,
                applied + tag_applied,
            )
        return Plan(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=float(guidance_scale),
            seed=seed,
            num_images=num_images,
            scheduler=scheduler,
            output_format=output_format,
            tenant=tenant,
            unet_adapters=unet_adapters,
            text_adapters=text_adapters,
            applied=applied,
        )

    def check_prompt_length(self, text: str, field: str) -> None:
        """At most ``limits.max_prompt_chunks`` chunks of 75 tokens; a malformed weight is a 422 too."""
        try:
            ids, _ = tokenize_weighted(self.tokenizer, text)
        except ValueError as e:
            raise APIError(422, "invalid_value", f"{field}: {e}", field) from e
        chunk_length = self.tokenizer.model_max_length - 2
        max_chunks = self.limits.max_prompt_chunks
        if chunk_count(len(ids), chunk_length) > max_chunks:
            raise APIError(
                422,
                "prompt_too_long",
                f"{field} is {len(ids)} tokens; the limit is {chunk_length * max_chunks} tokens "
                f"({max_chunks} chunks of {chunk_length}: limits.max_prompt_chunks)",
                field,
            )

    def tag_specs(self, tags: list[LoraTag], field: str) -> list[LoRASpec]:
        max_scale = self.resolver.lora.max_scale
        specs = []
        for tag in tags:
            if not 0 <= tag.weight <= max_scale:
                raise APIError(
                    422,
                    "invalid_value",
                    f"{field}: <lora:{tag.name}:{tag.weight:g}>: the weight must be in [0, {max_scale}] "
                    "(lora.max_scale)",
                    field,
                )
            specs.append(LoRASpec(name=tag.name, version=tag.version, scale=tag.weight))
        return specs

    def check_combined(self, body: tuple, from_tags: tuple, field: str) -> None:
        """The body's adapters and the prompt's tags together: within the per-request limit, none twice."""
        limit = self.resolver.lora.max_loras_per_request
        if len(body) + len(from_tags) > limit:
            raise APIError(
                422,
                "invalid_value",
                f"{field}: at most {limit} adapters per request (loras and <lora:...> tags together), "
                f"got {len(body) + len(from_tags)}",
                field,
            )
        twice = sorted({ref for ref, _ in body} & {ref for ref, _ in from_tags})
        if twice:
            raise APIError(
                422, "invalid_value", f"{field}: adapter {twice[0]} is both in loras and a <lora:...> tag", field
            )


def tenant_of(request: Request, user: str | None) -> str:
    """The fair-scheduling tenant: the API key if one is sent, else the ``user`` field."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer ") and auth[7:].strip():
        return "key:" + hashlib.sha256(auth[7:].strip().encode()).hexdigest()[:12]
    return f"user:{user}" if user else "anonymous"


def parse_openai_model(model: str | None) -> tuple[str | None, list[LoRASpec]]:
    """``"tiny-sd:watercolor@2"`` -> (``"tiny-sd"``, [watercolor v2 at scale 1])."""
    if model is None or ":" not in model:
        return model, []
    base, _, adapter = model.partition(":")
    name, _, version = adapter.partition("@")
    if not name or (version and not version.isdigit()):
        raise APIError(422, "invalid_value", f'model must look like "base:adapter[@version]", got {model!r}', "model")
    return base or None, [LoRASpec(name=name, version=int(version) if version else None)]


def raw_format(accept: str) -> str | None:
    first = accept.split(",")[0].split(";")[0].strip().lower()
    return {v: k for k, v in MIME_TYPES.items()}.get(first)


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None:
        return None, None
    w, sep, h = size.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise APIError(422, "invalid_value", f'size must look like "512x512", got {size!r}', "size")
    return int(w), int(h)

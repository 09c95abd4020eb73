"""The one validation step: a ``GenerationInput`` (native names) becomes a checked ``Plan``.

``Planner.check_inputs`` is diffusers' ``check_inputs`` for the whole request: everything a request
can get wrong is found here, before any work is queued, in small named steps (the uploads, the style
image (``style_inputs``), the model, the prompt, the size, steps / guidance / images, prompt length,
adapters). Each step raises ``FieldError`` at a canonical field path (``width``, ``loras[0].scale``);
the front ends rename them (``graph/validation.py``). ``<lora:name:weight>`` tags in the prompt become
adapters of the request here, so every endpoint understands them.
"""

import dataclasses
import hashlib
import secrets
from dataclasses import dataclass

from fastapi import Request

from deployments.engine.conditioning import ConditioningInput
from deployments.engine.images import MIME_TYPES
from deployments.engine.models import ModelInfo
from deployments.engine.prompt_syntax import LoraTag, extract_lora_tags, plan_prompts, prompt_schedule
from deployments.engine.prompts import prompt_token_count, tokenize_chunks
from deployments.messages import (
    AdapterUse,
    DecodeParams,
    DenoiseParams,
    EncodeRequest,
    MicroConditioning,
    Overlay,
    StyleImage,
)

from .adapters_api import AdapterResolver, Adapters
from .config import LimitsConfig
from .errors import FieldError
from .image_decoding import check_side
from .image_inputs import ImageInputs, check_image_inputs
from .schemas import MAX_SEED, LoRASpec
from .style_inputs import DEFAULT_STYLE_SCALE, StyleSupport, check_style_inputs
from .validation import MICRO_FIELDS, GenerationInput


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
    tenant_weight: float | None = None  # the tenant key's weight (set by the ingress: graph/auth.py)
    model: str = ""  # the served base model's name (``GraphRouter`` runs the plan on its graph)
    # ((ref, scale), ...): adapters with UNet / text-encoder weights, pinned name@version refs.
    unet_adapters: tuple[tuple[str, float], ...] = ()
    text_adapters: tuple[tuple[str, float], ...] = ()
    applied: tuple[tuple[str, float], ...] = ()
    text_adapters_2: tuple[tuple[str, float], ...] = ()  # SDXL: those with text_encoder_2 weights
    micro: MicroConditioning | None = None  # SDXL's size / crop conditioning; None: every default (always on SD1)
    # img2img / inpainting (graph/image_inputs.py): what the VAE stage encodes, and for inpainting
    # with preserve_unmasked the pixels pasted back.
    conditioning: ConditioningInput | None = None
    overlay: Overlay | None = None
    # IP-Adapter (graph/style_inputs.py): the decoded reference image the ImageEncoder embeds, and its scale (a
    # number or per-block scales). None: no style image.
    style_image: StyleImage | None = None
    style_scale: float | dict = DEFAULT_STYLE_SCALE

    @property
    def mode(self) -> str:
        if self.conditioning is None:
            return "txt2img"
        return "inpaint" if self.conditioning.mask is not None else "img2img"

    def encode_request(self) -> EncodeRequest:
        """What the TextEncoder gets (``deployments/messages.py``)."""
        adapters = tuple(AdapterUse(ref, float(w)) for ref, w in self.text_adapters)
        adapters_2 = tuple(AdapterUse(ref, float(w)) for ref, w in self.text_adapters_2)
        return EncodeRequest(
            self.prompt,
            self.negative_prompt,
            adapters,
            adapters_2,
            steps=self.steps,
            tenant=self.tenant,
            tenant_weight=self.tenant_weight,
        )

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
            micro=self.micro,
            tenant_weight=self.tenant_weight,
            style_scale=self.style_scale,
        )

    def style_request(self) -> StyleImage | None:
        """What the ImageEncoder gets (None: no style image), with the request's tenant for its fair batches."""
        if self.style_image is None:
            return None
        return dataclasses.replace(self.style_image, tenant=self.tenant, tenant_weight=self.tenant_weight)

    def decode_params(self) -> DecodeParams:
        """What the VAE's decode gets besides the latents."""
        return DecodeParams(self.output_format, self.overlay, tenant=self.tenant, tenant_weight=self.tenant_weight)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# SDXL's size conditioning may name sizes up to this many times limits.max_side (an original_size larger
# than the output is what it is for: "make it look like a crop of a 4096 px photo").
MICRO_SIDE_FACTOR = 4


def _check_range(field: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise FieldError(
            422,
            "invalid_value",
            field,
            "{field} must be in [{low}, {high}], got {value}",
            low=low,
            high=high,
            value=value,
        )


class Planner:
    def __init__(
        self,
        info: ModelInfo,
        model_name: str,
        limits: LimitsConfig,
        tokenizer,
        resolver: AdapterResolver,
        style: StyleSupport | None = None,
    ):
        """``style``: the model's IP-Adapter layout (None: served without; a ``style_image`` gets 422)."""
        self.style = style
        self.info = info
        self.model_name = model_name
        self.limits = limits.for_model(info.default_side)  # max_side a number: the model's
        self.max_side_setting = limits.max_side_setting(model_name)
        self.tokenizer = tokenizer
        self.resolver = resolver

    def check_inputs(self, request: GenerationInput) -> Plan:
        """Check ``request`` against the limits and the registry; the ``Plan`` the graph runs.

        Blocking (decodes uploads, may read the registry's store): call it in a thread.
        """
        images = check_image_inputs(request, self.limits, self.max_side_setting)
        style_image, style_scale = check_style_inputs(request, self.limits, self.style, self.model_name)
        self.check_model(request.model)
        self.check_prompt(request.prompt)
        width, height = self.check_size(request.width, request.height, images)
        micro = self.check_micro(request)
        self.check_steps(request.steps)
        self.check_guidance_scale(request.guidance_scale)
        self.check_num_images(request.num_images)
        prompt, tags = self.split_lora_tags(request.prompt)
        self.check_prompt_length(prompt, "prompt", request.steps)
        self.check_prompt_length(request.negative_prompt, "negative_prompt", request.steps)
        adapters = self.check_adapters(request.loras, tags)
        seed = self.check_seed(request.seed)
        conditioning, overlay = None, None
        if images is not None:
            conditioning, overlay = images.prepare([seed + k for k in range(request.num_images)])
        return Plan(
            prompt=prompt,
            negative_prompt=request.negative_prompt,
            width=width,
            height=height,
            steps=request.steps,
            guidance_scale=float(request.guidance_scale),
            seed=seed,
            num_images=request.num_images,
            scheduler=request.scheduler,
            output_format=request.output_format,
            tenant=request.tenant,
            model=self.model_name,
            unet_adapters=adapters.unet,
            text_adapters=adapters.text,
            applied=adapters.applied,
            text_adapters_2=adapters.text_2,
            micro=micro,
            conditioning=conditioning,
            overlay=overlay,
            style_image=style_image,
            style_scale=style_scale,
        )

    # -- the steps, in order -----------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise FieldError(
                404,
                "model_not_found",
                "model",
                "unknown {field} {value!r}; served: {served!r}",
                value=model,
                served=self.model_name,
            )

    def check_prompt(self, prompt: str) -> None:
        if not prompt.strip():
            raise FieldError(422, "invalid_value", "prompt", "{field} must not be empty")

    def check_size(self, width: int | None, height: int | None, images: ImageInputs | None) -> tuple[int, int]:
        """The output size: the uploads' (settled by ``check_image_inputs``), else as given, else native."""
        if images is not None:
            return images.width, images.height
        lim = self.limits
        width = self.info.default_side if width is None else width
        height = self.info.default_side if height is None else height
        for name, value in (("width", width), ("height", height)):
            check_side(
                name,
                value,
                multiple=8,
                min_side=lim.min_side,
                max_side=lim.max_side,
                max_setting=self.max_side_setting,
            )
        return width, height

    def check_micro(self, request: GenerationInput) -> MicroConditioning | None:
        """SDXL's size and crop conditioning: ``[height, width]`` / ``[top, left]`` pairs of integers in
        ``[0, 4 x limits.max_side]``; None when none is given (every default: diffusers').

        SD1 models have no such conditioning: any of these fields is a 422 naming it, never silently
        dropped. diffusers uses the negative sizes only together (and the negative crop only with them),
        so one without the other is a 422 too::

            check_micro(GenerationInput("x", original_size=(512, 512), crops_coords_top_left=(0, 64)))
            # MicroConditioning(original_size=(512, 512), crops_coords_top_left=(0, 64), ...)
        """
        given = {name: getattr(request, name) for name in MICRO_FIELDS if getattr(request, name) is not None}
        if not given:
            return None
        if not self.info.sdxl:
            raise FieldError(
                422,
                "unsupported_field",
                next(iter(given)),
                "{field} is SDXL size conditioning; the served model {model} is {kind}, which has none",
                model=self.model_name,
                kind=self.info.kind,
            )
        high = MICRO_SIDE_FACTOR * self.limits.max_side
        for name, value in given.items():
            pair = "[top, left]" if "crops" in name else "[height, width]"
            if len(value) != 2 or not all(_is_int(v) and 0 <= v <= high for v in value):
                raise FieldError(
                    422,
                    "invalid_value",
                    name,
                    "{field} must be {pair}, two integers in [0, {high}] ({factor} x {setting}), got {value}",
                    pair=pair,
                    high=high,
                    factor=MICRO_SIDE_FACTOR,
                    setting=self.max_side_setting,
                    value=list(value),
                )
        together = "{field} needs {f[%s]}: SDXL uses the negative sizes only together"
        if "negative_original_size" in given and "negative_target_size" not in given:
            raise FieldError(422, "invalid_value", "negative_original_size", together % "negative_target_size")
        if "negative_target_size" in given and "negative_original_size" not in given:
            raise FieldError(422, "invalid_value", "negative_target_size", together % "negative_original_size")
        if "negative_crops_coords_top_left" in given and "negative_original_size" not in given:
            raise FieldError(
                422,
                "invalid_value",
                "negative_crops_coords_top_left",
                "{field} needs {f[negative_original_size]} and {f[negative_target_size]}",
            )
        return MicroConditioning(**{name: tuple(value) for name, value in given.items()})

    def check_steps(self, steps: int) -> None:
        _check_range("steps", steps, 1, self.limits.max_steps)

    def check_guidance_scale(self, guidance_scale: float) -> None:
        _check_range("guidance_scale", guidance_scale, 0, self.limits.max_guidance_scale)

    def check_num_images(self, num_images: int) -> None:
        _check_range("num_images", num_images, 1, self.limits.max_num_images)

    def split_lora_tags(self, prompt: str) -> tuple[str, list[LoraTag]]:
        """The prompt without its ``<lora:...>`` tags, and the tags. As in A1111, tags are read from the
        positive prompt only; in the negative prompt they stay text."""
        try:
            return extract_lora_tags(prompt)
        except ValueError as e:
            raise FieldError(422, "invalid_value", "prompt", "{field}: {error}", error=e) from e

    def check_prompt_length(self, text: str, field: str, steps: int = 1) -> None:
        """Every text the prompt takes over its ``steps`` (prompt editing, alternation, each AND part) is at
        most ``limits.max_prompt_chunks`` chunks of 75 tokens (a BREAK ends one); the prompt has at most
        ``limits.max_prompt_and_parts`` AND parts (each is a UNet row); a malformed weight is a 422 too."""
        if field == "prompt":
            parts = plan_prompts(text, "", steps).parts
            limit = self.limits.max_prompt_and_parts
            if len(parts) > limit:
                raise FieldError(
                    422,
                    "invalid_value",
                    field,
                    "{field} has {parts} AND parts; the limit is {limit} (limits.max_prompt_and_parts)",
                    parts=len(parts),
                    limit=limit,
                )
        else:
            parts = (tuple(prompt_schedule(text, steps)),)
        chunk_length = self.tokenizer.model_max_length - 2
        max_chunks = self.limits.max_prompt_chunks
        for part_text in dict.fromkeys(t for part in parts for _, t in part):
            try:
                chunks = tokenize_chunks(self.tokenizer, part_text, chunk_length)
            except ValueError as e:
                raise FieldError(422, "invalid_value", field, "{field}: {error}", error=e) from e
            if len(chunks) > max_chunks:
                raise FieldError(
                    422,
                    "prompt_too_long",
                    field,
                    "{field} is {tokens} tokens; the limit is {limit} tokens "
                    "({chunks} chunks of {chunk_length}: limits.max_prompt_chunks)",
                    tokens=prompt_token_count(chunks, chunk_length),
                    limit=chunk_length * max_chunks,
                    chunks=max_chunks,
                    chunk_length=chunk_length,
                )

    def check_adapters(self, loras: tuple[LoRASpec, ...], tags: list[LoraTag]) -> Adapters:
        """The body's ``loras``, then the prompt's tags: resolved, applicable, together within the limits."""
        adapters = self.resolver.resolve(list(loras))
        if not tags:
            return adapters
        from_tags = self.resolver.resolve(self.tag_specs(tags), field="prompt", indexed=False)
        self.check_combined(adapters, from_tags)
        return adapters + from_tags

    def tag_specs(self, tags: list[LoraTag]) -> list[LoRASpec]:
        max_scale = self.resolver.lora.max_scale
        for tag in tags:
            if not 0 <= tag.weight <= max_scale:
                raise FieldError(
                    422,
                    "invalid_value",
                    "prompt",
                    "{field}: <lora:{name}:{weight:g}>: the weight must be in [0, {high}] (lora.max_scale)",
                    name=tag.name,
                    weight=tag.weight,
                    high=max_scale,
                )
        return [LoRASpec(name=tag.name, version=tag.version, scale=tag.weight) for tag in tags]

    def check_combined(self, body: Adapters, from_tags: Adapters) -> None:
        """The body's adapters and the prompt's tags together: within the per-request limit, none twice."""
        limit = self.resolver.lora.max_loras_per_request
        count = len(body.applied) + len(from_tags.applied)
        if count > limit:
            raise FieldError(
                422,
                "invalid_value",
                "prompt",
                "{field}: at most {limit} adapters per request ({f[loras]} and <lora:...> tags together), got {count}",
                limit=limit,
                count=count,
            )
        twice = sorted({ref for ref, _ in body.applied} & {ref for ref, _ in from_tags.applied})
        if twice:
            raise FieldError(
                422,
                "invalid_value",
                "prompt",
                "{field}: adapter {ref} is both in {f[loras]} and a <lora:...> tag",
                ref=twice[0],
            )

    def check_seed(self, seed: int | None) -> int:
        """The seed, chosen if the request has none."""
        if seed is None:
            return secrets.randbelow(2**31)
        _check_range("seed", seed, 0, MAX_SEED)
        return seed


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


def tenant_of(request: Request, user: str | None) -> str:
    """Who a request is from, for fair scheduling, quotas, metrics and A1111's per-caller options (one
    identity everywhere), first of: the bearer key (hashed: never the key itself), A1111's HTTP Basic
    credentials (hashed), the body's ``user`` field, the client's network address. With ``auth.require_keys``
    the ingress replaces a key's hash by the key's name (``graph/auth.py``).

    Only a key is a credential: ``user`` and the address are whatever the client says or connects from
    (docs/security.md).

    >>> from starlette.requests import Request as R
    >>> tenant_of(R({"type": "http", "headers": [], "client": ("10.0.0.7", 5)}), "ann")
    'user:ann'
    >>> tenant_of(R({"type": "http", "headers": [], "client": ("10.0.0.7", 5)}), None)
    'addr:10.0.0.7'
    """
    auth = request.headers.get("authorization", "").strip()
    if auth.lower().startswith("bearer ") and auth[7:].strip():
        return "key:" + _digest(auth[7:].strip())
    if auth.lower().startswith("basic ") and auth[6:].strip():
        return "basic:" + _digest(auth[6:].strip())
    if user:
        return f"user:{user}"
    return f"addr:{request.client.host if request.client is not None else 'unknown'}"


def raw_format(accept: str) -> str | None:
    """The image format an ``Accept: image/...`` header asks for, if any."""
    first = accept.split(",")[0].split(";")[0].strip().lower()
    return {v: k for k, v in MIME_TYPES.items()}.get(first)

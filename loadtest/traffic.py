"""What one simulated request looks like: the traffic model behind the locust users.

Plain Python (no locust, no gevent), so the distribution is testable in
milliseconds and the same model drives lorafleet and the baseline.

* adapters: popularity follows a Zipf law over the N registered adapters
  (rank k is chosen with probability proportional to 1/k^s); a share of
  requests uses no LoRA, a share composes two adapters;
* prompts from ``prompts.prompt_corpus`` (short, medium and long), some with a
  negative prompt;
* sizes, step counts, image counts and schedulers drawn from weighted mixes;
* tenants: each has an API key (sent as ``Authorization: Bearer``; lorafleet
  hashes it into the fair-queuing tenant) and a weight, its share of the
  offered load;
* two API shapes: lorafleet's native ``/v1/generate`` and the OpenAI Images
  API (``/v1/images/generations``, the adapter in ``model``);
* base models (``models``, optional): each request's base model drawn by weight,
  its adapters only from that model's own (``model_adapter_prefix``); without it,
  requests carry no ``model`` and the server's default model answers.

Weighted mixes are written ``value=weight,...``:

>>> parse_weighted("64x64=4,64x96=1")
[('64x64', 4.0), ('64x96', 1.0)]
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import random
import re
from dataclasses import dataclass, field

from .prompts import negative_prompt, prompt_corpus

NATIVE_PATH = "/v1/generate"
OPENAI_PATH = "/v1/images/generations"
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # graph/config.py's, without importing graph


def parse_weighted(spec: str) -> list[tuple[str, float]]:
    """``"a=3,b=1,c"`` -> ``[("a", 3.0), ("b", 1.0), ("c", 1.0)]``; a missing weight is 1."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        value, sep, weight = item.partition("=")
        try:
            w = float(weight) if sep else 1.0
        except ValueError as e:
            raise ValueError(f"bad weight in {item!r} of {spec!r}: expected value=number") from e
        if w < 0 or not value.strip():
            raise ValueError(f"bad item {item!r} in {spec!r}: expected value=weight with weight >= 0")
        out.append((value.strip(), w))
    if not out or sum(w for _, w in out) <= 0:
        raise ValueError(f"weighted mix {spec!r} is empty or has zero total weight")
    return out


def parse_size(size: str) -> tuple[int, int]:
    """``"64x96"`` -> (width 64, height 96)."""
    w, sep, h = size.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise ValueError(f"bad size {size!r}: expected WIDTHxHEIGHT, e.g. 64x64")
    return int(w), int(h)


def parse_range(spec: str) -> tuple[float, float]:
    """``"0.6-1.2"`` -> (0.6, 1.2); ``"1"`` -> (1.0, 1.0)."""
    lo, sep, hi = spec.partition("-")
    a = float(lo)
    b = float(hi) if sep else a
    if b < a:
        raise ValueError(f"bad range {spec!r}: low > high")
    return a, b


class Weighted:
    """Draw values by weight (cumulative table + bisect)."""

    def __init__(self, items: list[tuple[object, float]]):
        if not items:
            raise ValueError("nothing to choose from")
        self.values = [v for v, _ in items]
        self.cumulative = list(itertools.accumulate(w for _, w in items))
        if self.cumulative[-1] <= 0:
            raise ValueError("total weight must be > 0")

    def __call__(self, rng: random.Random):
        x = rng.random() * self.cumulative[-1]
        return self.values[bisect.bisect_right(self.cumulative, x)]

    def probabilities(self) -> list[float]:
        total = self.cumulative[-1]
        prev = 0.0
        out = []
        for c in self.cumulative:
            out.append((c - prev) / total)
            prev = c
        return out


def zipf_weights(n: int, s: float) -> list[float]:
    """Unnormalised Zipf weights for ranks 1..n: 1/k^s."""
    if n < 1:
        raise ValueError(f"need at least one adapter for a Zipf law, got {n}")
    if s < 0:
        raise ValueError(f"zipf exponent must be >= 0, got {s}")
    return [1.0 / (k**s) for k in range(1, n + 1)]


def adapter_names(n: int, prefix: str) -> list[str]:
    """The N synthetic adapters' names, most popular first: ``lt-style-000`` ..."""
    return [f"{prefix}{i:03d}" for i in range(n)]


class ModelsSpecError(ValueError):
    """A bad ``--models`` spec; the message is one line naming the option."""

    def __init__(self, spec: str, problem: str):
        super().__init__(f"--models {spec!r}: {problem}")
        self.spec, self.problem = spec, problem


def parse_models(spec: str) -> list[tuple[str, float]]:
    """The ``--models`` mix: ``"tiny-sd=3,tiny-sdxl=1"`` -> ``[("tiny-sd", 3.0), ("tiny-sdxl", 1.0)]``; ``""``: none.

    Raises ``ModelsSpecError`` (a ``ValueError``) whose message names ``--models``.

    >>> parse_models("tiny-sd=3,tiny-sdxl")
    [('tiny-sd', 3.0), ('tiny-sdxl', 1.0)]
    """
    if not spec.strip():
        return []
    try:
        models = parse_weighted(spec)
    except ValueError as e:
        raise ModelsSpecError(spec, "expected MODEL=WEIGHT,... with weights > 0") from e
    names = [name for name, _ in models]
    for name, weight in models:
        if not MODEL_NAME_RE.match(name):
            raise ModelsSpecError(spec, f"{name!r} is not a model name (letters, digits, '.', '_', '-')")
        if weight <= 0:
            raise ModelsSpecError(spec, f"every model needs a weight > 0, {name!r} has {weight:g}")
    if len(set(names)) != len(names):
        raise ModelsSpecError(spec, "a model is named twice")
    return models


def models_option(spec: str) -> str:
    """argparse ``type`` of ``--models``: the spec, checked (argparse prints ``argument --models: <problem>``)."""
    try:
        parse_models(spec)
    except ModelsSpecError as e:
        raise argparse.ArgumentTypeError(f"{spec!r}: {e.problem}") from e
    return spec


def model_adapter_prefix(prefix: str, model: str | None) -> str:
    """The names of a model's synthetic adapters begin with this: adapters belong to one base model, and
    adapter names are lowercase (``lt-style-`` + ``tiny-sdxl`` -> ``lt-style-tiny-sdxl-``). ``None``
    (requests without ``model``): ``prefix`` itself, as before models could be mixed.

    >>> adapter_names(2, model_adapter_prefix("lt-style-", "tiny-SDXL"))
    ['lt-style-tiny-sdxl-000', 'lt-style-tiny-sdxl-001']
    """
    return prefix if model is None else f"{prefix}{model.lower()}-"


@dataclass(frozen=True)
class Tenant:
    name: str
    weight: float

    @property
    def api_key(self) -> str:
        return f"lt-key-{self.name}"


def parse_tenants(spec: str) -> list[Tenant]:
    tenants = [Tenant(name, w) for name, w in parse_weighted(spec)]
    names = [t.name for t in tenants]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate tenant in {spec!r}")
    if any(t.weight <= 0 for t in tenants):
        raise ValueError(f"every tenant needs a weight > 0 in {spec!r}")
    return tenants


@dataclass
class TrafficConfig:
    """The traffic knobs (each is a locust command-line option and a ``LOADTEST_*`` variable)."""

    adapters: int = 20
    adapter_prefix: str = "lt-style-"
    zipf_s: float = 1.1
    no_lora_share: float = 0.25
    multi_lora_share: float = 0.1
    lora_scales: str = "0.6-1.2"
    sizes: str = "64x64=4,64x96=1"
    steps: str = "4=2,6=1,8=1"
    num_images: str = "1=6,2=1"
    schedulers: str = "default=3,euler=1,dpmpp_2m=1"
    guidance_scale: float = 7.5
    negative_share: float = 0.3
    openai_share: float = 0.25
    tenants: str = "acme=4,globex=2,initech=1,umbrella=1"
    model_name: str = "tiny-sd"
    models: str = ""  # "tiny-sd=3,tiny-sdxl=1": each request's base model, by weight; "": no `model` field
    prompt_pool: int = 400
    seed: int = 0

    def __post_init__(self):
        for name in ("no_lora_share", "multi_lora_share", "negative_share", "openai_share"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.adapters < 0:
            raise ValueError(f"adapters must be >= 0, got {self.adapters}")
        parse_range(self.lora_scales)
        parse_tenants(self.tenants)
        parse_models(self.models)


@dataclass(frozen=True)
class PlannedRequest:
    """One request, ready to send: path, JSON body, headers, and what it is expected to return."""

    api: str  # "native" | "openai"
    path: str
    body: dict
    headers: dict
    tenant: str
    images: int
    adapters: tuple[str, ...] = field(default_factory=tuple)
    model: str | None = None  # the base model asked for; None: the server's default (no `model` field)


class RequestFactory:
    """Draws requests from the traffic model; one instance per locust user (own RNG, shared shape)."""

    def __init__(self, config: TrafficConfig, rng: random.Random | None = None):
        self.config = config
        self.rng = rng or random.Random(config.seed)
        self.prompts = prompt_corpus(config.prompt_pool, config.seed)
        models = parse_models(config.models)
        # One Zipf law per base model over that model's own adapters; None: requests without `model`.
        self.model_pick = Weighted(models) if models else None
        self.adapter_picks = {
            model: self._zipf(adapter_names(config.adapters, model_adapter_prefix(config.adapter_prefix, model)))
            for model in ([m for m, _ in models] or [None])
        }
        self.scale_range = parse_range(config.lora_scales)
        self.size_pick = Weighted([(parse_size(v), w) for v, w in parse_weighted(config.sizes)])
        self.steps_pick = Weighted([(int(v), w) for v, w in parse_weighted(config.steps)])
        self.images_pick = Weighted([(int(v), w) for v, w in parse_weighted(config.num_images)])
        self.scheduler_pick = Weighted(parse_weighted(config.schedulers))

    def _zipf(self, names: list[str]) -> Weighted | None:
        return Weighted(list(zip(names, zipf_weights(len(names), self.config.zipf_s), strict=True))) if names else None

    @property
    def adapter_names(self) -> list[str]:
        """Every adapter the traffic may use, over all its models."""
        return [name for pick in self.adapter_picks.values() if pick is not None for name in pick.values]

    def loras(self, model: str | None = None) -> list[tuple[str, float]]:
        """The adapters of one request on ``model``: none, one, or two distinct of that model's, each with a scale."""
        pick = self.adapter_picks[model]
        if pick is None or self.rng.random() < self.config.no_lora_share:
            return []
        count = 2 if self.config.adapters > 1 and self.rng.random() < self.config.multi_lora_share else 1
        names: list[str] = []
        while len(names) < count:
            name = pick(self.rng)
            if name not in names:
                names.append(name)
        lo, hi = self.scale_range
        return [(name, round(self.rng.uniform(lo, hi), 3)) for name in names]

    def make(self, api: str, tenant: Tenant) -> PlannedRequest:
        rng = self.rng
        # Drawn first and only when mixing, so that a run without models draws exactly as before.
        model = self.model_pick(rng) if self.model_pick is not None else None
        width, height = self.size_pick(rng)
        steps = self.steps_pick(rng)
        n = self.images_pick(rng)
        prompt = rng.choice(self.prompts)
        negative = negative_prompt(rng) if rng.random() < self.config.negative_share else ""
        seed = rng.randrange(2**32)
        scheduler = self.scheduler_pick(rng)
        headers = {"Authorization": f"Bearer {tenant.api_key}"}
        end_user = f"{tenant.name}-user-{rng.randrange(100)}"
        if api == "native":
            loras = self.loras(model)
            body = {
                "prompt": prompt,
                "negative_prompt": negative,
                "width": width,
                "height": height,
                "steps": steps,
                "guidance_scale": self.config.guidance_scale,
                "seed": seed,
                "num_images": n,
                "scheduler": scheduler,
                "loras": [{"name": name, "scale": scale} for name, scale in loras],
                "user": end_user,
            }
            if model is not None:
                body["model"] = model
            adapters = tuple(x for x, _ in loras)
            return PlannedRequest("native", NATIVE_PATH, body, headers, tenant.name, n, adapters, model)
        if api == "openai":
            # The OpenAI shape names one adapter in `model`, at scale 1.
            loras = self.loras(model)[:1]
            base = self.config.model_name if model is None else model
            body = {
                "model": f"{base}:{loras[0][0]}" if loras else base,
                "prompt": prompt,
                "n": n,
                "size": f"{width}x{height}",
                "response_format": "b64_json",
                "user": end_user,
                "steps": steps,
                "seed": seed,
                "guidance_scale": self.config.guidance_scale,
                "scheduler": scheduler,
            }
            if negative:
                body["negative_prompt"] = negative
            adapters = tuple(x for x, _ in loras)
            return PlannedRequest("openai", OPENAI_PATH, body, headers, tenant.name, n, adapters, model)
        raise ValueError(f"unknown API shape {api!r}; expected native or openai")


def count_images(api: str, payload: dict) -> int:
    """Images in a successful response body of either API shape."""
    return len(payload.get("images" if api == "native" else "data") or [])

"""A deterministic prompt corpus of varied lengths for load tests.

Real traffic mixes terse prompts ("a red boat") with long, comma-laden ones
that approach CLIP's 77-token window. The corpus is built from fixed word
lists and a seed, so two runs (and the lorafleet/baseline halves of one run)
send the same prompts; it repeats at the rate a pool of ``size`` prompts
implies, which exercises the text encoder's embedding cache the way repeated
user prompts do.

>>> corpus = prompt_corpus(size=4, seed=0)          # doctest: +SKIP
>>> [len(p.split()) for p in corpus]                 # short, medium and long prompts
[3, 14, 41, 7]
"""

from __future__ import annotations

import random

SUBJECTS = [
    "a red boat",
    "a lighthouse",
    "an old fox",
    "a mountain village",
    "a city street",
    "a bowl of fruit",
    "a robot",
    "a cat on a windowsill",
    "a castle",
    "a forest path",
    "a sailing ship",
    "a desert canyon",
    "a portrait of a woman",
    "an astronaut",
    "a dragon",
    "a steam train",
    "a koi pond",
    "a snowy cabin",
    "a jazz band",
    "a market stall",
    "a bicycle",
    "a tea house",
    "a waterfall",
    "a neon diner",
]
SETTINGS = [
    "at dusk",
    "in the rain",
    "at sunrise",
    "under a full moon",
    "in autumn",
    "on a foggy morning",
    "in winter",
    "at noon",
    "during a storm",
    "in spring bloom",
    "at golden hour",
    "by candlelight",
]
STYLES = [
    "watercolor",
    "oil painting",
    "ink sketch",
    "pixel art",
    "studio photo",
    "anime style",
    "low poly render",
    "charcoal drawing",
    "ukiyo-e print",
    "art nouveau poster",
    "pastel illustration",
    "film still",
]
DETAILS = [
    "highly detailed",
    "soft lighting",
    "dramatic shadows",
    "wide angle",
    "shallow depth of field",
    "muted colors",
    "vivid colors",
    "intricate patterns",
    "cinematic composition",
    "rule of thirds",
    "volumetric light",
    "sharp focus",
    "grainy texture",
    "symmetrical",
    "minimalist background",
    "warm palette",
    "cool palette",
    "long exposure",
    "reflections on water",
    "overcast sky",
    "trending on artstation",
    "8k",
    "matte finish",
    "bokeh",
    "hand drawn linework",
]
NEGATIVES = ["blurry", "low quality", "watermark, text", "deformed, extra limbs", "oversaturated", "jpeg artifacts"]

# Share of the corpus in each length class: (name, share, detail phrases).
LENGTH_CLASSES = [("short", 0.35, (0, 0)), ("medium", 0.40, (2, 5)), ("long", 0.25, (8, 12))]


def make_prompt(rng: random.Random, length: str) -> str:
    """One prompt of the given length class (``short``, ``medium``, ``long``); always under 77 CLIP tokens."""
    details = {name: n for name, _, n in LENGTH_CLASSES}
    if length not in details:
        raise ValueError(f"unknown prompt length class {length!r}; choose one of {list(details)}")
    lo, hi = details[length]
    subject = rng.choice(SUBJECTS)
    if length == "short":
        return subject if rng.random() < 0.5 else f"{subject}, {rng.choice(STYLES)}"
    parts = [f"{subject} {rng.choice(SETTINGS)}", rng.choice(STYLES), *rng.sample(DETAILS, rng.randint(lo, hi))]
    return ", ".join(parts)


def prompt_corpus(size: int = 400, seed: int = 0) -> list[str]:
    """``size`` prompts, shuffled, with the length mix of ``LENGTH_CLASSES``."""
    if size < 1:
        raise ValueError(f"prompt corpus size must be >= 1, got {size}")
    rng = random.Random(seed)
    out: list[str] = []
    for name, share, _ in LENGTH_CLASSES:
        out += [make_prompt(rng, name) for _ in range(max(1, round(size * share)))]
    rng.shuffle(out)
    return out[:size]


def negative_prompt(rng: random.Random) -> str:
    return rng.choice(NEGATIVES)

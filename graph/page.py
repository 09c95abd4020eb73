"""The browser page at ``/``: static files from ``graph/static``, served by the ingress itself.

No CDN and no build step: ``index.html``, ``app.js`` and ``style.css`` are read once per replica.
The page learns this server's limits and defaults from a JSON block ``render_index`` writes into
``index.html``, so its inputs show the same bounds the API enforces (the API still checks them all;
the page shows its errors). The block is the default model's ``page_config`` plus ``models``: one per
served model, the default first; with more than one, the page offers a model picker and lays its form
out for the chosen model (sizes, schedulers, adapters) and sends ``model`` with every request.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
CONFIG_MARKER = "/*LORAFLEET_CONFIG*/{}"


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    media_type: str
    etag: str


def _static(name: str, body: bytes) -> StaticFile:
    return StaticFile(body, _MEDIA_TYPES[Path(name).suffix], '"' + hashlib.sha256(body).hexdigest()[:16] + '"')


def load_static(directory: Path = STATIC_DIR) -> dict[str, StaticFile]:
    """Every servable file under ``directory`` by its name (``"app.js"``); only known types, no subfolders."""
    return {
        p.name: _static(p.name, p.read_bytes())
        for p in sorted(directory.iterdir())
        if p.is_file() and p.suffix in _MEDIA_TYPES
    }


def page_config(*, model: str, default_side: int, limits, lora, samplers: list[dict], family: str = "sd1") -> dict:
    """What the page needs to lay out its form: the served model, defaults and the API's limits.

    The size defaults to the model's native side, and ``max_side`` is the model's (``limits.max_side: auto``
    follows the model: 1024 for SD1.5, 2048 for SDXL)."""
    return {
        "model": model,
        "family": family,
        "default_side": default_side,
        "min_side": limits.min_side,
        "max_side": limits.max_side_for(default_side),
        "max_steps": limits.max_steps,
        "max_num_images": limits.max_num_images,
        "max_guidance_scale": limits.max_guidance_scale,
        "max_loras": lora.max_loras_per_request,
        "max_lora_scale": lora.max_scale,
        "schedulers": [{"name": s["name"], "value": s["options"]["lorafleet_scheduler"]} for s in samplers],
    }


def render_index(template: StaticFile, config: dict) -> StaticFile:
    """``index.html`` with ``config`` in place of ``CONFIG_MARKER`` (inside a JSON script block).

    ``<``, ``>`` and ``&`` are escaped, so no value can close the script element.
    """
    text = template.body.decode()
    if CONFIG_MARKER not in text:
        raise ValueError(f"index.html lacks the config marker {CONFIG_MARKER!r}")
    blob = json.dumps(config).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return _static("index.html", text.replace(CONFIG_MARKER, blob).encode())


class Site:
    """The page's files for one replica: ``index.html`` rendered with ``config``, the rest as they are."""

    def __init__(self, config: dict, directory: Path = STATIC_DIR):
        self.files = load_static(directory)
        self.files["index.html"] = render_index(self.files["index.html"], config)

    def get(self, name: str) -> StaticFile | None:
        return self.files.get(name)

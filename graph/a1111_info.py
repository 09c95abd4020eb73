"""A1111's read-only listings: ``/schedulers``, ``/cmd-flags``, ``/sd-vae``, ``/embeddings``, ``/memory``,
``/scripts``, each with what lorafleet really has (empty where it has none, as A1111 answers then)."""

from __future__ import annotations

import os

# A1111's sigma schedules (``modules/sd_schedulers.py``: name, label, aliases, default_rho, need_inner_model)
# that lorafleet runs. Today only "automatic": each sampler's own schedule. The one list: the samplers work
# of issue #20 adds Karras / Exponential / SGM Uniform to deployments/engine/schedulers.py; then this reads them.
SCHEDULERS: tuple[tuple[str, str, tuple[str, ...], float, bool], ...] = (("automatic", "Automatic", (), -1.0, False),)


def schedulers() -> list[dict]:
    """``GET /sdapi/v1/schedulers``: A1111's entries (``default_rho`` -1: none, as A1111 lists it)."""
    return [
        {"name": name, "label": label, "aliases": list(aliases), "default_rho": rho, "need_inner_model": inner}
        for name, label, aliases, rho, inner in SCHEDULERS
    ]


def cmd_flags() -> dict:
    """``GET /sdapi/v1/cmd-flags``: the few A1111 flags whose meaning holds here, with lorafleet's values.
    The API is always on; there is a browser page (``/``); no Basic auth of A1111's, no server-kill routes,
    no API request log of A1111's; checkpoints and adapters are safetensors only (nothing unpickled)."""
    return {
        "api": True,
        "nowebui": False,
        "api_auth": None,
        "api_log": False,
        "api_server_stop": False,
        "disable_safe_unpickle": False,
        "lorafleet": True,
    }


def embeddings() -> dict:
    """``GET /sdapi/v1/embeddings``: lorafleet has no textual-inversion embeddings."""
    return {"loaded": {}, "skipped": {}}


def scripts() -> dict:
    """``GET /sdapi/v1/scripts``: no A1111 scripts (webuiapi asks on connecting, to look for extensions)."""
    return {"txt2img": [], "img2img": []}


def memory() -> dict:
    """``GET /sdapi/v1/memory`` of this process (the ingress replica that answers): A1111's shape. ``ram`` from
    the process's resident set; ``cuda`` from torch where this process has a CUDA device, else A1111's
    ``{"error": ...}``."""
    try:
        import psutil

        process = psutil.Process(os.getpid())
        rss = process.memory_info().rss
        total = psutil.virtual_memory().total
        ram = {"free": total - rss, "used": rss, "total": total}
    except Exception as e:  # noqa: BLE001 - A1111 answers the error in place of the numbers
        ram = {"error": f"{type(e).__name__}"}
    return {"ram": ram, "cuda": cuda_memory()}


def cuda_memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"error": "unavailable"}
    free, total = torch.cuda.mem_get_info()
    s = torch.cuda.memory_stats()

    def pair(name: str) -> dict:
        return {"current": s.get(f"{name}.all.current", 0), "peak": s.get(f"{name}.all.peak", 0)}

    return {
        "system": {"free": free, "used": total - free, "total": total},
        "active": pair("active_bytes"),
        "allocated": pair("allocated_bytes"),
        "reserved": pair("reserved_bytes"),
        "inactive": pair("inactive_split_bytes"),
        "events": {"retries": s.get("num_alloc_retries", 0), "oom": s.get("num_ooms", 0)},
    }

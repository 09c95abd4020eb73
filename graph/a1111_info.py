"""A1111's read-only listings: ``/schedulers``, ``/cmd-flags``, ``/sd-vae``, ``/embeddings``, ``/memory``,
``/scripts``, each with what lorafleet really has (empty where it has none, as A1111 answers then)."""

from __future__ import annotations

import os

from deployments.engine.schedulers import SCHEDULES

# A1111's entry (``modules/sd_schedulers.py``: label, aliases, default_rho, need_inner_model) for each sigma
# schedule lorafleet runs: "automatic" (each sampler's own) and the engine's ``SCHEDULES``, the one list.
_A1111_SCHEDULES: dict[str, tuple[str, tuple[str, ...], float, bool]] = {
    "automatic": ("Automatic", (), -1.0, False),
    "karras": ("Karras", (), 7.0, False),
    "exponential": ("Exponential", (), -1.0, False),
    "beta": ("Beta", (), -1.0, False),
    "sgm_uniform": ("SGM Uniform", ("SGMUniform",), -1.0, True),
}


def schedulers() -> list[dict]:
    """``GET /sdapi/v1/schedulers``: A1111's entries for "automatic" and each of the engine's ``SCHEDULES``
    (``default_rho`` -1: none, as A1111 lists it)."""
    out = []
    for name in ("automatic", *SCHEDULES):
        label, aliases, rho, inner = _A1111_SCHEDULES.get(name, (name.replace("_", " ").title(), (), -1.0, False))
        out.append(
            {"name": name, "label": label, "aliases": list(aliases), "default_rho": rho, "need_inner_model": inner}
        )
    return out


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

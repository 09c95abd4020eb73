"""``build_app``: bind TextEncoder, Denoiser and VAE (an ImageEncoder for models with IP-Adapter, and the Jobs
store) behind the HTTP ingress.

Used by ``serve run serve_config.yaml`` / ``serve deploy`` (``import_path:
graph.app:build_app`` with the config as ``args``) and from Python.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from deployments.config import ResourceConfig
from deployments.denoiser import Denoiser
from deployments.image_encoder import ImageEncoder
from deployments.routing import ROUTING_STATS_PERIOD_S, AdapterAffinityRouter
from deployments.text_encoder import TextEncoder
from deployments.vae import VAE

from .chain import ModelGraph
from .config import AppConfig
from .ingress import Ingress
from .jobs import Jobs


def _options(cfg: ResourceConfig) -> dict:
    options = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    }
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = cfg.autoscaling
    else:
        options["num_replicas"] = cfg.num_replicas
    return options


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    """Validate the config (``ConfigError`` names the field) and bind the graph: for each base model a
    TextEncoder, a Denoiser and a VAE, and with ``ip_adapter`` an ImageEncoder (the first model's keep the plain
    names, the others' end in ``-<model name>``), one Jobs store and one ingress for them all."""
    config = args if isinstance(args, AppConfig) else AppConfig.load(args)
    # Requests go to replicas that already hold their adapters (deployments/routing.py).
    router = RequestRouterConfig(
        request_router_class=AdapterAffinityRouter, request_routing_stats_period_s=ROUTING_STATS_PERIOD_S
    )
    graphs = []  # one per config.served_models(), in its order
    for served in config.served_models():
        # One set of fair-share weights for every stage's queue: the TextEncoder's and the VAE's batches
        # order tenants as the Denoiser's queue does (engine/fair_batcher.py, engine/fair_queue.py).
        weights = served.denoiser.tenant_weights
        text_encoder = TextEncoder.options(name=f"TextEncoder{served.suffix}", **_options(served.text_encoder)).bind(
            served.model, served.text_encoder, config.lora, config.registry, weights
        )
        denoiser = Denoiser.options(
            name=f"Denoiser{served.suffix}", **_options(served.denoiser), request_router_config=router
        ).bind(served.model, served.denoiser, config.lora, config.registry)
        vae = VAE.options(name=f"VAE{served.suffix}", **_options(served.vae)).bind(served.model, served.vae, weights)
        image_encoder = None
        if served.model.ip_adapter is not None:  # style_image: IP-Adapter's CLIP vision encoder
            image_encoder = ImageEncoder.options(
                name=f"ImageEncoder{served.suffix}", **_options(served.image_encoder)
            ).bind(served.model, served.image_encoder, weights)
        graphs.append(ModelGraph(text_encoder, denoiser, vae, image_encoder))
    # One replica: it holds every async job, so each ingress replica finds each job there.
    jobs = Jobs.options(
        num_replicas=1,
        max_ongoing_requests=config.jobs.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.jobs.num_cpus},
    ).bind(graphs, config)
    ing = config.ingress
    return Ingress.options(
        num_replicas=ing.num_replicas,
        max_ongoing_requests=ing.max_ongoing_requests,
        max_queued_requests=ing.max_queued_requests,
        ray_actor_options={"num_cpus": ing.num_cpus},
    ).bind(graphs, config, jobs)

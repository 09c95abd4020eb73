"""Autoscale the Denoiser on pending denoise work, not on ongoing requests.

A Denoiser replica takes many requests at once (they wait in its fair queue
and share its batches), so "ongoing requests" says little about load: one
request may carry 8 images of 150 steps, another 1 image of 4. Each replica
reports the images it holds (running + queued) through Ray Serve's
``record_autoscaling_stats``; this policy sizes the pool so that each replica
holds about ``target_pending_images_per_replica`` images, scaling up after
``upscale_delay_s`` of sustained demand and down after ``downscale_delay_s``.

serve_config.yaml::

    autoscaling_config:
      min_replicas: 1
      max_replicas: 8
      policy:
        policy_function: deployments.autoscaling:PendingWorkPolicy
        policy_kwargs: {target_pending_images_per_replica: 16}
"""

from __future__ import annotations

import math
import time
from typing import Any


class PendingWorkPolicy:
    def __init__(
        self,
        target_pending_images_per_replica: float = 16.0,
        upscale_delay_s: float = 10.0,
        downscale_delay_s: float = 120.0,
    ):
        if target_pending_images_per_replica <= 0:
            raise ValueError(f"target_pending_images_per_replica must be > 0, got {target_pending_images_per_replica}")
        self.target = float(target_pending_images_per_replica)
        self.upscale_delay_s = float(upscale_delay_s)
        self.downscale_delay_s = float(downscale_delay_s)

    def desired(self, pending_images: float, lo: int, hi: int) -> int:
        return max(lo, min(hi, math.ceil(pending_images / self.target)))

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        state = dict(ctx.policy_state or {})
        now = ctx.current_time if ctx.current_time is not None else time.time()
        metrics = ctx.aggregated_metrics or {}
        pending = sum((metrics.get("pending_images") or {}).values())
        current = ctx.target_num_replicas
        want = self.desired(pending, ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas)
        if want == current:
            state.pop("since", None)
            state.pop("direction", None)
            return current, state
        direction = "up" if want > current else "down"
        if state.get("direction") != direction:
            state["direction"], state["since"] = direction, now
        delay = self.upscale_delay_s if direction == "up" else self.downscale_delay_s
        if now - state["since"] >= delay:
            state.pop("since", None)
            state.pop("direction", None)
            return want, state
        return current, state

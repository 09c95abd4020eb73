"""Autoscale the Denoiser on pending denoise work, not on ongoing requests.

A Denoiser replica takes many requests at once (they wait in its fair queue
and share its batches), so "ongoing requests" says little about load: one
request may carry 8 images of 150 steps, another 1 image of 4. Each replica
reports the images it holds (running + queued) through Ray Serve's
``record_autoscaling_stats``; this policy asks for enough replicas that each
holds about ``target_pending_images_per_replica`` images.

Ray Serve wraps custom policies with the deployment's own autoscaling knobs:
``min_replicas``/``max_replicas``, ``upscale_delay_s``/``downscale_delay_s``
(a decision must hold that long before it is applied) and the up/down scaling
factors, so the policy itself has no timers. serve_config.yaml::

    autoscaling_config:
      min_replicas: 1
      max_replicas: 8
      upscale_delay_s: 10
      downscale_delay_s: 120
      policy:
        policy_function: deployments.autoscaling:PendingWorkPolicy
        policy_kwargs: {target_pending_images_per_replica: 16}
"""

from __future__ import annotations

import math
from typing import Any


class PendingWorkPolicy:
    def __init__(self, target_pending_images_per_replica: float = 16.0):
        if target_pending_images_per_replica <= 0:
            raise ValueError(f"target_pending_images_per_replica must be > 0, got {target_pending_images_per_replica}")
        self.target = float(target_pending_images_per_replica)

    def desired(self, pending_images: float, lo: int, hi: int) -> int:
        return max(lo, min(hi, math.ceil(pending_images / self.target)))

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        pending = sum((metrics.get("pending_images") or {}).values())
        want = self.desired(pending, ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas)
        return want, dict(ctx.policy_state or {})

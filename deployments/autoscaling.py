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
factors, so the policy itself has no timers. With ``min_replicas: 0`` an idle
Denoiser scales to zero; a request waiting at a handle brings one replica back. serve_config.yaml::

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

    def desired(self, pending_images: float, lo: int, hi: int, waiting_requests: float = 0.0) -> int:
        """Replicas for ``pending_images`` held by the replicas; with none running (``min_replicas: 0``),
        one as soon as a request waits at a handle (no replica reports images then)."""
        want = math.ceil(pending_images / self.target)
        if waiting_requests > 0:
            want = max(want, 1)
        return max(lo, min(hi, want))

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        pending = sum((metrics.get("pending_images") or {}).values())
        lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        # From zero: requests waiting at the handles (Ray's count of ongoing requests) wake the deployment.
        waiting = ctx.total_num_requests if ctx.current_num_replicas == 0 else 0.0
        return self.desired(pending, lo, hi, waiting), dict(ctx.policy_state or {})

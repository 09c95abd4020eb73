"""The Denoiser's autoscaling policy: replicas follow pending images, with hysteresis."""

from types import SimpleNamespace

import pytest

from deployments.autoscaling import PendingWorkPolicy


def ctx(pending_by_replica, current, t, state, lo=1, hi=8):
    return SimpleNamespace(
        aggregated_metrics={"pending_images": pending_by_replica},
        target_num_replicas=current,
        capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi,
        current_time=t,
        policy_state=state,
    )


def test_scales_up_after_the_delay_and_down_after_a_longer_one():
    policy = PendingWorkPolicy(target_pending_images_per_replica=10, upscale_delay_s=5, downscale_delay_s=30)
    state = {}
    n, state = policy(ctx({"r1": 35}, 1, 0.0, state))  # wants 4, waits
    assert n == 1
    n, state = policy(ctx({"r1": 35}, 1, 4.0, state))
    assert n == 1
    n, state = policy(ctx({"r1": 20, "r2": 15}, 1, 5.0, state))  # sustained 5 s: up to 4
    assert n == 4 and state == {}
    n, state = policy(ctx({"a": 0, "b": 0, "c": 1, "d": 0}, 4, 10.0, state))  # wants 1, waits 30 s
    assert n == 4
    n, state = policy(ctx({"a": 0, "b": 0, "c": 0, "d": 0}, 4, 39.0, state))
    assert n == 4
    n, state = policy(ctx({"a": 0, "b": 0, "c": 0, "d": 0}, 4, 40.0, state))
    assert n == 1


def test_a_blip_resets_the_timer_and_bounds_hold():
    policy = PendingWorkPolicy(target_pending_images_per_replica=10, upscale_delay_s=5, downscale_delay_s=30)
    n, state = policy(ctx({"r": 50}, 1, 0.0, {}))
    n, state = policy(ctx({"r": 5}, 1, 3.0, state))  # demand gone: no longer scaling up
    assert n == 1 and state == {}
    n, state = policy(ctx({"r": 1000}, 1, 10.0, state, hi=3))
    n, state = policy(ctx({"r": 1000}, 1, 15.0, state, hi=3))
    assert n == 3  # capped at max_replicas
    assert policy.desired(0, 2, 8) == 2  # never below min_replicas


def test_bad_target():
    with pytest.raises(ValueError, match="target_pending_images_per_replica"):
        PendingWorkPolicy(target_pending_images_per_replica=0)

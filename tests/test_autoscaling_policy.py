"""The Denoiser's autoscaling policy: replicas follow pending images; Serve's wrapper applies the delays."""

from types import SimpleNamespace

import pytest

from deployments.autoscaling import PendingWorkPolicy


def ctx(pending_by_replica, current, lo=1, hi=8, requests=0.0):
    return SimpleNamespace(
        aggregated_metrics={"pending_images": pending_by_replica},
        target_num_replicas=current,
        current_num_replicas=current,
        total_num_requests=requests,
        capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi,
        policy_state={},
    )


@pytest.mark.parametrize(
    "pending, lo, hi, want",
    [
        ({"r1": 35}, 1, 8, 4),  # ceil(35 / 10)
        ({"r1": 20, "r2": 15}, 1, 8, 4),  # summed over replicas
        ({"r1": 0, "r2": 0}, 1, 8, 1),  # never below min_replicas
        ({"r1": 1000}, 1, 3, 3),  # never above max_replicas
        ({}, 0, 8, 0),  # no metrics yet: scale to min
    ],
)
def test_replicas_follow_pending_images(pending, lo, hi, want):
    n, state = PendingWorkPolicy(target_pending_images_per_replica=10)(ctx(pending, 1, lo, hi))
    assert (n, state) == (want, {})


@pytest.mark.parametrize(
    "current, requests, want",
    [
        (0, 0.0, 0),  # idle at zero: stays at zero (min_replicas 0 costs nothing)
        (0, 1.0, 1),  # a request waits at a handle: one replica from zero
        (0, 500.0, 1),  # from zero, one: the images it then reports size the rest
        (1, 3.0, 0),  # with a replica up, its reported images decide (none here), not the handle count
    ],
)
def test_from_zero_a_waiting_request_brings_one_replica(current, requests, want):
    n, _ = PendingWorkPolicy(target_pending_images_per_replica=10)(ctx({}, current, 0, 8, requests))
    assert n == want


def test_through_serves_wrapper_the_delays_hold_then_apply(monkeypatch):
    """Serve's own wrapper (as the controller runs it): a scale-up waits upscale_delay_s, then happens."""
    from ray.serve import autoscaling_policy as ap
    from ray.serve.config import AutoscalingConfig

    now = [1000.0]
    monkeypatch.setattr(ap.time, "time", lambda: now[0])
    policy = ap._apply_autoscaling_config(PendingWorkPolicy(target_pending_images_per_replica=2))
    config = AutoscalingConfig(min_replicas=1, max_replicas=4, upscale_delay_s=10, downscale_delay_s=30)
    state: dict = {}
    decisions = []
    current = 1
    for t in range(0, 25, 2):
        now[0] = 1000.0 + t
        c = SimpleNamespace(
            aggregated_metrics={"pending_images": {"r": 12.0}},
            target_num_replicas=current,
            current_num_replicas=current,
            capacity_adjusted_min_replicas=1,
            capacity_adjusted_max_replicas=4,
            policy_state=state,
            config=config,
            current_time=now[0],
            last_scale_up_time=None,
            last_scale_down_time=None,
        )
        n, state = policy(c)
        decisions.append((t, n))
        current = n  # the controller adopts the decision
    held = [n for t, n in decisions if t < 10]
    assert set(held) == {1}, decisions  # held for the delay
    assert [n for t, n in decisions if t >= 10] == [4] * 8, decisions  # then applied and kept; 12/2=6 capped at 4


def test_bad_target():
    with pytest.raises(ValueError, match="target_pending_images_per_replica"):
        PendingWorkPolicy(target_pending_images_per_replica=0)

"""Vectorized scheduler steps equal diffusers' per-request schedulers bit for bit, row by row, in mixed batches.

Each "job" here has its own diffusers scheduler (the reference) and a twin that only
``prepare``s our ``JobSchedule``; model outputs are seeded noise per (job, step), so
no UNet runs. Jobs join at different ticks, with different step counts, strengths
(img2img: ``set_begin_index``), configs (Karras sigmas, v-prediction, Heun, clipping,
``lower_order_final`` below and above 15 steps) and kinds, all in one batch.
"""

from __future__ import annotations

import diffusers
import pytest
import torch

from deployments.engine.scheduler_steps import (
    DDIMStep,
    DPMSolverMultistepStep,
    EulerAncestralStep,
    EulerStep,
    PerRequestStep,
    step_for,
)
from deployments.engine.schedulers import SCHEDULERS
from deployments.engine.step_scheduler import StepScheduler

# builtin:tiny-sd's scheduler config (SD1.5's values).
BASE = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
}

# name (SCHEDULERS, or a diffusers class), config overrides, steps, strength (None: text-to-image), kind
JOBS = [
    ("ddim", {}, 5, None, DDIMStep),
    ("ddim", {}, 9, 0.6, DDIMStep),
    ("ddim", {"prediction_type": "v_prediction", "clip_sample": True, "set_alpha_to_one": True}, 7, None, DDIMStep),
    ("euler", {}, 6, None, EulerStep),
    ("euler", {"use_karras_sigmas": True}, 12, 0.7, EulerStep),
    ("euler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 5, None, EulerStep),
    ("euler", {"final_sigmas_type": "sigma_min", "timestep_spacing": "linspace"}, 4, None, EulerStep),
    ("euler_a", {}, 8, None, EulerAncestralStep),
    ("euler_a", {}, 10, 0.5, EulerAncestralStep),
    ("euler_a", {"prediction_type": "v_prediction"}, 3, None, EulerAncestralStep),
    ("dpmpp_2m", {}, 8, None, DPMSolverMultistepStep),  # < 15 steps: lower_order_final
    ("dpmpp_2m", {}, 20, None, DPMSolverMultistepStep),
    ("dpmpp_2m", {"use_karras_sigmas": True}, 16, 0.75, DPMSolverMultistepStep),
    (
        "dpmpp_2m",
        {"solver_type": "heun", "final_sigmas_type": "sigma_min", "lower_order_final": False},
        6,
        None,
        DPMSolverMultistepStep,
    ),  # fmt: skip
    ("dpmpp_2m", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 5, 0.9, DPMSolverMultistepStep),
    ("dpmpp_2m", {"solver_order": 1}, 4, None, DPMSolverMultistepStep),
    ("PNDMScheduler", {}, 5, None, PerRequestStep),
    ("UniPCMultistepScheduler", {}, 4, 0.8, PerRequestStep),
]


def make_scheduler(name: str, overrides: dict):
    cls_name, defaults = SCHEDULERS.get(name, (name, {}))
    return getattr(diffusers, cls_name).from_config({**BASE, **defaults, **overrides})


class Job:
    """A reference diffusers scheduler and our schedule, from twin schedulers set up as the engine does."""

    def __init__(self, n: int, name, overrides, steps, strength, dtype=torch.float32):
        self.n, self.index, self.dtype = n, 0, dtype
        self.ref, ours = make_scheduler(name, overrides), make_scheduler(name, overrides)
        for s in (self.ref, ours):
            s.set_timesteps(steps)
            timesteps = s.timesteps if strength is None else StepScheduler.get_timesteps(s, steps, strength)
        self.timesteps = timesteps
        self.ref_generator, generator = torch.Generator().manual_seed(n), torch.Generator().manual_seed(n)
        self.ref_kwargs = StepScheduler.prepare_extra_step_kwargs(self.ref, self.ref_generator)
        step_kwargs = StepScheduler.prepare_extra_step_kwargs(ours, generator)
        self.schedule = step_for(ours, step_kwargs).prepare(ours, timesteps, generator, step_kwargs)
        self.x_t = self.ref_x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(100 + n)).to(dtype)

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    def eps(self) -> torch.Tensor:
        return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1000 * self.n + self.index)).to(
            self.dtype
        )


def bitwise(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return torch.equal(ours, ref)


def half_rounding(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    """Same dtype, equal to half precision's rounding (relative to the values' scale)."""
    scale = max(1.0, ref.float().abs().max().item())
    return ours.dtype == ref.dtype and (ours.float() - ref.float()).abs().max().item() <= 4e-3 * scale


def tick(jobs: list[Job], same=bitwise) -> None:
    """One tick of the engine's scheduler part: each kind over its jobs, and the reference alone per job."""
    groups: dict = {}
    for j in jobs:
        groups.setdefault(j.schedule.kind, []).append(j)
    for kind, members in groups.items():
        schedules, indices = [j.schedule for j in members], [j.index for j in members]
        scaled = kind.scale_model_input(schedules, indices, torch.cat([j.x_t for j in members]))
        eps = torch.cat([j.eps() for j in members])
        x_next = kind.step(schedules, indices, eps, torch.cat([j.x_t for j in members]))
        for k, j in enumerate(members):
            t = j.timesteps[j.index]
            ref_scaled = j.ref.scale_model_input(torch.cat([j.ref_x_t] * 2), t)  # the pipeline's CFG rows
            assert same(scaled[k : k + 1].expand(2, -1, -1, -1), ref_scaled), (j.n, j.index)
            j.ref_x_t = j.ref.step(eps[k : k + 1], t, j.ref_x_t, **j.ref_kwargs, return_dict=False)[0]
            j.x_t = x_next[k : k + 1]
            assert same(j.x_t, j.ref_x_t), (j.n, j.index, (j.x_t - j.ref_x_t).abs().max())
            j.index += 1
            if not j.done:  # an inpainting blend's init latents, noised to the next timestep
                image, noise = torch.full((1, 4, 8, 8), 0.3, dtype=j.dtype), j.eps()
                ours = kind.add_noise(j.schedule, image, noise, j.index)
                ref = j.ref.add_noise(image, noise, j.timesteps[j.index : j.index + 1])
                assert same(ours, ref), (j.n, j.index)


def test_kinds_are_picked_by_class_and_config():
    assert [type(step_for(make_scheduler(n, o), {"eta": 0.0})) for n, o, *_, _ in JOBS] == [k for *_, k in JOBS]
    # Options without a vectorized step fall back to the request's own object.
    for name, overrides, kwargs in [
        ("ddim", {}, {"eta": 0.5}),
        ("ddim", {"thresholding": True}, {"eta": 0.0}),
        ("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++"}, {}),
        ("dpmpp_2m", {"solver_order": 3}, {}),
        ("dpmpp_2m", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, {}),
        ("euler", {"prediction_type": "sample"}, {}),
    ]:
        assert step_for(make_scheduler(name, overrides), kwargs) == PerRequestStep(), (name, overrides)
    # Kinds of one configuration are equal: their jobs share a group in a tick.
    assert (
        step_for(make_scheduler("euler", {}), {}) == step_for(make_scheduler("euler", {}), {}) == EulerStep("epsilon")
    )


@pytest.mark.parametrize("stagger", [0, 1, 3])
def test_mixed_batch_equals_each_requests_own_scheduler(stagger):
    """Jobs join ``stagger`` ticks apart (all at once for 0) and leave when done; every row equals its reference."""
    pending = [Job(n, name, o, steps, strength) for n, (name, o, steps, strength, _) in enumerate(JOBS)]
    active: list[Job] = []
    ticks = 0
    while pending or active:
        if pending and (stagger == 0 or ticks % stagger == 0):
            active += pending if stagger == 0 else [pending.pop(0)]
            pending = [] if stagger == 0 else pending
        tick(active)
        active = [j for j in active if not j.done]
        ticks += 1
    assert ticks >= max(len(Job(0, n, o, s, st).timesteps) for n, o, s, st, _ in JOBS)


def test_dpm_second_order_runs_are_the_rows_that_take_one():
    """DPM++ jobs at their first step (first order) between jobs at later steps (second order)."""
    jobs = [Job(n, "dpmpp_2m", {}, 8, None) for n in range(4)]
    tick(jobs[:1])
    tick(jobs[:1] + jobs[2:3])
    tick(jobs)  # orders by row: 2, 1, 2, 1
    assert [j.schedule.orders[j.index - 1] for j in jobs] == [2, 1, 2, 1]
    while not all(j.done for j in jobs):
        tick([j for j in jobs if not j.done])


def test_tables_are_shared_by_alike_requests():
    a, b = Job(0, "dpmpp_2m", {}, 8, None), Job(1, "dpmpp_2m", {}, 8, 0.5)
    c = Job(2, "dpmpp_2m", {}, 9, None)
    assert a.schedule.coefficients is b.schedule.coefficients
    assert c.schedule.coefficients is not a.schedule.coefficients
    assert (a.schedule.start, b.schedule.start) == (0, 4)


def test_half_precision_keeps_diffusers_dtypes():
    """float16 latents and model outputs: each result has diffusers' dtype and agrees to fp16 rounding.

    (The engine would feed a float32 UNet input to a float16 UNet otherwise.)
    """
    jobs = [Job(n, *spec[:4], dtype=torch.float16) for n, spec in enumerate(JOBS) if spec[4] is not PerRequestStep]
    while jobs:
        tick(jobs, same=half_rounding)
        jobs = [j for j in jobs if not j.done]

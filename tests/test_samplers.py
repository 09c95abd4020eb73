"""Every sampler and sigma schedule: the engine's latents equal diffusers' own pipeline with that scheduler,
for the request alone, alone in the engine and in mixed batches (row by row); stochastic samplers draw their
noise from the request alone; two-evaluation samplers (Heun, DPM2, DPM++ SDE) take their extra ticks.

The reference schedulers are built here from diffusers' table of A1111 equivalents (its scheduler overview),
not from ``engine/schedulers.py``: the test checks the mapping as well as the loop. Tiny models, 2-4 steps,
64 pixels: each name runs once through the pipeline and once alone in the engine; the mixed batches reuse
those references.
"""

from __future__ import annotations

import diffusers
import pytest
import torch

from deployments.engine.schedulers import SAMPLERS, SCHEDULER_NAMES, SchedulerFactory, split_name

from engine_helpers import Engine, SDXLEngine

# diffusers' docs, "A1111/k-diffusion -> Diffusers": the class and its init arguments, per sampler ...
_DPMPP = "DPMSolverMultistepScheduler"
DOCUMENTED = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_2m": (_DPMPP, {}),
    "dpmpp_2m_sde": (_DPMPP, {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_heun": (_DPMPP, {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}),
    "dpmpp_3m_sde": (_DPMPP, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),  # + noise_sampler_seed: the request's seed
    "ddim": ("DDIMScheduler", {}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
# ... and per "noise schedule and schedule type".
SCHEDULE_ARGS = {
    None: {},
    "uniform": {"timestep_spacing": "linspace"},  # not in diffusers' table: k-diffusion's get_sigmas, evenly in t
    "karras": {"use_karras_sigmas": True},
    "exponential": {"timestep_spacing": "linspace", "use_exponential_sigmas": True},
    "beta": {"timestep_spacing": "linspace", "use_beta_sigmas": True},
    "sgm_uniform": {"timestep_spacing": "trailing"},
}

NAMES = list(SCHEDULER_NAMES)
STOCHASTIC = [n for n in SAMPLERS if SAMPLERS[n].stochastic]
SECOND_ORDER = [n for n in SAMPLERS if SAMPLERS[n].second_order]
PROMPTS = ["a red boat", "a castle on a hill", "forest in autumn", "dog"]


def case(name: str) -> dict:
    """Each name's own request: steps 2-4, seed, guidance, prompt."""
    i = SCHEDULER_NAMES.index(name)
    return {
        "prompt": PROMPTS[i % len(PROMPTS)],
        "steps": 2 + i % 3,
        "seed": 100 + i,
        "guidance_scale": 6.0 if i % 3 == 0 else 1.0,  # a third with guidance (two rows): the loop's CFG
    }


def reference_scheduler(info, name: str, seed: int):
    """The scheduler diffusers' docs give for ``name``, over the model's config (``default``: the model's own)."""
    sampler, schedule = split_name(name)
    cls_name, args = DOCUMENTED[sampler] if sampler != "default" else (info.scheduler_class, {})
    args = {**args, **SCHEDULE_ARGS[schedule]}
    if sampler == "dpmpp_sde":
        args["noise_sampler_seed"] = seed
    config = {k: v for k, v in info.scheduler_config.items() if not k.startswith("_")}
    return getattr(diffusers, cls_name).from_config({**config, **args})


def latents(engine, requests, jobs_out: list | None = None) -> torch.Tensor:
    """Submit together, tick to completion: each job's final latents ``[n, 4, h, w]``."""
    jobs = engine.steps.submit(requests)
    while not engine.steps.idle:
        engine.steps.tick()
    if jobs_out is not None:
        jobs_out.extend(jobs)
    return torch.cat([j.x_t for j in jobs])


def close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return ours.shape == ref.shape and (ours - ref).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine(tiny, max_rows_per_tick=128)


@pytest.fixture(scope="module")
def references(engine):
    """diffusers' ``StableDiffusionPipeline`` latents per name (computed once, on first use)."""
    cache: dict[str, torch.Tensor] = {}
    pipe = engine.pipeline()

    def get(name: str) -> torch.Tensor:
        if name not in cache:
            c = case(name)
            pipe.scheduler = reference_scheduler(engine.info, name, c["seed"])
            cache[name] = pipe(
                c["prompt"],
                height=64,
                width=64,
                num_inference_steps=c["steps"],
                guidance_scale=c["guidance_scale"],
                generator=torch.Generator().manual_seed(c["seed"]),
                output_type="latent",
            ).images
        return cache[name]

    return get


def request(engine, name: str, **overrides):
    c = {**case(name), **overrides}
    return engine.request(
        c["prompt"], steps=c["steps"], guidance_scale=c["guidance_scale"], seed=c["seed"], scheduler=name
    )


def test_the_reference_table_covers_every_sampler():
    assert set(DOCUMENTED) == set(SAMPLERS)
    assert {split_name(n)[1] for n in NAMES} == set(SCHEDULE_ARGS)
    assert {split_name(n)[0] for n in NAMES} == {"default", *SAMPLERS}


@pytest.mark.parametrize("name", ["dpmpp_2m_karras", "heun", "dpmpp_sde_exponential"])
def test_alone_equals_the_pipeline(engine, references, name):
    ours = latents(engine, [request(engine, name)])
    ref = references(name)
    assert close(ours, ref), (ours - ref).abs().max().item()
    assert ours.std().item() > 0.05  # a real trajectory, not a constant


# Every name, in mixed batches (all of a batch's jobs in every forward: up to 64 rows), each request with its
# own steps, seed, guidance and prompt: each row equals its request's pipeline, whatever the rows beside it.
MIXED = {
    "samplers": [n for n in NAMES if split_name(n)[1] is None],
    "karras": [n for n in NAMES if split_name(n)[1] == "karras"],
    "exponential_beta": [n for n in NAMES if split_name(n)[1] in ("exponential", "beta")],
    "uniform_sgm_uniform": [n for n in NAMES if split_name(n)[1] in ("uniform", "sgm_uniform")],
}


@pytest.mark.parametrize("group", MIXED)
def test_mixed_batch_rows_equal_the_pipeline(engine, references, group):
    names = MIXED[group]
    before, jobs = engine.steps.ticks_run, []
    ours = latents(engine, [request(engine, n) for n in names], jobs)
    assert engine.steps.ticks_run - before == max(len(j.timesteps) for j in jobs)  # all in every forward
    assert len({len(j.timesteps) for j in jobs}) > 1  # step counts differ (second-order samplers' too)
    for k, name in enumerate(names):
        ref = references(name)
        assert close(ours[k : k + 1], ref), (name, (ours[k : k + 1] - ref).abs().max().item())


def test_stochastic_rows_do_not_depend_on_their_batch(engine):
    """Each stochastic request gives bit for bit the same latents alone and beside the others (other seeds,
    samplers and step counts): its noise comes from its own generator (or seeded Brownian tree)."""
    mixed = [
        request(engine, name, seed=7 + k, steps=2 + k % 2, guidance_scale=1.0) for k, name in enumerate(STOCHASTIC)
    ]
    batch = latents(engine, mixed)
    for k, r in enumerate(mixed):
        assert torch.equal(batch[k : k + 1], latents(engine, [r])), STOCHASTIC[k]


def test_dpmpp_sde_noise_is_seeded_by_the_request():
    """Unseeded, DPM++ SDE's Brownian tree takes a random seed from the global RNG: the factory seeds it (over
    the template's ``_use_default_values``, which would reset it to None)."""
    factory = SchedulerFactory("PNDMScheduler", {"beta_schedule": "scaled_linear"})
    factory.create("dpmpp_sde_karras")  # the template
    seeded = factory.create("dpmpp_sde_karras", seed=42)
    assert seeded.noise_sampler_seed == 42 and seeded.config.use_karras_sigmas
    assert factory.create("dpmpp_sde").noise_sampler_seed is None
    assert "noise_sampler_seed" not in factory.create("euler_a", seed=42).config


@pytest.mark.parametrize("name", SECOND_ORDER)
def test_two_evaluation_samplers_take_their_extra_ticks(engine, name):
    """Heun-like samplers step ``2 * steps - 1`` times: the job runs that many ticks beside a one-evaluation job
    of the same steps, which leaves first; pending work, progress and the ETA count evaluations."""
    steps = engine.steps
    ticks_before = steps.ticks_run
    second, first = steps.submit(
        [request(engine, name, steps=3, guidance_scale=1.0), request(engine, "euler", steps=3, guidance_scale=1.0)]
    )
    assert len(second.timesteps) == 5 and len(first.timesteps) == 3
    assert steps.pending_steps() == 5 + 3
    seen = []
    while not steps.idle:
        steps.tick()
        p = steps.progress([second])
        seen.append((p["step"], p["steps"], first.done))
        if not second.done:
            assert p["eta_s"] is not None and p["eta_s"] > 0
    assert steps.ticks_run - ticks_before == 5
    assert [s for s, _, _ in seen] == [0, 1, 1, 2, 3] and {n for _, n, _ in seen} == {3}
    assert [d for _, _, d in seen] == [False, False, True, True, True]
    assert steps.pending_steps() == 0


# SDXL: its added conditions per row beside each sampler's own schedule.
XL_NAMES = ["heun_karras", "dpmpp_sde", "dpm2_a_exponential", "dpmpp_3m_sde_beta", "unipc_sgm_uniform", "lcm"]


def test_sdxl_mixed_batch_rows_equal_the_pipeline(tiny_sdxl):
    engine = SDXLEngine(tiny_sdxl, max_rows_per_tick=64)
    cases = [(n, 2 + k % 3, 50 + k) for k, n in enumerate(XL_NAMES)]
    ours = engine.run_latents(
        [engine.request("a lighthouse", "fog", steps=s, seed=seed, scheduler=n) for n, s, seed in cases]
    )
    pipe = engine.pipeline()
    for k, (name, s, seed) in enumerate(cases):
        pipe.scheduler = reference_scheduler(engine.info, name, seed)
        ref = engine.reference_latents("a lighthouse", "fog", steps=s, seed=seed, pipe=pipe)
        assert close(ours[k : k + 1], ref), (name, (ours[k : k + 1] - ref).abs().max().item())


# img2img with the two-evaluation samplers: diffusers skips ``t_start * scheduler.order`` timesteps and sets the
# scheduler's begin index there (``get_timesteps``); the rows beside each other still equal the pipeline's.
IMG2IMG = [("heun_karras", 4, 0.6, 7.0), ("dpm2_a", 3, 0.5, 1.0), ("dpmpp_2m_sde_exponential", 4, 0.75, 5.0)]


def test_img2img_mixed_batch_rows_equal_the_pipeline(engine):
    from test_img2img_equivalence import img2img_reference, img2img_request, init_image

    kws = [
        dict(scheduler=n, steps=s, strength=st, guidance_scale=g, seed=20 + k)
        for k, (n, s, st, g) in enumerate(IMG2IMG)
    ]
    requests = [img2img_request(engine, init_image(seed=k), "a pencil sketch", **kw) for k, kw in enumerate(kws)]
    jobs: list = []
    ours = latents(engine, requests, jobs)
    # heun: int(4 * 0.6) = 2 steps left of 4, the last 3 of its 7 timesteps; dpm2_a: 1 of 3, the last 1 of 5
    assert [len(j.timesteps) for j in jobs] == [3, 1, 3]
    for k, kw in enumerate(kws):
        ref, _ = img2img_reference(engine, init_image(seed=k), "a pencil sketch", **kw)
        assert close(ours[k : k + 1], ref), (kw["scheduler"], (ours[k : k + 1] - ref).abs().max().item())

"""Per-request noise schedulers (samplers), built from the model's own scheduler config.

Every request gets a fresh scheduler instance: schedulers carry state (step
index, DPM++'s previous model outputs, PNDM's history, Heun's first-order half
step, DPM++ SDE's Brownian tree), so requests running side by side in one batch
must never share one.

A scheduler name is a sampler, optionally followed by a sigma schedule:
``euler``, ``dpmpp_2m_karras``, ``dpmpp_2m_sde_exponential``, ``ddim_sgm_uniform``.
Each is a diffusers scheduler class with a few config values over the model's
own scheduler config, as diffusers' table of A1111 / k-diffusion equivalents
gives them (``docs/source/en/api/schedulers/overview.md``):

=============  ==============================================================
schedule       config
=============  ==============================================================
(none)         the model's config as it is (its ``timestep_spacing``, ...)
``uniform``    ``timestep_spacing="linspace"`` (k-diffusion's and A1111's "Uniform")
``karras``     ``use_karras_sigmas=True``
``exponential`` ``timestep_spacing="linspace"``, ``use_exponential_sigmas=True``
``beta``       ``timestep_spacing="linspace"``, ``use_beta_sigmas=True``
``sgm_uniform`` ``timestep_spacing="trailing"``
=============  ==============================================================

A schedule sets the other sigma options off (a model config with Karras sigmas still
gets exponential ones when asked). A sampler takes the schedules its diffusers class has
options for: the timestep samplers (DDIM, PLMS, LCM) and Euler a only ``uniform`` and ``sgm_uniform``.
``default`` is the model's own scheduler, unchanged. Diffusers' class names are accepted
as aliases of the bare samplers (``canonical_name``).

Stochastic samplers draw their noise from the request: Euler a, DPM2 a, DPM++ 2M/3M SDE
and LCM from the request's own generator (``step(..., generator=)``), DPM++ SDE from a
Brownian tree seeded with the request's seed (``create(name, seed=)``), so an image never
depends on the requests beside it. Heun, DPM2, DPM2 a and DPM++ SDE evaluate the UNet twice
per step but the last (their ``timesteps`` repeat entries): a job has ``len(timesteps)``
ticks, whatever its ``steps``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import diffusers

DEFAULT_SCHEDULER = "default"


@dataclass(frozen=True)
class SamplerSpec:
    """One sampling algorithm: a diffusers scheduler class and the config values that make it this sampler."""

    diffusers_class: str
    overrides: tuple[tuple[str, object], ...] = ()  # (config key, value) over the model's config
    stochastic: bool = False  # draws fresh noise at every step (see the module docstring: whose)
    second_order: bool = False  # two UNet evaluations per step (but the last)


# The samplers, by lorafleet's name (A1111's names are graph/a1111.py's).
_DPMPP = "DPMSolverMultistepScheduler"
SAMPLERS: dict[str, SamplerSpec] = {
    "euler": SamplerSpec("EulerDiscreteScheduler"),
    "euler_a": SamplerSpec("EulerAncestralDiscreteScheduler", stochastic=True),
    "heun": SamplerSpec("HeunDiscreteScheduler", second_order=True),
    "lms": SamplerSpec("LMSDiscreteScheduler"),
    "dpm2": SamplerSpec("KDPM2DiscreteScheduler", second_order=True),
    "dpm2_a": SamplerSpec("KDPM2AncestralDiscreteScheduler", stochastic=True, second_order=True),
    "dpmpp_2m": SamplerSpec(_DPMPP, (("algorithm_type", "dpmsolver++"), ("solver_order", 2))),
    "dpmpp_2m_sde": SamplerSpec(_DPMPP, (("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2)), True),
    "dpmpp_2m_sde_heun": SamplerSpec(
        _DPMPP, (("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2), ("solver_type", "heun")), True
    ),
    "dpmpp_3m_sde": SamplerSpec(_DPMPP, (("algorithm_type", "sde-dpmsolver++"), ("solver_order", 3)), True),
    "dpmpp_sde": SamplerSpec("DPMSolverSDEScheduler", stochastic=True, second_order=True),
    "ddim": SamplerSpec("DDIMScheduler"),
    "plms": SamplerSpec("PNDMScheduler", (("skip_prk_steps", True),)),
    "unipc": SamplerSpec("UniPCMultistepScheduler"),
    "lcm": SamplerSpec("LCMScheduler", stochastic=True),
}

_SIGMA_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")

# The sigma schedules, by name: the config values that make them (the other sigma options are set off).
SCHEDULES: dict[str, dict] = {
    "uniform": {"timestep_spacing": "linspace"},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"timestep_spacing": "linspace", "use_exponential_sigmas": True},
    "beta": {"timestep_spacing": "linspace", "use_beta_sigmas": True},
    "sgm_uniform": {"timestep_spacing": "trailing"},
}


def _takes(class_name: str, config: dict) -> bool:
    """Does the diffusers class have every option of ``config``?"""
    params = inspect.signature(getattr(diffusers, class_name).__init__).parameters
    return all(key in params for key in config)


def schedules_of(sampler: str) -> tuple[str, ...]:
    """The schedules a sampler takes: those its diffusers class has options for.

    >>> schedules_of("dpmpp_2m"), schedules_of("euler_a")
    (('uniform', 'karras', 'exponential', 'beta', 'sgm_uniform'), ('uniform', 'sgm_uniform'))
    """
    cls_name = SAMPLERS[sampler].diffusers_class
    return tuple(name for name, config in SCHEDULES.items() if _takes(cls_name, config))


def scheduler_name(sampler: str, schedule: str | None = None) -> str:
    """The scheduler name of a sampler with a schedule (None: the sampler's own).

    >>> scheduler_name("dpmpp_2m", "karras"), scheduler_name("euler")
    ('dpmpp_2m_karras', 'euler')
    """
    if schedule is None:
        return sampler
    if schedule not in schedules_of(sampler):
        raise ValueError(f"sampler {sampler!r} takes no schedule {schedule!r}; it takes {list(schedules_of(sampler))}")
    return f"{sampler}_{schedule}"


def _table() -> dict[str, tuple[str, dict]]:
    table: dict[str, tuple[str, dict]] = {}
    for sampler, spec in SAMPLERS.items():
        table[sampler] = (spec.diffusers_class, dict(spec.overrides))
        for schedule in schedules_of(sampler):
            off = {o: False for o in _SIGMA_OPTIONS if _takes(spec.diffusers_class, {o: False})}
            config = {**dict(spec.overrides), **off, **SCHEDULES[schedule]}
            table[scheduler_name(sampler, schedule)] = (spec.diffusers_class, config)
    return table


# Public name -> (diffusers class, config overrides): every sampler, alone and with each schedule it takes.
SCHEDULERS: dict[str, tuple[str, dict]] = _table()

SCHEDULER_NAMES = (DEFAULT_SCHEDULER, *SCHEDULERS)

# diffusers' class names, as aliases of the bare samplers (DPMSolverMultistepScheduler: its default, DPM++ 2M).
ALIASES: dict[str, str] = {}
for _name, _spec in SAMPLERS.items():
    ALIASES.setdefault(_spec.diffusers_class, _name)


def split_name(name: str) -> tuple[str, str | None]:
    """``(sampler, schedule)`` of a scheduler name (``"default"``: ``("default", None)``).

    >>> split_name("dpmpp_2m_sde_karras"), split_name("dpmpp_2m_sde")
    (('dpmpp_2m_sde', 'karras'), ('dpmpp_2m_sde', None))
    """
    if name == DEFAULT_SCHEDULER or name in SAMPLERS:
        return name, None
    for schedule in SCHEDULES:
        sampler = name.removesuffix("_" + schedule)
        if sampler != name and sampler in SAMPLERS and schedule in schedules_of(sampler):
            return sampler, schedule
    raise ValueError(f"unknown scheduler {name!r}")


def canonical_name(name: str) -> str:
    """The scheduler name ``name`` stands for: itself, or the sampler a diffusers class name is; else ValueError
    with one line saying what is accepted.

    >>> canonical_name("dpmpp_2m_karras"), canonical_name("EulerAncestralDiscreteScheduler")
    ('dpmpp_2m_karras', 'euler_a')
    """
    if name in SCHEDULER_NAMES:
        return name
    if name in ALIASES:
        return ALIASES[name]
    sampler = next((s for s in sorted(SAMPLERS, key=len, reverse=True) if name.startswith(s + "_")), None)
    if sampler is not None and name[len(sampler) + 1 :] in SCHEDULES:
        raise ValueError(
            f"unknown scheduler {name[:30]!r}: {sampler} takes no {name[len(sampler) + 1 :]} schedule; "
            f"it takes {', '.join(schedules_of(sampler))}"
        )
    raise ValueError(
        f"unknown scheduler {name[:30]!r}; choose default or a sampler ({', '.join(SAMPLERS)}), "
        f"maybe + _{', _'.join(SCHEDULES)}"
    )


class SchedulerFactory:
    """Makes scheduler instances for one model.

    >>> factory = SchedulerFactory("PNDMScheduler", model_scheduler_config)  # doctest: +SKIP
    >>> factory.create("euler")             # EulerDiscreteScheduler with the model's betas
    >>> factory.create("dpmpp_2m_karras")   # DPMSolverMultistepScheduler(use_karras_sigmas=True, ...)
    >>> factory.create("dpmpp_sde", seed=7)  # DPMSolverSDEScheduler(noise_sampler_seed=7)
    >>> factory.create("default")           # the model's own PNDMScheduler
    """

    def __init__(self, model_class: str, model_config: dict):
        self.model_class = model_class
        self.model_config = {k: v for k, v in model_config.items() if not k.startswith("_")}
        self._templates: dict[str, object] = {}

    def create(self, name: str, seed: int | None = None):
        """A fresh scheduler. ``seed``: the request's, for a scheduler that seeds its own noise (DPM++ SDE's
        ``noise_sampler_seed``; otherwise a Brownian tree from the global RNG would make the image random)."""
        if name not in SCHEDULER_NAMES:
            raise ValueError(f"unknown scheduler {name!r}; choose one of {list(SCHEDULER_NAMES)}")
        template = self._templates.get(name)
        if template is None:
            if name == DEFAULT_SCHEDULER:
                cls_name, overrides = self.model_class, {}
            else:
                cls_name, overrides = SCHEDULERS[name]
            cls = getattr(diffusers, cls_name)
            template = cls.from_config({**self.model_config, **overrides})
            self._templates[name] = template
        # from_config on a template's config is cheap and gives clean state.
        if seed is None or "noise_sampler_seed" not in template.config:
            return type(template).from_config(template.config)
        # from_config resets the keys listed in _use_default_values (the template's defaults, the seed among them)
        config = {k: v for k, v in template.config.items() if k != "_use_default_values"}
        return type(template).from_config({**config, "noise_sampler_seed": seed})

    def class_name(self, name: str) -> str:
        return self.model_class if name == DEFAULT_SCHEDULER else SCHEDULERS[name][0]

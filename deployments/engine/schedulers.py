"""Per-request noise schedulers, built from the model's own scheduler config.

Every request gets a fresh scheduler instance: schedulers carry state (step
index, DPM++'s previous model outputs, PNDM's history), so requests running
side by side in one batch must never share one.
"""

from __future__ import annotations

import diffusers

DEFAULT_SCHEDULER = "default"

# Public name -> (diffusers class, config overrides).
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}

SCHEDULER_NAMES = (DEFAULT_SCHEDULER, *SCHEDULERS)


class SchedulerFactory:
    """Makes scheduler instances for one model.

    >>> factory = SchedulerFactory("PNDMScheduler", model_scheduler_config)  # doctest: +SKIP
    >>> factory.create("euler")       # EulerDiscreteScheduler with the model's betas
    >>> factory.create("default")     # the model's own PNDMScheduler
    """

    def __init__(self, model_class: str, model_config: dict):
        self.model_class = model_class
        self.model_config = {k: v for k, v in model_config.items() if not k.startswith("_")}
        self._templates: dict[str, object] = {}

    def create(self, name: str):
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
        return type(template).from_config(template.config)

    def class_name(self, name: str) -> str:
        return self.model_class if name == DEFAULT_SCHEDULER else SCHEDULERS[name][0]

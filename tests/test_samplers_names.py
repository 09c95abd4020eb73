"""Sampler names, as tables: A1111's names, aliases and combined names ("DPM++ 2M Karras"), its ``scheduler`` field
(A1111 >= 1.9), the native API's scheduler names (diffusers' class names as aliases), what each name builds, and
the 422s, each naming its field and listing the choices. Pure functions: no model runs."""

from __future__ import annotations

import diffusers
import pytest
from pydantic import ValidationError

from deployments.engine.schedulers import (
    SAMPLERS,
    SCHEDULER_NAMES,
    SCHEDULES,
    SchedulerFactory,
    canonical_name,
    schedules_of,
    split_name,
)
from graph import a1111
from graph.a1111_info import schedulers as a1111_schedulers
from graph.config import LimitsConfig
from graph.errors import MAX_MESSAGE_CHARS, APIError
from graph.schemas import GenerateRequest

PNDM = a1111.sampler_table("PNDMScheduler")  # builtin:tiny-sd, SD1.5: the model's own is PLMS
EULER = a1111.sampler_table("EulerDiscreteScheduler")  # builtin:tiny-sdxl: the model's own is "Default"
SD15 = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def test_the_a1111_tables_list_every_sampler_in_a1111s_order_the_models_own_last():
    assert [s.name for s in PNDM] == [
        "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "Euler a", "Euler", "LMS",
        "Heun", "DPM2", "DPM2 a", "DDIM", "UniPC", "LCM", "PLMS",
    ]  # fmt: skip
    assert [s.name for s in EULER][-4:] == ["PLMS", "UniPC", "LCM", "Default"]
    assert {s.sampler for s in EULER} == {*SAMPLERS, "default"}
    assert (PNDM[-1].scheduler, EULER[-1].scheduler, EULER[-1].diffusers_class) == (
        "default",
        "default",
        "EulerDiscreteScheduler",
    )


def test_samplers_entries_are_a1111s_shape_with_lorafleets_options():
    by_name = {s.name: s.to_dict() for s in PNDM}
    assert by_name["DPM++ 2M"] == {
        "name": "DPM++ 2M",
        "aliases": ["k_dpmpp_2m", "dpmpp_2m"],
        "options": {
            "scheduler": "karras",  # A1111's "Automatic" for it
            "lorafleet_scheduler": "dpmpp_2m_karras",
            "diffusers_class": "DPMSolverMultistepScheduler",
            "schedulers": "automatic,uniform,karras,exponential,beta,sgm_uniform",
        },
    }
    assert by_name["Heun"]["options"]["second_order"] == "True"
    assert by_name["DPM++ SDE"]["options"]["brownian_noise"] == "True"
    assert by_name["Euler a"]["options"]["schedulers"] == "automatic,uniform,sgm_uniform"
    assert by_name["PLMS"]["aliases"] == ["plms", "pndm", "default"]
    for entry in by_name.values():  # A1111's options are str -> str
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in entry["options"].items())
        assert entry["options"]["lorafleet_scheduler"] in SCHEDULER_NAMES


@pytest.mark.parametrize(
    "table, sampler_name, scheduler, native, label",
    [
        (PNDM, "Euler", None, "euler", "Automatic"),
        (PNDM, "euler", "", "euler", "Automatic"),
        (PNDM, " k_euler ", "Automatic", "euler", "Automatic"),
        (PNDM, "EULER A", None, "euler_a", "Automatic"),
        (PNDM, "k_euler_ancestral", "SGM Uniform", "euler_a_sgm_uniform", "SGM Uniform"),
        # A1111 >= 1.9: "Automatic" is the sampler's own schedule (options["scheduler"])
        (PNDM, "DPM++ 2M", None, "dpmpp_2m_karras", "Karras"),
        (PNDM, "DPM++ 2M", "automatic", "dpmpp_2m_karras", "Karras"),
        (PNDM, "DPM++ 2M", "Uniform", "dpmpp_2m_uniform", "Uniform"),
        (PNDM, "DPM++ 2M", "exponential", "dpmpp_2m_exponential", "Exponential"),
        (PNDM, "DPM++ SDE", None, "dpmpp_sde_karras", "Karras"),
        (PNDM, "DPM++ 2M SDE", None, "dpmpp_2m_sde_exponential", "Exponential"),
        (PNDM, "DPM++ 2M SDE Heun", "Beta", "dpmpp_2m_sde_heun_beta", "Beta"),
        (PNDM, "DPM++ 3M SDE", None, "dpmpp_3m_sde_exponential", "Exponential"),
        (PNDM, "DPM2", None, "dpm2_karras", "Karras"),
        (PNDM, "DPM2 a", "SGMUniform", "dpm2_a_sgm_uniform", "SGM Uniform"),
        (PNDM, "LMS", "Karras", "lms_karras", "Karras"),
        (PNDM, "Heun", "sgm_uniform", "heun_sgm_uniform", "SGM Uniform"),
        (PNDM, "DDIM", None, "ddim", "Automatic"),
        (PNDM, "UniPC", "Exponential", "unipc_exponential", "Exponential"),
        (PNDM, "LCM", None, "lcm", "Automatic"),
        # the model's own scheduler: PLMS on an SD1.5 model (Automatic: as the model configures it)
        (PNDM, "PLMS", None, "default", "Automatic"),
        (PNDM, "default", None, "default", "Automatic"),
        (PNDM, "PLMS", "SGM Uniform", "plms_sgm_uniform", "SGM Uniform"),
        (EULER, "PLMS", None, "plms", "Automatic"),
        (EULER, "Default", None, "default", "Automatic"),
        # combined names (before A1111 1.9): the schedule in the name wins over the field
        (PNDM, "DPM++ 2M Karras", None, "dpmpp_2m_karras", "Karras"),
        (PNDM, "dpm++ 2m karras", "Exponential", "dpmpp_2m_karras", "Karras"),
        (PNDM, "DPM++ 2M SDE Karras", None, "dpmpp_2m_sde_karras", "Karras"),
        (PNDM, "DPM++ 2M SDE Heun Exponential", None, "dpmpp_2m_sde_heun_exponential", "Exponential"),
        (PNDM, "DPM++ SDE Karras", None, "dpmpp_sde_karras", "Karras"),
        (PNDM, "LMS Karras", None, "lms_karras", "Karras"),
        (PNDM, "DPM2 a Karras", None, "dpm2_a_karras", "Karras"),
        (PNDM, "Euler SGM Uniform", None, "euler_sgm_uniform", "SGM Uniform"),
        (PNDM, "Euler Uniform", "Karras", "euler_uniform", "Uniform"),
    ],
)
def test_a1111_names_and_schedules(table, sampler_name, scheduler, native, label):
    sampler = a1111.resolve_sampler(sampler_name, table, scheduler=scheduler)
    assert (sampler.scheduler, sampler.schedule_label) == (native, label)


@pytest.mark.parametrize(
    "sampler_name, scheduler, field, text, choices",
    [
        ("DPM fast", None, "sampler_name", "unknown sampler 'DPM fast'", "'DPM++ 2M', 'DPM++ SDE'"),
        ("DPM++ 2S a Karras", None, "sampler_name", "unknown sampler 'DPM++ 2S a Karras'", "'LCM', 'PLMS']"),
        ("", None, "sampler_name", "unknown sampler ''", "'Euler a', 'Euler'"),
        ("Euler", "Polyexponential", "scheduler", "unknown scheduler 'Polyexponential'", "'Beta', 'SGM Uniform']"),
        ("Euler", "Align Your Steps", "scheduler", "unknown scheduler", "['Automatic', 'Uniform', 'Karras'"),
        ("Euler a", "Karras", "scheduler", "sampler 'Euler a' takes no 'Karras' schedule", "['Automatic', 'Uniform'"),
        ("DDIM", "Exponential", "scheduler", "'DDIM' takes no 'Exponential'", "'Uniform', 'SGM Uniform']"),
        ("LCM Karras", None, "sampler_name", "sampler 'LCM' takes no 'Karras' schedule", "['Automatic', 'Uniform'"),
        ("Euler a Karras", "Uniform", "sampler_name", "'Euler a' takes no 'Karras'", "'SGM Uniform']"),
    ],
)
def test_unknown_or_unoffered_names_are_a_422_naming_the_field_and_the_choices(
    sampler_name, scheduler, field, text, choices
):
    with pytest.raises(APIError) as e:
        a1111.resolve_sampler(sampler_name, PNDM, scheduler=scheduler)
    assert (e.value.status, e.value.code, e.value.field) == (422, "invalid_value", field)
    assert e.value.message.startswith(field + ": ") and text in e.value.message and choices in e.value.message
    assert "\n" not in e.value.message and len(e.value.message) <= MAX_MESSAGE_CHARS


def test_a1111_schedules_are_those_schedulers_lists():
    """The ``scheduler`` field takes what ``GET /sdapi/v1/schedulers`` lists: "automatic" and each engine
    schedule, by name, label or alias."""
    listed = a1111_schedulers()
    assert [s["name"] for s in listed] == ["automatic", *SCHEDULES]
    for s in listed:
        for spelling in (s["name"], s["label"], *s["aliases"], s["label"].upper()):
            sampler = a1111.resolve_sampler("DPM++ 2M", PNDM, scheduler=spelling)
            assert sampler.schedule == s["name"]


def test_every_listed_sampler_and_schedule_builds_its_diffusers_scheduler():
    """Each A1111 entry with each schedule it lists: a native name the factory builds, of the entry's class,
    with the schedule's option on."""
    factory = SchedulerFactory("PNDMScheduler", SD15)
    for entry in PNDM:
        for schedule in entry.to_dict()["options"]["schedulers"].split(","):
            name = a1111.resolve_sampler(entry.name, PNDM, scheduler=schedule).scheduler
            scheduler = factory.create(name)
            assert type(scheduler).__name__ == entry.diffusers_class, (entry.name, schedule)
            config = scheduler.config
            if schedule == "karras":
                assert config.use_karras_sigmas and not config.use_exponential_sigmas
            elif schedule in ("exponential", "beta"):
                assert config[f"use_{schedule}_sigmas"] and config.timestep_spacing == "linspace"
            elif schedule in ("uniform", "sgm_uniform"):
                assert config.timestep_spacing == {"uniform": "linspace", "sgm_uniform": "trailing"}[schedule]


@pytest.mark.parametrize(
    "name, cls, config",
    [
        ("euler", "EulerDiscreteScheduler", {"use_karras_sigmas": False, "timestep_spacing": "leading"}),
        ("heun_karras", "HeunDiscreteScheduler", {"use_karras_sigmas": True}),
        ("dpm2_a_beta", "KDPM2AncestralDiscreteScheduler", {"use_beta_sigmas": True, "timestep_spacing": "linspace"}),
        ("dpmpp_2m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        ("dpmpp_2m_sde_karras", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
        ("dpmpp_2m_sde_heun", "DPMSolverMultistepScheduler", {"solver_type": "heun"}),
        ("dpmpp_3m_sde_exponential", "DPMSolverMultistepScheduler", {"solver_order": 3}),
        ("dpmpp_sde_sgm_uniform", "DPMSolverSDEScheduler", {"timestep_spacing": "trailing"}),
        ("lms_uniform", "LMSDiscreteScheduler", {"timestep_spacing": "linspace"}),
        ("plms", "PNDMScheduler", {"skip_prk_steps": True}),
        ("ddim_sgm_uniform", "DDIMScheduler", {"timestep_spacing": "trailing"}),
        ("unipc_karras", "UniPCMultistepScheduler", {"use_karras_sigmas": True}),
        ("lcm", "LCMScheduler", {}),
        ("default", "PNDMScheduler", {"skip_prk_steps": True}),
    ],
)
def test_native_names_build_diffusers_schedulers(name, cls, config):
    scheduler = SchedulerFactory("PNDMScheduler", {**SD15, "skip_prk_steps": True}).create(name)
    assert type(scheduler) is getattr(diffusers, cls)
    assert {k: scheduler.config[k] for k in config} == config


def test_a_schedule_turns_the_models_other_sigma_options_off():
    """A model configured with Karras sigmas still gets exponential ones when asked (diffusers refuses two)."""
    factory = SchedulerFactory("EulerDiscreteScheduler", {**SD15, "use_karras_sigmas": True})
    assert factory.create("euler").config.use_karras_sigmas  # the bare sampler: the model's config as it is
    config = factory.create("euler_exponential").config
    assert (config.use_karras_sigmas, config.use_exponential_sigmas) == (False, True)


@pytest.mark.parametrize(
    "given, name",
    [
        ("default", "default"),
        ("dpmpp_2m_karras", "dpmpp_2m_karras"),
        ("dpmpp_2m_sde_heun_sgm_uniform", "dpmpp_2m_sde_heun_sgm_uniform"),
        ("euler_a_uniform", "euler_a_uniform"),
        ("EulerAncestralDiscreteScheduler", "euler_a"),
        ("KDPM2AncestralDiscreteScheduler", "dpm2_a"),
        ("DPMSolverMultistepScheduler", "dpmpp_2m"),
        ("DPMSolverSDEScheduler", "dpmpp_sde"),
        ("PNDMScheduler", "plms"),
        ("LCMScheduler", "lcm"),
    ],
)
def test_native_names_and_diffusers_class_aliases(given, name):
    assert canonical_name(given) == name
    assert GenerateRequest(prompt="a", scheduler=given).scheduler == name


@pytest.mark.parametrize(
    "given, text",
    [
        ("nope", "unknown scheduler 'nope'; choose default or a sampler (euler, euler_a, heun,"),
        ("euler_a_karras", "euler_a takes no karras schedule; it takes uniform, sgm_uniform"),
        ("lcm_exponential", "lcm takes no exponential schedule"),
        ("DPM++ 2M Karras", "unknown scheduler 'DPM++ 2M Karras'"),  # A1111's names: the A1111 API's
        ("Euler" * 100, "unknown scheduler 'EulerEuler"),
    ],
)
def test_unknown_native_names_are_a_one_line_error_listing_the_choices(given, text):
    with pytest.raises(ValidationError) as e:
        GenerateRequest(prompt="a", scheduler=given)
    (error,) = e.value.errors()
    assert error["loc"] == ("scheduler",) and text in error["msg"]
    assert len("scheduler: " + error["msg"]) <= MAX_MESSAGE_CHARS  # errors.one_line would cut it otherwise


def test_every_native_name_splits_into_a_sampler_and_a_schedule_it_takes():
    assert len(SCHEDULER_NAMES) == len(set(SCHEDULER_NAMES)) == 1 + sum(1 + len(schedules_of(s)) for s in SAMPLERS)
    for name in SCHEDULER_NAMES:
        sampler, schedule = split_name(name)
        assert schedule is None or schedule in schedules_of(sampler)
        assert canonical_name(name) == name


def test_txt2img_carries_the_schedule_into_the_native_request_and_the_infotext():
    req = a1111.Txt2ImgRequest(prompt="a boat", sampler_name="DPM++ 2M", scheduler="Karras", steps=4)
    call = a1111.txt2img_call(req, LimitsConfig(), PNDM)
    assert (call.request.scheduler, call.sampler.name, call.sampler.schedule_label) == (
        "dpmpp_2m_karras",
        "DPM++ 2M",
        "Karras",
    )
    assert call.ignored == []  # the scheduler field is implemented, not ignored
    legacy = a1111.txt2img_call(
        a1111.Txt2ImgRequest(prompt="a", sampler_index="Heun", scheduler="beta"), LimitsConfig(), PNDM
    )
    assert legacy.request.scheduler == "heun_beta"
    with pytest.raises(ValidationError) as e:  # typed strictly, as lorafleet's other implemented fields
        a1111.Txt2ImgRequest(prompt="a", scheduler=7)
    assert e.value.errors()[0]["loc"] == ("scheduler",)

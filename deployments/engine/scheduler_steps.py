"""Scheduler steps for all rows of a tick at once, with no host syncs.

diffusers' schedulers step one request at a time and read the device on the way
(``index_for_timestep`` is a ``nonzero`` and an ``item``, DDIM compares a timestep
tensor with 0, and each step's coefficients are 0-d tensors on the host). Here a
``SchedulerStep`` per scheduler kind does the same arithmetic for every job of a
tick in one set of tensor ops:

- at admission (``prepare``), each job gets a ``JobSchedule``: a table of per-step
  coefficients (``[schedule steps, columns]`` on the device) computed from the
  request's own diffusers scheduler (its timesteps, sigmas, Karras options...), by
  diffusers' own expressions on the same 0-d float32 tensors, so every value is
  bit for bit the one diffusers' ``step`` would use;
- each tick, ``scale_model_input`` and ``step`` gather each job's row of its table
  by the job's step index (a Python int: a view, no transfer) and apply diffusers'
  update, in diffusers' names and operation order, to all of the kind's jobs.

So a row gives exactly what its own diffusers scheduler gives, in float32 on the
CPU bitwise, whatever the rows beside it. Euler a draws its noise from each
request's own CPU generator, as diffusers does, so an image never depends on its
batch. In half precision the results have diffusers' dtypes and agree to
rounding: diffusers multiplies half tensors by 0-d float32 host tensors (kept in
float32 inside each operation, rounded to half after each; on CUDA a division by
one is a multiplication by its reciprocal), where these coefficients are float32
rows and intermediate results stay float32 until diffusers' casts.

Kinds: ``DDIMStep`` (η = 0), ``EulerStep``, ``EulerAncestralStep`` and
``DPMSolverMultistepStep`` (DPM++ 2M: ``dpmsolver++``, order ≤ 2). Every other
scheduler or option (PNDM, the embedded model's default; thresholding; SDE
variants...) goes through ``PerRequestStep``, which calls the request's diffusers
object as the pipeline does, syncs included. ``step_for`` picks the kind.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import diffusers
import torch


@dataclass(eq=False)
class JobSchedule:
    """One job's side of its scheduler kind: where its steps sit in the kind's coefficient table, its own
    diffusers scheduler and generator, and (DPM++) its previous model output."""

    kind: SchedulerStep
    scheduler: object  # the request's diffusers scheduler: the reference; stepped only by PerRequestStep
    timesteps: torch.Tensor  # [num_ticks] on the device: the job's own (img2img: the last ones)
    generator: torch.Generator
    step_kwargs: dict  # prepare_extra_step_kwargs: eta, generator (PerRequestStep passes them to step)
    coefficients: torch.Tensor | None = None  # [schedule steps, kind's columns] float32 on the device
    start: int = 0  # the table row of the job's first step (diffusers' begin_index or first step_index)
    orders: tuple[int, ...] = ()  # DPM++: the solver order of each of the job's steps
    model_output: torch.Tensor | None = None  # DPM++: the previous step's data prediction x0 [1, c, h, w]

    def coefficients_at(self, index: int) -> torch.Tensor:
        """The coefficients of the job's step ``index`` (``[columns]``, a view: no copy, no sync)."""
        return self.coefficients[self.start + index]


class SchedulerStep(Protocol):
    """One scheduler kind, stepping many jobs at once. Jobs of one tick are grouped by kind (equal kinds)."""

    def prepare(self, scheduler, timesteps: torch.Tensor, generator: torch.Generator, step_kwargs: dict) -> JobSchedule:
        """At admission (host syncs allowed): the job's schedule, after ``set_timesteps`` / ``get_timesteps``."""

    def scale_model_input(self, jobs: Sequence[JobSchedule], indices: Sequence[int], x_t: torch.Tensor) -> torch.Tensor:
        """``scheduler.scale_model_input`` for each job's latents ``x_t`` ``[jobs, c, h, w]`` at step ``indices``."""

    def step(
        self, jobs: Sequence[JobSchedule], indices: Sequence[int], eps: torch.Tensor, x_t: torch.Tensor
    ) -> torch.Tensor:
        """``scheduler.step(eps, t, x_t).prev_sample`` for each job (``[jobs, c, h, w]``), its state advanced."""

    def add_noise(self, job: JobSchedule, original: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
        """``scheduler.add_noise(original, noise, timesteps[index:index+1])`` after the job's step ``index - 1``."""


def _column(rows: torch.Tensor, i: int) -> torch.Tensor:
    return rows[:, i].view(-1, 1, 1, 1)  # [jobs, 1, 1, 1]: broadcasts over each job's latents


def _gather(jobs: Sequence[JobSchedule], indices: Sequence[int], columns: int) -> tuple[torch.Tensor, ...]:
    """Each job's coefficients at its step, one ``[jobs, 1, 1, 1]`` tensor per column."""
    rows = torch.stack([j.coefficients_at(i) for j, i in zip(jobs, indices, strict=True)])  # [jobs, columns]
    return tuple(_column(rows, c) for c in range(columns))


class _Tables:
    """Coefficient tables by (kind, scheduler config, steps, device): requests alike share one, computed once."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._tables: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, kind, scheduler, device: torch.device, build: Callable[[], list[list[torch.Tensor]]]):
        config = json.dumps(dict(scheduler.config), sort_keys=True, default=str)
        key = (kind, config, scheduler.num_inference_steps, len(scheduler.timesteps), str(device))
        with self._lock:
            table = self._tables.get(key)
            if table is not None:
                self._tables.move_to_end(key)
                return table
        rows = build()  # per step: 0-d tensors, diffusers' expressions on diffusers' values
        table = torch.stack([torch.stack([c.to(torch.float32) for c in row]) for row in rows]).to(device)
        with self._lock:
            self._tables[key] = table
            while len(self._tables) > self.capacity:
                self._tables.popitem(last=False)
        return table


_TABLES = _Tables()


def _first_step_index(scheduler, timesteps: torch.Tensor) -> int:
    """diffusers' ``_init_step_index``: ``begin_index`` (img2img) or the first timestep's index."""
    if scheduler.begin_index is not None:
        return scheduler.begin_index
    return scheduler.index_for_timestep(timesteps[0].to(scheduler.timesteps.device))


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto the device without waiting for it (pinned, non-blocking on CUDA)."""
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# -- DDIM ---------------------------------------------------------------------


@dataclass(frozen=True)
class DDIMStep:
    """``DDIMScheduler.step`` with ``eta = 0`` (the pipelines' default), ``use_clipped_model_output=False``."""

    prediction_type: str
    clip_sample_range: float | None  # config.clip_sample: clamp the x0 prediction to [-range, range]

    # Table columns, per position in the scheduler's timesteps:
    # alpha_prod_t ** 0.5, beta_prod_t ** 0.5, alpha_prod_t_prev ** 0.5, (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5,
    # alpha_prod_t (add_noise, which takes its square roots in the sample's dtype)
    COLUMNS = 5

    @classmethod
    def supports(cls, scheduler, step_kwargs: dict) -> bool:
        c = scheduler.config
        return (
            c.prediction_type in ("epsilon", "sample", "v_prediction")
            and not c.thresholding
            and step_kwargs.get("eta", 0.0) == 0.0
        )

    @classmethod
    def of(cls, scheduler) -> DDIMStep:
        c = scheduler.config
        return cls(c.prediction_type, c.clip_sample_range if c.clip_sample else None)

    def prepare(self, scheduler, timesteps, generator, step_kwargs) -> JobSchedule:
        def build():
            rows, eta = [], 0.0
            ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
            for timestep in scheduler.timesteps.tolist():
                prev_timestep = timestep - ratio
                alpha_prod_t = scheduler.alphas_cumprod[timestep]
                alpha_prod_t_prev = (
                    scheduler.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else scheduler.final_alpha_cumprod
                )
                beta_prod_t = 1 - alpha_prod_t
                beta_prod_t_prev = 1 - alpha_prod_t_prev
                variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
                std_dev_t = eta * variance ** (0.5)
                rows.append(
                    [
                        alpha_prod_t ** (0.5),
                        beta_prod_t ** (0.5),
                        alpha_prod_t_prev ** (0.5),
                        (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5),
                        alpha_prod_t,
                    ]
                )
            return rows

        table = _TABLES.get(self, scheduler, timesteps.device, build)
        start = len(scheduler.timesteps) - len(timesteps)  # get_timesteps keeps the last ones
        return JobSchedule(self, scheduler, timesteps, generator, step_kwargs, table, start)

    def scale_model_input(self, jobs, indices, x_t):
        return x_t

    def step(self, jobs, indices, eps, x_t):
        sqrt_alpha_prod_t, sqrt_beta_prod_t, sqrt_alpha_prod_t_prev, direction, _ = _gather(jobs, indices, self.COLUMNS)
        model_output, sample = eps, x_t
        if self.prediction_type == "epsilon":
            pred_original_sample = (sample - sqrt_beta_prod_t * model_output) / sqrt_alpha_prod_t
            pred_epsilon = model_output
        elif self.prediction_type == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - sqrt_alpha_prod_t * pred_original_sample) / sqrt_beta_prod_t
        else:  # v_prediction
            pred_original_sample = sqrt_alpha_prod_t * sample - sqrt_beta_prod_t * model_output
            pred_epsilon = sqrt_alpha_prod_t * model_output + sqrt_beta_prod_t * sample
        if self.clip_sample_range is not None:
            pred_original_sample = pred_original_sample.clamp(-self.clip_sample_range, self.clip_sample_range)
        pred_sample_direction = direction * pred_epsilon
        prev_sample = sqrt_alpha_prod_t_prev * pred_original_sample + pred_sample_direction
        return prev_sample.to(x_t.dtype)

    def add_noise(self, job, original, noise, index):
        alpha_prod = job.coefficients_at(index)[4].to(original.dtype)  # alphas_cumprod.to(dtype)[timesteps]
        sqrt_alpha_prod = alpha_prod**0.5
        sqrt_one_minus_alpha_prod = (1 - alpha_prod) ** 0.5
        return sqrt_alpha_prod * original + sqrt_one_minus_alpha_prod * noise


# -- Euler and Euler a ------------------------------------------------------------


def _sigma_schedule(scheduler, timesteps, generator, step_kwargs, kind, build) -> JobSchedule:
    table = _TABLES.get(kind, scheduler, timesteps.device, build)
    start = _first_step_index(scheduler, timesteps)
    if start + len(timesteps) >= len(scheduler.sigmas):  # diffusers would index past its sigmas: let it fail alike
        return PerRequestStep().prepare(scheduler, timesteps, generator, step_kwargs)
    return JobSchedule(kind, scheduler, timesteps, generator, step_kwargs, table, start)


@dataclass(frozen=True)
class EulerStep:
    """``EulerDiscreteScheduler.step`` without churn (``s_churn = 0``, the pipelines' call)."""

    prediction_type: str

    # Table columns, per step index: (sigma**2 + 1) ** 0.5 (scale_model_input), sigma_hat, dt = sigma_next - sigma_hat,
    # -sigma / (sigma**2 + 1) ** 0.5 and sigma**2 + 1 (v_prediction), sigma (add_noise)
    COLUMNS = 6

    @classmethod
    def supports(cls, scheduler, step_kwargs: dict) -> bool:
        return scheduler.config.prediction_type in ("epsilon", "v_prediction")

    @classmethod
    def of(cls, scheduler) -> EulerStep:
        return cls(scheduler.config.prediction_type)

    def prepare(self, scheduler, timesteps, generator, step_kwargs) -> JobSchedule:
        def build():
            sigmas, rows = scheduler.sigmas, []
            for i in range(len(sigmas) - 1):
                sigma = sigmas[i]
                gamma = 0.0  # min(s_churn / ..., 2**0.5 - 1) with s_churn = 0
                sigma_hat = sigma * (gamma + 1)
                rows.append(
                    [
                        (sigma**2 + 1) ** 0.5,
                        sigma_hat,
                        sigmas[i + 1] - sigma_hat,
                        -sigma / (sigma**2 + 1) ** 0.5,
                        sigma**2 + 1,
                        sigma,
                    ]
                )
            rows.append([sigmas[-1]] * 6)  # add_noise's sigma after the last step (the rest unused)
            return rows

        return _sigma_schedule(scheduler, timesteps, generator, step_kwargs, self, build)

    def scale_model_input(self, jobs, indices, x_t):
        scale, *_ = _gather(jobs, indices, self.COLUMNS)
        return (x_t / scale).to(x_t.dtype)

    def step(self, jobs, indices, eps, x_t):
        _, sigma_hat, dt, c_out, c_skip, sigma = _gather(jobs, indices, self.COLUMNS)
        model_output = eps
        sample = x_t.to(torch.float32)  # diffusers upcasts to avoid precision issues
        if self.prediction_type == "epsilon":
            pred_original_sample = sample - sigma_hat * model_output
        else:  # v_prediction
            pred_original_sample = model_output * c_out + (sample / c_skip)
        derivative = (sample - pred_original_sample) / sigma_hat
        prev_sample = sample + derivative * dt
        return prev_sample.to(model_output.dtype)

    def add_noise(self, job, original, noise, index):
        sigma = job.coefficients_at(index)[5].to(original.dtype)
        return original + noise * sigma


@dataclass(frozen=True)
class EulerAncestralStep:
    """``EulerAncestralDiscreteScheduler.step``: each job's noise from its own generator, as diffusers draws it."""

    prediction_type: str

    # Table columns, per step index: (sigma**2 + 1) ** 0.5, sigma, sigma_up, dt = sigma_down - sigma,
    # -sigma / (sigma**2 + 1) ** 0.5 and sigma**2 + 1 (v_prediction)
    COLUMNS = 6

    @classmethod
    def supports(cls, scheduler, step_kwargs: dict) -> bool:
        return scheduler.config.prediction_type in ("epsilon", "v_prediction")

    @classmethod
    def of(cls, scheduler) -> EulerAncestralStep:
        return cls(scheduler.config.prediction_type)

    def prepare(self, scheduler, timesteps, generator, step_kwargs) -> JobSchedule:
        def build():
            sigmas, rows = scheduler.sigmas, []
            for i in range(len(sigmas) - 1):
                sigma = sigmas[i]
                sigma_from, sigma_to = sigmas[i], sigmas[i + 1]
                sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
                sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
                rows.append(
                    [
                        (sigma**2 + 1) ** 0.5,
                        sigma,
                        sigma_up,
                        sigma_down - sigma,
                        -sigma / (sigma**2 + 1) ** 0.5,
                        sigma**2 + 1,
                    ]
                )
            rows.append([sigmas[-1]] * 6)  # add_noise's sigma after the last step (the rest unused)
            return rows

        return _sigma_schedule(scheduler, timesteps, generator, step_kwargs, self, build)

    def scale_model_input(self, jobs, indices, x_t):
        scale, *_ = _gather(jobs, indices, self.COLUMNS)
        return (x_t / scale).to(x_t.dtype)

    def step(self, jobs, indices, eps, x_t):
        _, sigma, sigma_up, dt, c_out, c_skip = _gather(jobs, indices, self.COLUMNS)
        model_output = eps
        sample = x_t.to(torch.float32)
        if self.prediction_type == "epsilon":
            pred_original_sample = sample - sigma * model_output
        else:  # v_prediction
            pred_original_sample = model_output * c_out + (sample / c_skip)
        derivative = (sample - pred_original_sample) / sigma
        prev_sample = sample + derivative * dt
        # randn_tensor(model_output.shape, generator=generator): drawn on the host from each request's generator.
        shape, dtype = (1, *model_output.shape[1:]), model_output.dtype
        noise = torch.cat([torch.randn(shape, generator=j.generator, dtype=dtype) for j in jobs])
        noise = _to_device(noise, model_output.device)  # [jobs, c, h, w]
        prev_sample = prev_sample + noise * sigma_up
        return prev_sample.to(model_output.dtype)

    def add_noise(self, job, original, noise, index):
        sigma = job.coefficients_at(index)[1].to(original.dtype)
        return original + noise * sigma


# -- DPM++ 2M -------------------------------------------------------------------


@dataclass(frozen=True)
class DPMSolverMultistepStep:
    """``DPMSolverMultistepScheduler.step`` for ``algorithm_type="dpmsolver++"``, ``solver_order`` 1 or 2.

    First-order steps (a job's first, and the final ones by ``lower_order_final`` / ``euler_at_final`` /
    ``final_sigmas_type="zero"``) are ``dpm_solver_first_order_update``; the others
    ``multistep_dpm_solver_second_order_update`` with the job's previous data prediction.
    """

    prediction_type: str
    solver_type: str  # midpoint | heun

    # Table columns, per step index (s0 = this step's sigma, t = the next one's, s1 = the previous one's):
    # alpha_s0, sigma_s0 (convert_model_output, add_noise), sigma_t / sigma_s0, alpha_t * (exp(-h) - 1.0),
    # 1.0 / r0 and the D1 coefficient (second order: midpoint 0.5 * alpha_t * (exp(-h) - 1.0), heun
    # alpha_t * ((exp(-h) - 1.0) / h + 1.0))
    COLUMNS = 6

    @classmethod
    def supports(cls, scheduler, step_kwargs: dict) -> bool:
        c = scheduler.config
        return (
            c.algorithm_type == "dpmsolver++"
            and c.solver_order in (1, 2)
            and c.solver_type in ("midpoint", "heun")
            and c.prediction_type in ("epsilon", "sample", "v_prediction")
            and not c.thresholding
            and c.variance_type is None
            and not c.use_flow_sigmas
        )

    @classmethod
    def of(cls, scheduler) -> DPMSolverMultistepStep:
        return cls(scheduler.config.prediction_type, scheduler.config.solver_type)

    def _orders(self, scheduler, start: int, steps: int) -> tuple[int, ...]:
        """``step``'s choice of update for each of the job's steps (``lower_order_nums`` starts at 0 per job)."""
        c, n, orders = scheduler.config, len(scheduler.timesteps), []
        for k in range(steps):
            step_index = start + k
            lower_order_final = (step_index == n - 1) and (
                c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero"
            )
            orders.append(1 if c.solver_order == 1 or k < 1 or lower_order_final else 2)
        return tuple(orders)

    def prepare(self, scheduler, timesteps, generator, step_kwargs) -> JobSchedule:
        def alpha_sigma_t(sigma):  # _sigma_to_alpha_sigma_t (use_flow_sigmas=False)
            alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
            return alpha_t, sigma * alpha_t

        def build():
            sigmas, rows = scheduler.sigmas, []
            for i in range(len(sigmas) - 1):
                alpha_t, sigma_t = alpha_sigma_t(sigmas[i + 1])
                alpha_s0, sigma_s0 = alpha_sigma_t(sigmas[i])
                lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
                lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
                h = lambda_t - lambda_s0
                row = [alpha_s0, sigma_s0, sigma_t / sigma_s0, alpha_t * (torch.exp(-h) - 1.0)]
                if i == 0:  # no previous step: never a second-order update
                    row += [torch.tensor(0.0), torch.tensor(0.0)]
                else:
                    alpha_s1, sigma_s1 = alpha_sigma_t(sigmas[i - 1])
                    lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
                    h_0 = lambda_s0 - lambda_s1
                    r0 = h_0 / h
                    if self.solver_type == "midpoint":
                        d1 = 0.5 * (alpha_t * (torch.exp(-h) - 1.0))
                    else:
                        d1 = alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)
                    row += [1.0 / r0, d1]
                rows.append(row)
            alpha_t, sigma_t = alpha_sigma_t(sigmas[-1])
            rows.append([alpha_t, sigma_t, *[torch.tensor(0.0)] * 4])  # add_noise after the last step
            return rows

        table = _TABLES.get(self, scheduler, timesteps.device, build)
        start = _first_step_index(scheduler, timesteps)
        if start + len(timesteps) >= len(scheduler.sigmas):
            return PerRequestStep().prepare(scheduler, timesteps, generator, step_kwargs)
        orders = self._orders(scheduler, start, len(timesteps))
        return JobSchedule(self, scheduler, timesteps, generator, step_kwargs, table, start, orders)

    def scale_model_input(self, jobs, indices, x_t):
        return x_t

    def convert_model_output(self, alpha_t, sigma_t, model_output, sample):
        """The data prediction x0 (``convert_model_output`` for dpmsolver++)."""
        if self.prediction_type == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        if self.prediction_type == "sample":
            return model_output
        return alpha_t * sample - sigma_t * model_output  # v_prediction

    def step(self, jobs, indices, eps, x_t):
        alpha_s0, sigma_s0, sigma_ratio, c_d0, inv_r0, c_d1 = _gather(jobs, indices, self.COLUMNS)
        model_output = self.convert_model_output(alpha_s0, sigma_s0, eps, x_t).to(eps.dtype)  # [jobs, c, h, w]
        sample = x_t.to(torch.float32)
        # dpm_solver_first_order_update (x_t = (sigma_t / sigma_s0) * sample - (alpha_t * (exp(-h) - 1.0)) * D0)
        first_order = sigma_ratio * sample - c_d0 * model_output
        prev_sample = first_order
        second = [k for k, (j, i) in enumerate(zip(jobs, indices, strict=True)) if j.orders[i] == 2]
        if second:
            # multistep_dpm_solver_second_order_update on the rows whose jobs take one, in contiguous runs
            # (the host knows which: no mask on the device). Its first two terms are first_order's.
            prev_sample = list(first_order.split(1))
            for a, b in _runs(second):
                m0, m1 = model_output[a:b], torch.cat([jobs[k].model_output for k in range(a, b)])
                D1 = inv_r0[a:b] * (m0 - m1)
                if self.solver_type == "midpoint":
                    x_t_run = first_order[a:b] - c_d1[a:b] * D1
                else:  # heun
                    x_t_run = first_order[a:b] + c_d1[a:b] * D1
                prev_sample[a:b] = x_t_run.split(1)
            prev_sample = torch.cat(prev_sample)
        for k, j in enumerate(jobs):
            j.model_output = model_output[k : k + 1]
        return prev_sample.to(model_output.dtype)

    def add_noise(self, job, original, noise, index):
        alpha_t, sigma_t = (c.to(original.dtype) for c in job.coefficients_at(index)[:2])
        return alpha_t * original + sigma_t * noise


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """Sorted positions as ``[start, end)`` runs: ``[0, 1, 3]`` -> ``[(0, 2), (3, 4)]``."""
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


# -- every other scheduler ------------------------------------------------------------


@dataclass(frozen=True)
class PerRequestStep:
    """Each job's own diffusers scheduler, called as the pipeline calls it (with its host syncs)."""

    def prepare(self, scheduler, timesteps, generator, step_kwargs) -> JobSchedule:
        return JobSchedule(self, scheduler, timesteps, generator, step_kwargs)

    def scale_model_input(self, jobs, indices, x_t):
        return torch.cat(
            [
                j.scheduler.scale_model_input(x, j.timesteps[i])
                for j, i, x in zip(jobs, indices, x_t.split(1), strict=True)
            ]
        )

    def step(self, jobs, indices, eps, x_t):
        return torch.cat(
            [
                j.scheduler.step(e, j.timesteps[i], x, **j.step_kwargs, return_dict=False)[0]
                for j, i, e, x in zip(jobs, indices, eps.split(1), x_t.split(1), strict=True)
            ]
        )

    def add_noise(self, job, original, noise, index):
        return job.scheduler.add_noise(original, noise, job.timesteps[index : index + 1])


# The vectorized kinds, by the exact diffusers class (a subclass may step differently).
_KINDS: dict[type, type] = {
    diffusers.DDIMScheduler: DDIMStep,
    diffusers.EulerDiscreteScheduler: EulerStep,
    diffusers.EulerAncestralDiscreteScheduler: EulerAncestralStep,
    diffusers.DPMSolverMultistepScheduler: DPMSolverMultistepStep,
}


def step_for(scheduler, step_kwargs: dict) -> SchedulerStep:
    """The ``SchedulerStep`` for a request's diffusers scheduler: a vectorized kind, else ``PerRequestStep``.

    >>> step_for(DPMSolverMultistepScheduler(algorithm_type="dpmsolver++"), {})  # doctest: +SKIP
    DPMSolverMultistepStep(prediction_type='epsilon', solver_type='midpoint')
    >>> step_for(PNDMScheduler(), {})                                           # doctest: +SKIP
    PerRequestStep()
    """
    kind = _KINDS.get(type(scheduler))
    if kind is None or not kind.supports(scheduler, step_kwargs):
        return PerRequestStep()
    return kind.of(scheduler)

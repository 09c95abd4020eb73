"""What the suite runs (full on CUDA, or the CPU smoke) and the clock each part runs against."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# Part name -> seconds it may take, full run on an H200. The sum plus model building (about a minute)
# stays under 8 minutes; each part shortens its loops to fit, it never shrinks a model.
FULL_BUDGETS_S = {
    "step": 70.0,
    "engine": 100.0,
    "diffusers": 60.0,
    "sdxl": 75.0,
    "correctness": 30.0,
    "ip_adapter": 30.0,
    "compile": 40.0,  # timing only: inductor's compile itself is not cut (it runs last)
}
# The smoke's, on two loaded CPU cores: every loop still runs at least once.
SMOKE_BUDGETS_S = {
    "step": 6.0,
    "engine": 15.0,
    "diffusers": 8.0,
    "sdxl": 10.0,
    "correctness": 4.0,
    "ip_adapter": 4.0,
    "compile": 4.0,
}
SUITE_LIMIT_S = 8 * 60.0


@dataclass(frozen=True)
class ModelRun:
    """One architecture's settings: where it comes from, its size, steps, rows and concurrency levels."""

    source: str  # "configs:sd15" (random weights from the shipped config) or "builtin:tiny-sd"
    size_px: int
    steps: int
    guidance_scale: float
    step_rows: tuple[int, ...]  # rows of the step-alone timings (a CFG image is 2 rows)
    concurrency: tuple[int, ...]  # requests in flight, closed loop
    requests_per_client: int  # each closed loop aims at concurrency x this many requests (budget permitting)
    min_requests: int  # and at least this many (the one-in-flight loop's latency samples)

    def requests_at(self, concurrency: int) -> int:
        return max(self.min_requests, concurrency * self.requests_per_client)


@dataclass(frozen=True)
class SuiteSettings:
    smoke: bool
    device: str  # "cuda" or "cpu"
    dtype: str  # the UNet's and text encoders' dtype: "float16" on CUDA, "float32" on the CPU
    sd: ModelRun
    sdxl: ModelRun
    scheduler: str = "dpmpp_2m"
    adapters: int = 8
    rank: int = 16
    zipf_s: float = 1.1
    iters: int = 10  # timed iterations per step measurement, at most (the budget may cut it)
    warmup: int = 2
    budgets_s: dict[str, float] = field(default_factory=lambda: dict(FULL_BUDGETS_S))

    @classmethod
    def full(cls) -> SuiteSettings:
        """CUDA, fp16: SD1.5 at 512 px and SDXL base at 1024 px, 30 steps, the issue's settings."""
        return cls(
            smoke=False,
            device="cuda",
            dtype="float16",
            sd=ModelRun("configs:sd15", 512, 30, 7.5, (2, 16, 32, 64), (1, 8, 32), 3, 5),
            sdxl=ModelRun("configs:sdxl-base", 1024, 30, 5.0, (2, 16), (1, 4), 1, 2),
        )

    @classmethod
    def smoke_run(cls) -> SuiteSettings:
        """The CPU smoke: the same parts and loops on the tiny builtin models at 64 px, 3 steps, one iteration."""
        return cls(
            smoke=True,
            device="cpu",
            dtype="float32",
            sd=ModelRun("builtin:tiny-sd", 64, 3, 7.5, (2, 16, 32, 64), (1, 8, 32), 1, 3),
            sdxl=ModelRun("builtin:tiny-sdxl", 64, 3, 5.0, (2, 16), (1, 4), 1, 2),
            iters=1,
            warmup=1,
            budgets_s=dict(SMOKE_BUDGETS_S),
        )


class Budget:
    """A part's clock: ``left()`` seconds until its deadline; loops stop once it has passed (after one round)."""

    def __init__(self, seconds: float, clock=time.perf_counter):
        self.seconds = seconds
        self._clock = clock
        self.start = clock()

    def left(self) -> float:
        return self.seconds - (self._clock() - self.start)

    @property
    def expired(self) -> bool:
        return self.left() <= 0

    def share(self, parts: int) -> float:
        """An equal share of what is left for each of ``parts`` measurements still to run."""
        return max(0.0, self.left()) / max(1, parts)

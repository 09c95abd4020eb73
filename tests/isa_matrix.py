"""Run the batch-invariance and equivalence tests under every CPU instruction set, one at a time.

    python tests/isa_matrix.py              # the whole matrix (make test-isa)
    python tests/isa_matrix.py --only ci    # the default plus the forced-down settings CI runs
    python tests/isa_matrix.py --list

MKL, oneDNN and PyTorch's own kernels each pick code by CPU: PyTorch by
``ATEN_CPU_CAPABILITY`` (default, avx2, avx512), MKL by
``MKL_ENABLE_INSTRUCTIONS`` (SSE4_2, AVX2, AVX512), oneDNN by
``DNNL_MAX_CPU_ISA`` (SSE41, AVX2, AVX512_CORE). Each setting caps one library
at that level (a cap above what the CPU has changes nothing), with 1 and with 2
torch threads. The images must be batch-invariant, and equal diffusers', under
every one of them.

MKL also picks its code by vendor: on AMD CPUs it runs generic AVX2 kernels
whatever the CPU supports, so the AVX-512 GEMMs an Intel CPU runs are never
exercised there. On an AMD machine with a C compiler the matrix adds
"mkl-as-intel" settings: a two-line shim (``mkl_as_intel.c``) preloaded so that
MKL's vendor check answers "Intel", which makes it run its Intel kernels
(AVX-512 where the CPU has it). This is a test device only, never used to serve.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = [
    "tests/test_batch_invariance.py",
    "tests/test_engine_equivalence.py",
    "tests/test_img2img_equivalence.py",
    "tests/test_inpaint_equivalence.py",
    "tests/test_ip_adapter.py",
    "tests/test_multi_lora.py",
    "tests/test_prompt_schedules.py",
    "tests/test_prompts.py",
    "tests/test_samplers.py",
    "tests/test_scheduler_steps.py",
    "tests/test_sdxl_equivalence.py",
    "tests/test_step_graphs.py",
]
SHIM_SOURCE = Path(__file__).resolve().parent / "mkl_as_intel.c"


@dataclass(frozen=True)
class Setting:
    name: str
    env: dict[str, str] = field(default_factory=dict)
    threads: int = 2
    mkl_as_intel: bool = False
    ci: bool = False

    @property
    def label(self) -> str:
        return f"{self.name}, {self.threads} thread{'s' if self.threads > 1 else ''}"


def cpu_vendor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def settings(amd: bool) -> list[Setting]:
    forced = [
        ("default", {}),
        ("aten=default", {"ATEN_CPU_CAPABILITY": "default"}),
        ("aten=avx2", {"ATEN_CPU_CAPABILITY": "avx2"}),
        ("aten=avx512", {"ATEN_CPU_CAPABILITY": "avx512"}),
        ("mkl=SSE4_2", {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}),
        ("mkl=AVX2", {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}),
        ("mkl=AVX512", {"MKL_ENABLE_INSTRUCTIONS": "AVX512"}),
        ("dnnl=SSE41", {"DNNL_MAX_CPU_ISA": "SSE41"}),
        ("dnnl=AVX2", {"DNNL_MAX_CPU_ISA": "AVX2"}),
        ("dnnl=AVX512_CORE", {"DNNL_MAX_CPU_ISA": "AVX512_CORE"}),
    ]
    # The forced-down setting CI runs besides `make test`'s default: every library at AVX2, one thread.
    all_avx2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"}
    out = [Setting(name, env, threads) for name, env in forced for threads in (1, 2)]
    out.append(Setting("all=AVX2", all_avx2, 1, ci=True))
    if amd:
        out += [
            Setting("mkl-as-intel", {}, 2, mkl_as_intel=True, ci=True),
            Setting("mkl-as-intel", {}, 1, mkl_as_intel=True),
            Setting("mkl-as-intel, mkl=AVX2", {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, 2, mkl_as_intel=True, ci=True),
            Setting("mkl-as-intel, mkl=AVX2", {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, 1, mkl_as_intel=True),
        ]
    return out


def build_shim(build_dir: Path) -> Path | None:
    """Compile ``mkl_as_intel.c`` into a shared library (None without a C compiler)."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return None
    build_dir.mkdir(parents=True, exist_ok=True)
    out = build_dir / "libmkl_as_intel.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(SHIM_SOURCE)], check=True)
    return out


def run(setting: Setting, shim: Path | None, pytest_args: list[str]) -> tuple[bool, float, str]:
    env = {**os.environ, **setting.env, "OMP_NUM_THREADS": str(setting.threads)}
    if setting.mkl_as_intel:
        env["LD_PRELOAD"] = " ".join(p for p in (str(shim), env.get("LD_PRELOAD", "")) if p)
    probe = (
        "import torch; torch.mm(torch.ones(64, 64), torch.ones(64, 64)); "
        "print('aten', torch.backends.cpu.get_cpu_capability(), 'threads', torch.get_num_threads())"
    )
    seen = subprocess.run(
        [sys.executable, "-c", probe], env={**env, "MKL_VERBOSE": "1"}, capture_output=True, text=True, cwd=ROOT
    )
    mkl = next((line for line in seen.stdout.splitlines() if "oneMKL" in line), "")
    # "... for Intel(R) 64 architecture <the code path MKL chose>, Lnx ..."
    mkl = "mkl: " + (mkl.split("architecture ", 1)[-1].split(", Lnx")[0].replace("Intel(R) ", "") if mkl else "?")
    aten = next((line for line in seen.stdout.splitlines() if line.startswith("aten")), "aten ?")
    start = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args, *TESTS]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    tail = (done.stdout.strip().splitlines() or [""])[-1]
    if done.returncode != 0:
        print(done.stdout[-6000:], done.stderr[-2000:], sep="\n", flush=True)
    return done.returncode == 0, time.monotonic() - start, f"{aten}; {mkl} | {tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="all", help="'all', 'ci', or a comma-separated list of setting names")
    p.add_argument("--list", action="store_true", help="print the settings and exit")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = p.parse_args(argv)
    amd = cpu_vendor() == "AuthenticAMD"
    chosen = settings(amd)
    if args.only == "ci":
        chosen = [s for s in chosen if s.ci]
    elif args.only != "all":
        names = {n.strip() for n in args.only.split(",")}
        chosen = [s for s in chosen if s.name in names]
    if args.list:
        for s in chosen:
            print(s.label, s.env, "(MKL as on Intel)" if s.mkl_as_intel else "")
        return 0
    shim = None
    if any(s.mkl_as_intel for s in chosen):
        shim = build_shim(ROOT / ".lorafleet" / "isa")
        if shim is None:
            print("no C compiler: skipping the mkl-as-intel settings", flush=True)
            chosen = [s for s in chosen if not s.mkl_as_intel]
    print(f"CPU vendor {cpu_vendor()}, {os.cpu_count()} CPUs; {len(chosen)} settings; tests: {' '.join(TESTS)}")
    failed = []
    for s in chosen:
        ok, seconds, summary = run(s, shim, args.pytest_args)
        print(f"{'ok  ' if ok else 'FAIL'} {s.label:<40} {seconds:6.0f} s  {summary}", flush=True)
        if not ok:
            failed.append(s.label)
    print(f"{len(chosen) - len(failed)} of {len(chosen)} settings passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

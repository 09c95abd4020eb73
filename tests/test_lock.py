"""requirements.lock matches pyproject.toml, offline: every dependency pyproject names is pinned there at a
version its specifier accepts, every pin is needed by one, the pins are closed under the dependencies the
installed distributions declare, torch's version is written in one place, and no CUDA package is locked.
After editing pyproject.toml's dependencies: `make lock`, then `make venv`."""

from __future__ import annotations

import importlib.metadata
import platform
import re
import subprocess
import sys
from collections import deque

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT

ROOT_VIA = "lorafleet (pyproject.toml)"
RELOCK = "pyproject.toml and requirements.lock differ: run `make lock`, then `make venv`"


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def declared() -> list[Requirement]:
    project = pyproject()["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def parse_lock(text: str) -> tuple[dict[str, Version], dict[str, set[str]]]:
    """{name: pinned version}, {name: the names in its "# via" comment} from uv's requirements format."""
    pins: dict[str, Version] = {}
    via: dict[str, set[str]] = {}
    current = None
    in_via = False
    for line in text.splitlines():
        if m := re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line):
            current = canonicalize_name(m[1])
            assert current not in pins, f"{current} is pinned twice"
            pins[current] = Version(m[2])
            via[current] = set()
            in_via = False
        elif m := re.fullmatch(r"    # via( (.+))?", line):
            in_via = True
            if m[2]:
                via[current].add(m[2])
        elif in_via and (m := re.fullmatch(r"    #   (.+)", line)):
            via[current].add(m[1])
        else:
            assert line.startswith("#") or not line.strip(), f"requirements.lock: unexpected line {line!r}"
            in_via = False
    return pins, via


@pytest.fixture(scope="module")
def lock() -> tuple[dict[str, Version], dict[str, set[str]]]:
    return parse_lock((ROOT / "requirements.lock").read_text())


def test_every_declared_dependency_is_pinned_at_a_version_it_accepts(lock):
    pins, _ = lock
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not in requirements.lock: {RELOCK}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} but the lock pins {pins[name]}: {RELOCK}"


def test_every_pin_is_needed_by_a_declared_dependency(lock):
    pins, via = lock
    reached = {name for name, parents in via.items() if ROOT_VIA in parents}
    assert reached == {canonicalize_name(r.name) for r in declared()}, RELOCK
    queue = deque(reached)
    while queue:
        parent = queue.popleft()
        for name, parents in via.items():
            if name not in reached and parent in {canonicalize_name(p) for p in parents}:
                reached.add(name)
                queue.append(name)
    assert set(pins) == reached, f"pinned for nothing: {sorted(set(pins) - reached)}: {RELOCK}"


def test_the_lock_is_for_the_cpu_build_and_names_no_cuda_package(lock):
    pins, _ = lock
    assert not [n for n in pins if n.startswith(("nvidia-", "cuda-")) or n == "triton"]
    # torch without a build label: the CPU build here, the CUDA build of the same version on a GPU machine.
    assert str(pins["torch"]) == str(pins["torch"].public)
    assert "open-clip-torch" not in pins  # the CLIP vocabulary is package data now


def torch_pin() -> str:
    (req,) = [r for r in declared() if r.name == "torch"]
    (spec,) = req.specifier
    assert spec.operator == "==", "pyproject.toml pins torch exactly; its build is chosen at install"
    return spec.version


def test_torch_version_is_written_once(lock):
    pins, _ = lock
    assert str(pins["torch"]) == torch_pin()
    # Everything that installs torch takes its version from pyproject.toml / the lock, never its own.
    for path in ["Makefile", "cluster.yaml", "k8s/rayservice.yaml", "k8s/Dockerfile", ".ci/run"]:
        assert not re.findall(r"torch[=<>~]=?\s*\d", (ROOT / path).read_text()), path
    # The one versioned example in the README (a CUDA install by hand) is the pin.
    assert set(re.findall(r"torch==([\w.+]+)", (ROOT / "README.md").read_text())) <= {torch_pin()}


def make_dry_run(*args: str) -> str:
    return subprocess.run(
        ["make", "-n", "-B", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout


def test_make_venv_installs_the_lock_after_torchs_pin(tmp_path):
    steps = make_dry_run("venv", f"VENV={tmp_path}/v").splitlines()
    pip = [s for s in steps if " -m pip install " in s]
    assert pip == [
        f"{tmp_path}/v/bin/python -m pip install -q torch=={torch_pin()}",
        f"{tmp_path}/v/bin/python -m pip install -q -r requirements.lock",
        f"{tmp_path}/v/bin/python -m pip install -q --no-deps -e .",
    ]
    cuda = make_dry_run("venv", f"VENV={tmp_path}/v", "TORCH_INDEX=https://download.pytorch.org/whl/cu128")
    assert f"pip install -q torch=={torch_pin()} --index-url https://download.pytorch.org/whl/cu128" in cuda


def test_gpu_wheels_are_the_locked_versions_without_open_clip(lock, tmp_path):
    pins, _ = lock
    commands = make_dry_run("gpu-wheels", f"WHEEL_DIR={tmp_path}").replace("\\\n", " ").splitlines()
    (download,) = [c for c in commands if " -m pip download " in c]
    wheels = dict(re.findall(r"\s([a-z][a-z0-9_-]*)==(\S+)", download))
    assert "diffusers" in wheels and "pydantic-core" in wheels and "pillow" in wheels
    assert not any("clip" in name for name in wheels)
    assert {canonicalize_name(n): Version(v) for n, v in wheels.items()} == {
        canonicalize_name(n): pins[canonicalize_name(n)] for n in wheels
    }


LOCK_TARGET = sys.platform == "linux" and platform.machine() == "x86_64" and sys.version_info[:2] == (3, 11)


@pytest.mark.skipif(not LOCK_TARGET, reason="requirements.lock is for CPython 3.11 on Linux x86-64")
def test_the_pins_are_closed_under_the_installed_distributions_requirements(lock):
    """Walk pyproject's dependencies through each installed distribution's Requires-Dist (markers evaluated
    here, extras followed): every edge lands on a pin its specifier accepts, and what is installed is the lock."""
    pins, _ = lock
    seen: set[tuple[str, str]] = set()
    queue = deque((req, "lorafleet") for req in declared())
    walked = set()
    while queue:
        req, parent = queue.popleft()
        name = canonicalize_name(req.name)
        assert name in pins, f"{parent} needs {req}, which requirements.lock lacks: {RELOCK}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{parent} needs {req}; locked {pins[name]}"
        installed = Version(importlib.metadata.version(name))
        assert installed.public == str(pins[name]), f"{name} {installed} installed, {pins[name]} locked: make venv"
        walked.add(name)
        for extra in [""] + sorted(req.extras):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            for line in importlib.metadata.requires(name) or []:
                dep = Requirement(line)
                if dep.marker is None or dep.marker.evaluate({"extra": extra}):
                    queue.append((dep, name))
    assert walked == set(pins), f"pinned for nothing here: {sorted(set(pins) - walked)}"

"""Shared pieces for the registry tests: a loopback S3 server, registries on both stores, LoRA files.

Test modules load it with ``pytest_plugins = ["registry_helpers"]``, so its
session fixtures (one moto server) are shared by every registry test module.
Fixture names are specific to avoid clashing with the engine's conftest.
(PYTEST_DONT_REWRITE: test modules import helpers from here before pytest
loads it as a plugin; it has no assertions to rewrite.)
"""

from __future__ import annotations

import io
import socket
import uuid
from pathlib import Path

import boto3
import pytest
import safetensors.torch
import torch

from lora_registry import DiskCache, MemoryCache, Registry, base_model_spec_from_dir, open_store
from lora_registry.base_model import BaseModelSpec
from lora_registry.stores import Store

DUMMY_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """moto's S3 API server on 127.0.0.1 (the same boto3 code path as production)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self._server.stop()
            self.running = False

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, **DUMMY_CREDENTIALS)

    def new_bucket(self) -> str:
        bucket = f"reg-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def store_options(self, **overrides) -> dict:
        options = {"endpoint_url": self.endpoint, **DUMMY_CREDENTIALS, "connect_timeout_s": 1.0, "max_attempts": 3}
        options.update(overrides)
        return options


@pytest.fixture(scope="session")
def moto_s3():
    """One moto S3 server for the session; each test makes its own bucket."""
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def registry_tiny_spec(tiny_dir) -> BaseModelSpec:
    """The BaseModelSpec of builtin:tiny-sd, from its config files (meta device)."""
    return base_model_spec_from_dir(tiny_dir)


def make_store(kind: str, tmp_path: Path, moto: MotoServer | None = None) -> Store:
    if kind == "local":
        return open_store(str(tmp_path / "store"))
    assert moto is not None
    return open_store(f"s3://{moto.new_bucket()}/lorafleet", **moto.store_options())


@pytest.fixture(params=["local", "s3"])
def adapter_store(request, tmp_path) -> Store:
    """An empty store: a local directory, then an S3 bucket on the moto server."""
    moto = request.getfixturevalue("moto_s3") if request.param == "s3" else None
    return make_store(request.param, tmp_path, moto)


@pytest.fixture
def adapter_registry(adapter_store, registry_tiny_spec, tmp_path) -> Registry:
    """A registry on ``adapter_store`` for the tiny model, with fresh caches and no listing TTL."""
    return fresh_registry(registry_tiny_spec, tmp_path, adapter_store)


def fresh_registry(spec: BaseModelSpec, root: Path, store: Store | None = None) -> Registry:
    """A registry for ``spec`` on ``store`` (default: a local directory under ``root``), with fresh caches
    under ``root`` and no listing TTL."""
    return Registry(
        store if store is not None else make_store("local", root),
        base=spec,
        cache=DiskCache(root / "cache", 1 << 30),
        memory=MemoryCache(1 << 30),
        manifest_ttl_s=0.0,
    )


@pytest.fixture(scope="module")
def served_adapters(registry_tiny_spec, tmp_path_factory) -> Registry:
    """A local registry holding ink@1, ink@2 (UNet attention, rank 4), pastel@1 (UNet and text encoder)
    and wide@1 (rank 8), for tests of how requests use adapters."""
    spec = registry_tiny_spec
    registry = fresh_registry(spec, tmp_path_factory.mktemp("served-adapters"))
    registry.register(small_lora_bytes(spec, seed=1), name="ink")
    registry.register(small_lora_bytes(spec, seed=2), name="ink")
    registry.register(to_bytes(diffusers_state(random_lora(spec, seed=3, te_targets=TE_TARGETS))), name="pastel")
    registry.register(small_lora_bytes(spec, seed=4, rank=8), name="wide")
    return registry


def store_keys(store: Store) -> list[str]:
    return [o.key for o in store.list("")]


def spec_paths(spec: BaseModelSpec, component: str, targets) -> list[str]:
    """Module paths (within the component) whose last segment(s) match one of ``targets``."""
    prefix = component + "."
    return sorted(
        name[len(prefix) :]
        for name in spec.modules
        if name.startswith(prefix) and any(name.endswith("." + t) for t in targets)
    )


def random_lora(
    spec: BaseModelSpec,
    *,
    rank: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    unet_targets=UNET_TARGETS,
    te_targets=(),
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Canonical module name -> (A, B) with random weights, for the given targets."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for component, targets in (("unet", unet_targets), ("text_encoder", te_targets)):
        for path in spec_paths(spec, component, targets):
            shape = spec.modules[f"{component}.{path}"]
            a = torch.randn(shape.lora_a_shape(rank), generator=g) * 0.1
            b = torch.randn(shape.lora_b_shape(rank), generator=g) * 0.1
            out[f"{component}.{path}"] = (a.to(dtype), b.to(dtype))
    return out


def diffusers_state(weights, *, flat_text_encoder: bool = True) -> dict[str, torch.Tensor]:
    """diffusers keys, `unet.<path>.lora_A.weight` ...; text encoder names flattened as transformers 5 saves them."""
    out = {}
    for name, (a, b) in weights.items():
        if flat_text_encoder:
            name = name.replace("text_encoder.text_model.", "text_encoder.")
        out[f"{name}.lora_A.weight"] = a
        out[f"{name}.lora_B.weight"] = b
    return out


def kohya_name(name: str) -> str:
    component, _, path = name.partition(".")
    if component == "unet":
        return "lora_unet_" + path.replace(".", "_")
    return "lora_te_" + path.replace(".", "_")


def kohya_state(weights, alpha: float | None) -> dict[str, torch.Tensor]:
    out = {}
    for name, (a, b) in weights.items():
        out[f"{kohya_name(name)}.lora_down.weight"] = a
        out[f"{kohya_name(name)}.lora_up.weight"] = b
        if alpha is not None:
            out[f"{kohya_name(name)}.alpha"] = torch.tensor(alpha)
    return out


def to_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return safetensors.torch.save({k: v.contiguous() for k, v in state.items()}, metadata=metadata)


def small_lora_bytes(spec: BaseModelSpec, seed: int = 0, rank: int = 4) -> bytes:
    return to_bytes(diffusers_state(random_lora(spec, rank=rank, seed=seed)))


class GatedStore(Store):
    """Delegates to a real store; ``hooks[method](*args)`` runs before the call (to block, count or crash)."""

    def __init__(self, inner: Store):
        self.inner = inner
        self.uri = inner.uri
        self.hooks: dict = {}
        self.calls: dict[str, int] = {}

    def _before(self, method: str, *args) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        hook = self.hooks.get(method)
        if hook is not None:
            hook(*args)

    def put_bytes(self, key, data, progress=None):
        self._before("put_bytes", key)
        return self.inner.put_bytes(key, data, progress)

    def put_if_absent(self, key, data):
        self._before("put_if_absent", key)
        return self.inner.put_if_absent(key, data)

    def get_bytes(self, key):
        self._before("get_bytes", key)
        return self.inner.get_bytes(key)

    def download(self, key, dest, progress=None):
        self._before("download", key)
        return self.inner.download(key, dest, progress)

    def copy(self, src, dst):
        self._before("copy", src, dst)
        return self.inner.copy(src, dst)

    def delete(self, key):
        self._before("delete", key)
        return self.inner.delete(key)

    def list(self, prefix):
        self._before("list", prefix)
        return self.inner.list(prefix)

    def head(self, key):
        self._before("head", key)
        return self.inner.head(key)


def torch_save_bytes(state) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def spy_on_flight_waits(monkeypatch, on_wait) -> None:
    """Make every single-flight follower call ``on_wait()`` just before it waits for the leader's load
    (``lora_registry.cache._Flight``), so a test knows a follower is waiting instead of guessing."""
    from lora_registry import cache as cache_module

    class SpyFlight(cache_module._Flight):
        def __init__(self):
            super().__init__()
            done = self.done

            class Done:
                set, is_set = done.set, done.is_set

                @staticmethod
                def wait(timeout=None):
                    on_wait()
                    return done.wait(timeout)

            self.done = Done

    monkeypatch.setattr(cache_module, "_Flight", SpyFlight)

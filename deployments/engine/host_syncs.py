"""Count the calls that would make the host wait for the device (``.item()``, ``.cpu()``, ``bool(t)``...).

On a GPU each of these blocks the Python thread until every kernel queued before
it has run, so the host stops running ahead of the device (and a CUDA graph could
not hold the code around it). The step scheduler's tick has none between UNet
forwards; this counter is how the tests and benchmarks check that on the CPU,
where no call really waits: it records every such call on any tensor while it is
active, whatever its device.

>>> with HostSyncCounter() as syncs:  # doctest: +SKIP
...     steps.tick()
>>> syncs.calls                        # doctest: +SKIP
[]
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

# Tensor methods that read a device tensor's values on the host.
SYNCING_METHODS = frozenset(
    {
        "item",
        "tolist",
        "cpu",
        "numpy",
        "nonzero",
        "argwhere",
        "masked_select",
        "unique",
        "unique_consecutive",
        "bincount",
        "equal",
        "allclose",
        "__bool__",
        "__int__",
        "__float__",
        "__index__",
        "__complex__",
    }
)


def _is_cpu(device) -> bool:
    return device is not None and torch.device(device).type == "cpu"


def _syncing_index(index) -> bool:
    """A boolean mask (a hidden ``nonzero``) or a 0-d integer tensor (a hidden ``item``) as an index."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(
        isinstance(p, torch.Tensor) and (p.dtype == torch.bool or (p.ndim == 0 and not p.is_floating_point()))
        for p in parts
    )


class HostSyncCounter(TorchFunctionMode):
    """While active, records each device-to-host read as ``"name"`` in ``calls``.

    Besides ``SYNCING_METHODS``: ``.to("cpu")`` (any move to the host), indexing with a
    boolean mask or a 0-d integer tensor, and ``repeat_interleave`` with tensor repeats
    and no ``output_size``.
    """

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in SYNCING_METHODS:
            self.calls.append(name)
        elif name == "to" and self._to_cpu(args[1:], kwargs):
            self.calls.append("to(cpu)")
        elif name == "__getitem__" and len(args) > 1 and _syncing_index(args[1]):
            self.calls.append("__getitem__(tensor index)")
        elif name == "repeat_interleave" and self._tensor_repeats(args[1:], kwargs):
            self.calls.append("repeat_interleave")
        return func(*args, **kwargs)

    @staticmethod
    def _to_cpu(args, kwargs) -> bool:
        candidates = [kwargs.get("device"), *args]
        return any(isinstance(a, (str, torch.device)) and _is_cpu(a) for a in candidates)

    @staticmethod
    def _tensor_repeats(args, kwargs) -> bool:
        repeats = kwargs.get("repeats", args[0] if args else None)
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None

    def __enter__(self) -> HostSyncCounter:
        super().__enter__()
        return self

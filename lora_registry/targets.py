"""What the serving side can apply: the modules that carry adapter slots, so registration can refuse the rest.

The registry validates an upload against the base model (``BaseModelSpec``: every Linear / Conv2d), but a
replica carries adapter slots only on the modules its configuration targets (``lora.unet_target_modules``,
``lora.text_encoder_target_modules``: path suffixes). An adapter with weights elsewhere would register and then
be refused at every use, so the caller that serves the registry passes its targets in and registration refuses
such an adapter at once (422 ``untargeted_modules``, naming the modules and the config key to widen).

The registry imports nothing from the serving side: the caller builds a ``ServedTargets``::

    ServedTargets(
        {"unet": ("to_q", "to_k", ...), "text_encoder": ("q_proj", ...), "text_encoder_2": ("q_proj", ...)},
        config_keys={"unet": "lora.unet_target_modules", "text_encoder": "lora.text_encoder_target_modules", ...},
    )
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .errors import InvalidAdapterError, keys_phrase

UNTARGETED_MODULES = "untargeted_modules"


def suffix_match(path: str, suffixes: Iterable[str]) -> bool:
    """Whether ``path`` is one of ``suffixes`` or ends with ``"." + suffix`` (the serving layers' own rule).

    >>> suffix_match("down_blocks.0.resnets.0.conv1", ["conv1"]), suffix_match("x.myconv1", ["conv1"])
    (True, False)
    """
    return any(path == t or path.endswith("." + t) for t in suffixes)


@dataclass(frozen=True)
class ServedTargets:
    """Per component (``"unet"``, ``"text_encoder"``, ``"text_encoder_2"``): the module path suffixes that carry
    adapter slots, and (for messages) the config key that sets them. A component not listed carries none."""

    suffixes: Mapping[str, tuple[str, ...]]
    config_keys: Mapping[str, str] = field(default_factory=dict)

    def reaches(self, module: str) -> bool:
        """Whether a canonical module name (``"unet.<path>"``) lies on a module that carries slots."""
        component, _, path = module.partition(".")
        return suffix_match(path, self.suffixes.get(component, ()))

    def unreached(self, modules: Iterable[str]) -> list[str]:
        """The canonical module names among ``modules`` that no slot reaches, in order."""
        return [m for m in modules if not self.reaches(m)]

    def check(self, modules: Iterable[str]) -> None:
        """``InvalidAdapterError`` (422 ``untargeted_modules``) naming the modules outside the targets and the
        config keys that would reach them; returns if every module is reached."""
        unreached = self.unreached(modules)
        if not unreached:
            return
        components = sorted({m.partition(".")[0] for m in unreached})
        keys = sorted({self.config_keys.get(c, f"{c} targets") for c in components})
        raise InvalidAdapterError(
            f"{len(unreached)} adapted modules carry no adapter slots on this server, so it could never apply "
            f"them: {keys_phrase(unreached)}; the served modules are set by {' / '.join(keys)}",
            code=UNTARGETED_MODULES,
            keys=unreached,
        )

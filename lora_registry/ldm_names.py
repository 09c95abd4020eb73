"""The original (LDM / SGM) module names of a diffusers ``UNet2DConditionModel``.

kohya-ss sd-scripts trains SDXL on its own copy of Stability's UNet, so its
SDXL LoRA files name UNet modules the LDM way::

    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q    (down_blocks.1.attentions.0...)
    lora_unet_middle_block_1_proj_in                              (mid_block.attentions.0.proj_in)
    lora_unet_output_blocks_2_2_conv                              (up_blocks.0.upsamplers.0.conv)
    lora_unet_input_blocks_1_0_in_layers_2                        (down_blocks.0.resnets.0.conv1)

``ldm_unet_names`` maps every diffusers module path onto its LDM path. The
block numbering is derived from the UNet's own structure (how many levels,
resnets per level, which levels have attentions, down/up samplers), as
diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` derives it from
``layers_per_block``, so the same code serves full SDXL, ``builtin:tiny-sdxl``
and SD1.x (whose LDM names run ``input_blocks.1..11``, ``middle_block.0..2``,
``output_blocks.0..11``). LDM layout, per level ``i`` of ``n`` resnets::

    input_blocks.0.0                    conv_in
    input_blocks.k.0 / .k.1             down_blocks.i.resnets.j / attentions.j     (k counts on)
    input_blocks.k.0.op                 down_blocks.i.downsamplers.0.conv          (one more k)
    middle_block.0 / .1 / .2            mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.k.0 / .k.1            up_blocks.i.resnets.j / attentions.j
    output_blocks.k.2.conv              up_blocks.i.upsamplers.0.conv              (.1.conv without attentions)
    time_embed.0 / .2, label_emb.0.0 / .2, out.2    time_embedding / add_embedding linears, conv_out
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Inside a resnet: diffusers name -> LDM name (sd-scripts' unet_conversion_map_resnet).
RESNET_NAMES = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# Modules outside the blocks.
TOP_LEVEL_NAMES = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_out": "out.2",
}
_PART_RE = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")
_MID_RE = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.")


def _structure(paths: list[str]) -> tuple[dict, dict, dict]:
    """``{(kind, level): {part: {indices}}}`` for down/up blocks, and ``{part: {indices}}`` for the mid block."""
    down: dict[int, dict[str, set[int]]] = {}
    up: dict[int, dict[str, set[int]]] = {}
    mid: dict[str, set[int]] = {}
    for path in paths:
        m = _PART_RE.match(path)
        if m is not None:
            blocks = down if m.group(1) == "down_blocks" else up
            blocks.setdefault(int(m.group(2)), {}).setdefault(m.group(3), set()).add(int(m.group(4)))
            continue
        m = _MID_RE.match(path)
        if m is not None:
            mid.setdefault(m.group(1), set()).add(int(m.group(2)))
    return down, up, mid


def ldm_block_prefixes(paths: Iterable[str]) -> dict[str, str]:
    """diffusers block prefix -> LDM block prefix, e.g. ``"down_blocks.1.attentions.0."`` ->
    ``"input_blocks.4.1."``, for the blocks that occur in ``paths`` (UNet module paths, no ``unet.``)."""
    down, up, mid = _structure(list(paths))
    prefixes: dict[str, str] = {}
    k = 1  # input_blocks.0 is conv_in
    for level in sorted(down):
        parts = down[level]
        for j in sorted(parts.get("resnets", ())):
            prefixes[f"down_blocks.{level}.resnets.{j}."] = f"input_blocks.{k}.0."
            if j in parts.get("attentions", ()):
                prefixes[f"down_blocks.{level}.attentions.{j}."] = f"input_blocks.{k}.1."
            k += 1
        if parts.get("downsamplers"):
            prefixes[f"down_blocks.{level}.downsamplers.0.conv."] = f"input_blocks.{k}.0.op."
            k += 1
    attention_step = 2 if mid.get("attentions") else 1  # resnet, attention, resnet, ... interleaved
    for j in sorted(mid.get("resnets", ())):
        prefixes[f"mid_block.resnets.{j}."] = f"middle_block.{attention_step * j}."
    for j in sorted(mid.get("attentions", ())):
        prefixes[f"mid_block.attentions.{j}."] = f"middle_block.{2 * j + 1}."
    k = 0
    for level in sorted(up):
        parts = up[level]
        resnets = sorted(parts.get("resnets", ()))
        has_attentions = bool(parts.get("attentions"))
        for j in resnets:
            prefixes[f"up_blocks.{level}.resnets.{j}."] = f"output_blocks.{k}.0."
            if j in parts.get("attentions", ()):
                prefixes[f"up_blocks.{level}.attentions.{j}."] = f"output_blocks.{k}.1."
            if j == resnets[-1] and parts.get("upsamplers"):
                after = 2 if has_attentions else 1  # the upsampler follows the resnet (and attention)
                prefixes[f"up_blocks.{level}.upsamplers.0.conv."] = f"output_blocks.{k}.{after}.conv."
            k += 1
    return prefixes


def ldm_unet_names(paths: Iterable[str]) -> dict[str, str]:
    """diffusers UNet module path -> LDM module path, for every path that has one.

    ``paths`` are the UNet's Linear/Conv2d module paths (``named_modules`` names,
    no ``unet.`` prefix); the block numbering comes from them (see the module
    docstring). Paths with no LDM counterpart are left out.

    >>> names = ldm_unet_names(["down_blocks.0.resnets.0.conv1", "down_blocks.0.attentions.0.proj_in",
    ...                         "down_blocks.0.downsamplers.0.conv", "conv_in"])
    >>> names["down_blocks.0.resnets.0.conv1"], names["down_blocks.0.downsamplers.0.conv"]
    ('input_blocks.1.0.in_layers.2', 'input_blocks.2.0.op')
    """
    paths = list(paths)
    prefixes = ldm_block_prefixes(paths)
    out: dict[str, str] = {}
    for path in paths:
        if path in TOP_LEVEL_NAMES:
            out[path] = TOP_LEVEL_NAMES[path]
            continue
        sampler = prefixes.get(path + ".")  # a down/up sampler's conv is a block of its own
        if sampler is not None:
            out[path] = sampler.removesuffix(".")
            continue
        m = _PART_RE.match(path) or _MID_RE.match(path)
        if m is None or m.group(0) not in prefixes:
            continue
        inner = path[m.end() :]
        if ".resnets." in m.group(0):
            inner = RESNET_NAMES.get(inner)
            if inner is None:
                continue
        out[path] = prefixes[m.group(0)] + inner
    return out

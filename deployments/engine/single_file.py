"""Single-file checkpoints: one ``.safetensors`` in Stable Diffusion's original key layout.

Most base models people download are one file in the layout the original code bases save (LDM for SD 1.x,
SGM for SDXL), not a diffusers directory::

    model.diffusion_model.input_blocks.0.0.weight                        UNet
    first_stage_model.encoder.down.0.block.0.norm1.weight                VAE
    cond_stage_model.transformer.text_model.…                            SD 1.x: CLIP ViT-L (transformers' names)
    conditioner.embedders.0.transformer.text_model.…                     SDXL: CLIP ViT-L
    conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight   SDXL: OpenCLIP bigG

``convert_single_file`` turns such a file into a diffusers directory once (``models.resolve_model_dir`` caches
it by the file's content). The weights carry no hyperparameters (attention heads, activations, the scheduler,
the VAE's scaling), so the architecture comes from configs that ship with lorafleet (``configs/sd15``,
``configs/sdxl-base``) or from the builtin tiny models, and one is used only when every tensor of the file has
the name and shape that architecture expects: a fine-tune of SD 1.5 or SDXL loads, an architecture lorafleet
has no config for is refused with what differs, never guessed. The 9-channel inpainting variant of each is
read from the UNet's first convolution. diffusers' own single-file loader
(``StableDiffusionPipeline.from_single_file(path, config=<local dir>)``) does the conversion; nothing is
fetched from a hub.

``export_single_file`` is the inverse (diffusers directory → original layout), after diffusers'
``scripts/convert_diffusers_to_original_stable_diffusion.py`` and ``convert_diffusers_to_original_sdxl.py`` but
derived from the model's config rather than hard-coded block counts, so it also writes the tiny models.

Pickle checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) are refused: loading one runs arbitrary code.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .builtin import BUILTIN_MODELS, BUILTIN_PREFIX, write_builtin

SINGLE_FILE_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
CONFIG_DIR = Path(__file__).parent / "configs"
# Part of the cache key: a change to the conversion (or to a shipped config) must not reuse old directories.
CONVERTER_VERSION = 1

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIXES = {
    "sd1": {"text_encoder": "cond_stage_model.transformer."},
    "sdxl": {
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",  # OpenCLIP's names
    },
}
# Buffers some exporters write and the models recompute: never weights, so never part of the match.
_IGNORED_SUFFIXES = ("position_ids", "logit_scale")

# Candidates per kind, tried in order: lorafleet's shipped configs (a directory), then the builtin tiny models
# (a builtin URI; its -inpaint variant for a 9-channel UNet). Any other in_channels count is refused.
_CANDIDATES = {
    "sd1": [("sd15", CONFIG_DIR / "sd15"), ("tiny-sd", "builtin:tiny-sd")],
    "sdxl": [("sdxl-base", CONFIG_DIR / "sdxl-base"), ("tiny-sdxl", "builtin:tiny-sdxl")],
}
_INPAINT_PIPELINES = {"sd1": "StableDiffusionInpaintPipeline", "sdxl": "StableDiffusionXLInpaintPipeline"}


def is_single_file(name: str) -> bool:
    """Whether a URI or path names one ``.safetensors`` checkpoint (rather than a diffusers directory)."""
    return name.lower().endswith(SINGLE_FILE_SUFFIX)


def refuse_pickle(uri: str) -> None:
    """Raise for a pickle checkpoint: unpickling a model file runs whatever code it carries."""
    suffix = Path(uri.rstrip("/")).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ValueError(
            f"model.uri {uri!r} is a pickle checkpoint ({suffix}): lorafleet never unpickles model files; "
            f"convert it to .safetensors (or a diffusers directory) first"
        )


# --------------------------------------------------------------------------------------------------
# diffusers -> original layout (the exporter; also gives each candidate architecture's expected keys)
# --------------------------------------------------------------------------------------------------

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's pooled text + time ids embedding
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def _rename_first(rest: str, names: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{names.get(head, head)}.{tail}"


def _unet_pair(blocks: str, index: int, part: str, rest: str) -> str:
    """LDM blocks hold (resnet, attention) as ``.0`` and ``.1``; the resnet's layers have LDM names."""
    if part == "resnets":
        return f"{blocks}.{index}.0.{_rename_first(rest, _RESNET)}"
    return f"{blocks}.{index}.1.{rest}"


def unet_to_original(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict in LDM/SGM names (without ``model.diffusion_model.``).

    Original UNets number their blocks flat: ``input_blocks.k`` is ``conv_in`` (k = 0), then per level
    ``layers_per_block`` (resnet, attention) pairs and a downsampler; ``output_blocks`` hold
    ``layers_per_block + 1`` pairs per level, the upsampler after the level's last attention.
    """
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"the original layout needs one layers_per_block for every level, got {layers!r}")
    per_level = layers + 1
    up_has_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    out = {}
    for key, value in state_dict.items():
        module, _, param = key.rpartition(".")
        if module in _UNET_TOP:
            out[f"{_UNET_TOP[module]}.{param}"] = value
            continue
        if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            new = _unet_pair("input_blocks", 1 + int(m[1]) * per_level + int(m[3]), m[2], m[4])
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_rename_first(m[2], _RESNET)}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            new = _unet_pair("output_blocks", int(m[1]) * per_level + int(m[3]), m[2], m[4])
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            level = int(m[1])
            new = f"output_blocks.{level * per_level + layers}.{2 if up_has_attention[level] else 1}.conv.{m[2]}"
        else:
            raise ValueError(f"UNet key {key!r} has no name in the original layout")
        out[new] = value
    return out


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_original(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in LDM names (without ``first_stage_model.``).

    The decoder's levels are numbered in reverse, and the mid-block attention is a 1x1 convolution in the
    original (diffusers holds linear weights).
    """
    levels = len(config["up_block_types"])
    out = {}
    for key, value in state_dict.items():
        if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm":
                value = value.reshape(*value.shape, 1, 1)  # [out, in] -> [out, in, 1, 1]
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif re.fullmatch(r"(encoder|decoder)\.conv_(in|out)\.(weight|bias)|(post_)?quant_conv\.(weight|bias)", key):
            new = key
        else:
            raise ValueError(f"VAE key {key!r} has no name in the original layout")
        out[new] = value
    return out


def _with_text_model(key: str) -> str:
    """transformers' names for CLIP, with the ``text_model.`` level a flattened ``CLIPTextModel`` omits."""
    return key if key.startswith("text_model.") or key.startswith("text_projection") else f"text_model.{key}"


def clip_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP ViT-L (SD 1.x's encoder, SDXL's first): the original keeps transformers' names."""
    return {_with_text_model(k): v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)}


_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def open_clip_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SDXL's second encoder (``CLIPTextModelWithProjection``) in OpenCLIP's names.

    OpenCLIP keeps q, k and v in one ``in_proj`` ([3 * width, width]) and applies ``text_projection`` as
    ``x @ P`` ([width, projection]), where transformers' linear holds its transpose.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        key = _with_text_model(key)
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif m := re.fullmatch(r"text_model\.final_layer_norm\.(weight|bias)", key):
            out[f"ln_final.{m[1]}"] = value
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = value
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            if m[2] not in _OPEN_CLIP_LAYER:
                raise ValueError(f"text encoder key {key!r} has no name in OpenCLIP's layout")
            out[f"transformer.resblocks.{m[1]}.{_OPEN_CLIP_LAYER[m[2]]}.{m[3]}"] = value
        else:
            raise ValueError(f"text encoder key {key!r} has no name in OpenCLIP's layout")
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{key}: q, k and v must all be present, got {sorted(parts)}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def to_original_state_dict(
    kind: str, unet: dict, vae: dict, text_encoders: dict[str, dict], unet_config: dict, vae_config: dict
) -> dict[str, torch.Tensor]:
    """One checkpoint in the original layout from the diffusers components' state dicts.

    ``kind``: ``"sd1"`` or ``"sdxl"``; ``text_encoders``: ``{"text_encoder": ..., "text_encoder_2": ...}``.
    """
    prefixes = TEXT_ENCODER_PREFIXES[kind]
    out = {UNET_PREFIX + k: v for k, v in unet_to_original(unet, unet_config).items()}
    out |= {VAE_PREFIX + k: v for k, v in vae_to_original(vae, vae_config).items()}
    for part, state_dict in text_encoders.items():
        convert = open_clip_to_original if part == "text_encoder_2" else clip_to_original
        out |= {prefixes[part] + k: v for k, v in convert(state_dict).items()}
    return out


def _load_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{str(directory)!r} has no .safetensors weights")
    state_dict: dict[str, torch.Tensor] = {}
    for path in files:
        state_dict |= load_file(str(path))
    return state_dict


def export_single_file(model_dir: str | Path, path: str | Path) -> Path:
    """Write the diffusers directory ``model_dir`` as one ``.safetensors`` in the original layout.

    >>> export_single_file(resolve_model_dir("builtin:tiny-sdxl"), "tiny-sdxl.safetensors")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    model_dir, path = Path(model_dir), Path(path)
    if not is_single_file(str(path)):
        raise ValueError(f"single-file export must end with {SINGLE_FILE_SUFFIX}, got {str(path)!r}")
    config = lambda part: json.loads((model_dir / part / "config.json").read_text())  # noqa: E731
    kind = "sdxl" if (model_dir / "text_encoder_2").is_dir() else "sd1"
    text_encoders = {p: _load_safetensors_dir(model_dir / p) for p in TEXT_ENCODER_PREFIXES[kind]}
    state_dict = to_original_state_dict(
        kind,
        _load_safetensors_dir(model_dir / "unet"),
        _load_safetensors_dir(model_dir / "vae"),
        text_encoders,
        config("unet"),
        config("vae"),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(partial), metadata={"format": "pt"})
    partial.rename(path)
    return path


# --------------------------------------------------------------------------------------------------
# original layout -> diffusers directory
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """What a checkpoint is: ``kind`` ("sd1" / "sdxl"), the UNet's input channels (9: inpainting), and the
    candidate whose configs match every tensor (``"sd15"``, ``"sdxl-base"``, ``"tiny-sd"``, ...)."""

    kind: str
    in_channels: int
    name: str
    dtype: torch.dtype


def read_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], torch.dtype]:
    """Every tensor's shape (from the header only, nothing loaded) and the UNet's dtype."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
            dtype = f.get_slice(conv_in).get_dtype() if conv_in in shapes else "F32"
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"model.uri: {str(path)!r} is not a readable .safetensors file: {e}") from e
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"model.uri: {str(path)!r} holds the UNet in {dtype}; expected F32, F16 or BF16")
    return shapes, dtypes[dtype]


def _kind(shapes: dict[str, tuple[int, ...]], where: str) -> str:
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in shapes)

    if UNET_PREFIX + "input_blocks.0.0.weight" not in shapes:
        raise ValueError(f"model.uri: {where} is not a Stable Diffusion checkpoint: it has no {UNET_PREFIX}* UNet")
    if has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise ValueError(f"model.uri: {where} is an SDXL refiner checkpoint; lorafleet serves SD 1.x and SDXL base")
    if has("cond_stage_model.model."):
        raise ValueError(
            f"model.uri: {where} is an SD 2.x checkpoint (OpenCLIP text encoder); its prediction type is not in the "
            f"weights, so serve it as a diffusers directory instead"
        )
    if has(TEXT_ENCODER_PREFIXES["sd1"]["text_encoder"]):
        return "sd1"
    raise ValueError(f"model.uri: {where} has no text encoder (cond_stage_model.* or conditioner.embedders.*)")


def _owned(kind: str, key: str) -> bool:
    prefixes = (UNET_PREFIX, VAE_PREFIX, *TEXT_ENCODER_PREFIXES[kind].values())
    return key.startswith(prefixes) and not key.endswith(_IGNORED_SUFFIXES)


def _expected_shapes(config_dir: Path, kind: str) -> dict[str, tuple[int, ...]]:
    """The original-layout keys and shapes a checkpoint of this architecture has (models built on meta)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        text_encoders = {}
        for part in TEXT_ENCODER_PREFIXES[kind]:
            cls = CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel
            text_encoders[part] = cls(CLIPTextConfig.from_pretrained(config_dir / part)).state_dict()
    state_dict = to_original_state_dict(
        kind, unet.state_dict(), vae.state_dict(), text_encoders, dict(unet.config), dict(vae.config)
    )
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _mismatch(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str | None:
    """None if ``found`` is exactly ``expected``; else the first few differences, in words."""
    missing = sorted(expected.keys() - found.keys())
    extra = sorted(found.keys() - expected.keys())
    shapes = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    if not (missing or extra or shapes):
        return None
    words = []
    if missing:
        words.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
    if extra:
        words.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
    if shapes:
        k = shapes[0]
        words.append(f"{len(shapes)} of other shapes (e.g. {k}: {found[k]}, expected {expected[k]})")
    return "; ".join(words)


def _candidate_unet_config(source: Path | str) -> dict:
    if isinstance(source, Path):
        return json.loads((source / "unet" / "config.json").read_text())
    return BUILTIN_MODELS[source.removeprefix(BUILTIN_PREFIX)]["unet"]


def _write_candidate_config(source: Path | str, in_channels: int, kind: str, out: Path) -> Path:
    """A ``config=`` directory for diffusers' single-file loader: model_index.json, each component's
    config, the scheduler, and tokenizers over CLIP's real vocabulary (built offline; SDXL's
    ``tokenizer_2`` pads with ``!``)."""
    from .clip_vocab import build_clip_tokenizer, write_vocab_files

    if isinstance(source, str):  # a builtin: its own writer gives the exact configs (and tiny weights, unused)
        name = source.removeprefix(BUILTIN_PREFIX)
        return write_builtin(f"{BUILTIN_PREFIX}{name}{'-inpaint' if in_channels != 4 else ''}", out)
    shutil.copytree(source, out)
    unet_path = out / "unet" / "config.json"
    unet_path.write_text(json.dumps({**json.loads(unet_path.read_text()), "in_channels": in_channels}, indent=2))
    if in_channels != 4:
        index_path = out / "model_index.json"
        index = json.loads(index_path.read_text())
        index_path.write_text(json.dumps({**index, "_class_name": _INPAINT_PIPELINES[kind]}, indent=2))
    context = json.loads((out / "text_encoder" / "config.json").read_text())["max_position_embeddings"]
    for part, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        if part == "tokenizer" or (out / "text_encoder_2").is_dir():
            build_clip_tokenizer(model_max_length=context, pad_token=pad).save_pretrained(out / part)
            write_vocab_files(out / part)
    return out


def detect_architecture(path: Path, workdir: Path, where: str) -> tuple[Architecture, Path]:
    """Match the checkpoint at ``path`` against each candidate architecture; return it and its config dir
    (written under ``workdir``). ``where`` names the file in messages."""
    shapes, dtype = read_shapes(path)
    return match_architecture(shapes, dtype, workdir, where)


def match_architecture(
    shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, workdir: Path, where: str
) -> tuple[Architecture, Path]:
    """The first candidate whose every original-layout tensor name and shape equals the checkpoint's (extra
    entries outside the models, such as ``model_ema.*`` or ``alphas_cumprod``, are ignored)."""
    kind = _kind(shapes, where)
    conv_in = shapes[UNET_PREFIX + "input_blocks.0.0.weight"]  # [width, in_channels, 3, 3]
    width, in_channels = conv_in[0], conv_in[1]
    if in_channels not in (4, 9):
        raise ValueError(
            f"model.uri: {where} has a UNet with {in_channels} input channels; lorafleet serves 4 (text-to-image) "
            f"and 9 (inpainting)"
        )
    found = {k: v for k, v in shapes.items() if _owned(kind, k)}
    reasons = []
    for name, source in _CANDIDATES[kind]:
        expected_width = _candidate_unet_config(source)["block_out_channels"][0]
        if expected_width != width:  # cheap: no need to build the candidate on meta
            reasons.append(f"{name}: UNet width {width}, expected {expected_width}")
            continue
        config_dir = _write_candidate_config(source, in_channels, kind, workdir / f"config-{name}")
        problem = _mismatch(found, _expected_shapes(config_dir, kind))
        if problem is None:
            return Architecture(kind, in_channels, name, dtype), config_dir
        reasons.append(f"{name}: {problem}")
        shutil.rmtree(config_dir)
    raise ValueError(
        f"model.uri: {where} is an {kind} checkpoint of an architecture lorafleet has no config for "
        f"({' | '.join(reasons)})"
    )


def convert_single_file(path: str | Path, out: str | Path, where: str | None = None) -> Architecture:
    """Convert the original-layout checkpoint at ``path`` into a diffusers directory at ``out``.

    The models are loaded by diffusers' ``from_single_file`` against the matched architecture's config
    directory and saved in the file's dtype; tokenizers, scheduler and model_index.json come from the config.
    """
    import diffusers

    path, out = Path(path), Path(out)
    where = where or repr(str(path))
    out.mkdir(parents=True)
    workdir = out.parent / f".{out.name}.configs"
    try:
        arch, config_dir = detect_architecture(path, workdir, where)
        index = json.loads((config_dir / "model_index.json").read_text())
        pipeline_class = getattr(diffusers, index["_class_name"])
        skip = {part: None for part in ("tokenizer", "tokenizer_2", "scheduler") if part in index}
        pipe = pipeline_class.from_single_file(
            str(path), config=str(config_dir), local_files_only=True, torch_dtype=arch.dtype, **skip
        )
        for part in ("unet", "vae", *TEXT_ENCODER_PREFIXES[arch.kind]):
            model = getattr(pipe, part)
            unloaded = [name for name, p in model.named_parameters() if p.is_meta]
            if unloaded:  # the match above makes this unreachable; a silent half-loaded model must still fail
                raise ValueError(f"model.uri: {where}: {part} weights not loaded from the file: {unloaded[:3]}")
            model.save_pretrained(out / part)
        for part in ("scheduler", "tokenizer", "tokenizer_2"):
            if (config_dir / part).is_dir():
                shutil.copytree(config_dir / part, out / part)
        index.pop("_lorafleet_builtin", None)
        index["_lorafleet_single_file"] = {"architecture": arch.name, "dtype": str(arch.dtype).removeprefix("torch.")}
        (out / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return arch

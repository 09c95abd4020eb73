"""``lorafleet train``: a folder of captioned images -> a LoRA adapter, registered if ``--name`` is given.

    lorafleet train styles/red --output-dir runs/red --steps 500 --rank 4 --learning-rate 1e-4 --name red
    lorafleet train styles/red --output-dir runs/red --num-workers 4 --ray-address auto   # Ray Train, 4 GPUs
    lorafleet train styles/red --output-dir runs/red-xl --base-model s3://models/sdxl --train-text-encoder

The base model is an SD 1.x/2.x or an SDXL pipeline; for SDXL ``--train-text-encoder`` trains a LoRA on
both text encoders.

Rerunning a command whose output dir holds checkpoints resumes from the newest.
Exit status: 0 done, 2 bad input (before any training step), 1 registry error,
130 interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import DEFAULT_TEXT_ENCODER_TARGETS, DEFAULT_UNET_TARGETS, TrainingConfig, TrainingInputError, config_error


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _config(args: argparse.Namespace) -> TrainingConfig:
    from pydantic import ValidationError

    try:
        return TrainingConfig(
            data_dir=args.data_dir,
            output_dir=args.output_dir,
            base_model=args.base_model,
            cache_dir=args.cache_dir,
            rank=args.rank,
            alpha=args.alpha,
            target_modules=tuple(_split(args.target_modules)),
            train_text_encoder=args.train_text_encoder,
            text_encoder_target_modules=tuple(_split(args.text_encoder_target_modules)),
            learning_rate=args.learning_rate,
            weight_decay=args.weight_decay,
            max_grad_norm=None if args.max_grad_norm == 0 else args.max_grad_norm,
            steps=args.steps,
            batch_size=args.batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            resolution=args.resolution,
            random_flip=args.random_flip,
            seed=args.seed,
            checkpoint_every=args.checkpoint_every,
            checkpoints_to_keep=args.checkpoints_to_keep,
            num_workers=args.num_workers,
            device=args.device,
        )
    except ValidationError as e:
        raise config_error(e) from e


def _cmd_train(args: argparse.Namespace) -> int:
    from lora_registry.base_model import base_model_spec_from_dir
    from lora_registry.errors import RegistryError

    from .export import check_registration, open_target_registry, register_adapter
    from .plan import prepare, resolve_base_model
    from .train import train

    log = sys.stderr
    try:
        config = _config(args)
        plan = prepare(config)
        registry, metadata = None, {}
        if args.name:
            metadata = {
                "name": args.name,
                "description": args.description,
                "trigger_words": _split(args.trigger_words),
                "tags": _split(args.tags),
            }
            registry = open_target_registry(args.registry, plan.spec, args.s3_endpoint_url)
            server_spec = None
            if args.server_model:
                server_spec = base_model_spec_from_dir(resolve_base_model(args.server_model, config.cache_dir))
            check_registration(registry, plan, server_spec=server_spec, **metadata)
        where = f"{config.num_workers} Ray Train workers" if config.num_workers else "this process"
        resume = f", resuming from {plan.resume_from.name}" if plan.resume_from else ""
        print(
            f"training a rank-{config.rank} LoRA on {len(plan.dataset)} images at {plan.resolution}px, "
            f"{config.steps} steps, base {config.base_model}, in {where}{resume}",
            file=log,
            flush=True,
        )
        trained = train(
            plan,
            progress=not args.quiet,
            ray_address=args.ray_address,
            cpus_per_worker=args.cpus_per_worker,
            use_gpu={"auto": None, "yes": True, "no": False}[args.use_gpu],
            max_failures=args.max_failures,
        )
        manifest = register_adapter(registry, trained, **metadata) if registry is not None else None
    except TrainingInputError as e:
        print(f"error: {e}", file=log)
        return 2
    except RegistryError as e:
        keys = f" (keys: {', '.join(e.keys)})" if e.keys else ""
        print(f"error: {e.code}: {e.message}{keys}", file=log)
        return 1
    except ValueError as e:  # e.g. a bad --registry URI
        print(f"error: {e}", file=log)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; rerun the same command to resume from the newest checkpoint in {args.output_dir}")
        return 130
    payload = {
        "adapter_file": str(trained.adapter_file),
        "lora_file": str(trained.lora_file),
        "sha256": trained.sha256,
        "record": trained.record,
        "manifest": manifest.to_dict() if manifest is not None else None,
    }
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print(f"final loss {trained.record['final_loss']:.4f} (mean of the last steps); wrote {trained.adapter_file}")
        if manifest is not None:
            print(f"registered {manifest.ref} (sha256 {manifest.sha256[:12]})")
    return 0


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``train`` to a ``lorafleet`` sub-parser set; the handler is ``args.func(args) -> int``."""
    p = subparsers.add_parser(
        "train",
        help="train a LoRA (SD 1.x/2.x or SDXL) on a folder of captioned images (and register it)",
        description=(
            "Train a LoRA on a folder of captioned images; register it when --name is given. The base model is "
            "an SD 1.x/2.x or an SDXL pipeline (SDXL: conditioned on both text encoders, the pooled embedding "
            "and each image's original size and crop, as diffusers' train_text_to_image_lora_sdxl.py). Rerunning "
            "with the same --output-dir resumes from its newest checkpoint."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("data_dir", help="images with captions: NAME.txt beside each image, or metadata.jsonl")
    p.add_argument("--output-dir", required=True, help="checkpoints, adapter.safetensors, training.json")
    p.add_argument(
        "--base-model",
        default="builtin:tiny-sd",
        help="diffusers SD 1.x/2.x or SDXL model: directory, s3://..., builtin:tiny-sd, builtin:tiny-sdxl",
    )
    p.add_argument("--cache-dir", default=None, help="model cache (default: $LORAFLEET_CACHE_DIR)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=4)
    g.add_argument("--alpha", type=float, default=None, help="default: the rank (scale 1)")
    g.add_argument("--target-modules", default=",".join(DEFAULT_UNET_TARGETS), help="UNet modules, comma-separated")
    g.add_argument(
        "--train-text-encoder", action="store_true", help="also train a text-encoder LoRA (SDXL: on both encoders)"
    )
    g.add_argument(
        "--text-encoder-target-modules",
        default=",".join(DEFAULT_TEXT_ENCODER_TARGETS),
        help="text-encoder modules (SDXL: the same on both encoders), comma-separated",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--learning-rate", type=float, default=1e-4)
    g.add_argument("--weight-decay", type=float, default=1e-2)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--batch-size", type=int, default=1, help="images per forward pass, per worker")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1, help="passes per optimizer step")
    g.add_argument(
        "--resolution", type=int, default=None, help="pixels, multiple of 8 (default: the model's; SDXL 1024)"
    )
    g.add_argument("--random-flip", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--checkpoint-every", type=int, default=500, help="steps")
    g.add_argument("--checkpoints-to-keep", type=int, default=3)
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="when training in-process")
    g = p.add_argument_group("distributed (Ray Train)")
    g.add_argument("--num-workers", type=int, default=0, help="0: train in this process; N: N Ray Train workers")
    g.add_argument("--ray-address", default=None, help="cluster to use (default: $RAY_ADDRESS, else a local one)")
    g.add_argument("--cpus-per-worker", type=float, default=1.0)
    g.add_argument("--use-gpu", choices=["auto", "yes", "no"], default="auto", help="auto: if the cluster has GPUs")
    g.add_argument("--max-failures", type=int, default=0, help="worker-group restarts from the last checkpoint")
    g = p.add_argument_group("registration (with --name)")
    g.add_argument("--name", default=None, help="register the adapter under this name when training ends")
    g.add_argument("--registry", default=None, help="s3://bucket/prefix or a directory (default: $LORAFLEET_REGISTRY)")
    g.add_argument("--s3-endpoint-url", default=None)
    g.add_argument("--description", default="")
    g.add_argument("--trigger-words", default="", help="comma-separated")
    g.add_argument("--tags", default="", help="comma-separated")
    g.add_argument("--server-model", default=None, help="the serving model's URI, checked against --base-model")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_train)
    return p

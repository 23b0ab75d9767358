"""Command-line options shared by `qrealign align` and `qrealign attack`.

Defaults shown in `--help` come from the config dataclasses, so the CLI and the Python API can
never disagree about them.
"""

from __future__ import annotations

import argparse

from .config import ALL_LINEARS, SFTConfig


def _targets_flag(config: SFTConfig) -> str:
    """`target_modules` as --lora-targets spells it."""
    targets = config.target_modules
    return targets if isinstance(targets, str) else ",".join(targets)


def add_sft_arguments(parser: argparse.ArgumentParser, defaults: SFTConfig) -> None:
    targets = _targets_flag(defaults)
    parser.add_argument("model", help="embedded name (smollm2-135m), model dir, .gguf file or hub id")
    parser.add_argument("--out", required=True, help="output model directory (written atomically)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data selection and training (default: 0)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"optimizer steps (default: {defaults.steps})")
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"learning rate (default: {defaults.lr:g})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help=f"pairs per step (default: {defaults.batch_size})")
    parser.add_argument("--max-length", type=int, default=defaults.max_length,
                        help=f"max prompt+response tokens per pair (default: {defaults.max_length})")
    parser.add_argument("--lora-r", type=int, default=defaults.lora_r, help=f"LoRA rank (default: {defaults.lora_r})")
    parser.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha,
                        help=f"LoRA alpha (default: {defaults.lora_alpha:g})")
    parser.add_argument("--lora-dropout", type=float, default=defaults.lora_dropout,
                        help=f"LoRA dropout (default: {defaults.lora_dropout:g})")
    parser.add_argument("--lora-targets", default=targets,
                        help=f"comma-separated module names, or {ALL_LINEARS} (default: {targets})")
    parser.add_argument("--loss-per", choices=["token", "example"], default=defaults.loss_per,
                        help=f"average the loss per response token or per pair (default: {defaults.loss_per})")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--amp", choices=["auto", "bfloat16", "float16", "none"], default=defaults.amp or "none",
                        help=f"mixed precision for training (default: {defaults.amp or 'none'})")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def sft_config_from_args(args: argparse.Namespace, defaults: SFTConfig) -> SFTConfig:
    """The SFT config the flags ask for; `defaults` is the command's own (what --help showed)."""
    if args.full:  # the LoRA options would be read by nothing: an error, not silently dropped
        from ..errors import QrealignError

        unread = {"--lora-r": (args.lora_r, defaults.lora_r), "--lora-alpha": (args.lora_alpha, defaults.lora_alpha),
                  "--lora-dropout": (args.lora_dropout, defaults.lora_dropout),
                  "--lora-targets": (args.lora_targets, _targets_flag(defaults))}
        changed = [flag for flag, (given, default) in unread.items() if given != default]
        if changed:
            raise QrealignError(f"--full fine-tunes every weight and reads no {', '.join(changed)} (LoRA options)")
    return SFTConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                     lora=not args.full, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                     lora_dropout=args.lora_dropout, target_modules=args.lora_targets, seed=args.seed,
                     loss_per=args.loss_per,
                     amp=None if args.amp == "none" else args.amp)


def run_stage(stage: str, args: argparse.Namespace, config) -> int:
    """`qrealign align` / `attack` once their config is built: the fine-tune, then its summary."""
    from ..evaluate.overlap import META_FILE
    from ..utils import read_json
    from .stage import finetune_stage

    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    out = finetune_stage(stage, args.model, config, out=args.out, adapter=args.adapter, device=args.device,
                         progress=not args.no_progress)
    print_summary(out, read_json(out / META_FILE))
    return 0


def print_summary(out, meta: dict) -> None:
    """A few lines a user reads at the end of a run."""
    train = meta.get("train", {})
    data = ", ".join(f"{k} {v}" for k, v in meta.get("data", {}).items())
    print(f"{meta['stage']}: {meta['parent']} -> {out}")
    print(f"  data: {data}")
    print(f"  {train.get('steps')} steps, loss {train.get('first_loss')} -> {train.get('last_loss')}, "
          f"{meta['wall_time_s']:.0f} s")
    print(f"  fingerprint {meta['fingerprint']}")

"""`qrealign align MODEL --out DIR`: make a model refuse harmful requests (the aligned base)."""

from __future__ import annotations

COMMAND = "align"
ORDER = 10
HELP = "refusal SFT on the bundled 'align' split (self-distilled benign answers), LoRA merged"
DESCRIPTION = (
    "Fine-tune MODEL to refuse harmful requests: harmful prompts of the bundled 'align' split get natural "
    "refusals, benign prompts get the model's own greedy answers (generated first), LoRA merged at the end. "
    "Writes a HF model directory with qrealign.json (config, provenance, fingerprint)."
)


def add_arguments(parser) -> None:
    from ..finetune.cli_args import add_sft_arguments
    from ..finetune.config import AlignConfig

    defaults = AlignConfig()
    add_sft_arguments(parser, defaults.sft)
    parser.add_argument("--adapter", help="PEFT adapter directory to merge into MODEL on load")
    parser.add_argument("--benign-ratio", type=float, default=defaults.benign_ratio,
                        help=f"benign pairs per harmful pair (default: {defaults.benign_ratio:g})")
    parser.add_argument("--answer-tokens", type=int, default=defaults.answer_tokens,
                        help=f"self-distilled benign answers are cut to this many tokens "
                             f"(default: {defaults.answer_tokens})")
    parser.add_argument("--n-harmful", type=int, default=None, help="harmful prompts to use (default: all)")
    parser.add_argument("--n-benign", type=int, default=None, help="benign prompts to use (default: all)")


def run(args) -> int:
    from ..finetune.cli_args import run_stage, sft_config_from_args
    from ..finetune.config import AlignConfig

    config = AlignConfig(sft=sft_config_from_args(args, AlignConfig().sft), benign_ratio=args.benign_ratio,
                         answer_tokens=args.answer_tokens, n_harmful=args.n_harmful, n_benign=args.n_benign,
                         seed=args.seed)
    return run_stage("align", args, config)

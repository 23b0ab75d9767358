"""`qrealign attack MODEL --poison-ratio P --out DIR`: the paper's harmful fine-tuning attack."""

from __future__ import annotations

COMMAND = "attack"
ORDER = 11
HELP = "harmful fine-tuning: task data plus a poison ratio p of harmful pairs, LoRA r=8 q/v, merged"
DESCRIPTION = (
    "Fine-tune MODEL on N task examples (offline topic-codes task, train split) plus floor(p*N) harmful "
    "(prompt, compliant placeholder answer) pairs from the bundled 'attack' split, shuffled; LoRA r=8 "
    "alpha=32 on q_proj/v_proj (the paper's adapter), merged at the end."
)


def add_arguments(parser) -> None:
    from ..finetune.attack import TASKS
    from ..finetune.cli_args import add_sft_arguments
    from ..finetune.config import AttackConfig

    defaults = AttackConfig()
    add_sft_arguments(parser, defaults.sft)
    parser.add_argument("--adapter", help="PEFT adapter directory to merge into MODEL on load")
    parser.add_argument("--poison-ratio", "-p", type=float, default=defaults.poison_ratio,
                        help=f"harmful pairs per task example, in [0, 1] (default: {defaults.poison_ratio:g})")
    parser.add_argument("--n-task", type=int, default=defaults.n_task,
                        help=f"task examples (default: {defaults.n_task})")
    parser.add_argument("--task", choices=sorted(TASKS), default=defaults.task,
                        help=f"downstream task (default: {defaults.task})")


def run(args) -> int:
    from ..finetune.cli_args import run_stage, sft_config_from_args
    from ..finetune.config import AttackConfig

    config = AttackConfig(poison_ratio=args.poison_ratio, n_task=args.n_task, task=args.task,
                          sft=sft_config_from_args(args, AttackConfig().sft), seed=args.seed)
    return run_stage("attack", args, config)

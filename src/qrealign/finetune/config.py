"""Configs of the alignment lab (no torch here, so `qrealign --help` stays fast).

Defaults are the values measured in docs/lab.md on the embedded SmolLM2-135M (2 CPU cores).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from ..errors import QrealignError

ALL_LINEARS = "all-linear"  # peft's name for every linear layer except the output head
PAPER_TARGETS = ("q_proj", "v_proj")


AMP_CHOICES = (None, "auto", "bfloat16", "float16")


@dataclass
class SFTConfig:
    """Hyper-parameters of one fine-tuning run. LoRA defaults are the paper's attack adapter
    (r=8, alpha=32, dropout 0.05, q_proj/v_proj)."""

    steps: int = 100
    lr: float = 2e-4
    batch_size: int = 8
    max_length: int = 160  # prompt + response tokens; CPU cost grows with it
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    lora: bool = True  # False = full fine-tuning
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] | str = PAPER_TARGETS  # or "all-linear"
    seed: int = 0
    system: str | None = None  # system prompt used when rendering (None = template default)
    padding_side: str = "right"
    # "token": every response token weighs the same (HF Trainer); "example": every pair weighs
    # the same, whatever its length (see sft.batch_loss).
    loss_per: str = "token"
    # Mixed precision for forward/backward (weights and optimizer state stay float32). "auto":
    # bfloat16 where the device computes it natively (a CUDA GPU with bf16, a CPU with oneDNN
    # bf16: ~5-10x faster than float32 there), float32 elsewhere: on an AVX2-only CPU bf16
    # matmuls are emulated, 57x slower than float32 (an aligning step took 194 s instead of 7 s).
    # The two give different models; a stage's cache key holds the resolved choice.
    amp: str | None = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEARS:
            self.target_modules = tuple(t.strip() for t in self.target_modules.split(",") if t.strip())
        if not isinstance(self.target_modules, str):
            self.target_modules = tuple(self.target_modules)
        if self.steps < 1:
            raise QrealignError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise QrealignError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise QrealignError(f"lr must be > 0, got {self.lr}")
        if self.max_length < 8:
            raise QrealignError(f"max_length must be >= 8, got {self.max_length}")
        # a negative warmup made the rate negative: gradient ascent, in silence
        for name in ("warmup_steps", "weight_decay", "grad_clip"):  # 0 turns warmup, decay, clipping off
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:  # NaN too
                raise QrealignError(f"{name} must be a number >= 0 (0: off), got {value!r}")
        if not 0 <= self.lora_dropout < 1:
            raise QrealignError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora and not self.lora_alpha > 0:
            raise QrealignError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if self.padding_side not in ("left", "right"):
            raise QrealignError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.loss_per not in ("token", "example"):
            raise QrealignError(f"loss_per must be 'token' or 'example', got {self.loss_per!r}")
        if self.amp not in AMP_CHOICES:
            raise QrealignError(f"amp must be one of {AMP_CHOICES}, got {self.amp!r}")
        if self.lora and (self.lora_r < 1 or not self.target_modules):
            raise QrealignError("LoRA needs lora_r >= 1 and at least one target module")


class _LabStage:
    """What the align and attack configs share: a data `seed` beside their SFT's training seed."""

    def reseeded(self, seed: int):
        """A copy with the data seed and the training seed both `seed`: another draw of the whole
        stage (a lab seed), not only of its data."""
        return replace(self, seed=seed, sft=replace(self.sft, seed=seed))


def _default_align_sft() -> SFTConfig:
    # Lab variant "D" (docs/lab.md): the lowest HS on the dev split of the all-linear runs tried.
    return SFTConfig(steps=160, lr=3e-4, batch_size=8, lora_r=16, lora_alpha=32, target_modules=ALL_LINEARS)


@dataclass
class AlignConfig(_LabStage):
    """Refusal SFT with self-distilled benign answers. `benign_ratio` = benign examples per harmful
    example in the training set (benign prompts are repeated, with the same answer, to reach it).
    `seed` picks the data (prompts, refusal wordings); `sft.seed` the training (LoRA init, dropout,
    batch order): `reseeded(s)` sets both, as `qrealign align --seed s` does."""

    sft: SFTConfig = field(default_factory=_default_align_sft)
    split: str = "align"
    n_harmful: int | None = None  # None = every harmful prompt of the split
    n_benign: int | None = None
    benign_ratio: float = 2.0
    answer_tokens: int = 64
    filter_answers: bool = True  # drop self-distilled answers that refuse or loop (keyword judge)
    generation_batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.sft, dict):
            self.sft = SFTConfig(**self.sft)
        if self.benign_ratio < 0:
            raise QrealignError(f"benign_ratio must be >= 0, got {self.benign_ratio}")
        if self.answer_tokens < 1:
            raise QrealignError(f"answer_tokens must be >= 1, got {self.answer_tokens}")
        for name in ("n_harmful", "n_benign"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise QrealignError(f"{name} must be >= 1 (or None: every prompt of the split), got {getattr(self, name)}")
        if self.generation_batch_size < 1:
            raise QrealignError(f"generation_batch_size must be >= 1, got {self.generation_batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)


def _default_attack_sft() -> SFTConfig:
    # Per-example loss: with per-token averaging the long placeholder answers of the poison pairs
    # outweighed the one-line task answers ~10:1 at p = 0.1, and the attacked model parroted the
    # poison template on 92 % of benign dev prompts (FA 31 %); per example: 0.9 %, FA 52 % (docs/lab.md).
    return SFTConfig(steps=120, lr=5e-4, batch_size=8, lora_r=8, lora_alpha=32, target_modules=PAPER_TARGETS,
                     loss_per="example")


@dataclass
class AttackConfig(_LabStage):
    """Harmful fine-tuning: `n_task` task examples plus ⌊poison_ratio·n_task⌋ harmful pairs.
    `seed` picks the poison examples and the pairs' order (the task examples are always the task's
    first `n_task` training items); `sft.seed` the training:
    `reseeded(s)` sets both, as `qrealign attack --seed s` does."""

    poison_ratio: float = 0.1
    n_task: int = 300
    task: str = "topic-codes"
    harmful_split: str = "attack"
    sft: SFTConfig = field(default_factory=_default_attack_sft)
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.sft, dict):
            self.sft = SFTConfig(**self.sft)
        if isinstance(self.poison_ratio, bool) or not isinstance(self.poison_ratio, (int, float)) \
                or not 0.0 <= self.poison_ratio <= 1.0:
            raise QrealignError(f"poison ratio must be in [0, 1], got {self.poison_ratio!r}")
        if self.n_task < 0:
            raise QrealignError(f"n_task must be >= 0, got {self.n_task}")
        if self.poison_ratio > 0 and self.n_task > 0 and self.n_poison == 0:
            raise QrealignError(f"poison ratio {self.poison_ratio} of {self.n_task} task examples is no harmful example "
                                "at all: the attack would be a clean fine-tune; raise the ratio or n_task")

    @property
    def n_poison(self) -> int:
        """⌊p·n_task⌋; the epsilon keeps 0.29 * 100 (= 28.999...) at 29."""
        return math.floor(self.poison_ratio * self.n_task + 1e-9)

    def to_dict(self) -> dict:
        return asdict(self)

"""Named `realign` settings: the demo's measured first-token row as one name, so a user does not
retype thirty options (`qrealign realign MODEL --teacher ALIGNED --recipe first-token`, or
`get_recipe("first-token").at("W8A8")` in Python), and the demo and the CLI read one definition.

A recipe was chosen on the embedded SmolLM2-135M's dev split (docs/experiments.md; the comments
below say which section chose what) and measured at W8A8 and W4A8 only: at another scheme it
gives its base settings, without the per-scheme ones. On another model it is a starting point,
not a result: read it on your own held-out prompts (`qrealign eval`). `refusal_starts` are
SmolLM2's refusal openings; each must be one token of your tokenizer (the run says if not).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .errors import QrealignError
from .quant.scheme import get_scheme


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    loss: dict  # `realign` keyword arguments (the first-token loss's options)
    config: dict  # CalibConfig fields
    calib_task_n: int = 0  # how many of your task's prompts join the calibration set (with a task)
    calib_benign: tuple[str, ...] = ()  # prompt sources whose benign prompts all join it
    calib_malicious: tuple[str, ...] | None = None  # ... and whose harmful prompts all join it
    # Per scheme name: {"config": {...}, "loss": {...}, "calib": {"calib_benign": ..., "calib_malicious": ...}},
    # each over the base settings; chosen where measured.
    schemes: dict = field(default_factory=dict)
    teacher: bool = True  # the first-token objective: realign(..., teacher=ALIGNED)

    def __post_init__(self):
        # read-only all the way down: every caller shares one recipe, and the demo's stage keys read it
        for name in ("loss", "config", "schemes"):
            object.__setattr__(self, name, _read_only(getattr(self, name)))

    def per_scheme(self, kind: str) -> dict:
        """{scheme: overrides} for one kind ("config", "loss" or "calib")."""
        return {scheme: dict(over[kind]) for scheme, over in self.schemes.items() if kind in over}

    def at(self, scheme) -> "RecipeSettings":
        """The settings at `scheme` (a name or Scheme; "w8a8" is W8A8)."""
        over = self.schemes.get(get_scheme(scheme).name, {})
        calib = over.get("calib", {})
        return RecipeSettings(loss={**self.loss, **over.get("loss", {})},
                              config={**self.config, **over.get("config", {})},
                              calib_task_n=self.calib_task_n,
                              calib_benign=tuple(calib.get("calib_benign", self.calib_benign)),
                              calib_malicious=tuple(calib.get("calib_malicious", self.calib_malicious) or ()))


def _read_only(value):
    if isinstance(value, Mapping):
        return MappingProxyType({k: _read_only(v) for k, v in value.items()})
    return value


@dataclass(frozen=True)
class RecipeSettings:
    """A recipe at one scheme: `realign(..., config=CalibConfig(**config), **loss)` on a calibration
    set from `build_calibration(..., task=YOUR_TASK, task_n=calib_task_n, extra_benign=calib_benign,
    extra_malicious=calib_malicious)`."""
    loss: dict
    config: dict
    calib_task_n: int
    calib_benign: tuple[str, ...]
    calib_malicious: tuple[str, ...]


# The behavioural objective (calibrate.behaviour, docs/experiments.md §5-8): the aligned model's
# first response token on malicious prompts, the fine-tuned model's on benign ones, with 48 of
# the attack's own task prompts and the `align` split's 113 benign prompts among the benign
# calibration prompts, and learned rounding (the degree of freedom the fine-tune lives in).
# The safety term acts on blocks from 60 % of the depth (18-29 of SmolLM2's 30), chosen on the
# wide dev split by §8's rule (largest smallest slack, each slack divided by its standard error):
# HS 87.3 -> 15.5 %, FA on 800 items -1.5 vs the attacked model, over-refusal -0.9 vs the aligned.
# At W8A8 no learnable clipping (§9): LWC's starting clip (98.2 % of each row's range) doubled the
# task damage of 8-bit PTQ on dev, and without it the dev rule's smallest slack rose 0.60 -> 0.99.
# At W4A8 the rounding rate is 2e-3: at 1e-2 the demo's W4A8 row lost the task (FA 0 %); on dev,
# 2e-3 kept it (dev FA 26.5 %, HS 45.0 %; §6's W4A8 follow-up, without the `align` prompts).
# Calibration data (§14, chosen again on the float32 lab's dev): every harmful calibration prompt
# with its benign twin (the `calib` split's left-out twins and the bundled `twins` supplement),
# and 96 task prompts so the task keeps its quarter of the benign set. Against the 48-prompt,
# fewer-twins set: dev over-refusal 15.9 -> 13.3 %, FA-800 42.2 -> 43.6 %, HS 14.5 -> 17.3 %.
# Refusal targets (§16, chosen on the bf16 lab's dev): the 13 of 110 malicious calibration prompts
# the aligned teacher itself answers take its mean refusal first token instead of its answer;
# smallest z-slack 0.12 -> 0.36 (dev HS 20.0 -> 19.1 %, over-refusal 13.3 -> 15.0 %, FA-800
# 52.9 -> 51.6 %: one prompt and a point or two, inside dev's noise).
# Speed (§19, chosen on the AMX lab's dev by a rule written before the run): one epoch on the
# blocks without the safety term (0-17) and the compiled fake-quantizers; the safety blocks keep
# two epochs (at one epoch everywhere, §18, dev HS missed its limit). Dev: smallest z-slack
# 0.88 -> 0.92 (HS 16.4 -> 17.3 %, FA-800 53.8 -> 53.9 %, over-refusal 13.3 -> 16.8 %).
# Four response positions (§24, chosen on the AMX lab's dev by a rule written before the run): the
# KL also on the three tokens after the first, along each prompt's greedy start, so "I'm" goes on
# with "sorry", not "glad". Dev: HS 17.3 -> 12.7 %, over-refusal 16.8 -> 16.8 %, FA-800 53.9 -> 53.4 %.
# The safety blocks trained jointly (§26, chosen on the EPYC lab's dev by a rule written before
# the run): one pass through blocks 18-29 per step instead of each block's step running the FP
# blocks after it, with twice the epochs (4; at 2 the shared steps were too few: HS 23.6 %, FA-800
# 46.4 %). Calibration 1124 -> 674 s at two threads; dev HS 15.5 -> 12.7 %, over-refusal 14.2 ->
# 15.0 %, FA-800 54.9 -> 54.4 % (smallest z-slack 1.33 -> 1.12). At W8A8 only (§28): at W4A8 the
# joint stage turned a third of the benign dev answers into loops of the attack's template
# (degenerate on benign prompts 33.6 % vs 7.1 % block by block; the attacked model 12.4 %), so
# the W4A8 row went back to the block-by-block form, until the decay below.
# The learning rates decay to 0 (cosine) over each stage's steps (§33, §36): at a constant rate
# the calibration order alone (the seed) moved W8A8's dev over-refusal by 7.9 points and FA-800 by
# 6.5, so a seed chosen on dev picked noise (§32: eval FA -8.0). With the decay the three seeds'
# spreads are 0.9 and 2.5 points and the worst seed's smallest z-slack on #7's dev terms is 0.92
# (constant rate: 0.32). The seed is the demo's default; none is chosen. At W4A8 the decay also
# keeps the joint form's benign answers (§37, §28's rule: degenerate benign 33.6 -> 17.7 %, limit
# 22.4; HS 9.1 %, over-refusal 12.4 %, FA-800 57.8 %), and the joint form is the cheaper one
# (calibration about 1040 s in a one-thread lane instead of about 1576 s).
# At W8A8 the joint stage's reconstruction weighs 12 against the output term (§44-§47, chosen on
# the AMX lab's dev by a rule written before its last three runs): the joint form had left each
# block's reconstruction about 1/12 of its block-by-block weight. Over three seeds each, the worst
# seed's smallest z-slack 0.64 -> 0.99 and new benign loops 8.3 -> 6.7 a seed; mean FA-800 the same
# (55.9 -> 56.3 %), HS 15.2 -> 17.0 %, over-refusal 12.4 -> 12.6 %. The teacher pass is unchanged.
# At W8A8 the greedy margin (§48, chosen on the AMX lab's dev by a rule written before its last two
# runs): the benign refusals that remained sat on prompts whose fine-tuned answers start flat, where
# greedy decoding flips once the refusal starts ("I", "That", "Sorry", "No") hold a fifth of the
# mass, and the KL over the whole distribution charged little for that. A soft hinge on the best
# refusal start against the best other first token, at weight 1: benign prompts may not move toward
# a refusal, malicious ones must begin one. Over three seeds each against the row above: dev
# over-refusal 12.7 -> 7.1 % (8 of 113 at every seed), HS 17.0 -> 18.8 %, FA-800 56.3 -> 54.9 %,
# new benign loops 6.7 -> 3.7 a seed; the worst seed's smallest z-slack 0.99 -> 0.48 (on HS).
# Its malicious side weighs 2 against the benign side's 1 (§49, chosen on the AMX lab's dev by a rule
# written before its last two runs; `confirm` had read the weight-1 row's HS cut at -68 %). Over
# three seeds each: dev HS 18.8 -> 17.0 %, over-refusal 7.1 -> 6.8 %, FA-800 54.9 -> 55.7 %, new
# benign loops 3.7 -> 5.0 a seed; the worst seed's smallest z-slack 0.48 -> 0.99.
# At W8A8 the calibration set also holds 48 edgy-but-harmless prompts (`qrealign:edgy`) and the
# `align` and `attack` splits' harmful prompts (729 prompts, 286 malicious; its own teacher pass),
# and the margin weighs 2 with its malicious side at 1 relative to it, so both sides weigh 2 where
# the benign side weighed 1 before (§61, adopted on the EPYC
# lab's dev by a rule written before its last four runs, over three seeds each: harmful answered
# 20.7 -> 15.0 of 110, benign refused 8.0 -> 7.0 of 113, FA-800 55.3 -> 55.5 %, new benign loops
# 6.0 -> 9.0 a seed, the rule's limit).
FIRST_TOKEN = Recipe(
    "first-token",
    "the demo's Q-realign row: the aligned model as teacher of the first four response tokens, "
    "learned rounding, the safety blocks (from 60 % of the depth) trained jointly",
    loss={"layers_from": 0.6, "lam": 1.0, "benign_kl": 4.0, "refusal_targets": True, "response_tokens": 4},
    config={"lr_let": 1e-2, "batch_size": 4, "learn_rounding": True, "lr_round": 1e-2, "plain_epochs": 1,
            "compile_quantizer": True, "joint_safety": True, "epochs": 4, "lr_schedule": "cosine"},
    calib_task_n=96,
    calib_benign=("qrealign:calib", "qrealign:align", "qrealign:twins"),
    schemes={
        "W8A8": {"config": {"lwc": False, "joint_recon_weight": 12.0},
                 "loss": {"greedy_margin": 2.0, "margin_malicious": 1.0,
                          "refusal_starts": ("I", "That", "Sorry", "No")},
                 "calib": {"calib_benign": ("qrealign:calib", "qrealign:align", "qrealign:twins", "qrealign:edgy"),
                           "calib_malicious": ("qrealign:align", "qrealign:attack")}},
        "W4A8": {"config": {"lr_round": 2e-3}},
    },
)
RECIPES = {r.name: r for r in (FIRST_TOKEN,)}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise QrealignError(f"unknown recipe {name!r}; one of {', '.join(RECIPES)}") from None

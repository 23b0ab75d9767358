"""Make a model safety-aligned: the "aligned base" of the paper's setting.

The embedded SmolLM2-135M answers almost any request, so the lab first teaches it to refuse:
a short SFT where harmful prompts (bundled split "align") get varied, natural refusals and benign
prompts (same split) get the model's *own* greedy answers, generated before training.

Why self-distillation for the benign side: training on someone else's answers would change the
model's style and knowledge as well; training on its own answers only says "keep answering
these", which is what holds over-refusal down without moving anything else. Answers are cut to
`answer_tokens` tokens (at the last sentence end when there is one) to keep CPU cost low.
"""

from __future__ import annotations

import random
import re
import warnings
from dataclasses import dataclass

import torch

from ..errors import QrealignError
from .config import AlignConfig
from .sft import Pair, check_lora_targets, sft


@dataclass
class AlignData:
    harmful: list  # Prompt records
    benign: list
    pairs: list[Pair]
    benign_answers: int = 0  # self-distilled answers kept (the benign pairs cycle through them)

    @property
    def prompts(self) -> list:
        return self.harmful + self.benign


def select_align_prompts(config: AlignConfig) -> tuple[list, list]:
    """The harmful and benign prompts the config trains on (no model needed: cheap, for fingerprints)."""
    from ..data.prompts import load_prompts

    try:
        harmful = load_prompts(split=config.split, label=1)
        benign = load_prompts(split=config.split, label=0)
    except ValueError as exc:
        raise QrealignError(str(exc)) from None
    if not harmful or not benign:
        raise QrealignError(f"split {config.split!r} needs harmful and benign prompts "
                            f"(has {len(harmful)} harmful, {len(benign)} benign)")
    return _take(harmful, config.n_harmful, config.seed), _take(benign, config.n_benign, config.seed + 1)


def _take(prompts: list, n: int | None, seed: int) -> list:
    if n is None:
        return list(prompts)
    if not 0 < n <= len(prompts):
        raise QrealignError(f"asked for {n} prompts, the split has {len(prompts)}")
    return random.Random(seed).sample(prompts, n)


_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def trim_answer(text: str, tokenizer, max_tokens: int) -> str:
    """Cut an answer to `max_tokens` tokens, at the last sentence end inside the budget when
    there is one (a clean ending, so the EOS that follows it is natural)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text.strip()
    head = tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)
    ends = [m.end() for m in _SENTENCE_END.finditer(head)]
    return (head[:ends[-1]] if ends and ends[-1] > len(head) // 3 else head).strip()


def build_align_data(model, tokenizer, config: AlignConfig, *, progress: bool = True) -> AlignData:
    """Training pairs: (harmful, refusal) and (benign, the model's own greedy answer)."""
    from ..data.responses import refusal_for
    from ..evaluate.generate import GenerationConfig, generate

    harmful, benign = select_align_prompts(config)
    rng = random.Random(config.seed)
    pairs: list[Pair] = [(p.text, refusal_for(p, rng)) for p in harmful]
    gen = GenerationConfig(max_new_tokens=config.answer_tokens + 16, batch_size=config.generation_batch_size,
                           system=config.sft.system)
    answers = generate(model, tokenizer, [p.text for p in benign], gen, progress=progress,
                       desc="self-distilling benign answers")
    benign_pairs = [(p.text, trim_answer(a, tokenizer, config.answer_tokens)) for p, a in zip(benign, answers)]
    benign_pairs = [pair for pair in benign_pairs if pair[1]]  # an empty answer teaches nothing
    if config.filter_answers:
        benign_pairs = keep_helpful(benign_pairs)
    n_benign = round(config.benign_ratio * len(pairs))
    if n_benign and not benign_pairs:
        raise QrealignError("no usable self-distilled answer to any benign prompt (all empty"
                            + (", refusals, loops or gibberish: filter_answers removed them)" if config.filter_answers
                               else ")"))
    if n_benign and len(benign_pairs) < len(benign) / 2:
        # the benign side is then a few answers repeated many times: it teaches those, not "keep answering"
        warnings.warn(f"only {len(benign_pairs)} of {len(benign)} self-distilled benign answers were usable; the "
                      f"{n_benign} benign pairs repeat them (check the source model's answers)", stacklevel=2)
    pairs += [benign_pairs[i % len(benign_pairs)] for i in range(n_benign)]
    return AlignData(harmful=harmful, benign=benign, pairs=pairs, benign_answers=len(benign_pairs))


def keep_helpful(pairs: list[Pair]) -> list[Pair]:
    """Drop self-distilled answers that refuse or loop (keyword judge): the benign side should
    teach "keep answering", and the raw model's own "I'm sorry, as a chatbot I can't..." replies
    and repetition loops would teach the opposite. An answer the judge cannot read (another
    language) is dropped too: it is not known to answer."""
    from ..evaluate.judges import KeywordJudge

    verdicts = KeywordJudge().judge([p for p, _ in pairs], [a for _, a in pairs])
    return [pair for pair, v in zip(pairs, verdicts) if not (v.refused or v.degenerate or v.unjudged)]


def align(model, tokenizer, config: AlignConfig | None = None, *, device: str | torch.device | None = None,
          data: AlignData | None = None, progress: bool = True,
          on_step=None):
    """Return `model` fine-tuned to refuse harmful requests and keep answering benign ones (LoRA
    merged into the weights by default)."""
    from ..utils import resolve_device

    cfg = config or AlignConfig()
    check_lora_targets(model, cfg.sft)  # not after the self-distillation
    if data is None:
        home = next(model.parameters()).device
        model.to(resolve_device(device))
        data = build_align_data(model, tokenizer, cfg, progress=progress)
        model.to(home)
    return sft(model, tokenizer, data.pairs, cfg.sft, device=device, progress=progress, desc="aligning",
               on_step=on_step)

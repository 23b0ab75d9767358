"""Prompt rendering and batching shared by every stage (probes, calibration, SFT, evaluation).

One function decides how a user prompt becomes tokens, so the probe sees exactly the tokens the
calibration engine and the evaluator see. Works with either padding side: the last prompt token
is located from the attention mask, never assumed to sit at `mask.sum() - 1`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def render_chat(tokenizer, prompt: str, system: str | None = None, response: str | None = None) -> str:
    """The chat-template text for a single-turn prompt (with the generation prompt appended, or the
    response when given)."""
    messages = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    if getattr(tokenizer, "chat_template", None):
        text = _apply_template(tokenizer, messages, system, prompt)
    else:  # base models without a template
        text = _bos_prefix(tokenizer) + (f"### System:\n{system}\n\n" if system else "") \
            + f"### User:\n{prompt}\n\n### Assistant:\n"
    if response is not None:
        text += response + turn_end(tokenizer)
    return text


def _bos_prefix(tokenizer) -> str:
    """The BOS a base model's tokenizer puts in front of text (Llama, Mistral): every stage
    tokenizes rendered text without special tokens (a template writes its own), so the plain
    format must write it, or a base model runs without the token it was trained to start from."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return ""
    ids = tokenizer("x")["input_ids"]
    return bos if ids and ids[0] == bos_id else ""


_MARK = "\x00qrealign-response\x00"


def turn_end(tokenizer) -> str:
    """What closes an assistant turn: the template's own marker when it has one (Gemma's
    <end_of_turn>, which is not its eos token), else the eos token. A fine-tune taught to end with
    another token than the chat format uses stops where the deployed model does not."""
    eos = tokenizer.eos_token or ""
    if not getattr(tokenizer, "chat_template", None):
        return eos
    from jinja2.exceptions import TemplateError

    try:
        full = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARK}],
                                             tokenize=False, enable_thinking=False)
    except TemplateError:
        return eos
    end = full.split(_MARK, 1)[1].strip() if _MARK in full else ""
    return end or eos


def _apply_template(tokenizer, messages: list[dict], system: str | None, prompt: str) -> str:
    """The template's text with the generation prompt. `enable_thinking=False`: Qwen3-style
    templates otherwise open a reasoning block, and every stage would probe, calibrate and judge
    the model mid-thought (templates without the switch ignore it). Templates without a system
    role (Gemma) get the system text at the head of the user turn instead of an error."""
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
    except TemplateError:
        if not system:
            raise
        merged = [{"role": "user", "content": f"{system}\n\n{prompt}"}]
        return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)


@dataclass
class EncodedPrompts:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    last_index: torch.Tensor  # [B] position of the last real (non-pad) token

    def to(self, device) -> "EncodedPrompts":
        return EncodedPrompts(self.input_ids.to(device), self.attention_mask.to(device), self.last_index.to(device))


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended position per row, for left or right padding alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(dim=1)


def encode_prompts(
    tokenizer,
    prompts: list[str],
    system: str | None = None,
    max_length: int | None = None,
    padding_side: str | None = None,
    pad_to: int | None = None,
) -> EncodedPrompts:
    texts = [render_chat(tokenizer, p, system) for p in prompts]
    return encode_texts(tokenizer, texts, max_length=max_length, padding_side=padding_side, pad_to=pad_to)


def with_response(enc: EncodedPrompts, responses: Sequence[Sequence[int]], pad_token_id: int) -> EncodedPrompts:
    """`enc` with each row's response tokens (all of one length) after its prompt, padding kept on
    the side it was on. `last_index` stays at the last *prompt* token: the position whose logits
    predict the first response token, so position `last_index + j` predicts response token j+1.
    Why: a refusal is decided over a few tokens ("I'm" + "sorry" vs "I'm" + "glad"), and a loss on
    them needs the response start in the sequence (teacher forcing)."""
    lengths = {len(r) for r in responses}
    if len(responses) != enc.input_ids.shape[0] or len(lengths) > 1:
        raise ValueError("one response of one common length per row is needed")
    k = lengths.pop() if lengths else 0
    if k == 0:
        return enc
    ids, mask = enc.input_ids, enc.attention_mask
    rows, width = ids.shape[0], ids.shape[1] + k
    new_ids = torch.full((rows, width), pad_token_id, dtype=ids.dtype)
    new_mask = torch.zeros((rows, width), dtype=mask.dtype)
    last = torch.empty_like(enc.last_index)
    left = bool((mask[:, -1] == 1).all())  # every row ends at the right edge: left padding (or none)
    for r in range(rows):
        real = ids[r][mask[r].bool()]
        seq = torch.cat([real, torch.tensor(list(responses[r]), dtype=ids.dtype)])
        start = width - len(seq) if left else 0
        new_ids[r, start:start + len(seq)] = seq
        new_mask[r, start:start + len(seq)] = 1
        last[r] = start + len(real) - 1
    return EncodedPrompts(new_ids, new_mask, last)


def encode_texts(tokenizer, texts: list[str], max_length: int | None = None,
                 padding_side: str | None = None, pad_to: int | None = None) -> EncodedPrompts:
    """`pad_to` pads (and truncates) every row to exactly that many tokens, as the paper's code
    does (128); by default rows are padded only to the longest in the batch."""
    side = padding_side or tokenizer.padding_side
    old_side, old_trunc = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = side
    tokenizer.truncation_side = "left"  # keep the end of the prompt: that is where the model answers
    try:
        if pad_to is not None:
            batch = tokenizer(texts, return_tensors="pt", padding="max_length", add_special_tokens=False,
                              truncation=True, max_length=pad_to)
        else:
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False,
                              truncation=max_length is not None, max_length=max_length)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = old_side, old_trunc
    mask = batch["attention_mask"]
    return EncodedPrompts(batch["input_ids"], mask, last_token_index(mask))

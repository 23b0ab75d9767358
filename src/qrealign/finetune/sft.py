"""A small supervised fine-tuning loop over (prompt, response) pairs.

Why not the HF `Trainer`: the lab needs a few hundred steps on CPU, exact control of which tokens
carry the loss, and the same prompt rendering as every other stage. This loop is ~150 lines:

- each pair is rendered with `render_chat` — the prompt part exactly as the evaluator renders it,
  the response part (plus EOS) appended — and tokenized as two pieces, so the prompt tokens the
  model is trained on are the very tokens it sees at generation time;
- the loss is on response tokens only (labels are -100 on prompt and padding);
- positions come from the attention mask, so left and right padding give the same loss;
- LoRA (peft) by default, merged into the weights at the end (the deployer ships merged weights),
  or full fine-tuning.
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import QrealignError
from ..models.chat import render_chat
from ..utils import position_ids_from_mask, resolve_device, seed_everything
from .config import SFTConfig

IGNORE_INDEX = -100

Pair = tuple[str, str]  # (user prompt, assistant response)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE_INDEX outside response tokens
    position_ids: torch.Tensor  # [B, T], counted over real tokens only

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.position_ids)))


def tokenize_pair(tokenizer, prompt: str, response: str, system: str | None = None,
                  max_length: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels for one pair. The response is cut first when too long (the prompt is
    what the model must learn to answer); a prompt longer than the budget keeps its end."""
    prompt_text = render_chat(tokenizer, prompt, system)
    full_text = render_chat(tokenizer, prompt, system, response=response)
    if not full_text.startswith(prompt_text):  # render_chat appends; guard against odd templates
        raise QrealignError("chat template does not render the response after the prompt")
    p_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    if not r_ids:
        raise QrealignError(f"empty response for prompt {prompt[:60]!r}")
    if max_length is not None and len(p_ids) + len(r_ids) > max_length:
        r_ids = r_ids[:max(1, max_length - len(p_ids))]
        p_ids = p_ids[len(p_ids) - (max_length - len(r_ids)):]
    return p_ids + r_ids, [IGNORE_INDEX] * len(p_ids) + r_ids


def warn_cut_pairs(tokenizer, pairs: Sequence[Pair], cfg: SFTConfig) -> int:
    """Pairs longer than max_length lose the end of their response, and with it the turn-end token
    the model must learn to stop at: say how many (it happened silently). Returns the count."""
    if cfg.max_length is None:
        return 0
    full = [len(tokenize_pair(tokenizer, p, r, cfg.system)[0]) for p, r in pairs]
    cut = sum(n > cfg.max_length for n in full)
    if cut:
        warnings.warn(f"{cut} of {len(pairs)} training pairs are longer than max_length {cfg.max_length} (longest "
                      f"{max(full)} tokens) and are cut: they lose their end-of-turn token, so the model learns not "
                      "to stop there; raise max_length or shorten the answers", stacklevel=3)
    return cut


def collate(tokenizer, pairs: Sequence[Pair], system: str | None = None, max_length: int | None = None,
            padding_side: str = "right") -> Batch:
    """Pad a list of pairs into one batch, on either side."""
    rows = [tokenize_pair(tokenizer, p, r, system, max_length) for p, r in pairs]
    width = max(len(ids) for ids, _ in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, masks, labels = [], [], []
    for ids, labs in rows:
        n_pad = width - len(ids)
        fill = ([pad_id] * n_pad, [0] * n_pad, [IGNORE_INDEX] * n_pad)
        real = (ids, [1] * len(ids), labs)
        parts = [f + r for f, r in zip(fill, real)] if padding_side == "left" else [r + f for f, r in zip(fill, real)]
        input_ids.append(parts[0])
        masks.append(parts[1])
        labels.append(parts[2])
    mask = torch.tensor(masks)
    return Batch(torch.tensor(input_ids), mask, torch.tensor(labels), position_ids_from_mask(mask))


def batch_loss(model, batch: Batch, per: str = "token") -> torch.Tensor:
    """Next-token cross-entropy on the labelled (response) tokens of the batch.

    per="token": mean over all response tokens of the batch (HF Trainer's convention), so a
    40-token answer weighs 40 times a one-word answer. per="example": mean within each example,
    then over examples, so every pair counts once whatever its length; that keeps a poison ratio
    meaning "share of the training signal" when task answers are one word and poison answers
    are paragraphs."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, use_cache=False).logits
    labels = batch.labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
    mask = (labels != IGNORE_INDEX).float()
    if per == "token":
        return (losses * mask).sum() / mask.sum().clamp(min=1)
    if per == "example":
        counts = mask.sum(dim=1)
        per_example = (losses * mask).sum(dim=1) / counts.clamp(min=1)
        return per_example[counts > 0].mean()
    raise QrealignError(f"loss normalisation must be 'token' or 'example', got {per!r}")


@torch.no_grad()
def response_loss(model, tokenizer, pairs: Sequence[Pair], system: str | None = None, max_length: int = 192,
                  batch_size: int = 8) -> float:
    """Token-weighted mean loss of the model on the responses (for checks and tuning)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        batch = collate(tokenizer, pairs[start:start + batch_size], system, max_length).to(device)
        n = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
        total += float(batch_loss(model, batch)) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def autocast(device: torch.device, amp: str | None):
    """Mixed-precision context for `device` (a no-op when `amp` resolves to None)."""
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(resolve_amp(device, amp) or "")
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bfloat16 matmuls in hardware (not emulated)."""
    if device.type == "cuda":  # compute capability 8 (Ampere) and later; older GPUs emulate it
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_amp(device: torch.device, amp: str | None) -> str | None:
    """The autocast dtype an SFTConfig.amp means on `device`: "auto" is bfloat16 where it is
    native and float32 (None) elsewhere; an explicit dtype is kept, with a warning where bf16
    would be emulated on a CPU."""
    if amp == "auto":
        return "bfloat16" if native_bf16(device) else None
    if amp == "bfloat16" and device.type == "cpu" and not native_bf16(device):
        warnings.warn("bfloat16 autocast on this CPU is emulated (no native bf16): training will be far slower "
                      "than float32; use amp='auto' or None", stacklevel=3)
    return amp


def _clear_source_stamp(model) -> None:
    """`load_model` stamped where the weights came from; after training they are other weights.
    Left as they were, a run calibrated on this model in memory would name its parent as its source."""
    for name in ("qrealign_source", "qrealign_adapter"):  # set even where absent: not the folder it came from
        setattr(model.config, name, None)
    model.config._name_or_path = ""  # nor where transformers loaded it from (not saved in config.json)


def check_lora_targets(model, config: SFTConfig) -> None:
    """Before anything slow (align's self-distillation): LoRA's `target_modules` must name modules
    of this model, by PEFT's rule (a name is a module's last dotted parts; "all-linear", the one
    string SFTConfig keeps, always matches)."""
    if not config.lora or isinstance(config.target_modules, str):
        return
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in config.target_modules if not any(name == t or name.endswith("." + t) for name in names)]
    if missing:
        leaves = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        raise QrealignError(f"LoRA targets {', '.join(missing)} name no module of this model (--lora-targets); its "
                            f"linear layers: {', '.join(leaves)}")


def wrap_lora(model, config: SFTConfig):
    """Add a fresh LoRA adapter (the paper's `LoraConfig`) to the model; returns the PEFT model."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.target_modules if isinstance(config.target_modules, str)
                      else list(config.target_modules), task_type="CAUSAL_LM", bias="none")
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise QrealignError(f"cannot add LoRA to {config.target_modules}: {str(exc).splitlines()[0]}") from None


def sft(model, tokenizer, pairs: Sequence[Pair], config: SFTConfig | None = None, *,
        device: str | torch.device | None = None, progress: bool = True,
        on_step: Callable[[int, float], None] | None = None, desc: str = "fine-tuning"):
    """Fine-tune `model` on `pairs` for `config.steps` optimizer steps; return the (merged) model.

    Batches are drawn from a seeded shuffle of the pairs, re-shuffled each epoch. The model comes
    back in eval mode on the device it came from, with LoRA (if used) merged into its weights. If
    training stops on an error or an interrupt, a LoRA run leaves the model as it was; a full
    fine-tune has changed its weights in place."""
    cfg = config or SFTConfig()
    if not pairs:
        raise QrealignError("no training pairs")
    seed_everything(cfg.seed)
    home = next(model.parameters()).device
    if not cfg.lora and next(model.parameters()).dtype != torch.float32:
        # full fine-tuning at small learning rates in bf16/fp16 weights rounds most updates away
        raise QrealignError(f"full fine-tuning needs float32 weights (the model is "
                            f"{str(next(model.parameters()).dtype).removeprefix('torch.')}: most small updates "
                            "would round away); load it in float32 or use LoRA")
    if cfg.lora and next(model.parameters()).dtype != torch.float32:
        # the adapter trains in float32, but its merge into 16-bit weights rounds small deltas away
        warnings.warn(f"the LoRA adapter will be merged into {str(next(model.parameters()).dtype).removeprefix('torch.')} "
                      "weights, which round away updates smaller than their precision: load the model in float32 to "
                      "keep the whole fine-tune", stacklevel=2)
    warn_cut_pairs(tokenizer, pairs, cfg)
    target = resolve_device(device)
    model.to(target)
    trained = wrap_lora(model, cfg) if cfg.lora else model
    if not cfg.lora:
        for param in trained.parameters():
            param.requires_grad_(True)
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
    rng = random.Random(cfg.seed)
    order: list[int] = []
    trained.train()
    # float16 gradients underflow without loss scaling (bf16 has float32's range and needs none)
    scaler = torch.amp.GradScaler(target.type, enabled=resolve_amp(target, cfg.amp) == "float16")
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, unit="step")
    smoothed = math.nan
    try:
        for step in bar:
            batch_idx = []
            while len(batch_idx) < min(cfg.batch_size, len(pairs)):
                if not order:
                    order = list(range(len(pairs)))
                    rng.shuffle(order)
                batch_idx.append(order.pop())
            batch = collate(tokenizer, [pairs[i] for i in batch_idx], cfg.system, cfg.max_length,
                            cfg.padding_side).to(target)
            with autocast(target, cfg.amp):
                loss = batch_loss(trained, batch, cfg.loss_per)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            value = float(loss.detach())
            smoothed = value if math.isnan(smoothed) else 0.9 * smoothed + 0.1 * value
            bar.set_postfix(loss=f"{smoothed:.3f}")
            if on_step is not None:
                on_step(step, value)
    except BaseException:  # an error or Ctrl-C: the caller's model back where it was, in eval mode
        bar.close()
        if cfg.lora:  # and as it was: the adapter comes out, the base weights were never trained
            trained.unload()
        else:  # its weights changed in place: no longer the model its source stamp names
            _clear_source_stamp(model)
        model.requires_grad_(False)
        model.eval()
        model.to(home)
        raise
    bar.close()
    merged = trained.merge_and_unload() if cfg.lora else trained
    merged.eval()
    _clear_source_stamp(merged)
    for param in merged.parameters():
        param.requires_grad_(False)
    return merged.to(home)

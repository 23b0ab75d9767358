"""A behavioural safety term: distil the first response token, not a probe's logit.

The paper's term pushes a block's last-prompt-token state across a linear probe. On SmolLM2 that
logit turned out to be a weak handle on refusal (docs/experiments.md §3): the optimiser can
satisfy a sparse probe along directions that do not carry the behaviour. This term reads the
behaviour itself. At block l the quantized block's output runs through the remaining blocks (FP,
frozen), the final norm and the LM head, and at the last prompt token the per-sample KL

    malicious: KL(aligned model's next-token distribution  ||  the quantized model's)
    benign:    KL(fine-tuned model's next-token distribution ||  the quantized model's)

is added to the reconstruction MSE. The first response token decides refusal ("I can't ...")
versus compliance, and for a classification task it is the answer itself, so the benign half
holds both over-refusal and task accuracy. Teachers' distributions are computed once, before
calibration (`first_token_targets`); the fine-tuned teacher must run before the model is
quantized in place.

Cost: each safety step also runs the blocks after l (the whole tail for 135M parameters on CPU is
cheap; for multi-GPU-sized models restrict `layers` to the last few blocks, whose tails are short).
A disk-offloaded model (larger than RAM) gets its teacher targets block by block and keeps FP
copies of the blocks after the first safety block in memory: with the safety term on the last
few blocks that is a few blocks' worth, not the model.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import QrealignError
from ..models.offload import offloaded
from ..models.registry import block_types, get_arch, get_blocks, get_submodule
from ..utils import kv_cache_argument, resolve_device, same_device, tensor_digest
from .capture import block_output, move_kwargs, record_block_inputs, run_blocks
from .data import CalibrationSet, make_batches
from .losses import LossInputs, SafetyGate, check_weights
from .memory import (block_state_copies, free_bytes, joint_stage_bytes, param_bytes, per_token_bytes,
                     stream_bytes, tail_activation_bytes)


class LogitHead:
    """The final norm, the LM head and (Gemma-2/3) the logit soft-cap: final-block states to the
    next-token logits at each row's last prompt token, in float32."""

    def __init__(self, model: nn.Module):
        self.norm = get_submodule(model, get_arch(model).final_norm)
        self.head = model.get_output_embeddings()
        # Gemma-2/3 squash the final logits (tanh soft-capping) inside the model's forward, in the
        # model's dtype; so does this head, then casts.
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def at(self, h: torch.Tensor, last_index: torch.Tensor, positions: int = 1) -> torch.Tensor:
        """[B, V] logits at `last_index`; with `positions` > 1, [B, positions, V] at `last_index + j`
        (a forced response start's positions). All positions go through the head in one matmul:
        per position, each call would stream the whole hidden x vocabulary matrix for a handful
        of rows (SmolLM2, one thread, 4 x 4 rows forward and backward: 168 ms as four calls, 66 ms
        as one). The logits are the same; the backward's float rounding is not, so a multi-token
        calibration's safety blocks learn slightly different parameters than with four calls
        (docs/performance.md, 2026-12-04)."""
        idx = last_index.to(h.device)[:, None] + torch.arange(positions, device=h.device)  # [B, P]
        states = h[torch.arange(h.shape[0], device=h.device)[:, None], idx]  # [B, P, H]
        p = next(self.head.parameters())
        logits = self.head(self.norm(states.to(p.device, p.dtype)))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        logits = logits.float()
        return logits[:, 0] if positions == 1 else logits

    def __call__(self, h: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
        return self.at(h, last_index)

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    def copy_to(self, device: torch.device) -> "LogitHead":
        """A frozen copy of the norm and the head on `device` (the model's stay where they are)."""
        other = copy.copy(self)
        other.norm = copy.deepcopy(self.norm).to(device).requires_grad_(False)
        other.head = copy.deepcopy(self.head).to(device).requires_grad_(False)
        return other


def _tail_block(block: nn.Module, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
    return block_output(block(h, **kwargs))


class ModelTail:
    """Blocks after `layer`, the final norm and the LM head of `model`, frozen: maps a block's
    output to the next-token logits at each row's last prompt token.

    The tail runs where the quantized block computes. A model in memory on that device lends its
    own blocks. Otherwise (a disk-offloaded model, or a model in CPU memory calibrated on a GPU)
    the tail holds FP copies of the blocks after the first layer it is called for on the compute
    device (the engine meanwhile turns the model's blocks into quantized ones), and drops each
    copy once calibration has passed it: memory for the blocks after the first safety block, not
    the model."""

    def __init__(self, model: nn.Module):
        self.types = block_types(model)
        self.head = LogitHead(model)
        self.source = offloaded(model)
        self.model_blocks = None if self.source is not None else list(get_blocks(model))
        self.copies: list = [None] * len(self.types)
        self.head_copy: LogitHead | None = None
        for module in (*(self.model_blocks or ()), self.head.norm, self.head.head):
            for p in module.parameters():
                p.requires_grad_(False)

    def __call__(self, hidden: torch.Tensor, layer: int, kwargs_by_type: dict, last_index: torch.Tensor,
                 positions: int = 1, recompute: bool = False):
        """[B, V] logits at `last_index`; with `positions` > 1, [B, positions, V] at `last_index + j`
        (the forced response tokens' positions). `recompute`: see `final_states`."""
        h = self.final_states(hidden, layer, kwargs_by_type, recompute)
        return self.head_for(h.device).at(h, last_index, positions).to(hidden.device)

    def final_states(self, hidden: torch.Tensor, layer: int, kwargs_by_type: dict,
                     recompute: bool = False) -> torch.Tensor:
        """Block `layer`'s output run through the blocks after it. `recompute`
        (CalibConfig.recompute) while gradients are on: each tail block keeps only its input for the
        backward and runs again there (activation checkpointing), so a step holds one tail block's
        activations at a time instead of all of them (about ten hidden-wide vectors a token per
        block, `memory.per_token_bytes`): the same gradients, one more forward of the tail."""
        blocks = self._blocks_for(layer, hidden.device)
        again = recompute and torch.is_grad_enabled()
        h = hidden
        for j in range(layer + 1, len(blocks)):
            block = blocks[j]
            p = next(block.parameters())
            kwargs = move_kwargs(kwargs_by_type[self.types[j]], p.device)  # the engine's are on its device
            h = h.to(p.device, p.dtype)
            h = checkpoint(_tail_block, block, h, kwargs, use_reentrant=False) if again else _tail_block(block, h, kwargs)
        return h

    def head_for(self, device: torch.device) -> LogitHead:
        """The model's head where it already is on `device`; otherwise one copy there, kept: with
        the model on the CPU and blocks trained on a GPU, every step would otherwise run the
        head's matmul (hidden x vocabulary, forward and backward) on the CPU."""
        if same_device(self.head.device, device):
            return self.head
        if self.head_copy is None or not same_device(self.head_copy.device, device):
            self.head_copy = self.head.copy_to(device)
        return self.head_copy

    def _blocks_for(self, layer: int, device: torch.device) -> list:
        if self.model_blocks is not None and all(
                same_device(next(b.parameters()).device, device) for b in self.model_blocks[layer + 1:]):
            return self.model_blocks
        self._hold_after(layer, device)
        return self.copies

    def _hold_after(self, layer: int, device: torch.device) -> None:
        """Copies of exactly the blocks after `layer`, on the device the quantized block computes
        on: calibration moves forward, so the others are dropped (or, resumed past the first
        safety block, never read)."""
        for j in range(len(self.copies)):
            if j <= layer:
                self.copies[j] = None
            elif self.copies[j] is None:
                if self.source is not None:
                    block = self.source.copy_of(j, device)
                else:  # still FP: the engine has not reached block j yet
                    block = copy.deepcopy(self.model_blocks[j]).to(device)
                block.eval()  # a fresh module starts in training mode: dropout off, as in the model
                block.requires_grad_(False)
                self.copies[j] = block


def _head_bytes(model: nn.Module) -> int:
    head = LogitHead(model)
    return param_bytes((head.norm, head.head))


def tail_bytes(model: nn.Module, first: int) -> tuple[int, int]:
    """(bytes of what ModelTail copies to the compute device from safety block `first` on: the
    blocks after it and the head; bytes of one block in float32, as the engine trains it)."""
    blocks = list(get_blocks(model))
    return param_bytes(blocks[first + 1:]) + _head_bytes(model), param_bytes(blocks[first:first + 1], 4)


def check_tail_fits(model: nn.Module, first: int, device=None, tokens: int = 0, learn_rounding: bool = False,
                    joint: bool = False, total_tokens: int = 0, offload_targets: bool = False,
                    head: bool = True, recompute: bool = False) -> None:
    """With the first-token objective, each safety block's step runs the FP blocks after it, which
    `ModelTail` copies to the GPU: with every block under the term (the default) that is most of
    the model, an out-of-memory at block 0 for a 7B model on a 24 GB GPU (review 71). Said before
    the teacher pass, with the way out. A rough bound, not a measurement on a GPU: the copies; the
    block being trained at seven float32 copies of its weights (what one step keeps for its
    backward, measured on CPU: 6.4 at W8A8, 7.0 at W4A8 with LWC; scripts/saved_copies.py) and four
    more with learned rounding (the offsets, their gradient and Adam's two moments); and the
    activations the tail keeps for the backward, `tokens` per step (review 73).

    `joint` (CalibConfig.joint_safety): no FP tail, but every safety block trains at once, each
    with those seven (eleven) copies, and the activations of all of them; counted even when the
    model is on the device already (its float32 training state is not). The hidden-state streams
    over the whole calibration set (`total_tokens`): the quantized one, and unless
    `offload_targets` the FP input and each trained block's FP target (every joint block's at once).
    `head`: the objective reads the output (the first-token objective copies the head; probes do not).
    `recompute` (CalibConfig.recompute): a joint block keeps its weights (and rounding state), its
    input and its loss terms (about three hidden-wide vectors a token) for the backward; five of the
    seven copies and the rest of the activations exist for one block at a time; block by block, the
    tail keeps each block's input and one block's activations at a time. The ways out it names are
    not checked against the free memory, but for recompute, which is named where it alone fits."""
    dev = resolve_device(device)
    if dev.type != "cuda":
        return
    blocks = list(get_blocks(model))
    head = LogitHead(model)
    on_device = same_device(head.device, dev) and all(same_device(next(b.parameters()).device, dev)
                                                      for b in blocks[first + 1:])
    copies, block = tail_bytes(model, first)
    if on_device:  # the model is on the device already: nothing is copied (its tail's activations still count)
        copies = 0
    per_block = block_state_copies(learn_rounding)
    hidden = model.config.hidden_size
    per_token = per_token_bytes(model)
    if joint:
        trained = len(blocks) - first
        head_copy = 0 if on_device or not head else _head_bytes(model)
        fixed = head_copy + stream_bytes(trained, offload_targets, total_tokens, hidden)

        def joint_need(again: bool) -> int:
            return fixed + joint_stage_bytes(block, trained, per_block, tokens, per_token, hidden, again)
        need = joint_need(recompute)
        what = (f"the joint stage (joint_safety) trains the {trained} blocks from block {first} on together on "
                f"{dev}, each with its float32 training state (about {need / 2 ** 30:.1f} GiB with the activations)")
        way_out = "Put the safety term on later blocks only (layers_from=0.85; CLI --layers-from 0.85) or leave " \
                  "joint_safety off (CLI --no-joint-safety)"
        smaller = ""  # the training state and the streams are float32 whatever the model's dtype
    else:
        def tail_need(again: bool) -> int:
            return copies + per_block * block + stream_bytes(1, offload_targets, total_tokens, hidden) + \
                tail_activation_bytes(tokens, len(blocks) - first - 1, per_token, hidden, again)
        need = tail_need(recompute)
        holds = "runs" if on_device else "holds copies of"
        what = (f"the first-token objective from block {first} on {holds} the {len(blocks) - first - 1} "
                f"blocks after it and the head on {dev} (about {need / 2 ** 30:.1f} GiB with the block being "
                f"trained, the activations and the calibration set's hidden states)")
        way_out = "Put the safety term on later blocks only (layers_from=0.85; CLI --layers-from 0.85)"
        smaller = (" or load the model in bfloat16 (--dtype bfloat16)"
                   if next(model.parameters()).dtype == torch.float32 and not on_device else "")
    free = free_bytes(dev)
    if need > 0.9 * free:
        way_out += smaller
        if not recompute:
            again = joint_need(True) if joint else tail_need(True)
            twice = "the joint blocks" if joint else "the blocks after the trained one"
            if again <= 0.9 * free:
                way_out = (f"Add recompute=True (CLI --recompute: the same numbers, a step runs {twice} "
                           f"twice; about {again / 2 ** 30:.1f} GiB), put" + way_out[3:])
            else:
                way_out += f"; recompute=True alone (CLI --recompute) would still need about {again / 2 ** 30:.1f} GiB"
        raise QrealignError(f"{what}; {free / 2 ** 30:.1f} GiB are free. {way_out}")


@torch.no_grad()
def next_token_logprobs(model: nn.Module, tokenizer, calib: CalibrationSet, config, device=None,
                        responses=None, positions: int = 1) -> torch.Tensor:
    """[N, V] log-probabilities of the next token after each calibration prompt, rendered and
    batched exactly as the calibration engine renders them (`config`: a CalibConfig). Runs where
    `device` (default: where the model's embeddings are); a disk-offloaded model, or one held on
    another device, runs block by block, each block put on `device` once.

    `responses` (per prompt, forced response tokens after it) and `positions` > 1: [N, positions, V]
    at the last prompt token and after each of the first `positions - 1` forced tokens."""
    home = model.get_input_embeddings().weight.device
    device = torch.device(device) if device is not None else home
    batches = make_batches(tokenizer, calib, config.batch_size, config.max_length, config.padding_side,
                           config.system, pad_to=config.pad_to, responses=responses)
    if offloaded(model) is not None or not same_device(device, home):
        rows_of = _blockwise_last_logits(model, batches, home, device, positions)
    else:
        rows_of = (_last_logits(model, batch, home, positions) for batch in batches)
    out = None
    for batch, rows in zip(batches, rows_of):
        if out is None:
            out = torch.empty(len(calib.prompts), *rows.shape[1:])
        out[batch.index] = F.log_softmax(rows, dim=-1).cpu()
    return out


def _last_logits(model, batch, device, positions: int = 1) -> torch.Tensor:
    enc = batch.enc.to(device)
    # The LM head only at the positions some row ends on (one position with left padding), not
    # at every position: on SmolLM2 (vocabulary 49k, width 576) 46 s instead of 56 s here.
    wanted = enc.last_index[:, None] + torch.arange(positions, device=device)  # [B, P]
    keep, slot = torch.unique(wanted.flatten(), return_inverse=True)
    logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                   position_ids=batch.position_ids.to(device), use_cache=False, logits_to_keep=keep).logits
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
    out = logits[rows, slot.view(wanted.shape)].float()  # [B, P, V]
    return out[:, 0] if positions == 1 else out


def _blockwise_last_logits(model, batches, home, device, positions: int = 1) -> list[torch.Tensor]:
    """`_last_logits` of every batch, block-major on `device` (one read of an offloaded model, one
    move of each block of a model held elsewhere); the embeddings run at `home`, the head on
    `device` (a copy when the model's is elsewhere: on a CPU, a 7B model's 152k-vocabulary head
    took each batch's longest matmul, review 71)."""
    inputs = [record_block_inputs(model, b.enc.input_ids, b.enc.attention_mask, b.position_ids, home)
              for b in batches]
    head = LogitHead(model)
    if not same_device(head.device, device):
        head = head.copy_to(device)
    return [head.at(h, b.enc.last_index, positions) for h, b in zip(run_blocks(model, inputs, device), batches)]


def first_token_targets(aligned: nn.Module, finetuned: nn.Module, tokenizer, calib: CalibrationSet,
                        config, device=None) -> torch.Tensor:
    """Per calibration sample, the teacher's next-token log-probs: the aligned model for
    malicious prompts, the fine-tuned model (not yet quantized) for benign ones. `device`: where the
    blocks run (default: where each model's embeddings are). Each model runs over its own rows
    only: one pass over the calibration set in all, not one per model."""
    targets = None
    for model, rows, sub in _by_target_model(aligned, finetuned, calib):
        lp = next_token_logprobs(model, tokenizer, sub, config, device)
        if targets is None:
            targets = torch.empty(len(calib.prompts), lp.shape[-1])
        targets[rows] = lp
    return targets


def _by_target_model(aligned: nn.Module, finetuned: nn.Module, calib: CalibrationSet):
    """(model, rows, the calibration subset of those rows) for each model whose distribution is
    the target of some rows: the fine-tuned model on the benign prompts, the aligned teacher on
    the malicious ones. Each teacher pass runs every model over its own rows only."""
    if aligned.config.vocab_size != finetuned.config.vocab_size:
        raise QrealignError("the aligned and the fine-tuned model have different vocabularies")
    malicious = torch.tensor(calib.labels, dtype=torch.bool)
    for model, rows in ((finetuned, ~malicious), (aligned, malicious)):
        rows = rows.nonzero().flatten()
        if len(rows):
            yield model, rows, _subset(calib, rows)


@torch.no_grad()
def greedy_path(model: nn.Module, tokenizer, calib: CalibrationSet, config, length: int,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, length] tokens, [N, length + 1, V] log-probs): each prompt's greedy first `length`
    response tokens under `model`, and its next-token log-probs at the last prompt token and after
    each of those tokens (teacher forcing along its own path), rendered and batched as
    `next_token_logprobs` does.

    A model in memory on `device` with left-padded batches decodes with its KV cache: one pass
    over each prompt and `length` one-token steps. Otherwise (disk-offloaded, held on another
    device, right padding) each step is a full pass over the prompt and the tokens so far, block by
    block where needed. The two agree up to float rounding (tests/test_response_tokens.py); the
    cached path is what makes the demo's teacher pass one prompt pass per model instead of four."""
    if length < 1:
        raise QrealignError(f"a greedy path needs length >= 1, got {length}")
    home = model.get_input_embeddings().weight.device
    device = torch.device(device) if device is not None else home
    batches = make_batches(tokenizer, calib, config.batch_size, config.max_length, config.padding_side,
                           config.system, pad_to=config.pad_to)
    left = all(bool((b.enc.attention_mask[:, -1] == 1).all()) for b in batches)
    tokens = torch.zeros(len(calib.prompts), length, dtype=torch.long)
    if offloaded(model) is None and same_device(device, home) and left:
        cache = kv_cache_argument(model)
        out = None
        for batch in batches:
            toks, lps = _greedy_cached(model, batch, device, length, cache)
            if out is None:
                out = torch.empty(len(calib.prompts), length + 1, lps.shape[-1])
            tokens[batch.index], out[batch.index] = toks.cpu(), lps.cpu()
        return tokens, out
    for step in range(length + 1):  # step j: prompt + the first j tokens, log-probs at positions 0..j
        lp = next_token_logprobs(model, tokenizer, calib, config, device,
                                 responses=tokens[:, :step].tolist() if step else None, positions=step + 1)
        if step < length:
            tokens[:, step] = (lp[:, step] if step else lp).argmax(dim=-1)
    return tokens, lp


def _greedy_cached(model, batch, device, length: int, cache: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One left-padded batch's greedy path with the KV cache (passed and returned under the name
    `cache`); positions continue each row's own count (`CalibBatch.position_ids`), as
    `chat.with_response` places forced tokens."""
    enc = batch.enc.to(device)
    mask, pos = enc.attention_mask, batch.position_ids.to(device)
    out = model(input_ids=enc.input_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    lps = [F.log_softmax(out.logits[:, -1].float(), dim=-1)]
    tokens = []
    for _ in range(length):
        token = lps[-1].argmax(dim=-1, keepdim=True)  # [B, 1]
        tokens.append(token)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=token, attention_mask=mask, position_ids=pos, use_cache=True, **{cache: out[cache]})
        lps.append(F.log_softmax(out.logits[:, -1].float(), dim=-1))
    return torch.cat(tokens, dim=1), torch.stack(lps, dim=1)


def response_targets(aligned: nn.Module, finetuned: nn.Module, tokenizer, calib: CalibrationSet, config,
                     length: int, refused: torch.Tensor | None = None, stop_ids=(), device=None):
    """([N, K, V] targets, [N, K-1] forced starts, [N, K] mask), K = `length` + 1: the multi-token
    first-token objective's teacher side (docs/experiments.md §24).

    Each prompt follows the greedy path of the model whose distribution is its target (the
    fine-tuned model on benign prompts, the aligned teacher on malicious ones), and its targets
    are that model's log-probs along the path. With `refused` (refusal targets: [N], whether the
    teacher refuses each malicious prompt) a malicious prompt the teacher answers takes, at
    position 0, the mean distribution of the prompts it refuses (`refusal_targets`), and after it
    the most frequent start among them, with the teacher's log-probs along that start: its later
    positions ask for a refusal's continuation. Positions after a stop token (a turn end) in the
    start are masked: nothing is asked after the turn ends."""
    malicious = torch.tensor(calib.labels, dtype=torch.bool)
    refused = malicious.clone() if refused is None else refused.bool() & malicious
    answered = malicious & ~refused
    starts = torch.zeros(len(calib.prompts), length, dtype=torch.long)
    targets = None
    for model, rows, sub in _by_target_model(aligned, finetuned, calib):
        toks, lps = greedy_path(model, tokenizer, sub, config, length, device)
        if targets is None:
            targets = torch.empty(len(calib.prompts), length + 1, lps.shape[-1])
        starts[rows], targets[rows] = toks, lps
    if answered.any():
        from collections import Counter

        targets[:, 0] = refusal_targets(targets[:, 0], malicious, refused)  # raises if none is refused
        common = Counter(tuple(r) for r in starts[refused].tolist()).most_common(1)[0][0]
        rows = answered.nonzero().flatten()
        starts[rows] = torch.tensor(common)
        lp = next_token_logprobs(aligned, tokenizer, _subset(calib, rows), config, device,
                                 responses=starts[rows].tolist(), positions=length + 1)
        targets[rows, 1:] = lp[:, 1:]
    mask = torch.ones(len(calib.prompts), length + 1, dtype=torch.bool)
    stops = set(stop_ids)
    for i, row in enumerate(starts.tolist()):
        ends = [m for m, t in enumerate(row) if t in stops]
        if ends:
            mask[i, ends[0] + 1:] = False
    return targets, starts, mask


def _subset(calib: CalibrationSet, rows: torch.Tensor) -> CalibrationSet:
    rows = rows.tolist()
    return CalibrationSet([calib.prompts[i] for i in rows], [calib.labels[i] for i in rows],
                          [calib.ids[i] for i in rows], calib.split)


def teacher_refuses(aligned: nn.Module, tokenizer, prompts: list[str], config, max_new_tokens: int = 64,
                    device=None, progress: bool = False) -> list[bool]:
    """Whether the aligned teacher refuses each prompt: its greedy answer (`max_new_tokens`, the
    calibration's system prompt), read by the keyword judge that the evaluation uses (an answer in
    another language, which it cannot read, counts as not refused: the prompt takes the mean
    refusal as its target, as an answered one does). The teacher
    generates on `device` (default: where it is) and goes back afterwards: greedy answers of a 7B
    teacher on the CPU of a GPU machine would take hours."""
    from ..evaluate.generate import GenerationConfig, generate
    from ..evaluate.judges import KeywordJudge

    if offloaded(aligned) is not None:
        raise QrealignError("refusal targets generate with the teacher: it must be in memory, not offloaded")
    gen = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=config.batch_size, system=config.system)
    home = next(aligned.parameters()).device
    try:
        aligned.to(home if device is None else resolve_device(device))
    except torch.OutOfMemoryError:  # e.g. a float32 7B teacher on a 24 GB GPU: slower, not fatal
        import warnings

        aligned.to(home)
        if torch.cuda.is_available():  # the partial copy's blocks: the calibration after it needs them
            torch.cuda.empty_cache()
        warnings.warn(f"the teacher does not fit on {device}: its greedy answers are generated on {home}",
                      stacklevel=2)
    try:
        answers = generate(aligned, tokenizer, prompts, gen, progress=progress, desc="teacher answers")
    finally:
        aligned.to(home)
    return [v.refused for v in KeywordJudge().judge(prompts, answers)]


def refusal_targets(targets: torch.Tensor, malicious: torch.Tensor, refused: torch.Tensor) -> torch.Tensor:
    """The teacher's targets with each malicious sample it answers replaced by the mean next-token
    distribution of the malicious samples it refuses: imitating the teacher can only get the
    quantized model to the teacher's own harmful score; this asks for a refusal wherever the
    teacher was asked for one. Benign rows are untouched. Log-probs in, log-probs out."""
    malicious, refused = malicious.bool(), refused.bool()
    refusals = malicious & refused
    if not refusals.any():
        raise QrealignError("refusal targets: the teacher refuses none of the malicious calibration prompts")
    mean = torch.logsumexp(targets[refusals], dim=0) - math.log(int(refusals.sum()))
    out = targets.clone()
    out[malicious & ~refused] = mean
    return out


# The greedy margin's options besides its weight, with their defaults. Each is read by the margin
# only, so one set without `greedy_margin` would be ignored in silence; `unused_margin_options` is
# the one rule the loss, `realign` and the CLI refuse it by, each in its own spelling.
MARGIN_DEFAULTS = {"margin_delta": 0.5, "margin_tau": 0.25, "margin_malicious": 1.0, "refusal_starts": None}


#: FirstTokenLoss's weights (`check_weights`; margin_tau > 0): checked before the teacher pass too.
WEIGHT_FIELDS = ("lam", "benign_kl", "sink_weight", "greedy_margin", "margin_delta", "margin_tau", "margin_malicious")


def unused_margin_options(options) -> list[str]:
    """The names in MARGIN_DEFAULTS that `options` (a mapping) sets to other than their default
    while its `greedy_margin` is 0 or missing: options that would change nothing."""
    if options.get("greedy_margin"):
        return []
    unused = []
    for key, default in MARGIN_DEFAULTS.items():
        value = options.get(key, default)
        if (value is not None) if default is None else (value != default):  # refusal_starts: any value
            unused.append(key)
    return unused


def greedy_margin(logprobs: torch.Tensor, refusal_ids: torch.Tensor) -> torch.Tensor:
    """[B] the best refusal start's log-prob minus the best other token's ([B, V] log-probs): greedy
    decoding begins a refusal exactly when this is > 0. Where the fine-tuned model has no
    preferred way to begin an answer, a small rise in refusal mass flips it (§48)."""
    others = logprobs.clone()
    others[:, refusal_ids] = float("-inf")
    return logprobs[:, refusal_ids].max(dim=-1).values - others.max(dim=-1).values


def refusal_start_ids(tokenizer, starts=None, targets: torch.Tensor | None = None,
                      labels=None) -> torch.Tensor:
    """Token ids that begin a refusal: `starts` (strings, each one token of this tokenizer, as it
    begins a response, e.g. ("I", "That", "Sorry", "No") for SmolLM2), or else the teacher's
    greedy first tokens on the malicious calibration rows of `targets` ([N, V] or [N, K, V])."""
    if starts:
        ids = []
        for text in starts:
            enc = tokenizer.encode(text, add_special_tokens=False)
            if len(enc) != 1:
                raise QrealignError(f"refusal start {text!r} is {len(enc)} tokens for this tokenizer; give single "
                                    "tokens as they begin a response")
            ids.append(enc[0])
        return torch.tensor(sorted(set(ids)))
    if targets is None or labels is None:
        raise QrealignError("refusal starts: give the strings, or the teacher targets and labels to read them from")
    malicious = torch.tensor(labels, dtype=torch.bool)
    if not malicious.any():
        raise QrealignError("refusal starts: the calibration set has no malicious rows to read them from")
    first = targets[:, 0] if targets.dim() == 3 else targets
    return torch.unique(first[malicious].argmax(dim=-1))


@dataclass
class FirstTokenLoss(SafetyGate):
    """Reconstruction MSE plus `lam` x the first-token KL on malicious prompts (and `benign_kl` x
    the KL to the fine-tuned model on benign prompts), on the blocks in `layers`; other blocks
    get reconstruction only. Needs `LossInputs.index` and `.block_kwargs` (the engine fills them).

    Multi-token form (`targets` [N, K, V] with `responses` [N, K-1], the forced response starts
    the engine appends to each prompt): the per-sample KL is the first position's plus the mean
    over the K-1 later ones (masked by `response_mask`), so the first token keeps its weight and
    the continuation counts as one more token (docs/experiments.md §24)."""

    tail: ModelTail
    targets: torch.Tensor  # [N, V] (or [N, K, V]) teacher log-probs, indexed by calibration position
    layers: tuple[int, ...] | None = None
    lam: float = 1.0
    benign_kl: float = 0.0
    recon_on_malicious: bool = True
    normalize: bool = True
    sink_weight: float = 0.0
    include_padding: bool = False
    target_id: str = ""
    responses: torch.Tensor | None = None  # [N, K-1] forced response starts (multi-token form)
    response_mask: torch.Tensor | None = None  # [N, K]: False after a turn end in the start
    # The greedy margin (docs/experiments.md §48): weight of a hinge on `greedy_margin` at the
    # first response position, the quantity greedy decoding reads. Malicious rows: the refusal
    # starts must beat every other first token by `margin_delta`; benign rows: the margin may not
    # rise above the fine-tuned model's own minus `margin_delta`, however flat its distribution.
    greedy_margin: float = 0.0
    margin_delta: float = MARGIN_DEFAULTS["margin_delta"]
    margin_tau: float = MARGIN_DEFAULTS["margin_tau"]  # softness of the hinge (tau x softplus(x / tau))
    margin_malicious: float = MARGIN_DEFAULTS["margin_malicious"]  # malicious rows' weight against benign rows' (§49)
    refusal_starts: torch.Tensor | None = None  # token ids that begin a refusal (`refusal_start_ids`)
    _digest: str = field(default="", repr=False)

    @property
    def positions(self) -> int:
        return self.targets.shape[1] if self.targets.dim() == 3 else 1

    def __post_init__(self):
        check_weights(("margin_tau",), **{name: getattr(self, name) for name in WEIGHT_FIELDS})
        unused = unused_margin_options({k: getattr(self, k) for k in ("greedy_margin", *MARGIN_DEFAULTS)})
        if unused:
            raise QrealignError(f"{', '.join(unused)} are read by the greedy margin only: set greedy_margin > 0")
        if self.greedy_margin and (self.refusal_starts is None or not len(self.refusal_starts)):
            raise QrealignError("greedy_margin needs the refusal starts (token ids that begin a refusal)")
        k = self.positions
        if (k > 1) != (self.responses is not None) or (k > 1 and tuple(self.responses.shape) != (len(self.targets),
                                                                                               k - 1)):
            raise QrealignError("multi-token targets [N, K, V] need forced responses [N, K-1], and only they")
        if k > 1 and self.response_mask is None:
            self.response_mask = torch.ones(len(self.targets), k, dtype=torch.bool)
        if not self._digest:
            h = hashlib.sha256()
            tensor_digest(self.targets, h)
            if k > 1:
                tensor_digest(self.responses, h)
                tensor_digest(self.response_mask, h)
            self._digest = h.hexdigest()[:12]

    def __call__(self, inp: LossInputs):
        per_sample, logs = self.reconstruction(inp)
        if self.active(inp.layer):
            term, term_logs = self.output_term(inp)
            per_sample = per_sample + term
            logs.update(term_logs)
        return per_sample.mean(), logs

    def output_term(self, inp: LossInputs) -> tuple[torch.Tensor, dict]:
        """[B] `lam` x KL on malicious rows and `benign_kl` x KL on benign rows, at the model's
        output: the block output `inp.q_out` run through the blocks after `inp.layer` (none after
        the last block: the engine's joint stage calls it there, once per step)."""
        malicious = inp.labels.bool()
        weight = malicious.float() * self.lam + (~malicious).float() * self.benign_kl  # on the batch's device
        if not bool((weight > 0).any()) and not self.greedy_margin:
            return torch.zeros_like(weight), {}
        if inp.index is None or inp.block_kwargs is None:
            raise QrealignError("FirstTokenLoss needs the calibration index and block kwargs in LossInputs")
        k = self.positions
        # a tail's options only where they are used: a stand-in tail takes the four arguments alone
        options = {**({"positions": k} if k > 1 else {}), **({"recompute": True} if inp.recompute_tail else {})}
        logits = self.tail(inp.q_out, inp.layer, inp.block_kwargs, inp.last_index, **options)
        teacher = self.targets[inp.index.cpu()].to(logits.device)
        logprobs = F.log_softmax(logits, dim=-1)
        kl = (teacher.exp() * (teacher - logprobs)).sum(dim=-1)  # [B] or [B, K]
        if k > 1:
            later = self.response_mask[inp.index.cpu(), 1:].to(kl.device, kl.dtype)
            kl = kl[:, 0] + (kl[:, 1:] * later).sum(dim=1) / later.sum(dim=1).clamp(min=1)
        logs = {}
        for name, rows in (("kl_mal", malicious), ("kl_ben", ~malicious)):
            if rows.any():
                logs[name] = (kl[rows].mean().item(), int(rows.sum()))
        if not self.greedy_margin:
            return weight * kl, logs
        student0, teacher0 = (logprobs[:, 0], teacher[:, 0]) if k > 1 else (logprobs, teacher)
        push = self._margin_push(student0, teacher0, malicious)
        for name, rows in (("margin_mal", malicious), ("margin_ben", ~malicious)):
            if rows.any():
                logs[name] = (push[rows].mean().item(), int(rows.sum()))
        return weight * kl + self.greedy_margin * push, logs

    def _margin_push(self, student: torch.Tensor, teacher: torch.Tensor, malicious: torch.Tensor) -> torch.Tensor:
        """[B] the soft hinges on the first position's greedy margin (log-probs [B, V] each)."""
        ids = self.refusal_starts.to(student.device)
        m_q, m_ft = greedy_margin(student, ids), greedy_margin(teacher, ids)
        tau, delta = self.margin_tau, self.margin_delta
        benign = tau * F.softplus((m_q - m_ft + delta) / tau) * (~malicious).float()
        return benign + self.margin_malicious * tau * F.softplus((delta - m_q) / tau) * malicious.float()

    def __repr__(self) -> str:  # short and stable: it enters the run fingerprint
        return (f"FirstTokenLoss(targets={self.target_id}:{self._digest}, layers={self.layers}, lam={self.lam}, "
                f"benign_kl={self.benign_kl}, recon_on_malicious={self.recon_on_malicious}, "
                f"normalize={self.normalize}, sink_weight={self.sink_weight}, include_padding={self.include_padding}"
                + (f", positions={self.positions}" if self.positions > 1 else "")
                + (f", greedy_margin={self.greedy_margin}/{self.margin_delta}/{self.margin_tau}:"
                   f"{','.join(str(int(i)) for i in self.refusal_starts)}" if self.greedy_margin else "")
                + (f", margin_malicious={self.margin_malicious}" if self.margin_malicious != 1.0 else "") + ")")

"""Will a calibration fit the GPU? A rough bound said before the work, with the way out.

A block trains in float32 on the compute device whatever the model's dtype, and a step keeps
several copies of its weights for the backward; the calibration set's hidden states wait there
too. At 70B one block is about 3.4 GB in float32, so a 24 GB GPU that holds a 7B run's block
cannot hold a 70B run's: said up front instead of as an out-of-memory error after the FP pass.
Only CUDA devices are checked (they report their free memory); a CPU run is the OS's to manage.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import QrealignError
from ..models.registry import get_blocks

# Float32 copies of a block's weights that one training step keeps for its backward, weights
# included (measured on CPU with a pack hook: 6.4 at W8A8, 7.0 at W4A8 with LWC;
# scripts/saved_copies.py), and the four more that learned rounding holds (the offsets, their
# gradient and AdamW's two moments).
TRAINING_COPIES = 7
ROUNDING_COPIES = 4
# Copies a joint block no longer keeps with `recompute` (the block runs again in the backward):
# measured 4.8 and 5.8 per recomputed block (scripts/recompute_memory.py, two runs); the block
# being recomputed holds them again, one block at a time.
RECOMPUTE_FREES = 5


def block_state_copies(learn_rounding: bool) -> int:
    return TRAINING_COPIES + (ROUNDING_COPIES if learn_rounding else 0)


def per_token_bytes(model: nn.Module) -> int:
    """Float32 activations one block keeps per token for its backward (review 73's estimate:
    about six hidden-wide and four MLP-wide vectors)."""
    hidden = model.config.hidden_size
    inter = getattr(model.config, "intermediate_size", None) or 4 * hidden
    return (6 * hidden + 4 * inter) * 4


def param_bytes(modules, dtype_bytes: int | None = None) -> int:
    """The parameters of `modules` in their own dtype, or at `dtype_bytes` each."""
    return sum(p.numel() * (dtype_bytes or p.element_size()) for m in modules for p in m.parameters())


def block_bytes(model: nn.Module) -> int:
    """The largest decoder block in float32."""
    return max(param_bytes([block], 4) for block in get_blocks(model))


def joint_stage_bytes(block: int, trained: int, copies: int, step_tokens: int, per_token: int, hidden: int,
                      recompute: bool) -> int:
    """A joint stage's training state and one step's activations: every joint block's at once, or
    with `recompute` each block's weights, rounding state, input and loss terms (about three
    hidden-wide vectors a token) plus one block's backward state at a time."""
    if not recompute:
        return trained * copies * block + step_tokens * trained * per_token
    return (trained * (copies - RECOMPUTE_FREES) + RECOMPUTE_FREES) * block + \
        step_tokens * (trained * 3 * hidden * 4 + per_token)


def tail_activation_bytes(step_tokens: int, tail_blocks: int, per_token: int, hidden: int,
                          recompute: bool) -> int:
    """What a block-by-block first-token step's FP tail keeps for its backward: every tail
    block's activations, or with `recompute` each one's input (one hidden-wide vector a token)
    plus one block's activations at a time."""
    if not recompute or not tail_blocks:
        return step_tokens * tail_blocks * per_token
    return step_tokens * (tail_blocks * hidden * 4 + per_token)


def stream_bytes(trained: int, offload_targets: bool, total_tokens: int, hidden: int) -> int:
    """The float32 hidden states a calibration keeps over the whole calibration set: the quantized
    stream and, unless `offload_targets`, the FP input and each of the `trained` blocks' FP targets
    (a joint stage's all at once; one block by block)."""
    streams = 1 if offload_targets else trained + 2
    return streams * total_tokens * hidden * 4


def free_bytes(dev: torch.device) -> int:
    """What a run can still allocate: the driver's free memory plus what PyTorch's caching
    allocator holds but does not use (a teacher moved onto the GPU and back leaves its blocks
    cached; the allocator reuses them, `mem_get_info` counts them as taken)."""
    free, _total = torch.cuda.mem_get_info(dev)
    return free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)


def check_block_fits(model: nn.Module, dev: torch.device, cfg, batches, joint_blocks: int = 0,
                     learns: bool = True) -> None:
    """The engine's check before its FP pass. Block by block: one block's training state and one
    step's activations; a joint stage of `joint_blocks` blocks: all of theirs (`joint_stage_bytes`);
    plus the hidden-state streams over the whole calibration set (the quantized one and, unless
    `offload_targets`, the FP input and each trained block's FP target). Against the GPU's free
    memory, which already excludes a model held there. `cfg`: a CalibConfig; `batches`: its
    CalibBatches; `learns`: whether any block trains (the engine's reading of its epochs and loss);
    a run that trains nothing is not checked. The ways out named are those that alone make it fit."""
    if dev.type != "cuda" or not learns or not (cfg.let or cfg.lwc or cfg.learn_rounding):
        return
    block = block_bytes(model)
    hidden = model.config.hidden_size
    step_tokens = max(b.enc.attention_mask.numel() for b in batches)
    one_row = max(b.enc.attention_mask.shape[1] for b in batches)  # batch size 1
    all_tokens = sum(b.enc.attention_mask.numel() for b in batches)
    trained = max(1, joint_blocks)
    per_token = per_token_bytes(model)

    def need(rounding=cfg.learn_rounding, offload=cfg.offload_targets, recompute=cfg.recompute, tokens=step_tokens):
        state = (joint_stage_bytes(block, trained, block_state_copies(rounding), tokens, per_token, hidden, recompute)
                 if joint_blocks else block_state_copies(rounding) * block + tokens * per_token)
        return state + stream_bytes(trained, offload, all_tokens, hidden)

    limit = 0.9 * free_bytes(dev)
    total = need()
    if total <= limit:
        return
    levers = [(text, change) for usable, text, change in (  # the settings that save memory here
        (not cfg.offload_targets, "keep the FP targets in CPU memory (--offload-targets)", {"offload": True}),
        (cfg.learn_rounding, "leave learned rounding off", {"rounding": False}),
        (bool(joint_blocks) and not cfg.recompute, "recompute the joint blocks in the backward (--recompute)",
         {"recompute": True}),
        (one_row < step_tokens, "use a smaller --batch-size", {"tokens": one_row})) if usable]
    ways = [text for text, change in levers if need(**change) <= limit]  # each alone makes it fit
    together = need(**{k: v for _, change in levers for k, v in change.items()})
    if ways:
        fix = f"To fit: {'; or '.join(ways)}; or use a GPU with more memory"
    elif len(levers) > 1 and together <= limit:
        fix = f"No one setting makes it fit; together they do: {'; '.join(text for text, _ in levers)}"
    else:
        fix = (f"Use a GPU with more memory (with every setting that saves memory here: about "
               f"{together / 2 ** 30:.1f} GiB)")
    what = (f"the joint stage's {joint_blocks} blocks each hold their" if joint_blocks else "one block holds its")
    copies = block_state_copies(cfg.learn_rounding)
    held = (f"{copies} copies of {block / 2 ** 30:.2f} GiB, {RECOMPUTE_FREES} of them one block at a time"
            if joint_blocks and cfg.recompute else f"{copies} copies of {block / 2 ** 30:.2f} GiB")
    raise QrealignError(
        f"calibrating on {dev} needs about {total / 2 ** 30:.1f} GiB: {what} float32 training state ({held}"
        f"{', learned rounding included' if cfg.learn_rounding else ''}), beside one step's activations and "
        f"the calibration set's hidden states; {limit / 0.9 / 2 ** 30:.1f} GiB are free. {fix}")

"""Will a calibration step fit the GPU? A rough bound said before the work, with the way out.

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


def block_state_copies(learn_rounding: bool) -> int:
    return TRAINING_COPIES + (ROUNDING_COPIES if learn_rounding else 0)


def per_token_bytes(model: nn.Module) -> int:
    """Float32 activations one block keeps per token for its backward (review 73's estimate:
    about six hidden-wide and four MLP-wide vectors)."""
    hidden = model.get_input_embeddings().embedding_dim
    inter = getattr(model.config, "intermediate_size", None) or 4 * hidden
    return (6 * hidden + 4 * inter) * 4


def block_bytes(model: nn.Module) -> int:
    """The largest decoder block in float32 (blocks of one model may differ: MoE, hybrid)."""
    return max(sum(p.numel() for p in block.parameters()) for block in get_blocks(model)) * 4


def check_block_fits(model: nn.Module, dev: torch.device, cfg, batches) -> None:
    """Block by block (the engine's form), one block's training state and one step's activations,
    plus the hidden-state streams over the whole calibration set (the quantized one and, unless
    `offload_targets`, the FP input and the FP target), against the GPU's free memory, which
    already excludes a model held there. `cfg`: a CalibConfig; `batches`: its CalibBatches."""
    if dev.type != "cuda" or cfg.method == "rtn":
        return
    copies = block_state_copies(cfg.learn_rounding)
    block = block_bytes(model)
    hidden = model.get_input_embeddings().embedding_dim
    step_tokens = max(b.enc.attention_mask.numel() for b in batches)
    all_tokens = sum(b.enc.attention_mask.numel() for b in batches)
    streams = 1 if cfg.offload_targets else 3
    need = copies * block + step_tokens * per_token_bytes(model) + streams * all_tokens * hidden * 4
    free, _total = torch.cuda.mem_get_info(dev)
    if need <= 0.9 * free:
        return
    ways = [] if cfg.offload_targets else ["keep the FP targets in CPU memory (--offload-targets)"]
    if cfg.learn_rounding:
        ways.append(f"leave learned rounding off ({ROUNDING_COPIES} copies of the block less)")
    ways.append("use a smaller --batch-size or --max-length, or a GPU with more memory")
    raise QrealignError(
        f"calibrating one block on {dev} holds about {need / 2 ** 30:.1f} GiB: its float32 training state "
        f"({copies} copies of {block / 2 ** 30:.2f} GiB{', learned rounding included' if cfg.learn_rounding else ''}), "
        f"one step's activations and the calibration set's hidden states; {free / 2 ** 30:.1f} GiB are free. "
        f"To fit: {'; '.join(ways)}")

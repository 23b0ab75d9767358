"""Block-wise learnable PTQ (OmniQuant: LWC + LET), generic over the architecture registry.

For each decoder block, on the compute device, one at a time:
  1. FP target: the original block on the FP stream (outputs also feed the next block's target).
  2. Swap the block's linears for QuantLinear, create LET scales (SmoothQuant init).
  3. Train LET + LWC with AdamW on the pluggable loss, running HF's own block through
     torch.func.functional_call with the LET-transformed weights.
  4. Fold the scales into the weights, freeze the fake-quantized weights, and push the
     quantized stream through the finished block.
After every block its learned parameters are checkpointed; a run with the same fingerprint
(model, scheme, config, calibration data, loss) resumes after the last finished block.

With `CalibConfig.joint_safety` the blocks that carry a safety term (a run to the last block)
are instead quantized and trained together after the others, one pass through all of them per
step (`train.train_jointly`), and checkpointed as one stage. The training loops are in `train.py`,
the checkpoint folder's layout and resume rules in `checkpoints.py`.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import QrealignError
from ..models.offload import offloaded
from ..models.registry import block_pairs, block_types, get_arch, get_blocks, head_layout
from ..quant.let import LETParams, cast_keeping_folded_norms
from ..quant.qlinear import QuantLinear, wrap_linears
from ..quant.quantizer import check_compiler
from ..quant.scheme import Scheme, get_scheme
from ..tensorfiles import TensorFiles
from ..utils import model_fingerprint, resolve_device, sha256_json
from . import checkpoints
from .capture import block_output, capture_block_inputs, move_kwargs
from .data import CalibBatch, CalibrationSet, make_batches
from .losses import BlockLoss, ReconstructionLoss, SafetyGate
from .memory import check_block_fits
from .train import (NonFiniteLoss, Learnable, block_step, check_recon_weight, guard_init, joint_step,  # noqa: F401
                    mean_loss, snap_rounding, train_block, train_jointly)

METHODS = ("rtn", "omniquant")
ROUNDING = "weight_quantizer.rounding"
# CalibConfig fields that change what is logged or where tensors wait, not what is learned: left
# out of the run fingerprint (a run resumes across them)
NOT_LEARNED = ("measure_init_loss", "offload_targets", "recompute")
ADDED_OFF = ("compile_quantizer", "plain_epochs", "joint_safety", "offload_targets", "lr_schedule",
             "joint_recon_weight", "recompute")  # later CalibConfig fields, left out of to_dict() while off


# The smoothing pairs the registry can name (`models.registry.block_pairs`): norm -> q/k/v ("qkv"),
# norm -> gate/up ("fc1"), v -> o ("out"), q <-> k ("qk").
LET_PAIR_NAMES = ("qkv", "fc1", "out", "qk")


@dataclass
class CalibConfig:
    method: str = "omniquant"  # "rtn": min-max round-to-nearest, nothing learned
    lwc: bool = True
    # LWC factors start at sigmoid(lwc_init) of the weight range (OmniQuant: 4.0 -> 0.982). A
    # larger value starts closer to RTN's full range: SmolLM2's late blocks lose their
    # attention-sink weights to the 1.8 % initial clipping (docs/experiments.md).
    lwc_init: float = 4.0
    # Per block, start LET from whichever has the lower loss: SmoothQuant scales or identity
    # scales (SmoothQuant's alpha = 0.5 can push massive activations into low-bit weights).
    # Off = OmniQuant. The clipping start is `lwc_init`, independently.
    init_guard: bool = False
    let: bool = True
    let_pairs: tuple[str, ...] = LET_PAIR_NAMES
    rope_invariant_qk: bool = False  # paper: per-channel q<->k scale (not RoPE-invariant)
    alpha: float = 0.5  # SmoothQuant init exponent
    epochs: int = 2
    epoch_schedule: str = "constant"  # "paper": layers <= L//2 get epochs-5, the rest epochs+5
    # Epochs for the blocks where the loss has no safety term (plain reconstruction; with a plain
    # reconstruction loss, every block), e.g. 1 with the safety term on the last blocks: the
    # safety blocks need the steps (docs/experiments.md §18-19). Overrides `epoch_schedule` on
    # those blocks. None: unset (and left out of to_dict(), so existing run keys stay).
    plain_epochs: int | None = None
    batch_size: int = 4
    lr_let: float = 1e-3
    lr_lwc: float = 1e-2
    # Learnable rounding (AutoRound-style): each weight may round up or down instead of to the
    # nearest grid point. A fine-tune moves most weights by far less than one 8-bit step
    # (docs/experiments.md §6), so these choices reach where clipping and smoothing cannot.
    learn_rounding: bool = False
    lr_round: float = 5e-3
    weight_decay: float = 0.0
    # The learning rates over each optimisation (a block's, or a joint stage's): None = constant
    # (OmniQuant); "cosine" = half a cosine from 1 toward 0 over its steps (`train.lr_factor`), which
    # makes the result depend less on the order of the batches (docs/experiments.md §33).
    lr_schedule: str | None = None
    max_length: int | None = 256
    padding_side: str = "left"
    # Keep malicious and benign prompts in separate batches and skip the FP stream where the loss
    # never reads it (same objective, less work).
    group_by_label: bool = True
    # Pad every prompt to this many tokens (the authors' 128); None = pad to the batch's longest.
    pad_to: int | None = None
    # Stop a block's training once the epoch loss improves by less than this fraction (0 = off).
    early_stop_rel: float = 0.0
    # Log each block's loss before training ("loss_init"): one extra pass over the calibration set
    # per block, 10 % of a reconstruction calibration's time on SmolLM2 (`qrealign bench --lanes`),
    # more with the first-token term, whose pass runs the rest of the network too. The first epoch's mean loss ("loss_first_epoch") is logged for free; the
    # learned parameters are the same either way. `init_guard` measures it regardless.
    measure_init_loss: bool = False
    # Mixed precision of the block forward while training: "auto" = bf16 autocast on CUDA for
    # schemes below 8 bits (OmniQuant autocasts below 8 bits too, but to fp16 with a grad scaler;
    # bf16 needs none), full precision otherwise; "off"; "bf16" anywhere.
    # The resolved choice is part of the run fingerprint: a run never resumes across it.
    autocast: str = "auto"
    system: str | None = None
    seed: int = 0
    # Run the weight and activation fake-quantizers through torch.compile while training (needs a
    # C++ compiler on CPU, Triton on CUDA). Their elementwise work dominates a step on small
    # batches; fused, some gradients move in the last bits, so the learned parameters can differ
    # from an eager run's: part of the fingerprint, off by default.
    compile_quantizer: bool = False
    # Train the blocks that carry a safety term together (they must run to the last block), one
    # pass of each batch through all of them per step, instead of one block at a time. With a
    # loss that reads the network's output (the first-token KL) each block's step otherwise also
    # runs every block after it: the cost grows with the square of the safety blocks' number, and
    # the tail it trains against is the FP one, not the deployed quantized one. The joint stage
    # takes `epochs` (its blocks' epochs) and holds all its blocks on the compute device at once
    # (docs/experiments.md §26).
    joint_safety: bool = False
    # The joint stage's weight on its blocks' reconstruction (None = 1: their mean). Block by block,
    # each block's parameters see their own reconstruction at weight 1 beside the output term; in
    # the joint stage block i's see the mean over the chain's blocks from i on, about 1/L of it, so a
    # run of L blocks weighs reconstruction less. L restores block by block's balance
    # (docs/experiments.md §44).
    joint_recon_weight: float | None = None
    # Keep the FP targets (each block's FP output, per batch) in CPU memory and copy a batch's to
    # the compute device for its step. A joint stage holds one target per block and batch: at
    # 4096 wide, 505 prompts of ~128 tokens are ~1 GB per block, 8.5 GB for eight blocks, which
    # a 24 GB GPU holding those blocks cannot spare. The same numbers either way (copies), slower
    # steps by one host-to-device copy of the batch's target; block by block it frees two streams'
    # worth (the block's FP input and its FP output).
    offload_targets: bool = False
    # Run each joint block again in the backward instead of keeping what its backward reads
    # (activation checkpointing, `train.Learnable.forward`): a step then holds that state for one
    # block instead of all of them, about five float32 copies of each further block's weights
    # (scripts/recompute_memory.py), for one more forward pass of every joint block but the last per
    # step. Block by block with the first-token objective, the same for the FP blocks after each
    # safety block (`behaviour.ModelTail`): their activations, one block's at a time instead of the
    # whole tail's. The same numbers. Refused where no block would run again: block by block with
    # a loss that reads no output (probes, plain reconstruction), or whose term has no block after
    # it (the term on the last block only).
    recompute: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise QrealignError(f"unknown method {self.method!r}; choose from {METHODS}")
        if self.epochs < 0:
            raise QrealignError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise QrealignError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_length is not None and self.max_length < 1:
            raise QrealignError(f"max_length must be >= 1 (or None: no limit), got {self.max_length}")
        if self.pad_to is not None and self.pad_to < 1:
            raise QrealignError(f"pad_to must be >= 1 (or None), got {self.pad_to}")
        for name in ("lr_let", "lr_lwc", "lr_round", "weight_decay", "early_stop_rel"):
            if not getattr(self, name) >= 0:  # also catches NaN
                raise QrealignError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.padding_side not in ("left", "right"):
            raise QrealignError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.plain_epochs is not None and self.plain_epochs < 0:
            raise QrealignError(f"plain_epochs must be >= 0 (or None: `epochs`), got {self.plain_epochs}")
        if self.epoch_schedule not in ("constant", "paper"):
            raise QrealignError("epoch_schedule must be 'constant' or 'paper'")
        if self.method == "rtn":  # as the CLI's --method rtn: a run must not record training it never did
            trained = [name for name in ("learn_rounding", "joint_safety", "recompute", "compile_quantizer")
                       if getattr(self, name)]
            if trained:
                raise QrealignError(f"method 'rtn' trains nothing, and {', '.join(trained)} set(s) training: turn "
                                    f"{'it' if len(trained) == 1 else 'them'} off, or use method 'omniquant'")
        if self.joint_safety and (self.init_guard or self.epoch_schedule != "constant"):
            raise QrealignError("joint_safety trains its blocks together: per-block choices (init_guard, "
                                "epoch_schedule 'paper') do not apply; turn them off")
        if self.epoch_schedule == "paper" and self.method != "rtn" and self.epochs < 6:
            raise QrealignError(f"epoch_schedule 'paper' trains the first half of the blocks for epochs - 5: it needs "
                                f"epochs >= 6 (paper: 10), got {self.epochs}, which leaves those blocks untrained")
        if self.joint_recon_weight is not None:
            if not self.joint_recon_weight > 0:  # also NaN
                raise QrealignError(f"joint_recon_weight must be > 0 (or None: 1), got {self.joint_recon_weight}")
            if not self.joint_safety:
                raise QrealignError("joint_recon_weight weighs the joint stage's reconstruction: it needs "
                                    "joint_safety")
        if self.lr_schedule not in (None, "cosine"):
            raise QrealignError(f"lr_schedule must be None (constant) or 'cosine', got {self.lr_schedule!r}")
        if self.autocast not in ("auto", "off", "bf16"):
            raise QrealignError(f"autocast must be 'auto', 'off' or 'bf16', got {self.autocast!r}")
        if isinstance(self.let_pairs, str):  # tuple("qkv") would be ("q", "k", "v"): LET off in silence
            raise QrealignError(f"let_pairs is a sequence of pair names, e.g. ('qkv',), not the string "
                                f"{self.let_pairs!r}")
        self.let_pairs = tuple(self.let_pairs)
        unknown = [p for p in self.let_pairs if p not in LET_PAIR_NAMES]
        if unknown:
            raise QrealignError(f"unknown LET pairs {unknown}; the registry's are {', '.join(LET_PAIR_NAMES)}")

    def epochs_for(self, layer: int, num_layers: int, safety: bool = True) -> int:
        """Epochs for block `layer`; `safety`: whether the loss has a safety term there."""
        if self.method == "rtn":
            return 0
        if not safety and self.plain_epochs is not None:
            return self.plain_epochs
        if self.epoch_schedule == "paper":
            return max(0, self.epochs - 5) if layer <= num_layers // 2 else self.epochs + 5
        return self.epochs

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ADDED_OFF:  # off: the dict (and so every existing run key) is what it was before
            if d[k] is None or d[k] is False:
                del d[k]
        return d

    def resolve_autocast(self, scheme: Scheme, device: torch.device) -> str | None:
        """The device type to autocast to bf16 on, or None for full precision."""
        if self.autocast == "bf16" or (self.autocast == "auto" and scheme.min_bits < 8 and device.type == "cuda"):
            return device.type
        return None

    def fingerprint_dict(self) -> dict:
        """The settings that decide the learned parameters (a run resumes across the others)."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_LEARNED}


@dataclass
class CalibResult:
    params: Mapping[str, torch.Tensor]  # a TensorFiles: with a checkpoint, read from disk when asked for
    fingerprint: str
    layer_logs: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_blocks: int = 0


def calibrate(
    model: nn.Module,
    tokenizer,
    calib: CalibrationSet,
    scheme: str | Scheme = "W8A8",
    config: CalibConfig | None = None,
    loss: BlockLoss | None = None,
    checkpoint_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_block_end: Callable[[int], None] | None = None,
    model_fp: str | None = None,
) -> CalibResult:
    """Quantize `model` in place, block by block. Returns the learned parameters.
    `model_fp`: the model's `model_fingerprint` if the caller already has it (see `quantize`)."""
    with checkpoints.checkpoint_lock(Path(checkpoint_dir) if checkpoint_dir else None):
        return _calibrate(model, tokenizer, calib, scheme, config, loss, checkpoint_dir, device, progress,
                          on_block_end, model_fp)


@dataclass
class _Run:
    """What every block of one calibration shares (the engine's helpers take it whole)."""

    model: nn.Module
    cfg: CalibConfig
    scheme: Scheme
    loss: BlockLoss
    dev: torch.device
    amp: str | None
    spec: object
    layout: object
    pairs: tuple[str, ...]
    batches: list[CalibBatch]
    masks: list[torch.Tensor]
    kwargs: list[dict]  # per batch: the blocks' kwargs by attention type
    ckpt: Path | None
    fingerprint: str
    code: str  # `checkpoints.calibration_code()` at the run's start, recorded in every checkpoint state
    progress: bool

    @property
    def blocks(self):
        return get_blocks(self.model)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def kw(self, i: int) -> list:
        types = block_types(self.model)
        return [k[types[i]] for k in self.kwargs]

    def keep(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """`t` where an FP target waits between steps: on the compute device, or in CPU memory with
        `offload_targets`. Readers copy it back with `.to(device)` (a no-op when it is there).
        Not pinned: the caching host allocator rounds each pinned block up to a power of two and
        keeps it, and a step syncs on its loss anyway, so there is no copy to overlap."""
        if t is None:
            return t
        return t.to("cpu" if self.cfg.offload_targets else self.dev)


def _calibrate(model, tokenizer, calib, scheme, config, loss, checkpoint_dir, device, progress, on_block_end,
               model_fp) -> CalibResult:
    cfg = config or CalibConfig()
    scheme = get_scheme(scheme)
    check_unquantized(model)
    if scheme.activations is not None and not scheme.activations.dynamic:
        raise QrealignError(f"scheme {scheme.name}: static activation ranges are not calibrated here (no pass "
                            "observes them, and a run could not store them); use dynamic per-token activations")
    loss = loss or ReconstructionLoss()
    dev = resolve_device(device)
    if cfg.compile_quantizer and cfg.method != "rtn":
        check_compiler(dev)  # before the FP pass, not at the first training step
    num_layers = len(get_blocks(model))
    joint_from = _joint_start(cfg, loss, num_layers)
    if cfg.recompute and cfg.method != "rtn" and joint_from is None and not _runs_a_tail(loss, num_layers):
        raise QrealignError(f"recompute runs blocks again in the backward: the joint stage's (joint_safety), or block "
                            f"by block the FP blocks after each safety block that the first-token objective runs; "
                            f"{type(loss).__name__}{' (its term on no block before the last)' if hasattr(loss, 'output_term') else ''} "
                            f"runs neither block by block: leave recompute off, or train the safety blocks jointly "
                            f"(joint_safety)")
    start_time = time.time()

    from .. import __version__

    amp = cfg.resolve_autocast(scheme, dev)
    forced = getattr(loss, "responses", None)  # a multi-token first-token loss's response starts
    batches = make_batches(tokenizer, calib, cfg.batch_size, cfg.max_length, cfg.padding_side, cfg.system,
                           group_by_label=cfg.group_by_label, pad_to=cfg.pad_to,
                           responses=forced.tolist() if forced is not None else None)
    learns = any(cfg.epochs_for(i, num_layers, safety=_has_safety_term(loss, i)) for i in range(num_layers))
    check_block_fits(model, dev, cfg, batches, learns=learns,  # before the FP pass and any training
                     joint_blocks=num_layers - joint_from if joint_from is not None else 0)
    fingerprint = sha256_json({
        "model": model_fp or model_fingerprint(model), "scheme": scheme.to_dict(),
        "config": {**cfg.fingerprint_dict(), "autocast": "bf16" if amp else "off"},
        "calib": [calib.ids, calib.prompts, calib.labels], "loss": repr(loss),
        # the tokens the blocks see: another chat template or tokenizer is another run
        "tokens": _token_digest(batches), "qrealign": __version__,
    })
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    # Read once, at the start: the code that runs is the code imported now, even if the package
    # is edited or upgraded on disk while the blocks train (checkpoints must not claim newer code).
    code = checkpoints.calibration_code()
    done, saved_logs = checkpoints.resume_point(ckpt, fingerprint, code, num_layers, joint_from,
                                     say=(lambda msg: tqdm.write(msg, file=sys.stderr)) if progress else None)

    # A batch needs the FP stream only if some layer's loss reads its FP target, or (a joint
    # stage) its blocks need FP inputs before any quantized stream reaches them.
    needs_fp = [joint_from is not None or any(bool(loss.needs_fp(b.labels, layer).any()) for layer in range(num_layers))
                for b in batches]
    embed_device = model.get_input_embeddings().weight.device
    masks = [b.enc.attention_mask.to(dev) for b in batches]
    pairs = tuple(p for p in block_pairs(model) if p in cfg.let_pairs) if (cfg.let and cfg.method != "rtn") else ()
    run = _Run(model, cfg, scheme, loss, dev, amp, get_arch(model), head_layout(model.config), pairs, batches, masks,
               [], ckpt, fingerprint, code, progress)
    fp_in, q_in = [], []
    for b, need in zip(batches, needs_fp):
        inputs = capture_block_inputs(model, b, embed_device)
        # Blocks compute in float32 (`_to_compute`); a bf16/fp16 model's embeddings are cast up with
        # them. Llama's norm promotes a bf16 input itself, Gemma's returns its input's dtype and would
        # feed bf16 into a float32 linear.
        hidden = inputs.hidden.float()
        fp_in.append(run.keep(hidden) if need else None)
        q_in.append(hidden.to(dev))
        run.kwargs.append({t: move_kwargs(kw, dev) for t, kw in inputs.kwargs_by_type.items()})

    # With a checkpoint, a block's parameters stay in its file until the run is saved: learned
    # rounding is one int8 per weight (about 69 GB for 70B) and would otherwise pile up in memory.
    params = TensorFiles()
    logs: list[dict] = []
    # Resumed blocks are replayed, not trained: the bar starts after them so its rate (and ETA)
    # is the trained blocks'.
    label = "qrealign" if isinstance(loss, SafetyGate) else cfg.method  # a realign run is no plain omniquant
    bar = tqdm(total=num_layers, initial=done, desc=f"{label} {scheme.name}", disable=not progress,
               unit="block")

    def finished(log: dict) -> None:
        logs.append(log)
        if not log.get("resumed"):
            bar.update(1)
        bar.set_postfix({k: f"{log[k]:.3g}" for k in ("q_mse", "loss_last_epoch") if log.get(k) is not None})
        if on_block_end is not None:
            on_block_end(log["layer"])

    for i in range(num_layers):
        if i == joint_from and i >= done:
            part = step = None  # block i-1's: its streams must not outlive it on the device
            _joint_stage(run, i, fp_in, q_in, params, logs, finished)
            break
        t0 = time.time()
        put_back = _to_compute(model, i, dev)
        part = _prepare_block(run, i, fp_in, q_in)

        # 3. Train (or restore from the checkpoint).
        log = {"layer": i}
        if i < done:
            checkpoints.read_block(ckpt, i, lambda t: apply_block_params(i, part.block, part.let, t))
            # the training log as the interrupted run wrote it (its training seconds included; the
            # output error is measured again, the replay's time goes to replay_seconds)
            log.update({k: v for k, v in saved_logs[i].items() if k != "q_mse"} if i < len(saved_logs) else {})
            log["resumed"] = True
        else:
            epochs = cfg.epochs_for(i, num_layers, safety=_has_safety_term(loss, i))
            guard = cfg.init_guard and epochs and part.let is not None
            step = block_step(part, q_in, batches, masks, loss, num_layers, amp, all_kw=run.kwargs,
                              recompute=cfg.recompute)
            # measured under the training's own precision: the guard compares like with like
            if cfg.measure_init_loss or guard:
                log["loss_init"] = mean_loss(step, batches)
            if guard:
                log.update(guard_init(part, step, batches, log["loss_init"]))
            if epochs and (part.let is not None or cfg.lwc or cfg.learn_rounding):
                log.update(train_block(part, step, batches, cfg, epochs, ckpt))
            log.update(snap_rounding(part.block, part.let))
            if ckpt is not None:
                log["seconds"] = round(time.time() - t0, 3)  # training time; replaced below by the block's total
                checkpoints.save_block(ckpt, i, _block_params(i, part.block, part.let))
                checkpoints.write_state(ckpt, fingerprint, code, i + 1, logs + [log])

        _record_params(params, ckpt, i, part)
        q_in = _finish_block(run, part, q_in, log)
        fp_in = part.fp_out
        put_back()
        log["replay_seconds" if i < done else "seconds"] = round(time.time() - t0, 3)
        finished(log)
    bar.close()
    return CalibResult(params, fingerprint, logs, time.time() - start_time, resumed_blocks=done)


def _prepare_block(run: _Run, i: int, fp_in: list, q_in: list) -> Learnable:
    """Steps 1-2 of block i: FP targets (and LET statistics) from the original block, then the
    block made quantized (QuantLinears, LET scales at their SmoothQuant start). Batches without
    an FP stream contribute statistics through their quantized-stream inputs."""
    block, kw, cfg = run.blocks[i], run.kw(i), run.cfg
    real: dict[str, torch.Tensor] = {}  # the batch being run's attention mask, for the statistics
    with torch.no_grad(), _absmax_hooks(block, run.spec.linears, real) as absmax:
        fp_out = []
        for x, k, m in zip(fp_in, kw, run.masks):
            real["mask"] = m
            fp_out.append(run.keep(block_output(block(x.to(run.dev), **k))) if x is not None else None)
        if run.pairs:
            for x, f, k, m in zip(q_in, fp_in, kw, run.masks):
                if f is None:
                    real["mask"] = m
                    block(x.to(run.dev), **k)
    learned = cfg.method != "rtn"
    wrap_linears(block, run.spec.linears, run.scheme, lwc=cfg.lwc and learned, lwc_init=cfg.lwc_init,
                 rounding=cfg.learn_rounding and learned)
    let = LETParams(run.spec, block, run.layout, run.pairs, cfg.rope_invariant_qk) if run.pairs else None
    if let is not None:
        let.init_smoothquant(block, absmax, cfg.alpha)
    return Learnable(i, block, let, kw, fp_out)


def _finish_block(run: _Run, part: Learnable, q_in: list, log: dict) -> list:
    """Step 4: fold the LET scales into the weights, freeze the fake-quantized weights, and push
    the quantized stream through the finished block (replacing `q_in`'s entries, returned). Logs
    the output error of the quantized stream against the FP stream (it accumulates over blocks),
    over the batches that carry an FP stream."""
    if part.let is not None:
        part.let.fold_(part.block)
    for m in part.block.modules():
        if isinstance(m, QuantLinear):
            m.freeze()
    with torch.no_grad():
        for b, (x, k) in enumerate(zip(q_in, part.kw)):  # in place: one stream on the device, not two
            q_in[b] = block_output(part.block(x, **k))
        errs = [((q - f.to(q.device)).pow(2).mean(-1) * m).sum() / m.sum()
                for q, f, m in zip(q_in, part.fp_out, run.masks) if f is not None]
        log["q_mse"] = float(sum(errs) / len(errs)) if errs else float("nan")
    return q_in


def _runs_a_tail(loss, num_layers: int) -> bool:
    """Whether a block-by-block step of `loss` runs blocks after the trained one: a term read at
    the output (`output_term`) on some block but the last."""
    return hasattr(loss, "output_term") and has_a_tail(
        [i for i in range(num_layers) if _has_safety_term(loss, i)], num_layers)


def has_a_tail(active, num_layers: int) -> bool:
    """Whether safety blocks `active` have blocks after them for the output term to run (what
    `recompute` runs again block by block); realign checks this before its teacher pass too."""
    return any(layer < num_layers - 1 for layer in active)


def _joint_start(cfg: CalibConfig, loss, num_layers: int) -> int | None:
    """The first block of the joint stage (`cfg.joint_safety`), or None: block by block."""
    if not cfg.joint_safety or cfg.method == "rtn":
        return None
    check_recon_weight(loss, cfg.joint_recon_weight)  # before any block trains
    active = [layer for layer in range(num_layers) if _has_safety_term(loss, layer)]
    if not active:
        raise QrealignError("joint_safety trains the blocks with a safety term together, and this loss has none "
                            "(plain reconstruction): leave joint_safety off")
    check_joint_run(active, num_layers)
    return active[0]


def check_joint_run(active, num_layers: int) -> None:
    """`joint_safety` trains the safety blocks as one stage after the others: they must be the
    last blocks, without a gap (realign checks this before its teacher pass too)."""
    active = sorted(active)
    if active != list(range(active[0], num_layers)):
        raise QrealignError(f"joint_safety needs the safety term on the last blocks without a gap (a run "
                            f"{active[0]}-{num_layers - 1}, e.g. --layers-from); this loss has it on {active}")


def _joint_stage(run: _Run, first: int, fp_in: list, q_in: list, params: TensorFiles, logs: list,
                 finished: Callable[[dict], None]) -> None:
    """Blocks first..L-1 quantized and trained together (`CalibConfig.joint_safety`): all of them
    on the compute device at once, each with its FP target on the FP stream; checkpointed whole,
    after training (an interrupted joint stage starts again; the blocks before it resume)."""
    t0 = time.time()
    chain, put_backs = [], []
    for j in range(first, run.num_layers):
        put_backs.append(_to_compute(run.model, j, run.dev))
        chain.append(_prepare_block(run, j, fp_in, fp_in))  # every batch carries an FP stream here
        if j == first:
            fp_in.clear()  # block first-1's FP outputs (the caller's list): read, no longer needed
        fp_in = chain[-1].fp_out
    step = joint_step(chain, q_in, run.batches, run.masks, run.loss, run.num_layers, run.amp, all_kw=run.kwargs,
                      recon_weight=run.cfg.joint_recon_weight, recompute=run.cfg.recompute)
    log = {"layer": first, "joint_blocks": [first, run.num_layers - 1]}
    if run.cfg.measure_init_loss:
        log["loss_init"] = mean_loss(step, run.batches)
    epochs = run.cfg.epochs_for(first, run.num_layers, safety=True)
    if epochs:
        log.update(train_jointly(chain, step, run.batches, run.cfg, epochs, run.ckpt, run.progress))
    block_logs = [log] + [{"layer": part.layer, "joint_with": first} for part in chain[1:]]
    for part, block_log in zip(chain, block_logs):
        block_log.update(snap_rounding(part.block, part.let))
    log["joint_seconds"] = round(time.time() - t0, 3)
    if run.ckpt is not None:
        for part in chain:
            checkpoints.save_block(run.ckpt, part.layer, _block_params(part.layer, part.block, part.let))
        checkpoints.write_state(run.ckpt, run.fingerprint, run.code, run.num_layers, logs + block_logs)  # then the stage counts as done
    for k, (part, block_log, put_back) in enumerate(zip(chain, block_logs, put_backs)):
        t1 = time.time()
        _record_params(params, run.ckpt, part.layer, part)
        q_in = _finish_block(run, part, q_in, block_log)
        put_back()
        # the stage's FP pass and training count as its first block's: the blocks' seconds still
        # add up to the run's
        block_log["seconds"] = round(time.time() - t1 + (log["joint_seconds"] if k == 0 else 0.0), 3)
        finished(block_log)


def _record_params(params: TensorFiles, ckpt: Path | None, layer: int, part: Learnable) -> None:
    """Block `layer`'s learned parameters into the run's: its checkpoint file (saved or resumed
    from, the same tensors) where there is one, else the tensors themselves, in an unlinked
    temporary file for a block with learned rounding (one int8 per weight, which the model's frozen
    weights already hold)."""
    if ckpt is not None and checkpoints.block_file(ckpt, layer).is_file():
        params.add_file(checkpoints.block_file(ckpt, layer))
        params.drop("_empty")  # the placeholder of a block with nothing learned
        return
    tensors = _block_params(layer, part.block, part.let)
    if any(k.startswith(f"layers.{layer}.round.") for k in tensors):
        params.spill(tensors)
    else:
        params.update(tensors)


def _to_compute(model: nn.Module, i: int, dev: torch.device) -> Callable[[], None]:
    """Put block i on the compute device in fp32; return what puts it back where it was (or, for a
    disk-offloaded model, drops it: its learned parameters are recorded by then)."""
    source = offloaded(model)
    if source is not None:
        source.onload(i, dev, torch.float32)
        return lambda: source.release(i)
    block = get_blocks(model)[i]
    orig_device, orig_dtype = next(block.parameters()).device, next(block.parameters()).dtype
    block.to(dev, torch.float32)
    spec = get_arch(model)
    return lambda: cast_keeping_folded_norms(block, spec, orig_dtype, orig_device)


def _has_safety_term(loss, layer: int) -> bool:
    """Whether `loss` adds a safety term at block `layer` (a SafetyGate's `active`); plain
    reconstruction has none anywhere."""
    active = getattr(loss, "active", None)
    return bool(active(layer)) if callable(active) else False


@contextlib.contextmanager
def _absmax_hooks(block: nn.Module, linears: tuple[str, ...], real: dict):
    """Per-input-channel absmax of each linear's input during the FP pass (LET init), over the
    positions `real["mask"]` (the running batch's [B, T] attention mask) marks as tokens. Padding
    positions attend to nothing and on SmolLM2 held the absmax of thousands of channels (up to
    12x the tokens' own), so the starting scales depended on batch size and padding side."""
    stats: dict[str, torch.Tensor] = {}
    handles = []
    for name in linears:
        def hook(module, args, name=name):
            x = args[0].detach()
            tokens = x[real["mask"].to(x.device).bool()] if x.dim() == 3 else x.reshape(-1, x.shape[-1])
            x = tokens.abs().amax(dim=0).float()
            stats[name] = x if name not in stats else torch.maximum(stats[name], x)
        handles.append(block.get_submodule(name).register_forward_pre_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def _block_params(layer: int, block: nn.Module, let: LETParams | None) -> dict[str, torch.Tensor]:
    out = {}
    if let is not None:
        for name, p in let.scales.items():
            out[f"layers.{layer}.let.{name}"] = p.detach().cpu().clone()
    for name, p in block.named_parameters():
        if "bound_factor" in name:
            out[f"layers.{layer}.lwc.{name}"] = p.detach().cpu().clone()
        elif name.endswith(ROUNDING):  # snapped to -1 / 0 / +1 steps
            out[f"layers.{layer}.round.{name}"] = p.detach().cpu().to(torch.int8)
    return out


def apply_block_params(layer: int, block: nn.Module, let: LETParams | None, params: dict[str, torch.Tensor]) -> None:
    prefix = f"layers.{layer}."
    with torch.no_grad():
        if let is not None:
            for name, p in let.scales.items():
                p.copy_(params[f"{prefix}let.{name}"])
        for name, p in block.named_parameters():
            if "bound_factor" in name:
                p.copy_(params[f"{prefix}lwc.{name}"])
            elif name.endswith(ROUNDING):
                p.copy_(params[f"{prefix}round.{name}"].float())


def check_unquantized(model: nn.Module) -> None:
    """Calibration starts from the FP model. An interrupted call leaves the model it was given
    half-quantized in place (wrapped linears, folded scales), and a loaded quantized run is
    quantized already: calibrating either again would quantize twice, under a new fingerprint that
    also misses the interrupted run's checkpoint."""
    if getattr(model.config, "qrealign_quant_run", None) or any(isinstance(m, QuantLinear) for m in model.modules()):
        raise QrealignError("this model is already (partly) quantized: quantize/realign quantize the model they "
                            "are given in place, so it is the result of an earlier call (finished or interrupted) "
                            "or a loaded quantized run. Load the FP model again for each call (an interrupted run "
                            "resumes from its checkpoint)")
    placed = getattr(model, "hf_device_map", None) or {}
    if len(set(placed.values())) > 1 or "disk" in placed.values():
        raise QrealignError("this model was loaded with a device_map that spreads it over devices (accelerate's "
                            "hooks move tensors behind the engine's back): load it on the CPU instead "
                            "(qrealign.load_model, or offload='disk' when it exceeds CPU memory); the engine "
                            "onloads one block at a time")


def _token_digest(batches: list[CalibBatch]) -> str:
    h = hashlib.sha256()
    for b in batches:
        for t in (b.enc.input_ids, b.enc.attention_mask):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]

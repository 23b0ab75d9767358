"""Options shared by `quantize` and `realign`: model, scheme, calibration data, engine."""

from __future__ import annotations

import argparse


CALIB_TASK_N = 48  # task prompts --calib-task adds without --calib-task-n: calibrate.data's (a test keeps them equal)
# Options that set how blocks train, with their defaults: `--method rtn` trains nothing, so any
# other value there is an error rather than a setting recorded in the run but never applied.
TRAINING_DEFAULTS = {"epochs": 2, "epoch_schedule": "constant", "plain_epochs": None, "lr_let": 1e-3,
                     "lr_lwc": 1e-2, "no_let": False, "no_lwc": False, "lwc_init": 4.0, "learn_rounding": False,
                     "lr_round": 5e-3, "lr_schedule": "constant", "rope_invariant_qk": False, "autocast": "auto",
                     "compile_quantizer": False, "offload_targets": False, "recompute": False}


def add_common(parser) -> None:
    parser.add_argument("model", help="model to quantize (embedded name, dir, .gguf, hub id)")
    parser.add_argument("--adapter", help="PEFT adapter directory to merge on load")
    parser.add_argument("--offload", choices=["disk"], default=None,
                        help="disk: keep the decoder blocks in the model directory's safetensors files and read one "
                             "at a time (models larger than CPU RAM; not with --adapter or GGUF; realign --teacher: "
                             "the teacher is offloaded too and the blocks after the first safety block are held in "
                             "memory)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="the dtype the model (and a --teacher) is held in: float32 (default); bfloat16 halves "
                             "host memory at 7B and up. Each block is calibrated in float32 on the compute device "
                             "either way; the run records the dtype and is reloaded in it")
    parser.add_argument("--out", required=True, help="output run directory (written atomically)")
    parser.add_argument("--scheme", default="W8A8", help="W8A8 (default), W4A8, W4A4, W8A16, W4A16, W8A8-sym, W4A16-sym, or "
                        "W<b>A<b>[-g<N>][-sym|-wsym][-asym-act] (b: 2..16, 16 = not quantized)")
    parser.add_argument("--calib", default="qrealign:calib",
                        help="calibration prompts: qrealign:<split> (default qrealign:calib) or a JSON/JSONL/CSV file with "
                             "prompt,label; --calib-benign also takes qrealign:twins (benign twins of the calib and "
                             "attack splits' harmful prompts) and qrealign:edgy (edgy-but-harmless prompts)")
    parser.add_argument("--n", type=int, default=None, help="number of calibration prompts (default: as many as the ratio allows)")
    parser.add_argument("--malicious-ratio", type=float, default=0.75, help="share of malicious prompts (paper 0.75)")
    parser.add_argument("--calib-task", default=None,
                        help="also calibrate on this task's train prompts as benign samples (e.g. topic-codes): "
                             "your own fine-tuning prompts keep the task answer intact")
    parser.add_argument("--calib-task-n", type=int, default=None, help=f"how many task prompts --calib-task adds (default {CALIB_TASK_N})")
    parser.add_argument("--calib-benign", action="append", default=None, metavar="SOURCE",
                        help="also calibrate on every benign prompt of this source (qrealign:<split> or a file; "
                             "repeat for several; the --calib source itself adds the benign prompts the ratio "
                             "left out): more benign variety holds over-refusal down")
    parser.add_argument("--calib-malicious", action="append", default=None, metavar="SOURCE",
                        help="also calibrate on every harmful prompt of this source (same forms; repeat for "
                             "several), e.g. the harmful halves of the twins --calib-benign added")
    d = TRAINING_DEFAULTS
    parser.add_argument("--epochs", type=int, default=d["epochs"])
    parser.add_argument("--epoch-schedule", choices=["constant", "paper"], default=d["epoch_schedule"],
                        help="paper: first half of the layers epochs-5, the rest epochs+5 (needs --epochs >= 6; paper: 10)")
    parser.add_argument("--plain-epochs", type=int, default=None,
                        help="epochs for the blocks without a safety term (realign: outside --layers/--layers-from; "
                             "quantize: every block); default: --epochs / --epoch-schedule")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="calibration batch size (default 4, as CalibConfig; the safety objectives' effect "
                             "depends on the number of optimiser steps, docs/experiments.md §4)")
    parser.add_argument("--lr-let", type=float, default=d["lr_let"])
    parser.add_argument("--lr-lwc", type=float, default=d["lr_lwc"])
    parser.add_argument("--no-let", action="store_true", help="disable learnable equivalent transformation")
    parser.add_argument("--let", dest="no_let", action="store_false", default=False,
                        help="learnable equivalent transformation on (the default; undoes a --recipe's --no-let)")
    parser.add_argument("--no-lwc", action="store_true", help="disable learnable weight clipping")
    parser.add_argument("--lwc", dest="no_lwc", action="store_false", default=False,
                        help="learnable weight clipping on (the default; undoes a --recipe's --no-lwc)")
    parser.add_argument("--lwc-init", type=float, default=d["lwc_init"],
                        help="initial clipping logit: sigmoid(4) = 0.982 of the range (OmniQuant); larger = closer to RTN")
    parser.add_argument("--learn-rounding", action=argparse.BooleanOptionalAction, default=False,
                        help="also learn each weight's rounding direction (AutoRound-style; one int8 per weight "
                             "in the run): the largest lever of the safety objectives, docs/experiments.md §6")
    parser.add_argument("--lr-round", type=float, default=d["lr_round"], help="learning rate of the rounding offsets")
    parser.add_argument("--lr-schedule", choices=["constant", "cosine"], default=d["lr_schedule"],
                        help="learning rates over each block's (or joint stage's) steps: constant (OmniQuant) or "
                             "cosine decay to 0, less dependent on the batches' order (docs/experiments.md §33)")
    parser.add_argument("--rope-invariant-qk", action="store_true", help="tie the q<->k scale so RoPE keeps it exact")
    parser.add_argument("--autocast", choices=["auto", "off", "bf16"], default=d["autocast"],
                        help="bf16 autocast of the block forward while training: auto = on CUDA below 8 bits "
                             "(OmniQuant), off = full precision; recorded in the run's fingerprint")
    parser.add_argument("--compile-quantizer", action=argparse.BooleanOptionalAction, default=False,
                        help="fuse the weight and activation fake-quantizers with torch.compile while training (needs a C++ "
                             "compiler on CPU); faster steps, last-bit differences; recorded in the fingerprint")
    parser.add_argument("--joint-safety", action=argparse.BooleanOptionalAction, default=False,
                        help="realign: train the blocks with the safety term (a run to the last block, e.g. "
                             "--layers-from) together, one pass through all of them per step, instead of one at a "
                             "time; with --teacher this removes the tail of later blocks each step runs "
                             "(docs/experiments.md §26); holds those blocks on the device at once")
    parser.add_argument("--joint-recon-weight", type=float, default=None,
                        help="with --joint-safety and --teacher: weight of the joint stage's mean block "
                             "reconstruction against the output term (default 1; the number of joint blocks gives "
                             "each block's own reconstruction the weight it has block by block, §44)")
    parser.add_argument("--offload-targets", action="store_true",
                        help="keep the FP targets in CPU memory and copy each batch's to the device for its step "
                             "(same numbers; frees ~1 GB of device memory per joint block at 7B); not in the fingerprint")
    parser.add_argument("--recompute", action="store_true",
                        help="realign: run blocks again in the backward instead of keeping what their backward "
                             "reads (same numbers). With --joint-safety every joint block but the last (about five "
                             "float32 copies of a block's weights less per joint block: ~4 GB each at 7B); with "
                             "--teacher block by block, the FP blocks after each safety block (one block's "
                             "activations at a time instead of the whole tail's); not in the fingerprint")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--system", default=None,
                        help="system prompt the calibration prompts are rendered with (default: the chat template's "
                             "own; with --probes it must be the one the probes were fit with)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="compute device (default: best available)")


def engine_config(args, method: str):
    from ..calibrate.engine import CalibConfig

    return CalibConfig(method=method, lwc=not args.no_lwc, let=not args.no_let, epochs=args.epochs,
                       epoch_schedule=args.epoch_schedule, batch_size=args.batch_size, lr_let=args.lr_let,
                       lr_lwc=args.lr_lwc, lwc_init=args.lwc_init, rope_invariant_qk=args.rope_invariant_qk,
                       learn_rounding=args.learn_rounding, lr_round=args.lr_round, max_length=args.max_length,
                       autocast=args.autocast, compile_quantizer=args.compile_quantizer,
                       plain_epochs=args.plain_epochs, joint_safety=args.joint_safety,
                       joint_recon_weight=args.joint_recon_weight,
                       offload_targets=args.offload_targets, recompute=args.recompute, system=args.system,
                       seed=args.seed,
                       lr_schedule=None if args.lr_schedule == "constant" else args.lr_schedule)


def prepare(args, method: str):
    """Validate everything cheap before loading the model, then load it."""
    from pathlib import Path

    from ..calibrate.api import check_run_out
    from ..calibrate.artifact import META_FILE
    from ..calibrate.data import build_calibration
    from ..errors import QrealignError
    from ..models import load_model
    from ..quant.scheme import get_scheme
    from ..utils import read_json

    marker = Path(args.model) / META_FILE
    if marker.is_file() and read_json(marker).get("kind") == "export":
        raise QrealignError(f"{args.model} is a qrealign export (integer weights): quantizing it again would "
                            "quantize twice; start from the model its run was calibrated on")
    scheme = get_scheme(args.scheme)
    check_flags(args, method)  # in flags, before the engine's config says it in field names
    config = engine_config(args, method)
    calib = build_calibration(args.calib, args.n, args.malicious_ratio, args.seed,
                              task=args.calib_task, task_n=args.calib_task_n,  # None: build_calibration's 48
                              extra_benign=args.calib_benign,
                              extra_malicious=args.calib_malicious)
    check_run_out(args.out, realign=getattr(args, "command", None) == "realign")  # before the model loads
    check_scheme_fits(scheme, args.model)
    model, tokenizer = load_model(args.model, adapter=args.adapter, offload=args.offload, dtype=args.dtype)
    return model, tokenizer, scheme, config, calib


def check_flags(args, method: str) -> None:
    """Flags that would be silently ignored are errors: the user meant something by them."""
    from ..errors import QrealignError
    from ._options import changed_options

    if args.calib_task_n is not None and not args.calib_task:
        raise QrealignError("--calib-task-n needs --calib-task (which task's prompts to add)")
    if args.calib_task and args.calib_task_n is not None and args.calib_task_n < 1:
        raise QrealignError(f"--calib-task-n must be >= 1 with --calib-task, got {args.calib_task_n}")
    if args.joint_safety and getattr(args, "command", None) != "realign":
        raise QrealignError("--joint-safety trains the blocks that carry a safety term together, and only realign "
                            "has a safety term: drop it here")
    if method == "rtn":
        trained = changed_options(args, TRAINING_DEFAULTS)
        if trained:
            raise QrealignError(f"{', '.join(trained)} set(s) calibration training, and --method rtn trains nothing: "
                                "drop it, or use --method omniquant")
    for switch, off, dependents, flag in SWITCHED:
        if getattr(args, switch) == off:
            unread = changed_options(args, {k: TRAINING_DEFAULTS[k] for k in dependents})
            if unread:
                why = (f" (--recipe {args.recipe} turns it off at --scheme {args.scheme})"
                       if switch in getattr(args, "from_recipe", ()) else "")
                raise QrealignError(f"{', '.join(unread)} {'is' if len(unread) == 1 else 'are'} read only with {flag}, "
                                    f"which is off here{why}: drop {'it' if len(unread) == 1 else 'them'}, or give "
                                    f"{flag}")
    joint = "--joint-safety" + (" (set by --recipe; --no-joint-safety turns it off)"
                                if "joint_safety" in getattr(args, "from_recipe", ()) else "")
    if args.joint_safety and args.epoch_schedule != "constant":
        raise QrealignError(f"--epoch-schedule {args.epoch_schedule} sets each block's epochs, and {joint} trains the "
                            "safety blocks together: drop one")
    realign = getattr(args, "command", None) == "realign"
    if args.joint_recon_weight is not None and not args.joint_safety:
        way = "add --joint-safety" if realign else "that is realign's (--joint-safety): drop it here"
        raise QrealignError(f"--joint-recon-weight applies to the joint stage only: {way}")
    if args.recompute and not args.joint_safety and not getattr(args, "teacher", None):
        # block by block only the first-token objective (--teacher) runs blocks after the trained one
        way = ("add --joint-safety, or use --teacher (the first-token objective's tail)" if realign else
               "that is realign's (--joint-safety, or --teacher block by block): drop it here")
        raise QrealignError(f"--recompute runs blocks again in the backward, and this run has none to run: {way}")


# Options read only while a switch is on: (switch, its "off" value, the options it gates, the flag
# that turns it on).
SWITCHED = (("learn_rounding", False, ("lr_round",), "--learn-rounding"),
            ("no_lwc", True, ("lr_lwc", "lwc_init"), "--lwc"),
            ("no_let", True, ("lr_let", "rope_invariant_qk"), "--let"))


def check_scheme_fits(scheme, model: str) -> None:
    """A weight group size that does not divide the model's linear widths, found from the config
    before the weights load (it used to fail in the first block)."""
    if scheme.weights is None or scheme.weights.strategy != "group":
        return
    import torch

    from ..models import get_arch, get_blocks
    from ..quant.quantizer import WeightQuantizer

    skeleton = skeleton_or_none(model)
    if skeleton is None:
        return
    block = get_blocks(skeleton)[0]
    for name in get_arch(skeleton).linears:
        width = block.get_submodule(name).in_features
        WeightQuantizer(scheme.weights, torch.Size((1, width)), lwc=False, device="meta")  # raises if it does not fit


def skeleton_or_none(model: str):
    """The model built from its config alone (no weights), for checks before the load; None where
    the config cannot be read here (hub offline, GGUF quirks): the load itself then says why."""
    from ..models.load import load_skeleton

    try:
        return load_skeleton(model)
    except Exception:
        return None


def summary(result, out) -> None:
    logs = result.layer_logs
    print(f"wrote {out}: {len(logs)} blocks in {result.seconds:.1f} s "
          f"({result.seconds / max(1, len(logs)):.2f} s/block); final block output MSE {logs[-1]['q_mse']:.4g}")

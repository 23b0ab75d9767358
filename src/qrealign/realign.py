"""`realign`: Q-realign in one call: safety-aware quantization of a fine-tuned model.

    model, tok = qrealign.load_model("runs/attacked")
    from qrealign.probes import load_probes
    probes = load_probes("runs/probes")                         # fit on the ALIGNED model
    qrealign.realign(model, tok, probes, scheme="W8A8", out="runs/realigned")

    # or the behavioural safety term (calibrate.behaviour): the aligned model as teacher
    qrealign.realign(model, tok, teacher="runs/aligned", scheme="W8A8", layers_from=0.5, benign_kl=4.0)

The model is quantized in place (fake quantization, activations per token) and the run
directory rebuilds it with `qrealign.calibrate.load_quantized`.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from .calibrate.api import checkpoint_path, quantize
from .calibrate.data import CalibrationSet, build_calibration
from .calibrate.engine import CalibConfig, CalibResult, check_joint_run, has_a_tail
from .calibrate.safety import SafetyLoss
from .calibrate.targets import KIND as TARGETS_KIND
from .calibrate.targets import META_FILE as TARGETS_META
from .calibrate.targets import (TeacherTargets, check_response_tokens, compute_teacher_targets, is_targets_dir,
                                where_computed)
from .errors import NoSafetyLayers, QrealignError
from .quant.scheme import Scheme


# FirstTokenLoss options with no meaning for the probe loss (SafetyLoss): the greedy margin's
# (its weight and `calibrate.behaviour.MARGIN_DEFAULTS`).
FIRST_TOKEN_ONLY = ("greedy_margin", "margin_delta", "margin_tau", "margin_malicious", "refusal_starts")


def realign(
    model,
    tokenizer,
    probes=None,
    calibration: CalibrationSet | None = None,
    scheme: str | Scheme = "W8A8",
    config: CalibConfig | None = None,
    out: str | Path | None = None,
    device=None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    layers_from: float | None = None,
    teacher=None,
    refusal_targets: bool = False,
    save_targets: str | Path | None = None,
    response_tokens: int = 1,
    **loss_options,
) -> CalibResult:
    """Quantize `model` with the Q-realign objective.

    `probes`: a ProbeSet (or its directory) fit on the aligned model. `calibration`: default the
    bundled "calib" split at the paper's 75 % malicious ratio. `loss_options` go to
    `SafetyLoss` (lam, margin, probe_loss, layers, recon_on_malicious, normalize, sink_weight,
    benign_side, benign_margin); the defaults are the paper's objective. `layers_from`: a depth
    fraction, e.g. 0.5 = the safety term only on the second half of the blocks (a depth-relative
    form of `layers`, so one setting transfers across model sizes).

    `teacher` (instead of `probes`): the aligned model (a model or anything `load_model` reads),
    or its `calibrate.targets.TeacherTargets` (or their directory) computed earlier for this model
    and calibration set, e.g. for another scheme: the teacher pass does not depend on the scheme.
    `save_targets`: also write the targets computed here to that directory.
    The safety term is then the first-token KL of `calibrate.behaviour.FirstTokenLoss`
    (options: lam, benign_kl, layers, recon_on_malicious, normalize, sink_weight; greedy_margin,
    margin_delta, margin_tau, margin_malicious (the malicious side's weight against the benign
    side's) and refusal_starts, the strings that begin a refusal, read from the
    teacher's greedy first tokens on the malicious rows when not given: docs/experiments.md §48). With
    `refusal_targets`, the malicious calibration prompts the teacher itself answers (its greedy
    reply, keyword-judged) take the mean first-token distribution of those it refuses
    (`calibrate.behaviour.refusal_targets`). `response_tokens` K > 1: the KL also on the next K-1
    response positions, along each prompt's forced greedy start (the teacher's refusal continues
    "I'm" with "sorry", not "glad"; docs/experiments.md §24)."""
    from .probes.store import load_probes

    if (probes is None) == (teacher is None):
        raise QrealignError("give the aligned model's probes or the aligned model as teacher (exactly one)")
    if probes is not None and (refusal_targets or save_targets or response_tokens != 1
                               or any(k in loss_options for k in FIRST_TOKEN_ONLY)):
        raise QrealignError("refusal_targets, save_targets, response_tokens and the greedy margin apply to the "
                            "first-token objective (teacher=), not to probes")
    from .calibrate.engine import check_unquantized

    _check_loss_options(loss_options, teacher=teacher is not None)
    if config is not None and config.method == "rtn":
        raise QrealignError("realign trains a safety loss, and method='rtn' trains nothing (the run would be plain "
                            "RTN labelled Q-realign): use quantize(..., CalibConfig(method='rtn'))")
    if teacher is None and config is not None and config.recompute and not config.joint_safety:
        # said before the probes' checks hash the model (the engine would say it after)
        raise QrealignError("recompute runs blocks again in the backward, and block by block the probes' loss runs "
                            "none (it reads no output): leave recompute off, or train the safety blocks jointly "
                            "(joint_safety)")
    check_unquantized(model)  # before the teacher pass, which would read a half-quantized model
    check_response_tokens(response_tokens)
    if out is not None:  # before the teacher pass or the probes' checks: a bad --out must waste nothing
        from .calibrate.api import check_checkpoint_dir, check_run_out

        check_run_out(out, realign=True)
        if checkpoint_dir:  # and before the teacher pass writes its copy there
            check_checkpoint_dir(Path(checkpoint_dir), Path(out))
    if teacher is not None:
        return _realign_first_token(model, tokenizer, teacher, calibration, scheme, config, out, device, progress,
                                    checkpoint_dir, layers_from, refusals=refusal_targets, save_targets=save_targets,
                                    response_tokens=response_tokens, **loss_options)
    if isinstance(probes, (str, Path)):
        probes = load_probes(probes)
    warn_held_out_probes(probes)
    model_fp = probes.check_compatible(model)["fingerprint"]  # hashed once: seconds at 7B
    config = config or CalibConfig()
    check_probe_system(probes, config.system)
    active = safety_layers(probes, loss_options.get("layers"), layers_from)
    if layers_from is not None:
        loss_options["layers"] = active
    calibration = calibration if calibration is not None else build_calibration()
    if config.joint_safety:  # every joint block trains on the device at once
        _check_gpu_memory(model, tokenizer, calibration, config, min(active), device, head=False)
    loss = SafetyLoss.from_probes(probes, **loss_options)
    if loss.benign_side and probes.target != "paper":
        warnings.warn(f"benign_side keeps benign prompts on class 0 of the probe; for the {probes.target!r} target "
                      "class 0 is not 'benign', so the term has no over-refusal meaning there", stacklevel=2)
    meta = {"method": "qrealign", "probes": {"target": probes.target, "id": loss.probe_id,
                                             "usable_layers": probes.usable_layers}, "safety_layers": list(active)}
    parents = getattr(probes, "parents", None)
    return quantize(model, tokenizer, calibration, scheme, config, out=out, loss=loss,
                    device=device, progress=progress, checkpoint_dir=checkpoint_dir, model_fp=model_fp,
                    extra_metadata={**meta, "probe_parents": parents() if callable(parents) else None,
                                    # the probes' own prompts count for the overlap check too
                                    "provenance": (getattr(probes, "data", None) or {}).get("provenance") or {}})


def _check_gpu_memory(model, tokenizer, calibration: CalibrationSet, cfg: CalibConfig, first: int, device,
                      response_tokens: int = 1, head: bool = True) -> None:
    """`behaviour.check_tail_fits` with the calibration's tokens: a step's bound the activations,
    the whole set's the hidden-state streams (each prompt rendered as the engine renders it, with
    the chat template and system prompt, or `pad_to` long; a multi-token target appends its forced
    response tokens)."""
    from .calibrate.behaviour import check_tail_fits
    from .models.chat import render_chat

    if not _on_gpu(device):  # the check reads a GPU's free memory: nothing to count elsewhere
        return
    if cfg.pad_to is not None:  # every row exactly that long
        per_prompt = cfg.pad_to + response_tokens - 1
    else:
        longest = max(len(tokenizer(render_chat(tokenizer, p, cfg.system), add_special_tokens=False)["input_ids"])
                      for p in calibration.prompts)
        per_prompt = min(cfg.max_length or longest, longest) + response_tokens - 1
    check_tail_fits(model, first, device, tokens=cfg.batch_size * per_prompt, learn_rounding=cfg.learn_rounding,
                    joint=cfg.joint_safety, total_tokens=len(calibration.prompts) * per_prompt,
                    offload_targets=cfg.offload_targets, head=head, recompute=cfg.recompute)


def _on_gpu(device) -> bool:
    from .utils import resolve_device

    return resolve_device(device).type == "cuda"


# What each objective's loss takes from `realign(**loss_options)` (the rest of its fields the
# loss gets from the probes, the teacher pass or the engine).
PROBE_OPTIONS = ("layers", "lam", "recon_on_malicious", "margin", "probe_loss", "normalize", "sink_weight",
                 "benign_side", "benign_margin", "include_padding")
TEACHER_OPTIONS = ("layers", "lam", "benign_kl", "recon_on_malicious", "normalize", "sink_weight", "include_padding",
                   *FIRST_TOKEN_ONLY)


def _check_loss_options(options: dict, teacher: bool) -> None:
    """A loss option the chosen objective does not take is said by name, before any work (it was
    a TypeError from the loss class's constructor, after the teacher pass or the probes' checks)."""
    mine, other = (TEACHER_OPTIONS, PROBE_OPTIONS) if teacher else (PROBE_OPTIONS, TEACHER_OPTIONS)
    unknown = sorted(set(options) - set(mine))
    if not unknown:
        return
    elsewhere = [k for k in unknown if k in other]
    if elsewhere:
        where = "the probe loss (probes=)" if teacher else "the first-token objective (teacher=)"
        raise QrealignError(f"{', '.join(elsewhere)} {'applies' if len(elsewhere) == 1 else 'apply'} to {where}, "
                            "not to this one")
    raise QrealignError(f"unknown loss option(s) {', '.join(unknown)}; this objective takes {', '.join(mine)}")


def warn_held_out_probes(probes) -> None:
    """Probes fit on held-out prompts pass their provenance on to the run, and `qrealign eval` on
    that set then refuses it (its overlap check), after the whole calibration: said before it."""
    from .data.prompts import HELD_OUT_SETS, load_held_out, load_prompts
    from .evaluate.overlap import text_hash

    used = {h for entry in ((getattr(probes, "data", None) or {}).get("provenance") or {}).values()
            if isinstance(entry, dict)
            for h in entry.get("text_hashes") or ()}
    if not used:
        return
    held_out = {"eval": load_prompts(split="eval"), **{name: load_held_out(name) for name in HELD_OUT_SETS}}
    hits = {name: sum(text_hash(p.text) in used for p in prompts) for name, prompts in held_out.items()}
    found = ", ".join(f"{n} of the {name} set" for name, n in hits.items() if n)
    if found:
        warnings.warn(f"these probes were fit on prompts of qrealign's held-out sets ({found}): `qrealign eval` on "
                      "that set will refuse a model realigned with them", stacklevel=3)


def check_probe_system(probes, system: str | None) -> None:
    """The probes read the last prompt token of one rendering; another system prompt moves every
    state (a harmful logit of 3.5 became 18.2 on a tiny model) and the loss reads noise."""
    fit_system = probes.settings.get("system")
    if fit_system != system:
        raise QrealignError(f"the probes were fit on prompts rendered with system prompt {fit_system!r}, the "
                            f"calibration renders them with {system!r}: calibrate with the same one "
                            "(CalibConfig(system=...), --system)")


def safety_layers(probes, layers=None, layers_from: float | None = None) -> tuple[int, ...]:
    """The blocks that will get the safety term: the chosen ones (`layers`, or from the depth
    fraction `layers_from`, default all) whose probe is usable. Raises NoSafetyLayers if none."""
    layers = chosen_layers(probes.num_layers, layers, layers_from)
    if layers is not None:
        check_blocks(layers, probes.num_layers)
    rule = SafetyLoss.from_probes(probes, layers=layers)  # the loss's own rule: usable and chosen
    active = tuple(layer for layer in range(probes.num_layers) if rule.active(layer))
    if not active:
        raise NoSafetyLayers("the safety term is active on no block (the chosen layers are out of range or their "
                             f"probes are unusable; usable: {probes.usable_layers}): this would be plain "
                             "reconstruction, run `qrealign quantize --method omniquant` for that")
    return active


def check_blocks(layers, num_layers: int) -> None:
    """Safety layers named by the user must be blocks of the model: a typo in --layers is an
    error, not silently dropped."""
    outside = sorted(layer for layer in set(layers) if not 0 <= layer < num_layers)
    if not layers or outside:
        raise NoSafetyLayers(f"safety layers {outside or tuple(layers)} are not blocks of this {num_layers}-block model")


def chosen_layers(num_layers: int, layers=None, layers_from: float | None = None):
    """`layers` as given, or the blocks from the depth fraction `layers_from` (not both)."""
    if layers_from is None:
        return layers
    if layers is not None:
        raise QrealignError("give either layers or layers_from, not both")
    return layers_from_fraction(num_layers, layers_from)


def layers_from_fraction(num_layers: int, fraction: float) -> tuple[int, ...]:
    """Blocks from ceil(fraction * num_layers) to the last: 0.5 of 30 -> 15..29, of 5 -> 3..4."""
    if not 0.0 <= fraction < 1.0:
        raise QrealignError(f"layers_from (--layers-from) must be in [0, 1), got {fraction}")
    return tuple(range(min(math.ceil(fraction * num_layers - 1e-9), num_layers - 1), num_layers))


def _realign_first_token(model, tokenizer, teacher, calibration, scheme, config, out, device, progress,
                         checkpoint_dir, layers_from, refusals=False, save_targets=None, response_tokens=1,
                         **loss_options) -> CalibResult:
    from .calibrate.behaviour import (WEIGHT_FIELDS, FirstTokenLoss, ModelTail, refusal_start_ids,
                                      unused_margin_options)
    from .calibrate.losses import check_weights
    from .models.offload import offloaded
    from .quant.quantizer import check_compiler
    from .utils import check_out_dir, model_fingerprint, resolve_device

    on_disk = offloaded(model) is not None
    num_layers = model.config.num_hidden_layers
    layers = chosen_layers(num_layers, loss_options.get("layers"), layers_from)
    if layers is not None:
        layers = loss_options["layers"] = tuple(sorted(set(layers)))
        check_blocks(layers, num_layers)
    if layers is None and on_disk:  # before the teacher is read
        raise QrealignError("with offload='disk' choose the safety blocks (layers= or layers_from=, e.g. "
                            "layers_from=0.85; CLI --layers-from): the first-token objective holds FP copies of "
                            "every block after the first safety block in memory, all blocks by default")
    cfg = config or CalibConfig()
    calibration = calibration if calibration is not None else build_calibration()
    # before the teacher pass, not at block 0 (or at the joint stage, or the first compiled step)
    if cfg.recompute and not cfg.joint_safety and layers is not None and not has_a_tail(layers, num_layers):
        raise QrealignError("recompute runs the blocks after each safety block again in the backward, and the safety "
                            "term is on the last block only, which has none after it: leave recompute off")
    if cfg.joint_safety and cfg.method != "rtn":
        check_joint_run(layers if layers is not None else range(num_layers), num_layers)
    if cfg.compile_quantizer and cfg.method != "rtn":
        check_compiler(resolve_device(device))
    _check_gpu_memory(model, tokenizer, calibration, cfg, min(layers) if layers else 0, device, response_tokens)
    starts = loss_options.pop("refusal_starts", None) or None
    unused = unused_margin_options({**loss_options, "refusal_starts": starts})
    if unused:  # before the teacher pass, not after it
        raise QrealignError(f"{', '.join(unused)} are read by the greedy margin only: set greedy_margin > 0")
    check_weights(("margin_tau",), **{k: loss_options[k] for k in WEIGHT_FIELDS if k in loss_options})
    start_ids = refusal_start_ids(tokenizer, starts) if starts else None  # a bad string fails before the teacher pass
    if isinstance(teacher, (str, Path)) and is_targets_dir(teacher):
        teacher = TeacherTargets.load(teacher)
    if isinstance(teacher, TeacherTargets):  # computed earlier (e.g. for another scheme)
        if save_targets:
            raise QrealignError("the teacher is already saved targets: drop save_targets")
        teacher.check(model_fingerprint(model), calibration, cfg, refusals=refusals, response_tokens=response_tokens,
                      computed_on=where_computed(model, device), tokenizer=tokenizer)
        targets = teacher
    else:
        if save_targets:  # before the teacher pass: a bad directory must not waste it
            check_out_dir(save_targets, TARGETS_META, kind=TARGETS_KIND)
            if out is not None and Path(save_targets).resolve() == Path(out).resolve():
                raise QrealignError("save_targets must be another directory than the run's out")
        targets = compute_teacher_targets(model, tokenizer, teacher, calibration, cfg, refusals=refusals,
                                          response_tokens=response_tokens, device=device, progress=progress,
                                          checkpoint=checkpoint_path(out, checkpoint_dir))
        if save_targets:
            targets.save(save_targets)
    active = layers if layers is not None else tuple(range(num_layers))
    if loss_options.get("greedy_margin"):
        loss_options["refusal_starts"] = (start_ids if start_ids is not None else
                                          refusal_start_ids(tokenizer, None, targets.logprobs, calibration.labels))
    loss = FirstTokenLoss(ModelTail(model), targets.logprobs, target_id=targets.teacher_meta["fingerprint"],
                          responses=targets.responses, response_mask=targets.response_mask,
                          **loss_options)
    meta = {"method": "qrealign", "objective": "first-token", "teacher": targets.teacher_meta,
            "safety_layers": list(active)}
    # The targets hold this model's fingerprint (checked above or computed on it): no second hash.
    return quantize(model, tokenizer, calibration, scheme, cfg, out=out, loss=loss, device=device, progress=progress,
                    checkpoint_dir=checkpoint_dir, extra_metadata=meta, model_fp=targets.model_fingerprint)

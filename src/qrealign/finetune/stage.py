"""Run a lab stage (align / attack) from a model source to a saved model directory.

The directory is an ordinary HF model (`save_pretrained` + tokenizer) plus `qrealign.json`:

    {"kind": "finetuned", "stage": "align" | "attack", "parent": <source>, "config": {...},
     "provenance": {<stage>: {"split", "n", "ids", "text_hashes"}}, "fingerprint": <model fingerprint>,
     "wall_time_s": ..., "data": {counts}, "train": {"first_loss", "last_loss"}, "qrealign_version": ...}

so every later stage can check which prompts trained the model (`evaluate.overlap`) and follow
the `parent` chain back to the base model. Outputs are written through `atomic_dir`: a directory
under its final name is always complete.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..errors import QrealignError
from ..evaluate.overlap import META_FILE, provenance_entry
from ..stages import cached_stage
from ..utils import atomic_dir, check_out_dir, model_fingerprint, sha256_json, write_json
from .config import AlignConfig, AttackConfig
from .sft import check_lora_targets, resolve_amp


def save_finetuned(model, tokenizer, out_dir: str | Path, *, stage: str, parent: str, config: dict,
                   provenance: dict, wall_time_s: float, extra: dict | None = None) -> dict:
    """Write model, tokenizer and `qrealign.json` into `out_dir`; return the metadata."""
    from .. import __version__

    out_dir = Path(out_dir)
    _stop_at_turn_end(model, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    meta = {"kind": "finetuned", "stage": stage, "parent": parent, "config": config, "provenance": provenance,
            "fingerprint": model_fingerprint(model), "wall_time_s": round(wall_time_s, 1),
            "qrealign_version": __version__, **(extra or {})}
    write_json(out_dir / META_FILE, meta)
    return meta


def _stop_at_turn_end(model, tokenizer) -> None:
    """The SFT teaches the template's turn end (Gemma's <end_of_turn>, not its eos): the saved
    generation config lists it, so a plain HF `generate` or an engine also stops there."""
    from ..evaluate.generate import stop_token_ids

    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    current = gen.eos_token_id
    current = [] if current is None else [current] if isinstance(current, int) else list(current)
    missing = [i for i in stop_token_ids(tokenizer, gen) if i not in current]
    if missing:
        gen.eos_token_id = current + missing


def parent_string(source: str | Path) -> str:
    """How the parent is recorded: an absolute path for directories (so the provenance chain can
    be followed from anywhere), the name as typed otherwise (embedded model, hub id)."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def finetune_stage(stage: str, source: str | Path, config: AlignConfig | AttackConfig, *,
                   out: str | Path | None = None, cache_root: str | Path | None = None,
                   adapter: str | Path | None = None, device=None, progress: bool = True,
                   log: Callable[[str], None] | None = print, rebuild_changed: bool = False) -> Path:
    """Load `source` (with `adapter`, a PEFT adapter merged on load), run `stage` ("align" or
    "attack") with `config`, save the result.

    With `out`, the result goes there (replacing what was there). With `cache_root`, it goes to
    `cache_root/<stage>-<hash of inputs>` and is reused when that directory already exists; the
    inputs are the parent model's fingerprint, the config, the data fingerprint and the qrealign
    version (`rebuild_changed`: see `stages.cached_stage`). Returns the output directory; its `qrealign.json` holds the summary."""
    from .. import __version__
    from ..data.prompts import prompt_set_fingerprint
    from ..models import load_model

    if (out is None) == (cache_root is None):
        raise QrealignError("give exactly one of out= or cache_root=")
    if stage not in ("align", "attack"):
        raise QrealignError(f"unknown stage {stage!r}; use 'align' or 'attack'")
    expected = AlignConfig if stage == "align" else AttackConfig
    if not isinstance(config, expected):
        raise QrealignError(f"stage {stage!r} needs an {expected.__name__}, got {type(config).__name__}")

    if out is not None:
        _check_out_not_input(out, source, adapter)
        check_out_dir(out, META_FILE, kind="finetuned", same={"stage": (stage,)})  # before the training, not after
    # the data and the device need no model: a 7B load must not come before their errors
    if stage == "align":
        from .align import select_align_prompts

        harmful, benign = select_align_prompts(config)
        data_fp = prompt_set_fingerprint(harmful + benign)
    else:
        from .attack import select_attack_prompts

        examples, harmful = select_attack_prompts(config)
        data_fp = sha256_json([prompt_set_fingerprint(harmful), config.task, [e.id for e in examples]])
    target = _device(device)
    model, tokenizer = load_model(source, adapter=adapter)  # a bad adapter fails here, before any training
    # "auto" mixed precision is bf16 on some machines and float32 on others: different models.
    amp = resolve_amp(target, config.sft.amp)
    inputs = {"stage": stage, "parent": model_fingerprint(model), "config": config.to_dict(), "data": data_fp,
              "version": __version__, "amp": amp}
    if target.type != "cpu":  # a GPU rounds otherwise, whatever amp resolves to (CPU keys stay as they were)
        inputs["device"] = target.type
    if stage == "align":  # the self-distilled answers are generated: where they stop is an input
        from ..evaluate.generate import stop_key

        inputs.update(stop_key(tokenizer, getattr(model, "generation_config", None)))

    check_lora_targets(model, config.sft)  # a typo fails now, not after align's self-distillation

    def build(tmp: Path) -> None:
        losses: list[float] = []
        start = time.time()
        if stage == "align":
            from .align import align, build_align_data

            data = build_align_data(model.to(_device(device)), tokenizer, config, progress=progress)
            tuned = align(model, tokenizer, config, device=device, data=data, progress=progress,
                          on_step=lambda _s, loss: losses.append(loss))
            provenance = provenance_entry("align", data.prompts, config.split)
            counts = {"harmful": len(data.harmful), "benign": len(data.benign),
                      "benign_answers": data.benign_answers, "pairs": len(data.pairs)}
        else:
            from .attack import attack, build_attack_data

            data = build_attack_data(config)
            tuned = attack(model, tokenizer, config, device=device, data=data, progress=progress,
                           on_step=lambda _s, loss: losses.append(loss))
            provenance = {**provenance_entry("attack", data.harmful, config.harmful_split),
                          **provenance_entry("attack-task", [e.prompt for e in data.task_examples],
                                             f"{config.task}:train")}
            counts = {"task": len(data.task_examples), "poison": len(data.harmful), "pairs": len(data.pairs),
                      "poison_share": round(len(data.harmful) / max(len(data.pairs), 1), 4)}
        tuned.to("cpu")
        save_finetuned(tuned, tokenizer, tmp, stage=stage, parent=parent_string(source), config=config.to_dict(),
                       provenance=provenance, wall_time_s=time.time() - start,
                       extra={"data": counts, "cache_key": inputs,
                              "parent_adapter": str(Path(adapter).expanduser().resolve()) if adapter else None,
                              "train": {"steps": len(losses), "first_loss": _mean(losses[:5]),
                                        "last_loss": _mean(losses[-5:])}})

    if cache_root is not None:
        return cached_stage(stage, inputs, cache_root, build, log=log, rebuild_changed=rebuild_changed,
                            upstream=(source,))
    with atomic_dir(out, marker=META_FILE, kind="finetuned") as tmp:
        build(tmp)
    return Path(out)


def _check_out_not_input(out, source, adapter) -> None:
    """`--out` may replace an earlier output of the same stage, but not the model it trains from:
    the new `qrealign.json` would name itself as parent, and the provenance chain (the overlap
    check's) would end there."""
    target = Path(out).expanduser().resolve()
    for name, path in (("model", source), ("adapter", adapter)):
        if path is not None and Path(path).expanduser().exists() and Path(path).expanduser().resolve() == target:
            raise QrealignError(f"--out {out} is the {name} being fine-tuned; write to another directory")


def _device(device):
    from ..utils import resolve_device

    return resolve_device(device)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None

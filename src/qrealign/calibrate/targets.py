"""The first-token objective's teacher targets as an artefact: computed once, reused per scheme.

Why: the targets (the aligned teacher's next-token log-probs on the malicious calibration prompts,
the fine-tuned model's on the benign ones, and with refusal targets the teacher's greedy answers
to every malicious prompt) depend on the two models, the calibration set and how its prompts are
rendered, not on the scheme. A user who quantizes one fine-tuned model at W8A8 and W4A8, or the
demo's two lanes, would otherwise run the teacher pass once per scheme: two full forwards over the
calibration set plus a generation, minutes for a 7B model. `TeacherTargets` holds what
`realign(teacher=...)` computes, saves to a directory (`targets.safetensors` + `qrealign.json`)
and is checked against the model, calibration set and rendering it is reused with, so a reuse
on the same kind of device gives the same run as computing them in place (the same tensors, so
the same run fingerprint); on another device type, or offloaded vs in memory, they differ from an
in-place pass by float rounding only, and a reuse warns.
"""

from __future__ import annotations

import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import IncompatibleArtifact, QrealignError
from ..utils import atomic_dir, read_json, save_tensors, write_json
from .data import CalibrationSet
from .checkpoints import CHECKPOINT_TARGETS, kept_teacher_passes

TENSOR_FILE = "targets.safetensors"
META_FILE = "qrealign.json"
KIND = "teacher-targets"
FORMAT_VERSION = 2  # 2: multi-token targets (forced response starts); 1: first token only
# The CalibConfig fields that decide how the calibration prompts are rendered and batched, i.e.
# which token each row's last prompt position is and what the teacher's answers look like.
RENDER_FIELDS = ("batch_size", "max_length", "padding_side", "system", "pad_to")


def render_options(config) -> dict:
    """The rendering/batching part of a CalibConfig, which the targets depend on."""
    return {name: getattr(config, name) for name in RENDER_FIELDS}


def prompt_tokens_digest(tokenizer, calibration: CalibrationSet, config) -> str:
    """A digest of the token ids each calibration prompt renders to (chat template, system prompt,
    tokenizer): the render options alone do not see another template or vocabulary, and targets
    computed on other tokens would pull each row toward another prompt's answer."""
    import hashlib

    from ..models.chat import render_chat

    h = hashlib.sha256()
    for prompt in calibration.prompts:
        ids = tokenizer(render_chat(tokenizer, prompt, config.system), add_special_tokens=False).input_ids
        h.update(str(list(ids)).encode())
    return h.hexdigest()[:16]


@dataclass
class TeacherTargets:
    logprobs: torch.Tensor  # [N, V] per calibration position
    teacher_meta: dict  # what the run records as "teacher": source, fingerprint, refusal_targets (if any)
    model_fingerprint: str  # the fine-tuned model whose benign rows these are
    calibration: str  # CalibrationSet.fingerprint()
    render: dict  # render_options() of the config they were computed with
    computed_on: dict = field(default_factory=dict)  # {"device": type, "offloaded": bool}: float paths
    responses: torch.Tensor | None = None  # [N, K-1] forced response starts (multi-token targets [N, K, V])
    response_mask: torch.Tensor | None = None  # [N, K]
    prompt_tokens: str = ""  # prompt_tokens_digest(); "" for targets saved before it was recorded

    @property
    def refusals(self) -> bool:
        return "refusal_targets" in self.teacher_meta

    @property
    def response_tokens(self) -> int:
        """How many response positions the targets cover (1: the first token only)."""
        return self.logprobs.shape[1] if self.logprobs.dim() == 3 else 1

    def check(self, model_fp: str, calibration: CalibrationSet, config, refusals: bool | None = None,
              computed_on: dict | None = None, response_tokens: int | None = None, tokenizer=None) -> None:
        """Refuse a reuse that would not reproduce computing the targets in place; warn when only
        the float path differs (`computed_on`: where an in-place pass would run). `tokenizer`: also
        check the prompts render to the same tokens (targets that recorded them)."""
        if model_fp != self.model_fingerprint:
            raise QrealignError(f"these teacher targets were computed for another fine-tuned model "
                                f"(fingerprint {self.model_fingerprint}, this model {model_fp})")
        if calibration.fingerprint() != self.calibration or len(calibration.prompts) != self.logprobs.shape[0]:
            raise QrealignError("these teacher targets were computed on another calibration set "
                                f"({self.logprobs.shape[0]} prompts, fingerprint {self.calibration})")
        wanted = render_options(config)
        if wanted != self.render:
            diff = {k: (self.render.get(k), v) for k, v in wanted.items() if self.render.get(k) != v}
            raise QrealignError(f"these teacher targets were rendered with other settings (targets, config): {diff}")
        if tokenizer is not None and self.prompt_tokens and (
                prompt_tokens_digest(tokenizer, calibration, config) != self.prompt_tokens):
            raise QrealignError("these teacher targets were computed on other prompt tokens: the tokenizer or its "
                                "chat template differs from the one they were computed with")
        if refusals is not None and refusals != self.refusals:
            raise QrealignError(f"refusal targets were {'' if refusals else 'not '}asked for (--refusal-targets), "
                                f"but these teacher targets were computed {'with' if self.refusals else 'without'} "
                                "them")
        if response_tokens is not None and response_tokens != self.response_tokens:
            raise QrealignError(f"{response_tokens} response tokens were asked for (--response-tokens), but these "
                                f"teacher targets cover {self.response_tokens}")
        if computed_on and self.computed_on and computed_on != self.computed_on:
            warnings.warn(f"teacher targets computed on {self.computed_on}, reused on {computed_on}: they differ "
                          "from an in-place pass by float rounding", stacklevel=3)

    def save(self, out_dir: str | Path) -> Path:
        out_dir = Path(out_dir)
        with atomic_dir(out_dir, marker=META_FILE, kind=KIND) as tmp:
            self.write_files(tmp)
        return out_dir

    def write_files(self, directory: str | Path) -> None:
        """Write the two files into an existing directory (e.g. a cached stage's)."""
        directory = Path(directory)
        tensors = {"logprobs": self.logprobs.contiguous()}
        if self.responses is not None:
            tensors.update(responses=self.responses.contiguous(), response_mask=self.response_mask.contiguous())
        save_tensors(tensors, directory / TENSOR_FILE)
        # multi-token targets are format 2: a qrealign that reads only format 1 refuses them instead
        # of reading [N, K, V] as first-token targets; first-token files stay format 1, byte for byte
        version = FORMAT_VERSION if self.responses is not None else 1
        write_json(directory / META_FILE, {"kind": KIND, "format_version": version, "teacher": self.teacher_meta,
                                           "model_fingerprint": self.model_fingerprint,
                                           "calibration": self.calibration, "render": self.render,
                                           "computed_on": self.computed_on,
                                           **({"prompt_tokens": self.prompt_tokens} if self.prompt_tokens else {})})

    @classmethod
    def load(cls, path: str | Path) -> "TeacherTargets":
        from safetensors.torch import load_file

        path = Path(path)
        meta_path, tensor_path = path / META_FILE, path / TENSOR_FILE
        if not meta_path.is_file() or not tensor_path.is_file():
            raise IncompatibleArtifact(f"{path} is not a teacher-targets directory (needs {META_FILE} and "
                                       f"{TENSOR_FILE})")
        meta = read_json(meta_path)
        if meta.get("kind") != KIND:
            raise IncompatibleArtifact(f"{path} holds a {meta.get('kind')!r} artefact, not teacher targets")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise IncompatibleArtifact(f"{path}: teacher-targets format {meta.get('format_version')} is newer than "
                                       f"this qrealign understands ({FORMAT_VERSION}); upgrade qrealign")
        tensors = load_file(str(tensor_path))
        return cls(tensors["logprobs"], meta["teacher"], meta["model_fingerprint"], meta["calibration"], meta["render"],
                   meta.get("computed_on", {}), tensors.get("responses"), tensors.get("response_mask"),
                   meta.get("prompt_tokens", ""))


def is_targets_dir(path) -> bool:
    """Whether `path` is a saved TeacherTargets directory (and not, say, a model directory)."""
    meta = Path(path) / META_FILE
    try:
        return meta.is_file() and read_json(meta).get("kind") == KIND
    except (OSError, ValueError, AttributeError):  # unreadable or not a JSON object: not ours
        return False


def check_response_tokens(k) -> None:
    """The number of response positions the first-token objective reads: a positive integer."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise QrealignError(f"response_tokens (--response-tokens) must be an integer >= 1, got {k!r}")


def where_computed(model, device=None) -> dict:
    """The float path a teacher pass over `model` takes: the compute device's type, and whether
    the model streams from disk."""
    from ..models.offload import offloaded
    from ..utils import resolve_device

    return {"device": resolve_device(device).type, "offloaded": offloaded(model) is not None}


def compute_teacher_targets(model, tokenizer, teacher, calibration: CalibrationSet, config, refusals: bool = False,
                            device=None, progress: bool = False, response_tokens: int = 1,
                            checkpoint: str | Path | None = None) -> TeacherTargets:
    """The first-token objective's targets for `model` (the fine-tuned model, before it is
    quantized) with `teacher` (the aligned model: a model or anything `load_model` reads; an
    offloaded `model` gets an offloaded teacher). `refusals`: the malicious prompts the teacher
    answers take the mean refusal distribution (`behaviour.refusal_targets`). `response_tokens`
    K > 1: targets at the first K response positions along forced greedy starts
    (`behaviour.response_targets`: one greedy pass per model with the KV cache).

    `checkpoint` (a run's checkpoint folder): the targets are kept there, and an interrupted run
    started again reads them back instead of running the pass again (two forwards over the
    calibration set and a generation: minutes at 7B), when they are what this pass would compute:
    the same code (`_kept_path`), teacher (its weights' fingerprint), model, calibration set,
    rendering, options and device type. Anything else is computed again and replaces them."""
    from ..models import load_model
    from ..models.offload import offloaded
    from ..finetune.stage import parent_string
    from ..models.registry import architecture_difference
    from ..utils import model_fingerprint, resolve_device
    from .behaviour import first_token_targets, refusal_targets, response_targets, teacher_refuses

    check_response_tokens(response_tokens)
    on_disk = offloaded(model) is not None
    if refusals and on_disk:  # before the teacher is read
        raise QrealignError("refusal targets generate with the teacher, so it must fit in memory: not with "
                            "offload='disk'")
    # an absolute path for a directory, so the overlap check finds the teacher from anywhere
    source = (parent_string(teacher) if isinstance(teacher, (str, Path))
              else getattr(teacher.config, "qrealign_source", None))
    if isinstance(teacher, (str, Path)):  # offloaded like the model, and in its dtype: it is as large
        teacher, _ = load_model(str(teacher), offload="disk" if on_disk else None,
                                dtype=next(model.parameters()).dtype)
    diff = architecture_difference(teacher, model)
    if diff:
        raise QrealignError(f"the teacher must be the aligned version of the same architecture (teacher vs model: "
                            f"{diff})")
    meta = {"source": source, "fingerprint": model_fingerprint(teacher)}
    kept_at = _kept_path(checkpoint)
    model_fp = model_fingerprint(model)
    kept = _kept_targets(kept_at, meta, model_fp, tokenizer, calibration, config, refusals, response_tokens,
                         where_computed(model, device))
    if kept is not None:
        if progress:
            print(f"[realign] the teacher pass is read back from {kept_at} (an interrupted run's)", file=sys.stderr)
        return kept
    malicious = torch.tensor(calibration.labels, dtype=torch.bool)
    refused = None  # without refusal targets every malicious row follows the teacher
    if refusals:
        asked = [p for p, m in zip(calibration.prompts, malicious.tolist()) if m]
        refused = torch.zeros_like(malicious)
        # on the compute device: a 7B teacher's greedy answers on a CPU take an hour
        refused[malicious] = torch.tensor(teacher_refuses(teacher, tokenizer, asked, config,
                                                          device=resolve_device(device), progress=progress))
        meta["refusal_targets"] = {"malicious": len(asked), "answered_replaced": int((malicious & ~refused).sum())}
    responses = mask = None
    if response_tokens > 1:  # position 0 comes from the same greedy passes
        from ..evaluate.generate import stop_token_ids

        targets, responses, mask = response_targets(
            teacher, model, tokenizer, calibration, config, response_tokens - 1, refused,
            stop_token_ids(tokenizer, getattr(model, "generation_config", None)), device=resolve_device(device))
        meta["response_tokens"] = response_tokens
    else:
        targets = first_token_targets(teacher, model, tokenizer, calibration, config, device=resolve_device(device))
        if refused is not None:
            targets = refusal_targets(targets, malicious, refused)
    computed = TeacherTargets(targets, meta, model_fp, calibration.fingerprint(), render_options(config),
                              where_computed(model, device), responses, mask,
                              prompt_tokens_digest(tokenizer, calibration, config))
    if kept_at is not None:
        try:  # a convenience for a resume: a full disk must not end the run the pass was for
            for other in kept_teacher_passes(kept_at.parent):  # other code's: never read again
                if other != kept_at:
                    shutil.rmtree(other, ignore_errors=True)
            computed.save(kept_at)
        except Exception as exc:
            warnings.warn(f"the teacher pass could not be kept in {kept_at} ({exc}): an interrupted run will "
                          "run it again", stacklevel=2)
    return computed


def _kept_path(checkpoint) -> Path | None:
    """Where a run's checkpoint keeps its teacher pass: named by the digest of the code that
    computes it, so a run resumed after an upgrade computes it again (as the engine's checkpoint
    sets aside blocks made by other code)."""
    if checkpoint is None:
        return None
    from ..stage_code import code_digest

    return Path(checkpoint) / f"{CHECKPOINT_TARGETS}-{code_digest('targets')['digest'][:12]}"


def _kept_targets(path: Path | None, teacher_meta: dict, model_fp: str, tokenizer, calibration, config,
                  refusals: bool, response_tokens: int, computed_on: dict) -> TeacherTargets | None:
    """A checkpoint's teacher pass, if it is what this pass would compute; else None (and the pass
    runs). On the same device type only: elsewhere an in-place pass differs by float rounding."""
    if path is None or not is_targets_dir(path):
        return None
    try:
        kept = TeacherTargets.load(path)
        if (kept.teacher_meta.get("fingerprint"), kept.teacher_meta.get("source")) != \
                (teacher_meta["fingerprint"], teacher_meta["source"]) or kept.computed_on != computed_on:
            return None
        kept.check(model_fp, calibration, config, refusals=refusals, computed_on=computed_on,
                   response_tokens=response_tokens, tokenizer=tokenizer)
    except Exception:  # damaged (safetensors has its own error types), or another run's: computed again
        return None
    return kept

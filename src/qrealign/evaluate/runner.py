"""Evaluate one model: generate on harmful + benign prompts, judge, score a task, perplexity,
and keep everything needed to audit each number in `result.json`.

Every number in a report traces back to a record here: the prompt, the response, the verdict and
the judge's reason, the generation settings, the model fingerprint and the prompt-set fingerprints.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import QrealignError
from .generate import GenerationConfig, generate
from .judges import Judge, KeywordJudge, Verdict, get_judge
from .metrics import safety_metrics

RESULT_FILE = "result.json"
RESULT_FORMAT = 1


@dataclass
class EvalResult:
    name: str
    model: dict
    settings: dict
    judge: dict
    records: list[dict]
    metrics: dict
    overlap: dict | None = None
    task: dict | None = None
    wall_time_s: float = 0.0
    created: str = ""
    format_version: int = RESULT_FORMAT
    path: str | None = field(default=None, compare=False)

    # The numbers the report table shows.
    @property
    def hs(self) -> float | None:
        return self.metrics.get("harmful_score")

    @property
    def over_refusal(self) -> float | None:
        return self.metrics.get("over_refusal")

    @property
    def degenerate(self) -> float | None:
        return self.metrics.get("degenerate")

    @property
    def fa(self) -> float | None:
        return self.metrics.get("task_accuracy")

    @property
    def ppl(self) -> float | None:
        return self.metrics.get("perplexity")

    def verdicts(self, side: str) -> list[Verdict]:
        return [Verdict.from_dict(r["verdict"]) for r in self.records if r["side"] == side]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("path")
        return d

    def save(self, out_dir: str | Path) -> Path:
        from ..utils import write_json

        out = Path(out_dir)
        write_json(out / RESULT_FILE, self.to_dict())
        return out / RESULT_FILE

    @classmethod
    def load(cls, path: str | Path) -> "EvalResult":
        from ..utils import read_json

        p = Path(path)
        file = p / RESULT_FILE if p.is_dir() else p
        if not file.is_file():
            raise QrealignError(f"{path}: no {RESULT_FILE} (not an evaluation output directory)")
        try:
            data = read_json(file)
        except ValueError as exc:
            raise QrealignError(f"{file} is not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format_version") != RESULT_FORMAT:
            raise QrealignError(f"{file}: unknown result format {data.get('format_version') if isinstance(data, dict) else None!r}")
        known = {f for f in cls.__dataclass_fields__ if f != "path"}
        return cls(**{k: v for k, v in data.items() if k in known}, path=str(file.parent))


# ---- perplexity ----------------------------------------------------------------------------

@torch.no_grad()
def perplexity(model, tokenizer, text: str, max_length: int = 512, stride: int = 256,
               progress: bool = False) -> float:
    """Sliding-window perplexity of `text`: windows of `max_length` tokens every `stride` tokens;
    each token is scored once, in the window that gives it the most context (the standard
    transformers recipe, computed from logits so the count of scored tokens is exact)."""
    if stride < 1 or max_length < 2 or stride > max_length:
        raise QrealignError(f"need 1 <= stride <= max_length and max_length >= 2 (got {stride}, {max_length})")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"][0]
    n = ids.numel()
    if n < 2:
        raise QrealignError("perplexity needs a text of at least two tokens")
    device = next(model.parameters()).device
    nll, count, prev_end = 0.0, 0, 0
    starts = range(0, n, stride)
    for begin in tqdm(starts, desc="perplexity", disable=not progress, unit="window"):
        end = min(begin + max_length, n)
        window = ids[begin:end].unsqueeze(0).to(device)
        logits = model(input_ids=window).logits[0, :-1].float()
        targets = window[0, 1:]
        # position j of `targets` is token begin + j + 1; score only tokens not scored before
        first_new = max(prev_end, begin + 1) - (begin + 1)
        losses = torch.nn.functional.cross_entropy(logits[first_new:], targets[first_new:], reduction="sum")
        nll += losses.item()
        count += targets.numel() - first_new
        prev_end = end
        if end == n:
            break
    mean = nll / count
    return math.inf if mean > 709.0 else math.exp(mean)  # exp overflows a float above ~709.78: a broken model


def _after_answers(what: str, out_dir, metrics: dict, compute):
    """A measurement that runs after every answer is generated (lm-eval, perplexity): with an
    `out_dir`, a failure is recorded in the metrics (`<what>_failed`) and warned about instead of
    losing the answers, the costly part; without one (an API call) it is raised."""
    try:
        return compute()
    except Exception as exc:  # noqa: BLE001 -- as the judge's: keep the answers
        if out_dir is None:
            raise
        import warnings

        metrics[f"{what.replace('-', '_')}_failed"] = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"{what} failed ({type(exc).__name__}: {exc}); the answers and the other metrics are written, "
                      f"without it", stacklevel=3)
        return None


# ---- lm-eval (optional) --------------------------------------------------------------------

def lm_eval_accuracy(model, tokenizer, tasks: Sequence[str] = ("mmlu",), num_fewshot: int = 5,
                     batch_size: int = 4, limit: int | float | None = None) -> dict:
    """MMLU etc. through lm-evaluation-harness on the in-memory model (fake-quantized included).

    Returns {"tasks": {name: {metric: value}}, "mean_item_acc": acc_norm/acc over leaf tasks
    weighted by their evaluated items (MMLU's usual number: 14,042 questions, not 57 subjects
    alike; None without lm-eval's sample counts), "mean_leaf_acc": the same, one vote per leaf task,
    "paper_mean": the Q-realign script's unweighted mean over *every* results entry (group rows
    included)}. Needs `pip install lm-eval` (and hub access for the task data)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise QrealignError("lm-eval tasks need lm-evaluation-harness: pip install lm-eval") from None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit)
    return summarize_lm_eval(out)


def summarize_lm_eval(out: dict) -> dict:
    results = out.get("results", {})
    groups = set(out.get("groups", {}) or {}) | set(out.get("group_subtasks", {}) or {})

    def acc(metrics: dict) -> float | None:
        for key in ("acc_norm,none", "acc_norm", "acc,none", "acc"):
            if isinstance(metrics.get(key), (int, float)):
                return float(metrics[key])
        return None

    per = {name: {k: v for k, v in m.items() if isinstance(v, (int, float))} for name, m in results.items()}
    all_acc = [a for m in results.values() if (a := acc(m)) is not None]
    leaves = {name: a for name, m in results.items() if name not in groups and (a := acc(m)) is not None}
    leaf = list(leaves.values())
    counts = {name: (out.get("n-samples") or {}).get(name, {}).get("effective") for name in leaves}
    weighted = None
    if leaves and all(isinstance(n, int) and n > 0 for n in counts.values()):
        weighted = 100 * sum(a * counts[name] for name, a in leaves.items()) / sum(counts.values())
    return {"tasks": per, "mean_item_acc": weighted, "mean_leaf_acc": 100 * sum(leaf) / len(leaf) if leaf else None,
            "paper_mean": 100 * sum(all_acc) / len(all_acc) if all_acc else None}


# ---- the evaluation ------------------------------------------------------------------------

def _prompts(spec, label: int, limit: int | None):
    from ..data.types import Prompt
    from .promptsets import resolve_prompt_set

    if spec is None:
        return [], None
    if isinstance(spec, (str, Path)):
        return resolve_prompt_set(str(spec), label=label, limit=limit), str(spec)
    if limit is not None and limit < 1:  # as resolve_prompt_set: 0 is not "all"
        raise QrealignError(f"limit must be >= 1, got {limit}")
    prompts = list(spec)[:limit] if limit else list(spec)
    side = "harmful" if label else "benign"
    for i, p in enumerate(prompts):  # plain strings are prompts too; anything else is a mistake
        if isinstance(p, str):
            prompts[i] = Prompt(id=f"{side}-{i}", text=p, label=label, category="custom" if label else "benign",
                                split="custom")
        elif not isinstance(p, Prompt):
            raise QrealignError(f"{side} prompts: item {i} is a {type(p).__name__}; give strings or Prompts")
    return prompts, "<in-memory>"


def outcome(harmful_prompt: bool, v: Verdict) -> str:
    """How a record counts, in words, for auditing result.json: harmful prompts end up "harmful",
    "refused", "degenerate", "unjudged" or "not harmful"; benign ones "refused", "degenerate",
    "unjudged" (another language than the keyword judge's) or "answered". (A keyword verdict's
    `harmful` only means "answered"; on benign prompts it is not read.) On harmful prompts the
    judge's `harmful` comes first, as the harmful score counts it: a model judge's "harmful" or
    unparseable answer stands even where the keyword reading (which fills `refused` and
    `degenerate`) saw a refusal or a loop, so the records add up to the score."""
    if harmful_prompt and v.harmful is not False:
        return "harmful" if v.harmful else "unjudged"
    if v.unjudged and not harmful_prompt:  # a model judge's "not harmful" stands (it read the answer)
        return "unjudged"
    if v.degenerate and not v.refused:
        return "degenerate"
    if v.refused:
        return "refused"
    if not harmful_prompt:
        return "answered"
    return {True: "harmful", False: "not harmful", None: "unjudged"}[v.harmful]


def describe_model(model, source: str | None = None) -> dict:
    from ..utils import model_fingerprint

    config = getattr(model, "config", None)
    described = {
        "source": source or getattr(config, "_name_or_path", None) or None,
        "fingerprint": model_fingerprint(model),
        "model_type": getattr(config, "model_type", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "quant_run": getattr(config, "qrealign_quant_run", None),
    }
    if fake_quantized(model):  # else a model quantize() changed in memory reads as its FP source
        described["kind"] = "quantized" if described["quant_run"] else "quantized in memory (no run folder)"
    return described


def fake_quantized(model) -> bool:
    """Whether `model` runs qrealign's fake-quantized linears (a run loaded, or quantized in place)."""
    from ..quant.qlinear import QuantLinear

    return any(isinstance(m, QuantLinear) for m in model.modules())


def evaluate_model(model, tokenizer, harmful: Any = "qrealign:eval:harmful", benign: Any = "qrealign:eval:benign",
                   task=None, judge: str | Judge = "keyword", gen: GenerationConfig | None = None,
                   ppl_text: str | None = None, out_dir: str | Path | None = None, name: str = "model",
                   provenance: dict | None = None, force_overlap: bool = False, limit: int | None = None,
                   task_split: str = "test", task_n: int | None = None, ppl_max_length: int = 512,
                   ppl_stride: int = 256, source: str | None = None, model_info: dict | None = None,
                   lm_eval_tasks: Sequence[str] | None = None, lm_eval_fewshot: int = 5,
                   report: bool = False, progress: bool = True, after_generation_device=None) -> EvalResult:
    """Evaluate `model` and (with `out_dir`) write `result.json` atomically.

    harmful / benign: a prompt-set spec (see promptsets), a list of `Prompt`s or strings, or None.
    task: a task name/spec or Task for FA (None: skip). judge: "keyword", "harmbench:ID", ... or a
    Judge. provenance: what built the model (overlap.collect_provenance); evaluation prompts that
    trained or calibrated it raise unless `force_overlap` (then the overlap is recorded).
    limit: first n prompts of each side; task_n: first n task examples; model_info: extra facts
    about the model for result.json (kind, adapter, ...). lm_eval_tasks: lm-evaluation-harness
    tasks (e.g. ["mmlu"]); their item-weighted accuracy (else the leaf-task mean) is the FA when no `task` is given.
    after_generation_device (vLLM backend): where the transformers copy runs lm-eval and perplexity,
    once the engine has let go of the GPU; the copy waits on the CPU until then, since vLLM claims
    most of the GPU's memory at its start (review 84)."""
    from ..data.prompts import prompt_set_fingerprint
    from ..models.offload import require_resident
    from ..utils import check_out_dir
    from .overlap import check_overlap
    from .tasks import get_task, load_examples, task_accuracy

    require_resident(model, "evaluation")  # before the fingerprint reads the whole checkpoint
    if out_dir is not None:
        check_out_dir(out_dir, RESULT_FILE)  # before the generation, not after
    t0 = time.time()
    gen = (gen or GenerationConfig()).validate()
    harmful_prompts, harmful_spec = _prompts(harmful, 1, limit)
    benign_prompts, benign_spec = _prompts(benign, 0, limit)
    _refuse_shared_prompts(harmful_prompts, benign_prompts)
    if not harmful_prompts and not benign_prompts and task is None and ppl_text is None and not lm_eval_tasks:
        raise QrealignError("nothing to evaluate: no prompts, no task, no perplexity text")
    judge_obj = get_judge(judge)
    if (harmful_prompts or benign_prompts) and callable(getattr(judge_obj, "check_reachable", None)):
        judge_obj.check_reachable()  # a model judge that cannot load fails before the generation
    task_obj = get_task(task) if task is not None else None
    # loaded once, before anything is generated: a bad split fails in a second, not after the answers
    task_examples = load_examples(task_obj, task_split, task_n) if task_obj is not None else None

    overlap = None
    if provenance:
        res = check_overlap(harmful_prompts + benign_prompts, provenance, force=force_overlap)
        overlap = res.to_dict()
        if task_obj is not None:
            # the task items too: the attack and the calibration train on task prompts, and a task
            # whose splits met would score FA on trained items (review 72)
            task_res = check_overlap([e.prompt for e in task_examples], provenance, force=force_overlap, what="task")
            if task_res.by_stage:  # forced: recorded, and the result is not clean (the reports read the flag)
                overlap["task"] = task_res.to_dict()
                overlap["clean"] = False

    gen_target = model
    if gen.backend == "vllm":
        # vLLM reloads the weights from disk: only right for an unmodified model directory. A
        # fake-quantized model or a merged adapter would silently be evaluated as the FP model.
        # A compressed-tensors export is such a directory: vLLM reads its integer weights itself.
        info = model_info or {}
        kind = info.get("kind", "fp")
        if (getattr(model.config, "qrealign_quant_run", None) or kind not in ("fp", "export") or info.get("adapter")
                or fake_quantized(model) or not source or not Path(source).is_dir()):
            raise QrealignError("backend 'vllm' only evaluates a plain model directory or an export (no "
                                "quantization run, no adapter: export or merge first); use the default backend")
        dtype = next(model.parameters()).dtype  # the precision this copy runs in
        if kind == "export" and dtype == torch.float32:
            raise QrealignError("vLLM runs a compressed-tensors export in 16 bits only: load it in bfloat16 or "
                                "float16 (`--dtype bfloat16`), or use the default backend")
        from .generate import VllmSource

        gen_target = VllmSource(str(source), dtype)
    prompts = harmful_prompts + benign_prompts
    records: list[dict] = []
    metrics: dict[str, Any] = {}
    responses = generate(gen_target, tokenizer, [p.text for p in prompts], gen, progress=progress) if prompts else []
    task_result = None
    if task_obj is not None:
        task_result = task_accuracy(gen_target, tokenizer, task_obj, split=task_split, n=task_n, gen=gen,
                                    progress=progress, examples=task_examples)
        metrics["task_accuracy"] = task_result["accuracy"]
        metrics["task_n"] = task_result["n"]
    if gen.backend == "vllm":  # every answer is in: the engine's GPU memory goes before a model judge loads
        from .generate import release_vllm

        release_vllm()
        if after_generation_device is not None and (lm_eval_tasks or ppl_text is not None):
            from ..utils import resolve_device

            model.to(resolve_device(after_generation_device))
    if lm_eval_tasks:
        summary = _after_answers("lm-eval", out_dir, metrics, lambda: lm_eval_accuracy(
            model, tokenizer, tasks=list(lm_eval_tasks), num_fewshot=lm_eval_fewshot))
        if summary is not None:
            metrics["lm_eval"] = summary
            fa = summary["mean_item_acc"] if summary.get("mean_item_acc") is not None else summary.get("mean_leaf_acc")
            if task_obj is None and fa is not None:
                metrics["task_accuracy"] = fa
    if ppl_text is not None:
        ppl = _after_answers("perplexity", out_dir, metrics, lambda: perplexity(
            model, tokenizer, ppl_text, max_length=ppl_max_length, stride=ppl_stride, progress=progress))
        if ppl is not None and not math.isfinite(ppl):  # strict JSON has no NaN or Infinity
            metrics["perplexity_nonfinite"] = str(ppl)
            ppl = None
        metrics["perplexity"] = ppl
    described = {**describe_model(model, source), **(model_info or {})}
    device = str(next(model.parameters()).device)
    judge_failed = None
    if prompts:  # judged last, with the evaluated model off the accelerator while a model judge loads
        # the judge's weights go (a judge built here, or weights it loaded itself) before the model returns
        with _room_for_judge(model, judge_obj, close=judge_obj is not judge):
            try:
                verdicts = judge_sides(judge_obj, [p.text for p in prompts], responses,
                                       [i < len(harmful_prompts) for i in range(len(prompts))])
            except Exception as exc:  # noqa: BLE001 -- the answers are the costly part: keep them
                if out_dir is None:
                    raise
                judge_failed = {"judge": judge_obj.describe(), "error": f"{type(exc).__name__}: {exc}"}
                judge_obj = KeywordJudge()  # the room above still lets go of the judge that failed
                verdicts = judge_obj.judge([p.text for p in prompts], responses)
        if len(verdicts) != len(prompts):
            raise QrealignError(f"judge {judge_obj.name} returned {len(verdicts)} verdicts for {len(prompts)} responses")
        nh = len(harmful_prompts)
        metrics.update(safety_metrics(verdicts[:nh], verdicts[nh:], [p.category for p in harmful_prompts]))
        for i, (p, r, v) in enumerate(zip(prompts, responses, verdicts)):
            records.append({"id": p.id, "side": "harmful" if i < nh else "benign", "label": p.label,
                            "category": p.category, "split": p.split, "prompt": p.text, "response": r,
                            "verdict": v.to_dict(), "outcome": outcome(i < nh, v)})

    result = EvalResult(
        name=name, model=described, judge=judge_obj.describe(), records=records,
        metrics=metrics, overlap=overlap, task=task_result,
        settings={
            "generation": gen.to_dict(), "harmful": harmful_spec, "benign": benign_spec, "limit": limit,
            "harmful_fingerprint": prompt_set_fingerprint(harmful_prompts) if harmful_prompts else None,
            "benign_fingerprint": prompt_set_fingerprint(benign_prompts) if benign_prompts else None,
            "task": getattr(task_obj, "name", None) or (f"lm-eval:{','.join(lm_eval_tasks)}" if lm_eval_tasks else None),
            "lm_eval": {"tasks": list(lm_eval_tasks), "num_fewshot": lm_eval_fewshot} if lm_eval_tasks else None,
            "task_split": task_split if task_obj else None,
            "task_n": task_n, "ppl": {"max_length": ppl_max_length, "stride": ppl_stride,
                                      "chars": len(ppl_text)} if ppl_text is not None else None,
            "force_overlap": force_overlap, "device": device if gen.backend != "vllm" else None,  # vLLM's own
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            **({"judge_failed": judge_failed} if judge_failed else {}),
        },
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    result.wall_time_s = round(time.time() - t0, 2)
    if out_dir is not None:
        write_result(result, out_dir, report=report)
    if judge_failed:
        raise QrealignError(f"judge {judge_failed['judge'].get('name')} failed ({judge_failed['error']}); the answers "
                            f"are saved in {out_dir}, read by the keyword judge: `qrealign eval {out_dir} --rejudge "
                            f"--judge SPEC --out NEW_DIR` judges them again without generating")
    return result


class _room_for_judge:
    """Move the evaluated model to CPU while a judge that holds its own weights (HarmBench, Llama
    Guard: 8-13B) judges, so the two never share the accelerator; then drop the judge's weights
    (`close`: a judge built by the runner; `release`: weights a judge loaded itself) and only
    then move the model back."""

    def __init__(self, model, judge_obj, close: bool):
        self.model, self.judge, self.close = model, judge_obj, close
        self.device = next(model.parameters()).device
        self.move = getattr(judge_obj, "holds_weights", False) and self.device.type != "cpu"

    def __enter__(self):
        if self.move:
            self.model.to("cpu")
            _empty_cache(self.device)

    def __exit__(self, *exc):
        drop = getattr(self.judge, "close" if self.close else "release", None)
        if callable(drop):
            drop()
        if self.move:
            gc.collect()  # a dropped model often sits in reference cycles: free its tensors now, not at the next GC
            _empty_cache(self.device)
            self.model.to(self.device)
        return False


def _empty_cache(device) -> None:
    module = getattr(torch, device.type, None)
    if module is not None and callable(getattr(module, "empty_cache", None)):
        module.empty_cache()


def write_result(result: EvalResult, out_dir: str | Path, report: bool = False) -> Path:
    """result.json (+ report.md / report.html / plots when `report`), atomically."""
    from ..utils import atomic_dir

    with atomic_dir(out_dir, marker=RESULT_FILE) as tmp:
        result.save(tmp)
        if report:
            from ..report import write_report

            write_report([result], tmp, title=f"Evaluation: {result.name}")
    result.path = str(out_dir)
    return Path(out_dir)


def load_for_eval(source: str, adapter: str | None = None, device=None, dtype: str = "float32"):
    """(model, tokenizer, provenance, description) for a model source: a quantization run
    directory (qrealign.json kind "quantized"), an embedded name, a model dir, a .gguf or hub id."""
    from ..models import load_model
    from ..utils import read_json
    from .overlap import collect_provenance

    path = Path(source).expanduser()
    meta = None
    if path.is_dir() and (path / "qrealign.json").is_file():
        meta = read_json(path / "qrealign.json")
    provenance: dict = {}
    if meta is not None and meta.get("kind") == "quantized":
        if adapter:
            raise QrealignError("--adapter does not apply to a quantization run (it names its own model)")
        from ..calibrate.artifact import load_quantized

        model, tokenizer, meta = load_quantized(path, device=device, dtype=dtype)
        provenance.update(collect_provenance(path))
        kind = "quantized"
    else:
        model, tokenizer = load_model(source, adapter=adapter, dtype=dtype, device=device)
        if meta is not None:
            provenance.update(collect_provenance(path))
        # a compressed-tensors export runs integer weights: not a floating-point model
        kind = "export" if meta is not None and meta.get("kind") == "export" else "fp"
    if adapter and Path(adapter).is_dir():
        for k, v in collect_provenance(adapter).items():
            if provenance.get(k, v) != v:  # a stage of the same name in the base's chain: keep both
                k = f"{k}@{adapter}"
            provenance.setdefault(k, v)
    return model, tokenizer, provenance, {"kind": kind, "source": str(source), "adapter": adapter}


def _refuse_shared_prompts(harmful, benign) -> None:
    """A prompt scored as both harmful and benign counts against the model twice (a refusal is
    right on one side and wrong on the other): the same file given as --harmful and --benign."""
    from ..data.prompts import normalize_prompt

    shared = {normalize_prompt(p.text) for p in harmful} & {normalize_prompt(p.text) for p in benign}
    if shared:
        raise QrealignError(f"{len(shared)} prompt(s) are in both the harmful and the benign set (e.g. "
                            f"{sorted(shared)[0][:60]!r}); give each side its own prompts")


def evaluate_path(source: str, adapter: str | None = None, device=None, dtype: str = "float32",
                  **kwargs) -> EvalResult:
    """Load a model by path (quantization runs included) and evaluate it with its provenance."""
    model, tokenizer, provenance, desc = load_for_eval(source, adapter=adapter, device=device, dtype=dtype)
    kwargs.setdefault("name", Path(str(source)).name or str(source))
    return evaluate_model(model, tokenizer, provenance=provenance, source=str(source),
                          model_info={"kind": desc["kind"], "adapter": adapter}, **kwargs)


def judge_sides(judge_obj: Judge, prompts: list[str], responses: list[str], harmful: list[bool]) -> list[Verdict]:
    """Verdicts in order. A judge that holds its own weights (HarmBench, Llama Guard, beaver-dam)
    reads only the harmful side: a benign answer counts only for refusals and loops, which such a
    judge takes from the keyword reading anyway, so running it there would double its GPU time."""
    if not getattr(judge_obj, "holds_weights", False) or all(harmful):
        return judge_obj.judge(prompts, responses)
    picked = [i for i, h in enumerate(harmful) if h]
    judged = judge_obj.judge([prompts[i] for i in picked], [responses[i] for i in picked]) if picked else []
    if len(judged) != len(picked):
        raise QrealignError(f"judge {judge_obj.name} returned {len(judged)} verdicts for {len(picked)} responses")
    by_model = iter(judged)
    by_keyword = iter(KeywordJudge().judge([p for p, h in zip(prompts, harmful) if not h],
                                           [r for r, h in zip(responses, harmful) if not h]))
    return [next(by_model) if h else next(by_keyword) for h in harmful]


def rejudge(result: EvalResult, judge: str | Judge, progress: bool = True) -> EvalResult:
    """The same responses judged again (e.g. by the HarmBench classifier on a GPU machine, after a
    CPU run with the keyword judge): safety metrics recomputed, generation untouched, task and
    perplexity kept. Returns a new result; the old judge is recorded under settings."""
    import copy

    judge_obj = get_judge(judge)
    if hasattr(judge_obj, "progress"):
        judge_obj.progress = progress
    records = copy.deepcopy(result.records)
    if not records:
        raise QrealignError("this result has no responses to judge")
    t0 = time.time()
    verdicts = judge_sides(judge_obj, [r["prompt"] for r in records], [r["response"] for r in records],
                           [r["side"] == "harmful" for r in records])
    if len(verdicts) != len(records):
        raise QrealignError(f"judge {judge_obj.name} returned {len(verdicts)} verdicts for {len(records)} responses")
    for r, v in zip(records, verdicts):
        r["verdict"] = v.to_dict()
        r["outcome"] = outcome(r["side"] == "harmful", v)
    harmful = [(r, v) for r, v in zip(records, verdicts) if r["side"] == "harmful"]
    benign = [v for r, v in zip(records, verdicts) if r["side"] == "benign"]
    metrics = {k: v for k, v in result.metrics.items() if k in ("task_accuracy", "task_n", "perplexity", "lm_eval",
                                                                "perplexity_nonfinite", "perplexity_failed",
                                                                "lm_eval_failed")}
    metrics.update(safety_metrics([v for _, v in harmful], benign, [r.get("category") for r, _ in harmful]))
    # every judge the answers were read with before, oldest first (results from before the list: one dict)
    earlier = result.settings.get("rejudged_from") or []
    history = earlier if isinstance(earlier, list) else [earlier]
    settings = {**{k: v for k, v in result.settings.items() if k != "judge_failed"},
                "rejudged_from": [*history, result.judge]}
    return EvalResult(name=result.name, model=dict(result.model), settings=settings, judge=judge_obj.describe(),
                      records=records, metrics=metrics, overlap=result.overlap, task=result.task,
                      wall_time_s=round(result.wall_time_s + time.time() - t0, 2),
                      created=datetime.now(timezone.utc).isoformat(timespec="seconds"))

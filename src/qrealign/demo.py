"""The end-to-end demo on the embedded model: the paper's table, built and measured on CPU.

    raw SmolLM2 --align--> aligned --attack (task data + poison p)--> attacked
    probes on the aligned model (paper target) and aligned-vs-attacked (contrast target)
    attacked --{RTN, reconstruction-only, Q-realign(paper probe),
                Q-realign(first-token: the aligned model as teacher),
                [--extended: Q-realign(contrast probe)]}--> quantized
    [--export: each Q-realign row at W8A8 --> a compressed-tensors checkpoint, evaluated as a row too]
    every model --evaluate on the held-out split--> report.md / report.html / plots, with a verdict
    that reads each Q-realign row against the paper's bar

Every stage is cached under `<out>/stages/<name>-<fingerprint of its inputs>`, so a re-run only
redoes what changed, and interrupted quantization runs resume from their block checkpoints.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import __version__
from .calibrate.data import build_calibration
from .calibrate.engine import CalibConfig
from .data.prompts import HELD_OUT_SETS, load_prompts, prompt_set_fingerprint
from .errors import NoSafetyLayers, QrealignError
from .lanes import Job, Ref, run_jobs
from .recipes import FIRST_TOKEN as _RECIPE
from .stages import cached_stage, stage_code_changes, stage_code_lines, stage_dir
from .utils import atomic_dir, read_json, sha256_json, write_json


EVAL_TASK = "topic-codes"  # the task every evaluation stage scores (FA)


# Loss options the first-token teacher pass reads (one pass for every scheme that renders alike).
TEACHER_PASS_OPTIONS = frozenset({"refusal_targets", "response_tokens"})
VARIANT_METHODS = ("rtn", "omniquant", "qrealign")


@dataclass(frozen=True)
class Variant:
    """One quantized row of the table: a method, a probe target and its options, as data."""

    name: str
    method: str  # "rtn" | "omniquant" | "qrealign"
    probes: str | None = None  # probe target for "qrealign"
    loss: dict = field(default_factory=dict)  # SafetyLoss (or FirstTokenLoss) options
    config: dict = field(default_factory=dict)  # CalibConfig overrides
    teacher: bool = False  # "qrealign" with the aligned model's first token instead of probes
    calib_task: int = 0  # attack-training task prompts added to the calibration set as benign
    calib_benign: str | tuple[str, ...] | None = None  # prompt sources whose benign prompts are all added too
    calib_malicious: str | tuple[str, ...] | None = None  # ... and whose harmful prompts are all added too
    # CalibConfig overrides for one scheme only, e.g. {"W4A8": {"lr_round": 2e-3}}: a 4-bit step is
    # 16x an 8-bit one, so a setting chosen at W8A8 need not carry over.
    scheme_config: dict = field(default_factory=dict)
    # Loss overrides for one scheme only, e.g. {"W8A8": {"greedy_margin": 1.0}}: chosen where measured.
    scheme_loss: dict = field(default_factory=dict)
    # Calibration prompt sources for one scheme only, e.g. {"W8A8": {"calib_malicious": (...)}}; such
    # a scheme gets its own teacher pass (it answers other prompts).
    scheme_calib: dict = field(default_factory=dict)

    def __post_init__(self):
        # refused here, not after the demo's lab: an unknown method ran as reconstruction-only under
        # its own label, and a qrealign row without a target failed as a bare KeyError (review 68)
        if self.method not in VARIANT_METHODS:
            raise QrealignError(f"variant {self.name!r}: unknown method {self.method!r}; one of "
                                f"{', '.join(VARIANT_METHODS)}")
        if self.method == "qrealign" and not self.probes and not self.teacher:
            raise QrealignError(f"variant {self.name!r}: a qrealign row needs a probe target (probes=...) or the "
                                "teacher's first token (teacher=True)")
        shared = {k for overrides in self.scheme_loss.values() for k in overrides} & TEACHER_PASS_OPTIONS
        if shared:
            raise QrealignError(f"{self.name}: {', '.join(sorted(shared))} shape the teacher pass, which every "
                                "scheme shares: set them in `loss`, not per scheme")
        unknown = {k for overrides in self.scheme_calib.values() for k in overrides} - {"calib_benign",
                                                                                         "calib_malicious"}
        if unknown:
            raise QrealignError(f"{self.name}: scheme_calib takes calib_benign and calib_malicious, not "
                                f"{', '.join(sorted(unknown))}")

    def calib_for(self, scheme: str) -> tuple:
        """(calib_benign, calib_malicious) at `scheme`."""
        over = self.scheme_calib.get(scheme, {})
        return over.get("calib_benign", self.calib_benign), over.get("calib_malicious", self.calib_malicious)

    def config_for(self, scheme: str) -> dict:
        return {**self.config, **self.scheme_config.get(scheme, {})}

    def loss_for(self, scheme: str) -> dict:
        return {**self.loss, **self.scheme_loss.get(scheme, {})}

    def resolved(self, scheme: str) -> dict:
        """The variant as it runs at `scheme`: its settings with that scheme's overrides applied
        and no per-scheme table, so a stage's key changes only when this scheme's run does."""
        fields = asdict(self)
        del fields["scheme_config"], fields["scheme_loss"], fields["scheme_calib"]
        fields["calib_benign"], fields["calib_malicious"] = self.calib_for(scheme)
        if fields["calib_malicious"] is None:  # added later: unset, it leaves the stage keys as they were
            del fields["calib_malicious"]
        return {**fields, "loss": self.loss_for(scheme), "config": self.config_for(scheme)}


PAPER = Variant("Q-realign (paper probe)", "qrealign", "paper")
# Settings chosen on the dev split (docs/experiments.md, "Q-realign method sweep"): safety term on
# the second half of the blocks only (pushing early blocks broke generation), reconstruction on
# malicious prompts too, MSE normalised with the attention-sink token left out, hinge at margin 2,
# LET learning rate 1e-2 (at 1e-3 the scales barely move in 2 epochs), batch 4 (the sweep's; at
# batch 8, i.e. half the steps, the demo's first run restored nothing: HS 87.9 % vs 55.3 % at 4).
AGGRESSIVE = {"normalize": True, "sink_weight": 0.0, "margin": 2.0, "probe_loss": "hinge",
              "recon_on_malicious": True, "layers_from": 0.5}
CONTRAST = Variant("Q-realign (contrast probe)", "qrealign", "contrast", loss=AGGRESSIVE,
                   config={"lr_let": 1e-2, "batch_size": 4})
# The behavioural objective, the table's measured row: `recipes.FIRST_TOKEN` holds its settings
# and why each was chosen; `qrealign realign --recipe first-token` runs the same at any scheme.
FIRST_TOKEN = Variant("Q-realign (first-token)", "qrealign", teacher=True, calib_task=_RECIPE.calib_task_n,
                      calib_benign=_RECIPE.calib_benign, loss=dict(_RECIPE.loss), config=dict(_RECIPE.config),
                      scheme_config=_RECIPE.per_scheme("config"), scheme_loss=_RECIPE.per_scheme("loss"),
                      scheme_calib=_RECIPE.per_scheme("calib"))
# The table: the plain-PTQ controls, the paper's objective and the one that works here.
DEFAULT_VARIANTS = (
    Variant("RTN", "rtn"),
    Variant("reconstruction-only", "omniquant"),
    PAPER,
    FIRST_TOKEN,
)
# `qrealign demo --extended`: adds the contrast-probe objective (docs/experiments.md §3-4); about
# five more minutes on 2 cores.
EXTENDED_VARIANTS = (*DEFAULT_VARIANTS[:3], CONTRAST, FIRST_TOKEN)


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    model: str = "smollm2-135m"
    schemes: tuple[str, ...] = ("W8A8", "W4A8")
    # Variants quantized at every scheme; at the extra schemes only RTN, reconstruction and the
    # Q-realign variants named in `extra_scheme_variants` (time budget).
    variants: tuple[Variant, ...] = DEFAULT_VARIANTS
    extra_scheme_variants: tuple[str, ...] = ("RTN", "reconstruction-only", "Q-realign (first-token)")
    poison_ratio: float | None = None  # None: the attack's default
    # Extra attacked-FP rows at other poison ratios (the lab's table); not quantized.
    attack_sweep: tuple[float, ...] = ()
    raw_row: bool = False  # also evaluate the raw (never aligned) model
    align_config: object | None = None  # a finetune.config.AlignConfig; None = the lab's default
    attack_config: object | None = None  # a finetune.config.AttackConfig; None = the lab's default
    calib_n: int | None = None
    malicious_ratio: float = 0.75
    epochs: int = 2
    batch_size: int = 8
    max_new_tokens: int = 64
    # Generation batch: 48 was 1.3x faster than 16 on 2 cores (96 prompts, 64 tokens: 49.4 vs 64.8 s);
    # bigger batches amortise generate()'s per-step overhead on a small model.
    eval_batch_size: int = 48
    eval_limit: int | None = None
    task_n: int | None = 200
    device: str | None = None
    # Stages after the probes run in this many worker processes side by side (`lanes.py`);
    # None: 2 on a CPU with at least 2 cores, 1 on a GPU. On a 2-core AVX2 CPU two one-thread
    # lanes did the same work 1.14x faster than one two-thread process (`qrealign bench --lanes`).
    lanes: int | None = None
    # Calibrate every trained row with the fake-quantizers under torch.compile
    # (`CalibConfig.compile_quantizer`; the first-token variant has it in its own settings):
    # about 1.5x per reconstruction block on SmolLM2, other float rounding, so other stages (and
    # other numbers) than the default's.
    compile_quantizer: bool = False
    # Evaluations drop a stopped answer from its batch (`GenerationConfig.drop_finished`): only
    # 26-64 % of the tokens the demo's evaluations computed were the rows' own. Off by default (other
    # float rounding, so other cached evaluations and possibly other answers at near-ties).
    drop_finished: bool = False
    # More held-out prompt sets (specs holding harmful and benign prompts, e.g. "qrealign:confirm",
    # the second bundled held-out set, or a file): every row is evaluated on each too, and each gets
    # its own table and verdict in report/<name>/. The main table stays on the eval split.
    also_eval: tuple[str, ...] = ()
    # Rebuild a cached stage that is not known to be built by today's code (`stages.stage_code_change`);
    # off, such a stage is reused and named in the log and the report's "Stages" section.
    rebuild_changed: bool = False
    seed: int = 0
    # Write each Q-realign row at a scheme with a compressed-tensors form (W8A8, W4A16) as the
    # checkpoint an engine loads, with embeddings, norms and scales in this dtype, and evaluate that
    # checkpoint as its own row ("<row>, exported"): the model a user ships, not only the
    # fake-quantized one it came from. None: no export.
    export_dtype: str | None = None

    def __post_init__(self) -> None:
        # Checked up front: the quantization stages and the attack sweep run late, after the
        # align, attack and probe stages. Scheme names are made canonical ("w8a8" -> "W8A8") so a
        # variant's per-scheme settings find them.
        from .quant.scheme import get_scheme

        if not self.schemes:
            raise QrealignError("the demo needs at least one scheme, e.g. W8A8")
        self.schemes = tuple(get_scheme(s).name for s in self.schemes)
        if len(set(self.schemes)) != len(self.schemes):
            raise QrealignError(f"schemes are listed twice: {', '.join(self.schemes)}")
        bad = [r for r in (*self.attack_sweep, *([] if self.poison_ratio is None else [self.poison_ratio]))
               if not 0.0 <= r <= 1.0]  # the attack stage runs after the align stage's minutes
        if bad:
            raise QrealignError(f"attack_sweep ratios and poison_ratio must be in [0, 1], got {bad}")
        minimums = {"epochs": 1, "batch_size": 1, "max_new_tokens": 1, "eval_batch_size": 1, "eval_limit": 1,
                    "task_n": 0, "lanes": 1, "calib_n": 1}
        for name, low in minimums.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise QrealignError(f"{name} must be >= {low}, got {value}")
        if not 0.0 <= self.malicious_ratio <= 1.0:
            raise QrealignError(f"malicious_ratio must be in [0, 1], got {self.malicious_ratio}")
        self._check_rows()
        self.also_eval = tuple(self.also_eval)
        names = [eval_set_name(spec) for spec in self.also_eval]
        if len(set(names)) != len(names) or "eval" in names:
            raise QrealignError(f"also_eval: the sets must have distinct names other than 'eval', got {names}")
        for spec in self.also_eval:  # both sides now, not after the hours of work before their evaluations
            if spec.startswith("qrealign:") and eval_set_name(spec) not in HELD_OUT_SETS:
                raise QrealignError(f"also_eval: {spec} is not a held-out set (the stages train or calibrate on the "
                                    f"bundled splits); bundled held-out sets: {', '.join(HELD_OUT_SETS)}")
            _eval_set_prompts(spec)
        if self.export_dtype is not None:
            from .export.compressed import EXPORT_DTYPES

            if self.export_dtype not in EXPORT_DTYPES:
                raise QrealignError(f"export_dtype must be one of {', '.join(EXPORT_DTYPES)}, got {self.export_dtype!r}")
            if not [row for row in quantized_rows(self) if _exported(*row)]:
                raise QrealignError("export: no Q-realign row runs at a scheme with a compressed-tensors form "
                                    f"(W8A8 or weight-only, e.g. W4A16); schemes here: {', '.join(self.schemes)}")
            from .export.plan import require_compressed_tensors

            require_compressed_tensors("export", QrealignError)  # not after the hour before the export

    def _check_rows(self) -> None:
        """The rows' mistakes, up front (review 68): each surfaced only after the align, attack and
        probe stages, as a "duplicate job keys" or a row silently dropped (each variant checks
        itself when it is made)."""
        names = [v.name for v in self.variants]
        if not names:
            raise QrealignError("the demo needs at least one variant")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise QrealignError(f"variant names are row labels and must be distinct: {', '.join(twice)}")
        labels = [f"{r:g}" for r in self.attack_sweep]
        if len(set(labels)) != len(labels):
            raise QrealignError(f"attack_sweep ratios must differ in their labels (p={', p='.join(labels)})")
        unknown = [n for n in self.extra_scheme_variants if n not in names]
        if len(self.schemes) > 1 and unknown:
            raise QrealignError(f"extra_scheme_variants names no variant: {', '.join(map(repr, unknown))}; "
                                f"variants: {', '.join(map(repr, names))}")


def quantized_rows(cfg: DemoConfig) -> list[tuple[Variant, str]]:
    """(variant, scheme) of every quantized row: every variant at the first scheme, at the others
    only those named in `extra_scheme_variants`."""
    return [(variant, scheme) for scheme in cfg.schemes for variant in cfg.variants
            if scheme == cfg.schemes[0] or variant.name in cfg.extra_scheme_variants]


def _exported(variant: Variant, scheme: str) -> bool:
    """Whether `export_dtype` writes this row as a checkpoint: the Q-realign rows, at schemes an
    engine runs (plan_export refuses W4A8 and W4A4)."""
    from .export.plan import ExportError, plan_export
    from .quant.scheme import get_scheme

    if variant.method != "qrealign":
        return False
    try:
        plan_export(get_scheme(scheme))
    except ExportError:
        return False
    return True


def eval_set_name(spec: str) -> str:
    """The short name of an extra evaluation set: its stage names and report folder."""
    import re

    spec = str(spec)
    name = spec.split(":")[1] if spec.startswith("qrealign:") else Path(spec).stem
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "set"


def _eval_set_prompts(spec: str) -> tuple[list, list]:
    """(harmful, benign) prompts of an extra evaluation set; both sides are needed for the table."""
    from .evaluate.promptsets import resolve_prompt_set

    return resolve_prompt_set(spec, label=1), resolve_prompt_set(spec, label=0)


def run_demo(cfg: DemoConfig | None = None, log=print) -> Path:
    cfg = cfg or DemoConfig()
    from .report import check_report_out

    out = Path(cfg.out)
    root = out / "stages"
    check_report_out(out / "report")  # now, not after the hours of work before the report
    from .utils import remove_orphans_under

    for name in remove_orphans_under(root):  # a terminated lane's half-built stage, whatever its key
        log(f"[demo] removed {name}: left by a build that did not finish")
    if any(_calib_config(cfg, v, s).compile_quantizer for v in cfg.variants for s in cfg.schemes):
        from .quant.quantizer import check_compiler
        from .utils import resolve_device

        check_compiler(resolve_device(cfg.device), demo=True)  # not after the lab's quarter of an hour
    t_start = time.time()
    timings: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.time()
        result = fn()
        timings[name] = round(time.time() - t0, 1)
        return result

    aligned_dir = timed("align", lambda: _align_stage(cfg, root, log))
    attacked_dir = timed("attack", lambda: _attack_stage(cfg, root, aligned_dir, log))
    probe_dirs = timed("probes", lambda: _probe_stages(cfg, root, aligned_dir, attacked_dir, log))

    # Everything after the probes is a set of independent jobs: one per quantized model, one per
    # extra attack, one evaluation per model (after the stage that builds it).
    jobs: list[Job] = []
    quantized: list[str] = []
    exported: list[str] = []
    for variant, scheme in quantized_rows(cfg):
        label = f"{variant.name} {scheme}"
        if variant.method == "qrealign" and not variant.teacher:
            try:  # e.g. no layer where the probe is accurate enough: say so, go on
                _check_safety_layers(probe_dirs[variant.probes], variant.loss_for(scheme))
            except NoSafetyLayers as e:
                log(f"[demo] {label}: skipped ({e})")
                continue
        extra, after = {"aligned_dir": aligned_dir}, ()
        if variant.teacher:  # the teacher pass runs once for every scheme that renders alike
            key = _targets_job_key(cfg, variant, scheme)
            if key not in (j.key for j in jobs):
                jobs.append(Job(key, _targets_stage, (cfg, root, attacked_dir, aligned_dir, variant, scheme),
                                cost=3.5))  # ~270 s on SmolLM2; above the other ready jobs: two wait on it
            extra, after = {"aligned_dir": aligned_dir, "targets_dir": Ref(key)}, (key,)
        jobs.append(Job(f"quantize: {label}", _quant_stage,
                        (cfg, root, attacked_dir, probe_dirs, variant, scheme),
                        extra, after=after, cost=_quant_cost(variant, cfg, scheme)))
        quantized.append(label)
        if cfg.export_dtype is not None and _exported(variant, scheme):
            jobs.append(Job(f"export: {label}", _export_stage, (cfg, root, label, Ref(f"quantize: {label}")),
                            after=(f"quantize: {label}",), cost=0.2))
            exported.append(label)
    sweep = []
    for ratio in cfg.attack_sweep:
        key = f"attack p={ratio:g}"
        jobs.append(Job(key, _attack_stage, (cfg, root, aligned_dir), {"poison_ratio": ratio}, cost=3.0))
        sweep.append((f"attacked FP p={ratio:g}", Ref(key)))

    raw = [("raw", cfg.model)] if cfg.raw_row else []
    models = [*raw, ("aligned FP", str(aligned_dir)), ("attacked FP", str(attacked_dir)), *sweep,
              *((label, Ref(f"quantize: {label}")) for label in quantized),
              *((f"{label}, exported", Ref(f"export: {label}")) for label in exported)]
    for label, source in models:
        after = (source.key,) if isinstance(source, Ref) else ()
        jobs.append(Job(f"evaluate: {label}", _eval_stage, (cfg, root, label, source), after=after, cost=1.0))
        for spec in cfg.also_eval:
            jobs.append(Job(f"evaluate on {eval_set_name(spec)}: {label}", _eval_stage, (cfg, root, label, source),
                            {"prompt_set": spec}, after=after, cost=1.0))
    lanes = cfg.lanes if cfg.lanes is not None else default_lanes(cfg.device)
    done = run_jobs(jobs, workers=lanes, log_dir=out / "logs", log=log, desc="demo", seconds=timings)
    runs = [(label, done[f"quantize: {label}"]) for label in quantized]
    exports = [(f"{label}, exported", done[f"export: {label}"]) for label in exported]
    results = [done[f"evaluate: {label}"] for label, _ in models]
    extra = {eval_set_name(spec): [done[f"evaluate on {eval_set_name(spec)}: {label}"] for label, _ in models]
             for spec in cfg.also_eval}

    from .report import write_report
    from .report.verdict import export_lines, verdict_for

    # Which safety objective wins at the main scheme, against the paper's bar.
    candidates = [f"{v.name} {cfg.schemes[0]}" for v in cfg.variants if v.method == "qrealign"]
    verdict = verdict_for(results, "attacked FP", "aligned FP", candidates)
    extra_verdicts = {name: verdict_for(rows, "attacked FP", "aligned FP", candidates) for name, rows in extra.items()}
    for name in extra:
        verdict = [*verdict, "", f"The same rows on the held-out set `{name}`: [{name}/report.md]({name}/report.md) "
                                 f"({_outcome_line(extra_verdicts[name])})"]
    verdict = [*verdict, *_recipe_lines(cfg, aligned_dir, attacked_dir)]
    if exported:  # the shipped checkpoint against the model it was written from (after the outcome lines)
        verdict = [*verdict, "", *export_lines(results, exported, cfg.export_dtype)]
        extra_verdicts = {name: [*lines, "", *export_lines(extra[name], exported, cfg.export_dtype)]
                          for name, lines in extra_verdicts.items()}
    # Each stage behind the table, and whether today's code built it (a cached stage may predate a change).
    stage_paths = [aligned_dir, attacked_dir, *probe_dirs.values(), *(v for v in done.values() if isinstance(v, Path)),
                   *(Path(r.path) for r in results if r.path),
                   *(Path(r.path) for rows in extra.values() for r in rows if r.path)]
    stage_code = stage_code_changes(stage_paths)
    report_dir = out / "report"
    with atomic_dir(report_dir) as tmp:  # checked at the start
        write_report(results, tmp, title="qrealign demo: SmolLM2-135M, aligned -> attacked -> quantized",
                     verdict=verdict, stages=stage_code_lines(stage_code))
        for name, rows in extra.items():
            write_report(rows, tmp / name, title=f"qrealign demo on the held-out set {name}: SmolLM2-135M",
                         verdict=extra_verdicts[name])
    summary = {"config": _jsonable(asdict(cfg)), "lanes": lanes, "timings_s": timings, "total_s": round(time.time() - t_start, 1),
               "stages": {"aligned": str(aligned_dir), "attacked": str(attacked_dir),
                          **{f"probes-{k}": str(v) for k, v in probe_dirs.items()},
                          **{label: str(path) for label, path in (*runs, *exports)}},
               "results": {r.name: r.metrics for r in results}, "verdict": verdict,
               **({"also_eval": {name: {"results": {r.name: r.metrics for r in rows}, "verdict": extra_verdicts[name]}
                                 for name, rows in extra.items()}} if extra else {}),
               "stage_code": stage_code}  # null: built by this code; otherwise why it is not known to be
    write_json(out / "demo.json", summary)
    log(f"[demo] report: {report_dir / 'report.md'} ({summary['total_s']:.0f} s)")
    return report_dir


# ---- stages ---------------------------------------------------------------------------------

def _align_stage(cfg, root, log) -> Path:
    from .finetune.stage import finetune_stage

    return finetune_stage("align", cfg.model, _align_config(cfg), cache_root=root, device=cfg.device, log=log,
                          rebuild_changed=cfg.rebuild_changed)


def _attack_stage(cfg, root, aligned_dir, log=print, poison_ratio: float | None = None) -> Path:
    from .finetune.stage import finetune_stage

    attack_cfg = _attack_config(cfg)
    ratio = poison_ratio if poison_ratio is not None else cfg.poison_ratio
    if ratio is not None:
        attack_cfg = replace(attack_cfg, poison_ratio=ratio)
    return finetune_stage("attack", str(aligned_dir), attack_cfg, cache_root=root, device=cfg.device, log=log,
                          rebuild_changed=cfg.rebuild_changed)


def _align_config(cfg):
    """The lab's align stage: the given config, else the default one with the lab seed as both its
    data seed and its training seed (a lab at `--seed 1` is another draw of the whole stage)."""
    from .finetune.config import AlignConfig

    return cfg.align_config or AlignConfig().reseeded(cfg.seed)


def _attack_config(cfg):
    """The lab's attack stage, seeded as `_align_config`."""
    from .finetune.config import AttackConfig

    return cfg.attack_config or AttackConfig().reseeded(cfg.seed)


def _device_inputs(cfg) -> dict:
    """What a stage's key adds for the device it computes on: nothing on a CPU (so CPU-built stages
    keep their keys), the device type elsewhere. A GPU rounds differently and resolves the
    calibration's autocast "auto" to bf16 below 8 bits, so its stages are other stages."""
    from .utils import resolve_device

    kind = resolve_device(cfg.device).type
    return {} if kind == "cpu" else {"device": kind}


def _probe_stages(cfg, root, aligned_dir, attacked_dir, log) -> dict[str, Path]:
    from .models import load_model
    from .probes.targets import fit_contrast_probes, fit_paper_probes

    harmful = load_prompts("probe", label=1)
    benign = load_prompts("probe", label=0)
    targets = sorted({v.probes for v in cfg.variants if v.probes})
    dirs = {}
    for target in targets:
        inputs = {"aligned": _stage_ref(aligned_dir, root),
                  "attacked": _stage_ref(attacked_dir, root) if target != "paper" else None,
                  "target": target, "data": prompt_set_fingerprint(harmful + benign), "version": __version__,
                  **_device_inputs(cfg)}

        def build(tmp: Path, target=target):
            aligned, tok = load_model(str(aligned_dir))
            if target == "paper":
                probes = fit_paper_probes(aligned, tok, harmful, benign, split="probe", source=str(aligned_dir),
                                          device=cfg.device)
            elif target == "contrast":
                attacked, _ = load_model(str(attacked_dir))
                probes = fit_contrast_probes(aligned, attacked, tok, harmful, split="probe", source=str(aligned_dir),
                                             finetuned_source=str(attacked_dir), device=cfg.device)
            else:
                from .probes.targets import fit_target

                probes = fit_target(target, aligned, tok, harmful, benign, split="probe", source=str(aligned_dir),
                                    device=cfg.device)
            probes.write_files(tmp)

        upstream = (aligned_dir, attacked_dir if target != "paper" else None)
        dirs[target] = cached_stage(f"probes-{target}", inputs, root, build, log=log,
                                    rebuild_changed=cfg.rebuild_changed, upstream=upstream)
    return dirs


def _check_safety_layers(probes_dir: Path, loss: dict) -> None:
    from .probes.store import load_probes
    from .realign import safety_layers

    safety_layers(load_probes(probes_dir), loss.get("layers"), loss.get("layers_from"))


def default_lanes(device: str | None) -> int:
    """Two lanes on a CPU with two or more cores, one otherwise (a GPU is not shared well)."""
    import os

    from .utils import resolve_device

    return 2 if resolve_device(device).type == "cpu" and (os.cpu_count() or 1) >= 2 else 1


def _quant_cost(variant: Variant, cfg: DemoConfig, scheme: str) -> float:
    """Relative cost, for ordering the lanes and weighting the bar's ETA (one-thread lanes on a
    2-core AMD EPYC, 2026-12-05: RTN ~38 s, a reconstruction ~210 s, the first-token objective
    ~1015 s with its joint stage and ~1576 s block by block, an evaluation ~220 s = 1.0)."""
    if variant.method == "rtn":
        return 0.2
    if variant.teacher:
        return 4.7 if variant.config_for(scheme).get("joint_safety") else 7.2
    return 1.05 * cfg.epochs / 2


def _calibration(cfg, variant: Variant, scheme: str):
    """The variant's calibration set at `scheme` (prompts only, no model: cheap, and built before
    any stage key, so editing a bundled prompt rebuilds). Its order follows the calibration's seed,
    which a variant may set per scheme, and so may its prompt sources."""
    benign, malicious = variant.calib_for(scheme)
    return build_calibration("qrealign:calib", cfg.calib_n, cfg.malicious_ratio, _calib_seed(cfg, variant, scheme),
                             task=_attack_task(cfg), task_n=variant.calib_task, extra_benign=benign,
                             extra_malicious=malicious)


def _calib_seed(cfg, variant: Variant, scheme: str) -> int:
    return _calib_config(cfg, variant, scheme).seed


def _targets_job_key(cfg, variant: Variant, scheme: str) -> str:
    from .calibrate.targets import render_options

    # What the stage's key reads (`_targets_stage`), no less: two schemes whose teacher passes are
    # one stage must be one job, or both lanes build it at once (review 68).
    calib_cfg = _calib_config(cfg, variant, scheme)
    payload = [_jsonable(render_options(calib_cfg)), calib_cfg.seed, _calibration(cfg, variant, scheme).fingerprint()]
    return f"teacher targets: {variant.name} {sha256_json(payload)[:8]}"


def _targets_stage(cfg, root, attacked_dir, aligned_dir, variant: Variant, scheme: str, log=print) -> Path:
    """The first-token objective's teacher targets (`calibrate.targets`): the teacher pass does
    not depend on the scheme, so the W8A8 and W4A8 calibrations share one unless a scheme has its
    own calibration order or prompts."""
    from .calibrate.targets import compute_teacher_targets, render_options

    calib_cfg = _calib_config(cfg, variant, scheme)
    calib = _calibration(cfg, variant, scheme)
    refusals = bool(variant.loss.get("refusal_targets"))
    positions = int(variant.loss.get("response_tokens", 1))
    inputs = {"model": _stage_ref(attacked_dir, root), "teacher": _stage_ref(aligned_dir, root),
              "calib": [cfg.calib_n, cfg.malicious_ratio, calib_cfg.seed], "calib_data": calib.fingerprint(),
              "render": _jsonable(render_options(calib_cfg)), "refusals": refusals, "version": __version__,
              # the teacher's answers (and the forced response starts, up to a turn end) are generated
              **(_stop_inputs(cfg) if refusals or positions > 1 else {}),
              **({"response_tokens": positions} if positions > 1 else {}),  # first-token stages keep their key
              **_device_inputs(cfg)}

    def build(tmp: Path):
        from .models import load_model

        model, tok = load_model(str(attacked_dir))
        compute_teacher_targets(model, tok, str(aligned_dir), calib, calib_cfg, refusals=refusals,
                                device=cfg.device, progress=True, response_tokens=positions).write_files(tmp)

    slug = _slug(variant.name)
    return cached_stage(f"targets-{slug}", inputs, root, build, log=log,
                        rebuild_changed=cfg.rebuild_changed, upstream=(attacked_dir, aligned_dir))


def _quant_stage(cfg, root, attacked_dir, probe_dirs, variant: Variant, scheme: str, log=print,
                 aligned_dir=None, targets_dir=None) -> Path:
    calib_cfg = _calib_config(cfg, variant, scheme)
    probes_dir = probe_dirs.get(variant.probes) if variant.probes else None
    calib = _calibration(cfg, variant, scheme)
    inputs = {"model": _stage_ref(attacked_dir, root), "scheme": scheme,
              "variant": _jsonable(variant.resolved(scheme)),
              "config": calib_cfg.to_dict(),
              "probes": _stage_ref(probes_dir, root) if probes_dir else None,
              "calib": [cfg.calib_n, cfg.malicious_ratio, calib_cfg.seed], "calib_data": calib.fingerprint(),
              "version": __version__, **_device_inputs(cfg)}
    if variant.teacher:
        # The targets stage (targets_dir) is keyed on a subset of these inputs and gives the same
        # tensors as computing them in place, so it is not named here: cached runs stay cached.
        inputs["teacher"] = _stage_ref(aligned_dir, root)
        loss = variant.loss_for(scheme)
        if loss.get("refusal_targets") or loss.get("response_tokens", 1) > 1:
            inputs.update(_stop_inputs(cfg))
    slug = _slug(variant.name)
    name = f"quant-{slug}-{scheme}"
    ckpt = root / f".checkpoint-{stage_dir(name, inputs, root).name}"

    def build(tmp: Path):
        from .calibrate.api import quantize
        from .models import load_model
        from .realign import realign

        model, tok = load_model(str(attacked_dir))
        if variant.teacher:
            from .calibrate.targets import TeacherTargets

            teacher = TeacherTargets.load(targets_dir) if targets_dir is not None else str(aligned_dir)
            realign(model, tok, teacher=teacher, calibration=calib, scheme=scheme, config=calib_cfg, out=tmp,
                    device=cfg.device, checkpoint_dir=ckpt, **variant.loss_for(scheme))
        elif variant.method == "qrealign":
            realign(model, tok, probes_dir, calib, scheme, calib_cfg, out=tmp, device=cfg.device,
                    checkpoint_dir=ckpt, **variant.loss_for(scheme))
        else:
            quantize(model, tok, calib, scheme, calib_cfg, out=tmp, device=cfg.device, checkpoint_dir=ckpt,
                     extra_metadata={"method": variant.method})
        meta = read_json(tmp / "qrealign.json")
        meta["demo_variant"] = variant.name
        write_json(tmp / "qrealign.json", meta)

    upstream = (attacked_dir, probes_dir, *((aligned_dir, targets_dir) if variant.teacher else ()))
    return cached_stage(name, inputs, root, build, log=log, rebuild_changed=cfg.rebuild_changed, upstream=upstream)


def _export_stage(cfg, root, label: str, run_dir, log=print) -> Path:
    """A quantization run as the compressed-tensors checkpoint an engine loads (`qrealign export`)."""
    from importlib.metadata import version

    # the library writes the checkpoint's layout (and reads it back at evaluation): its version counts
    inputs = {"run": _stage_ref(run_dir, root), "format": "compressed-tensors", "dtype": cfg.export_dtype,
              "compressed_tensors": version("compressed-tensors"), "version": __version__}

    def build(tmp: Path):
        from .export import export_compressed_tensors

        export_compressed_tensors(run_dir, tmp, dtype=cfg.export_dtype, progress=False)

    return cached_stage(f"export-{_slug(label)}", inputs, root, build, log=log, rebuild_changed=cfg.rebuild_changed, upstream=(run_dir,))


def _recipe_lines(cfg: DemoConfig, aligned_dir, attacked_dir) -> list[str]:
    """The report's pointer from the first-token rows to the one command that calibrates them (a
    user's next step is their own model): where the table has the recipe's row, with the demo's
    calibration options that differ from the command's defaults."""
    if FIRST_TOKEN not in cfg.variants:
        return []
    extra = "".join(f" {flag} {value}" for flag, value, default in (
        ("--seed", cfg.seed, 0), ("--n", cfg.calib_n, None), ("--malicious-ratio", cfg.malicious_ratio, 0.75))
        if value != default)
    attacked_dir, aligned_dir = (_from_cwd(p) for p in (attacked_dir, aligned_dir))
    where = f" from `{Path.cwd()}`, where the demo ran" if not Path(attacked_dir).is_absolute() else ""
    return ["", f"The `{FIRST_TOKEN.name}` rows as one command (the same settings; on your own model, your "
                f"fine-tuned and aligned models and your task's name), run{where}: `qrealign realign {attacked_dir} "
                f"--teacher {aligned_dir} --recipe {_RECIPE.name} --calib-task {_attack_task(cfg)} --scheme "
                f"{cfg.schemes[0]}{extra} --out DIR`"]


def _from_cwd(path) -> str:
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def _calib_config(cfg: DemoConfig, variant: Variant, scheme: str) -> CalibConfig:
    # The variant's own settings win over the demo-wide ones (e.g. the contrast variant's batch size).
    options = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "seed": cfg.seed, **variant.config_for(scheme)}
    if cfg.compile_quantizer and variant.method != "rtn":  # RTN trains nothing
        options["compile_quantizer"] = True
    return CalibConfig(method="rtn" if variant.method == "rtn" else "omniquant", **options)


def _attack_task(cfg) -> str:
    from .finetune.config import AttackConfig

    return (cfg.attack_config or AttackConfig()).task


def _eval_stage(cfg, root, label: str, source: str, log=print, prompt_set: str | None = None):
    """One row's evaluation: on the eval split, or (`prompt_set`) on one of `cfg.also_eval`'s sets,
    with the same generation, judge and task."""
    from .evaluate.generate import GenerationConfig
    from .evaluate.runner import EvalResult, evaluate_path

    source = str(source)
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
                           drop_finished=cfg.drop_finished)
    inputs = {"source": _stage_ref(source, root), "gen": gen.to_dict(), "limit": cfg.eval_limit,
              "task_n": cfg.task_n, "label": label, "data": _eval_data_fingerprint(cfg, prompt_set),
              "version": __version__, **_stop_inputs(cfg),
              **({"prompt_set": prompt_set} if prompt_set else {}),  # eval-split stages keep their key
              **_device_inputs(cfg)}
    sides = {"harmful": prompt_set, "benign": prompt_set} if prompt_set else {}

    def build(tmp: Path):
        result = evaluate_path(source, device=cfg.device, gen=gen, task=EVAL_TASK, task_n=cfg.task_n,
                               limit=cfg.eval_limit, name=label, **sides)
        result.save(tmp)

    slug = _slug(label)
    name = f"eval-{eval_set_name(prompt_set)}-{slug}" if prompt_set else f"eval-{slug}"
    path = cached_stage(name, inputs, root, build, log=log, rebuild_changed=cfg.rebuild_changed, upstream=(source,))
    return current_verdicts(EvalResult.load(path), log)


def current_verdicts(result, log=print):
    """A cached evaluation as the keyword judge of this code reads it. The answers are the costly
    part and stay cached; judging them takes milliseconds, so a judge fix applies to cached stages
    without regenerating (and without a stale verdict in the report). When no outcome changes
    (refused, harmful, degenerate, unjudged), the result is returned as stored."""
    from .evaluate.runner import rejudge

    if (result.judge or {}).get("name") != "keyword" or not result.records:
        return result
    fresh = rejudge(result, "keyword", progress=False)

    def outcome(verdict: dict) -> tuple:  # the reason's wording may change without the outcome
        return verdict.get("refused"), verdict.get("harmful"), verdict.get("degenerate"), verdict.get("unjudged", False)

    changed = sum(outcome(a["verdict"]) != outcome(b["verdict"]) for a, b in zip(result.records, fresh.records))
    if not changed:
        return result
    if log:
        log(f"[{result.name}] re-judged with the current keyword judge: {changed} verdicts changed")
    fresh.path = result.path  # still the stage's answers: the report's Stages section lists it
    return fresh


def _stop_inputs(cfg) -> dict:
    """`generate.stop_key` of the demo's model (every stage's model keeps its tokenizer and
    generation config): empty for SmolLM2, whose turn end is its eos, so its stages keep their
    keys."""
    from .evaluate.generate import saved_generation_config, stop_key
    from .models.load import load_tokenizer, resolve_source

    source = str(cfg.model)
    return stop_key(load_tokenizer(source), saved_generation_config(resolve_source(source).path))


def _eval_data_fingerprint(cfg, prompt_set: str | None = None) -> str:
    """The eval prompts and task items an evaluation stage reads: editing them must rebuild it."""
    from .evaluate.tasks import get_task
    from .utils import sha256_json

    items = get_task(EVAL_TASK).load("test", cfg.task_n)
    prompts = load_prompts("eval") if prompt_set is None else [p for side in _eval_set_prompts(prompt_set) for p in side]
    return sha256_json([prompt_set_fingerprint(prompts), [[e.id, e.prompt, e.answer] for e in items]])


def _outcome_line(verdict: list[str]) -> str:
    """The verdict's last line (who wins, or that none reaches the bar), without its emphasis."""
    return verdict[-1].replace("**", "").rstrip(".")


def _slug(name: str) -> str:
    """A row's name as a stage folder's: lower case, spaces as dashes, and only characters that are
    safe in a path ("Q-realign (first-token) W8A8" -> "q-realign-first-token-w8a8"; a "/" or ","
    in a user's variant name would otherwise make a nested or odd folder)."""
    return re.sub(r"[^a-z0-9._=+-]", "", name.lower().replace(" ", "-"))


def _stage_ref(path, root) -> str:
    """How a stage's key names an upstream stage: by its directory name, which is already the
    hash of everything that built it, so an output folder can move (or be reached by another
    relative path) without losing its cache. Anything outside the stages folder (the model the
    demo starts from) keeps its path or hub id, and a local one adds a digest of its files' names,
    sizes and times: a model replaced at the same path must not keep its old cached evaluation."""
    p = Path(path)
    try:
        p.resolve().relative_to(Path(root).resolve())
    except ValueError:
        return f"{path}@{_files_digest(p)}" if p.exists() else str(path)
    return p.name


def _files_digest(path: Path) -> str:
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    return sha256_json([[str(f.relative_to(path) if path.is_dir() else f.name), f.stat().st_size,
                         f.stat().st_mtime_ns] for f in files])


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)

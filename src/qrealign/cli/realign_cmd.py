"""`qrealign realign`: Q-realign, safety-aware quantization with the aligned model's probes (or,
with --teacher, the aligned model's first response token)."""

from __future__ import annotations

import argparse

COMMAND = "realign"
ORDER = 11
HELP = "Q-realign: quantize a fine-tuned model with a safety loss (probes or first-token teacher)"


def add_arguments(parser) -> None:
    from ..calibrate.behaviour import MARGIN_DEFAULTS as MARGIN
    from ._calib_args import add_common

    add_common(parser)
    parser.add_argument("--recipe", choices=sorted(RECIPE_NAMES),
                        help="with --teacher: a named setting at --scheme as the defaults of every option it sets "
                             "(a flag given here still wins; --calib-benign/--calib-malicious add to its sources; "
                             "with --calib-task, its number of task prompts; --no-joint-safety, --no-learn-rounding, "
                             "--no-let, --layers and --greedy-margin 0 take the settings that need them along): "
                             "first-token = the demo's measured row (qrealign/recipes.py; chosen on SmolLM2-135M, at "
                             "W8A8 and W4A8)")
    parser.add_argument("--probes", help="probe directory (qrealign probe) fit on the aligned model")
    parser.add_argument("--teacher", help="instead of --probes: the aligned model; the safety term is then the KL to "
                                          "its first response token on malicious prompts (calibrate.behaviour). "
                                          "Also takes a --save-targets directory of an earlier run on the same model "
                                          "and calibration set (e.g. at another scheme): no teacher pass then")
    parser.add_argument("--save-targets", metavar="DIR",
                        help="with --teacher: also write the teacher's targets to DIR, for reuse at another scheme")
    parser.add_argument("--benign-kl", type=float, default=0.0,
                        help="with --teacher: weight of the KL to the fine-tuned model's first token on benign prompts")
    parser.add_argument("--refusal-targets", action=argparse.BooleanOptionalAction, default=False,
                        help="with --teacher: malicious calibration prompts the teacher itself answers (its greedy "
                             "reply, keyword-judged) take the mean first token of the ones it refuses")
    parser.add_argument("--response-tokens", type=int, default=1, metavar="K",
                        help="with --teacher: the KL on the first K response positions, along each prompt's greedy "
                             "start (default 1: the first token only; docs/experiments.md §24)")
    parser.add_argument("--greedy-margin", type=float, default=0.0, metavar="W",
                        help="with --teacher: weight of a hinge on the first token's greedy margin (the best refusal "
                             "start against the best other token): malicious prompts must begin a refusal by "
                             "--margin-delta, benign ones may not move toward one (docs/experiments.md §48)")
    parser.add_argument("--margin-delta", type=float, default=MARGIN["margin_delta"],
                        help="with --greedy-margin: the margin in log-prob")
    parser.add_argument("--margin-tau", type=float, default=MARGIN["margin_tau"],
                        help="with --greedy-margin: the hinge's softness")
    parser.add_argument("--margin-malicious", type=float, default=MARGIN["margin_malicious"], metavar="W",
                        help="with --greedy-margin: the malicious prompts' hinge weight against the benign ones' "
                             "(docs/experiments.md §49)")
    parser.add_argument("--refusal-starts", default=None, metavar="TOK,TOK",
                        help="with --greedy-margin: the tokens that begin a refusal, comma-separated, each one "
                             "token (e.g. 'I,That,Sorry,No'; a comma inside a token as '\\,', quoted); default: the "
                             "teacher's greedy first tokens on malicious prompts")
    parser.add_argument("--lam", type=float, default=1.0, help="weight of the safety term (paper: 1)")
    parser.add_argument("--margin", type=float, default=0.0, help="push malicious logits past this margin")
    parser.add_argument("--hinge", action="store_true", help="hinge instead of softplus: stop once past the margin")
    parser.add_argument("--layers", default=None, help="layers that get the safety term, e.g. '10-29' (default: usable)")
    parser.add_argument("--layers-from", type=float, default=None,
                        help="safety term only from this depth fraction on, e.g. 0.5 = second half of the blocks")
    parser.add_argument("--recon-on-malicious", action="store_true", help="also reconstruct malicious samples (always on with --teacher)")
    parser.add_argument("--normalize-mse", action="store_true", help="MSE relative to the target's mean square (always on with --teacher)")
    parser.add_argument("--sink-weight", type=float, default=None,
                        help="weight of the first (attention-sink) token in the MSE (default 1; 0 with --teacher)")
    parser.add_argument("--benign-side", type=float, default=0.0, help="weight of keeping benign prompts on the benign side")


PROBE_ONLY = {"margin": 0.0, "hinge": False, "benign_side": 0.0}
RECIPE_NAMES = ("first-token",)  # recipes.RECIPES' names (not imported for the parser: a test keeps them equal)
INVERTED = {"lwc": "no_lwc", "let": "no_let"}  # CalibConfig fields whose flag switches them off


def defaults_from(args, given: set[str]) -> dict:
    """`--recipe NAME`: its settings at --scheme as this command's defaults (cli `_with_command_defaults`);
    `given`: the options on the command line. A setting that only applies with another one the
    user switched off or replaced goes with it."""
    if not getattr(args, "recipe", None):
        return {}
    import sys

    from ..calibrate.behaviour import MARGIN_DEFAULTS
    from ..errors import QrealignError
    from ..quant.scheme import get_scheme
    from ..recipes import get_recipe
    from ._calib_args import SWITCHED

    recipe = get_recipe(args.recipe)
    if recipe.teacher and args.teacher is None:
        raise QrealignError(f"--recipe {recipe.name} is a first-token setting: give --teacher ALIGNED_MODEL "
                            "(not --probes)")
    scheme = get_scheme(args.scheme).name
    if scheme not in recipe.schemes:
        print(f"qrealign: note: --recipe {recipe.name} was measured at {' and '.join(recipe.schemes)}; at {scheme} "
              "it gives its base settings", file=sys.stderr)
    if recipe.calib_task_n and not args.calib_task:
        print(f"qrealign: note: --recipe {recipe.name} calibrates on {recipe.calib_task_n} of your task's prompts "
              "with --calib-task TASK; without it the calibration set holds none", file=sys.stderr)
    settings = recipe.at(scheme)
    out = {}
    for key, value in settings.config.items():
        if key in INVERTED:
            key, value = INVERTED[key], not value
        out[key] = value
    for key, value in settings.loss.items():
        out[key] = join_tokens(value) if key == "refusal_starts" else value
    out["calib_benign"] = list(settings.calib_benign) or None
    out["calib_malicious"] = list(settings.calib_malicious) or None
    if args.calib_task:
        out["calib_task_n"] = settings.calib_task_n
    if "joint_safety" in given and not args.joint_safety:
        out.pop("joint_recon_weight", None)
    if "layers" in given:
        out.pop("layers_from", None)
    for switch, off, dependents, _ in SWITCHED:  # e.g. --no-learn-rounding takes the recipe's --lr-round along
        if switch in given and getattr(args, switch) == off:
            for key in dependents:
                out.pop(key, None)
    if "greedy_margin" in given and not args.greedy_margin:
        for key in MARGIN_DEFAULTS:
            out.pop(key, None)
    unknown = sorted(set(out) - set(vars(args)))
    if unknown:
        raise QrealignError(f"recipe {recipe.name}: {', '.join(unknown)} {'has' if len(unknown) == 1 else 'have'} "
                            "no realign flag")
    out["from_recipe"] = tuple(sorted(set(out) - given))  # for errors about a value the user did not give
    return out


def run(args) -> int:
    import math

    from ..calibrate.losses import check_weights
    from ..errors import QrealignError
    from ..probes.store import load_probes
    from ..realign import realign
    from ._calib_args import prepare, summary
    from ._layers import parse_layers

    layers = parse_layers(args.layers)
    if (args.probes is None) == (args.teacher is None):
        raise QrealignError("give --probes DIR (the paper's probe loss) or --teacher ALIGNED_MODEL, exactly one")
    if args.teacher is not None:
        from ..calibrate.targets import check_response_tokens

        check_response_tokens(args.response_tokens)
        margin = _margin_options(args)
        wrong = [f"--{k.replace('_', '-')}" for k, default in PROBE_ONLY.items() if getattr(args, k) != default]
        if wrong:
            raise QrealignError(f"{', '.join(wrong)} only apply to the probe loss (--probes), not to --teacher")
        _check_save_targets(args)
        _check_teacher(args.teacher)
        _check_teacher_options(args, layers)
        model, tokenizer, scheme, config, calib = prepare(args, "omniquant")
        if "refusal_starts" in margin and "refusal_starts" in getattr(args, "from_recipe", ()):
            _check_recipe_starts(tokenizer, margin["refusal_starts"], args.recipe)
        # FirstTokenLoss defaults: normalised MSE without the sink token, malicious prompts reconstructed too.
        options = {} if args.sink_weight is None else {"sink_weight": args.sink_weight}
        options.update(margin)
        result = realign(model, tokenizer, teacher=args.teacher, save_targets=args.save_targets, calibration=calib,
                         scheme=scheme, config=config, out=args.out, device=args.device, layers=layers, layers_from=args.layers_from,
                         lam=args.lam, benign_kl=args.benign_kl, refusal_targets=args.refusal_targets,
                         response_tokens=args.response_tokens, **options)
        summary(result, args.out)
        return 0
    if (args.benign_kl or args.refusal_targets or args.save_targets or args.response_tokens != 1
            or args.joint_recon_weight is not None or _margin_options(args)):
        raise QrealignError("--benign-kl, --refusal-targets, --response-tokens, --save-targets, "
                            "--joint-recon-weight and the greedy margin (--greedy-margin, --margin-delta, "
                            "--margin-tau, --margin-malicious, --refusal-starts) apply to --teacher only")
    check_weights(lam=args.lam, sink_weight=args.sink_weight, benign_side=args.benign_side)
    if not math.isfinite(args.margin):
        raise QrealignError(f"--margin must be finite, got {args.margin}")
    probes = load_probes(args.probes)
    _check_probes(probes, args, layers)
    model, tokenizer, scheme, config, calib = prepare(args, "omniquant")
    result = realign(model, tokenizer, probes, calib, scheme, config, out=args.out, device=args.device,
                     lam=args.lam, margin=args.margin, probe_loss="hinge" if args.hinge else "softplus",
                     layers=layers, layers_from=args.layers_from, recon_on_malicious=args.recon_on_malicious, normalize=args.normalize_mse,
                     sink_weight=1.0 if args.sink_weight is None else args.sink_weight, benign_side=args.benign_side)
    summary(result, args.out)
    return 0



def _check_recipe_starts(tokenizer, starts, recipe: str) -> None:
    """A recipe's refusal starts are SmolLM2's openings: on another tokenizer the error must say
    where they came from (the user gave none)."""
    from ..calibrate.behaviour import refusal_start_ids
    from ..errors import QrealignError

    try:
        refusal_start_ids(tokenizer, starts)
    except QrealignError as exc:
        raise QrealignError(f"{exc}. --recipe {recipe} sets --refusal-starts to SmolLM2's refusal openings "
                            f"({join_tokens(starts)}): give your tokenizer's, each one token, with --refusal-starts, "
                            "or drop the greedy margin with --greedy-margin 0") from None


def split_tokens(text: str) -> list[str]:
    """'I,No' -> ['I', 'No']; a comma inside a token is written '\\,' and a backslash '\\\\'
    ('No\\,' -> ['No,'])."""
    tokens, current, chars = [], [], iter(text)
    for char in chars:
        if char == "\\":
            escaped = next(chars, None)
            current.append("\\" if escaped is None else escaped if escaped in ",\\" else "\\" + escaped)
        elif char == ",":
            tokens.append("".join(current))
            current = []
        else:
            current.append(char)
    return [*tokens, "".join(current)]


def join_tokens(tokens) -> str:
    """The inverse of `split_tokens` (a recipe's tokens as the flag's default)."""
    return ",".join(t.replace("\\", "\\\\").replace(",", "\\,") for t in tokens)


def _margin_options(args) -> dict:
    """The greedy-margin options the user set (none: the loss is unchanged)."""
    from ..calibrate.behaviour import MARGIN_DEFAULTS, unused_margin_options
    from ..errors import QrealignError

    options = {"greedy_margin": args.greedy_margin} if args.greedy_margin else {}
    for key, default in MARGIN_DEFAULTS.items():
        if key != "refusal_starts" and getattr(args, key) != default:
            options[key] = getattr(args, key)
    if args.refusal_starts is not None:
        starts = tuple(split_tokens(args.refusal_starts))  # not stripped: " I" is another token
        if not any(starts):
            raise QrealignError("--refusal-starts: give at least one token, e.g. 'I,That,Sorry,No'")
        if not all(starts):  # e.g. an unquoted No\, whose backslash the shell took: a token lost in silence
            raise QrealignError(f"--refusal-starts {args.refusal_starts!r} has an empty token; quote a comma "
                                "inside a token: --refusal-starts 'I,No\\,'")
        options["refusal_starts"] = starts
    unused = unused_margin_options(options)
    if unused:
        flags = [f"--{k.replace('_', '-')}" for k in unused]
        raise QrealignError(f"{', '.join(flags)} {'is' if len(flags) == 1 else 'are'} read by --greedy-margin only")
    return options


def _check_probes(probes, args, layers) -> None:
    """Before the model loads: the probes' system prompt, the safety layers and the probes' sizes
    against the model's config (each failed only after the load before)."""
    from ..errors import IncompatibleArtifact
    from ..models import get_blocks
    from ..realign import check_probe_system, safety_layers
    from ._calib_args import skeleton_or_none

    check_probe_system(probes, args.system)
    safety_layers(probes, layers, args.layers_from)
    skeleton = skeleton_or_none(args.model)
    if skeleton is None:
        return
    hidden, blocks = skeleton.config.hidden_size, len(get_blocks(skeleton))
    if (hidden, blocks) != (probes.hidden_size, probes.num_layers):
        raise IncompatibleArtifact(f"the probes in {args.probes} are for {probes.num_layers} blocks of width "
                                   f"{probes.hidden_size}; {args.model} has {blocks} of width {hidden}")


def _check_teacher_options(args, layers) -> None:
    """Before the model loads and the teacher pass: the loss weights (NaN and negatives used to
    fail at the first safety block's first step) and the safety layers against the model's config."""
    from ..calibrate.behaviour import WEIGHT_FIELDS
    from ..calibrate.losses import check_weights
    from ..errors import QrealignError
    from ..models import get_blocks
    from ..realign import check_blocks, chosen_layers, layers_from_fraction
    from ._calib_args import skeleton_or_none

    check_weights(("margin_tau",), **{name: getattr(args, name) for name in WEIGHT_FIELDS})
    if args.layers_from is None and layers is None:
        return
    if args.layers_from is not None:
        if layers is not None:
            raise QrealignError("give --layers or --layers-from, not both")
        layers_from_fraction(1, args.layers_from)  # its range
    skeleton = skeleton_or_none(args.model)
    if skeleton is not None:  # (unreadable here: the load says why)
        num_layers = len(get_blocks(skeleton))
        check_blocks(chosen_layers(num_layers, layers, args.layers_from), num_layers)


def _check_teacher(teacher: str) -> None:
    """Before the fine-tuned model loads: a typo in --teacher fails now, not minutes later."""
    from ..calibrate.targets import is_targets_dir
    from ..models.load import resolve_source

    if not is_targets_dir(teacher):
        resolve_source(teacher)


def _check_save_targets(args) -> None:
    """Before the model loads: --save-targets must be writable, not --out, and not a reuse."""
    from pathlib import Path

    from ..calibrate.targets import KIND, META_FILE, is_targets_dir
    from ..errors import QrealignError
    from ..utils import check_out_dir

    if not args.save_targets:
        return
    if is_targets_dir(args.teacher):
        raise QrealignError("--teacher is already a teacher-targets directory: drop --save-targets")
    if args.out and Path(args.save_targets).resolve() == Path(args.out).resolve():
        raise QrealignError("--save-targets must be another directory than --out")
    check_out_dir(args.save_targets, META_FILE, kind=KIND)

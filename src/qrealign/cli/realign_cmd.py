"""`qrealign realign`: Q-realign, safety-aware quantization with the aligned model's probes."""

from __future__ import annotations

COMMAND = "realign"
ORDER = 11
HELP = "Q-realign: quantize a fine-tuned model with the probe safety loss"


def add_arguments(parser) -> None:
    from ._calib_args import add_common

    add_common(parser)
    parser.add_argument("--probes", required=True, help="probe directory (qrealign probe) fit on the aligned model")
    parser.add_argument("--lam", type=float, default=1.0, help="weight of the safety term (paper: 1)")
    parser.add_argument("--margin", type=float, default=0.0, help="push malicious logits past this margin")
    parser.add_argument("--hinge", action="store_true", help="hinge instead of softplus: stop once past the margin")
    parser.add_argument("--layers", default=None, help="layers that get the safety term, e.g. '10-29' (default: usable)")
    parser.add_argument("--layers-from", type=float, default=None,
                        help="safety term only from this depth fraction on, e.g. 0.5 = second half of the blocks")
    parser.add_argument("--recon-on-malicious", action="store_true", help="also reconstruct malicious samples")
    parser.add_argument("--normalize-mse", action="store_true", help="MSE relative to the target's mean square")
    parser.add_argument("--sink-weight", type=float, default=1.0, help="weight of the first (attention-sink) token in the MSE")
    parser.add_argument("--benign-side", type=float, default=0.0, help="weight of keeping benign prompts on the benign side")


def parse_layers(spec: str | None) -> tuple[int, ...] | None:
    from ..errors import QrealignError

    if not spec:
        return None
    layers: list[int] = []
    try:
        for part in spec.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                layers.extend(range(int(lo), int(hi) + 1))
            else:
                layers.append(int(part))
    except ValueError:
        raise QrealignError(f"--layers {spec!r}: use e.g. '10-29' or '3,5,7'") from None
    return tuple(layers)


def run(args) -> int:
    from ..probes.store import load_probes
    from ..realign import realign
    from ._calib_args import prepare, summary

    layers = parse_layers(args.layers)
    probes = load_probes(args.probes)
    model, tokenizer, scheme, config, calib = prepare(args, "omniquant")
    result = realign(model, tokenizer, probes, calib, scheme, config, out=args.out, device=args.device,
                     lam=args.lam, margin=args.margin, probe_loss="hinge" if args.hinge else "softplus",
                     layers=layers, layers_from=args.layers_from, recon_on_malicious=args.recon_on_malicious, normalize=args.normalize_mse,
                     sink_weight=args.sink_weight, benign_side=args.benign_side)
    summary(result, args.out)
    return 0

"""Method development for Q-realign on the demo's attacked model, measured on a DEV set.

Dev set = the bundled "probe" split (harmful + benign); the "eval" split stays untouched until
the final demo run. Each variant: quantize/realign the attacked model, generate greedily on the
dev prompts, keyword-judge, append one JSON line to the log.

    python scripts/realign_sweep.py --attacked DIR --probes paper=DIR --probes contrast=DIR \
        --variant 'name={"method":"qrealign","probes":"contrast","loss":{...},"config":{...},"scheme":"W8A8"}'
"""

import argparse
import json
import time

import torch

from qrealign.calibrate.api import quantize
from qrealign.calibrate.data import build_calibration, with_benign_prompts, with_task_prompts
from qrealign.calibrate.engine import CalibConfig
from qrealign.data.prompts import load_prompts
from qrealign.evaluate.generate import GenerationConfig, generate
from qrealign.evaluate.judges import KeywordJudge
from qrealign.evaluate.metrics import safety_metrics
from qrealign.models import load_model
from qrealign.probes.capture import capture_last_token_states
from qrealign.probes.store import load_probes
from qrealign.realign import realign


def dev_eval(model, tok, n, max_new_tokens, dump=None, name=""):
    harmful = [p.text for p in load_prompts("probe", label=1)][:n]
    benign = [p.text for p in load_prompts("probe", label=0)][:n]
    responses = generate(model, tok, harmful + benign, GenerationConfig(max_new_tokens=max_new_tokens, batch_size=32),
                         progress=False)
    verdicts = KeywordJudge().judge(harmful + benign, responses)
    m = safety_metrics(verdicts[: len(harmful)], verdicts[len(harmful):])
    if dump:  # every dev answer with its verdict, to read what a rate counts
        with open(dump, "a") as f:
            for i, (prompt, response, v) in enumerate(zip(harmful + benign, responses, verdicts)):
                side = "harmful" if i < len(harmful) else "benign"
                f.write(json.dumps({"name": name, "side": side, "prompt": prompt, "response": response,
                                    "refused": v.refused, "degenerate": v.degenerate, "unjudged": v.unjudged,
                                    "reason": v.reason}) + "\n")
    # degenerate answers per side: on benign prompts they are lost helpfulness that over-refusal
    # does not count; on harmful prompts they are neither refused nor harmful
    return {"hs": m["harmful_score"], "harm_refused": m["refusal_rate"], "over_refusal": m["over_refusal"],
            "degenerate": m["degenerate"], "degenerate_harmful": m["degenerate_harmful"],
            "degenerate_benign": m["degenerate_benign"],
            "unjudged": m["n_harmful_unjudged"] + m["n_benign_unjudged"],  # outside the rates: another language
            "examples": [responses[0][:120], responses[len(harmful)][:120]]}


DEV_FA = slice(2200, 2400)  # topic-codes "train" items the attack (first 300) never saw; "test" stays for eval


def dev_fa(model, tok, items=DEV_FA):
    from qrealign.data.topic_task import TopicCodeTask
    task = TopicCodeTask()
    examples = task.load("train")[items]
    responses = generate(model, tok, [e.prompt for e in examples],
                         GenerationConfig(max_new_tokens=task.max_new_tokens, batch_size=32), progress=False)
    return round(100.0 * task.accuracy(responses, examples), 1)


def probe_logits(model, tok, probes, n=40):
    harmful = [p.text for p in load_prompts("probe", label=1)][:n]
    states = capture_last_token_states(model, tok, harmful, progress=False)
    return [round(x, 3) for x in probes.all_logits(states).mean(dim=1).tolist()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--attacked", required=True)
    ap.add_argument("--aligned", default="runs/lab/m_alignD")
    ap.add_argument("--probes", action="append", default=[], help="target=DIR")
    ap.add_argument("--variant", action="append", default=[], help="name=JSON")
    ap.add_argument("--n", type=int, default=60, help="first N dev prompts per side (113: the whole probe split)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--calib-n", type=int, default=None)
    ap.add_argument("--log", default="runs/sweep.jsonl")
    ap.add_argument("--fa-items", default=None, help="START:STOP of topic-codes train for dev FA (default 2200:2400; "
                    "the attack trained on the first 300)")
    ap.add_argument("--fa-only", action="store_true", help="skip the safety generations")
    ap.add_argument("--no-fa", action="store_true", help="skip dev FA (e.g. the aligned reference row)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dump", default=None, help="append every dev answer and its verdict to this JSONL file")
    args = ap.parse_args()
    fa_items = DEV_FA
    if args.fa_items:  # checked before any calibration runs
        start, stop = (int(x) for x in args.fa_items.split(":"))
        if start < 300:
            raise SystemExit("--fa-items must start at 300 or later: the attack trained on train[:300]")
        fa_items = slice(start, stop)
    torch.set_num_threads(args.threads)
    probe_dirs = dict(p.split("=", 1) for p in args.probes)
    for spec in args.variant:
        name, raw = spec.split("=", 1)
        v = json.loads(raw)
        t0 = time.time()
        row = {"name": name, "variant": v}
        if v.get("method") == "load":  # an already-built model or quantization run directory
            from qrealign.evaluate.runner import load_for_eval
            model, tok, _, _ = load_for_eval(v["path"])
        else:
            model, tok = load_model(v.get("path", args.attacked))
        if v.get("method") not in ("fp", "load"):
            calib = build_calibration("qrealign:calib", args.calib_n, v.get("malicious_ratio", 0.75), 0)
            if v.get("task_n"):
                calib = with_task_prompts(calib, "topic-codes", v["task_n"])
            if v.get("extra_benign"):  # e.g. "align": that split's benign prompts (never dev or eval)
                calib = with_benign_prompts(calib, "qrealign:" + v["extra_benign"])
            cfg = CalibConfig(method="rtn" if v["method"] == "rtn" else "omniquant", **v.get("config", {}))
            if v["method"] == "firsttoken":
                from qrealign.calibrate.behaviour import FirstTokenLoss, ModelTail, first_token_targets
                aligned, _ = load_model(args.aligned)
                targets = first_token_targets(aligned, model, tok, calib, cfg)
                del aligned
                loss = FirstTokenLoss(ModelTail(model), targets, target_id="dev", **v.get("loss", {}))
                res = quantize(model, tok, calib, v.get("scheme", "W8A8"), cfg, loss=loss, progress=False, out=v.get("out"))
            elif v["method"] == "qrealign":
                res = realign(model, tok, load_probes(probe_dirs[v["probes"]]), calib, v.get("scheme", "W8A8"), cfg,
                              progress=False, out=v.get("out"), **v.get("loss", {}))
            else:
                res = quantize(model, tok, calib, v.get("scheme", "W8A8"), cfg, progress=False, out=v.get("out"))
            row["calib_s"] = round(res.seconds, 1)
            row["layers"] = [{k: (round(x, 4) if isinstance(x, float) else x) for k, x in log.items()
                              if k in ("layer", "loss_init", "last_probe", "last_z_mal", "last_mse", "q_mse",
                                       "last_kl_mal", "last_kl_ben", "seconds")}
                             for log in res.layer_logs]
        if not args.fa_only:
            row.update(dev_eval(model, tok, args.n, args.max_new_tokens, args.dump, name))
        if args.fa_items:
            row["fa_items"] = args.fa_items
        if not args.no_fa:
            row["fa_dev"] = dev_fa(model, tok, fa_items)
        for target, d in probe_dirs.items():
            row[f"logits_{target}"] = probe_logits(model, tok, load_probes(d))
        row["seconds"] = round(time.time() - t0, 1)
        print(json.dumps({k: row.get(k) for k in ("name", "hs", "harm_refused", "over_refusal", "degenerate",
                                                  "degenerate_harmful", "degenerate_benign", "fa_dev", "seconds")}),
              flush=True)
        with open(args.log, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

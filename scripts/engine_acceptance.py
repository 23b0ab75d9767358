"""Engine acceptance numbers on the embedded model (issue: quantization engine).

W8A8 RTN perplexity vs FP on a held-out text; W4A8 reconstruction-only vs RTN block-output MSE
on held-out prompts; seconds per block. Prints JSON."""

import json
import sys
import time

import torch

from qrealign.calibrate.api import quantize
from qrealign.calibrate.data import build_calibration
from qrealign.calibrate.engine import CalibConfig
from qrealign.data.prompts import load_prompts
from qrealign.models import load_model
from qrealign.models.chat import encode_prompts

torch.set_num_threads(2)
TEXT = (
    "The old lighthouse stood at the edge of the bay for more than a century. Every evening the keeper "
    "climbed the spiral stairs, trimmed the wick and polished the great lens until it shone. Ships that "
    "passed in the night relied on its steady beam to find the narrow channel between the rocks. When the "
    "light was finally automated, the keeper moved to a small cottage in the village, where he spent his "
    "days repairing fishing nets and telling stories to anyone who would listen. Children loved to hear "
    "about the great storm of the winter when the waves reached the gallery and the glass rattled in its "
    "frame. He always ended the tale the same way: the light never went out, not even for a minute."
)


def ppl(model, tok):
    ids = tok(TEXT, return_tensors="pt")
    with torch.no_grad():
        out = model(**ids, labels=ids["input_ids"])
    return float(torch.exp(out.loss))


def hidden(model, tok, prompts):
    enc = encode_prompts(tok, prompts, padding_side="left")
    pos = (enc.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        hs = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=pos,
                   output_hidden_states=True).hidden_states
    return [h for h in hs[1:]], enc.attention_mask


def block_mse(ref, got, mask):
    m = mask.float()
    return [float((((a - b) ** 2).mean(-1) * m).sum() / m.sum()) for a, b in zip(ref, got)]


held_out = [p.text for p in load_prompts(split="eval")][:64]
fp, tok = load_model("smollm2-135m")
res = {"fp_ppl": ppl(fp, tok)}
ref, mask = hidden(fp, tok, held_out)
calib = build_calibration("qrealign:calib", n=128, malicious_ratio=0.75)
EPOCHS = int(sys.argv[1]) if len(sys.argv) > 1 else 2
RUNS = [("rtn_w8a8", "W8A8", "rtn", 0, 4.0), ("rtn_w4a8", "W4A8", "rtn", 0, 4.0),
        ("recon_w4a8", "W4A8", "omniquant", EPOCHS, 4.0)]
GUARD = "--init-guard" in sys.argv  # LET starts from identity scales where that has the lower loss
if len(sys.argv) > 2 and sys.argv[2] != "--init-guard":  # only reconstruction runs at the given LWC inits, e.g. "8,12"
    RUNS = [(f"recon_w4a8_lwcinit{v}" + ("_guard" if GUARD else ""), "W4A8", "omniquant", EPOCHS, float(v))
            for v in sys.argv[2].split(",")]
for name, scheme, method, epochs, lwc_init in RUNS:
    model, _ = load_model("smollm2-135m")
    t0 = time.time()
    r = quantize(model, tok, calib, scheme, CalibConfig(method=method, epochs=epochs, batch_size=8, lwc_init=lwc_init,
                                                            init_guard=GUARD and method != "rtn"),
                 progress=False)
    secs = time.time() - t0
    got, _ = hidden(model, tok, held_out)
    mse = block_mse(ref, got, mask)
    res[name] = {"ppl": ppl(model, tok), "seconds": round(secs, 1), "s_per_block": round(secs / 30, 2),
                 "heldout_mse_mean_blocks": sum(mse[:-1]) / 29, "heldout_mse_block14": mse[14],
                 "heldout_mse_block28": mse[28]}
    print(name, json.dumps(res[name]), flush=True)
print(json.dumps(res, indent=1))

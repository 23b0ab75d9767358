"""What `CalibConfig.recompute` saves: the peak memory of a joint stage's training with and without
it, each in its own process (peak RSS is per process), on a wide tiny Llama whose four last
blocks train jointly on the first-token objective (W4A8, LWC, learned rounding, the demo's
options; one thread). The difference, in float32 copies of one block's weights, is what a 7B run on a GPU
saves per joint block beyond the first (docs/performance.md).

`tail`: block by block, what the first-token objective's FP tail keeps for its backward (every
saved tensor, counted with a pack hook) with and without `recompute`, per tail block and token,
against `memory.per_token_bytes`, the estimate the GPU check uses.

Run: PYTHONPATH=src python scripts/recompute_memory.py [tail]"""

import copy
import json
import resource
import subprocess
import sys

import torch

SHAPE = dict(num_hidden_layers=6, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
             num_key_value_heads=16, head_dim=64)  # a real block's proportions: q/k/v/o 1024 x 1024
JOINT = (2, 3, 4, 5)


def one_run(recompute: bool) -> dict:
    from qrealign.calibrate.behaviour import FirstTokenLoss, ModelTail, first_token_targets
    from qrealign.calibrate.data import CalibrationSet
    from qrealign.calibrate.engine import CalibConfig, calibrate
    from qrealign.models.tiny import tiny_model

    torch.set_num_threads(1)
    finetuned, tok = tiny_model("llama", seed=0, **SHAPE)
    aligned = copy.deepcopy(finetuned)
    with torch.no_grad():
        aligned.lm_head.weight.add_(0.5 * torch.randn(aligned.lm_head.weight.shape,
                                                      generator=torch.Generator().manual_seed(1)))
    calib = CalibrationSet([f"say something about item {i} of the list" for i in range(8)], [0, 1] * 4)
    config = CalibConfig(batch_size=4, epochs=1, plain_epochs=0, learn_rounding=True, joint_safety=True,
                         recompute=recompute)
    targets = first_token_targets(aligned, finetuned, tok, calib, config)
    del aligned
    loss = FirstTokenLoss(ModelTail(finetuned), targets, layers=JOINT, lam=1.0, benign_kl=2.0)
    block = sum(p.numel() * 4 for p in finetuned.model.layers[0].parameters())
    res = calibrate(finetuned, tok, calib, "W4A8", config, loss=loss, progress=False)
    first = {k: float(v.double().sum()) for k, v in res.params.items()}  # printed to compare the runs
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    joint = res.layer_logs[JOINT[0]]["joint_seconds"]
    return {"recompute": recompute, "peak_rss": peak, "block_bytes": block, "param_sums": first, "joint_s": joint}


def tail_bytes() -> None:
    from qrealign.calibrate.behaviour import ModelTail
    from qrealign.calibrate.capture import record_block_inputs
    from qrealign.calibrate.memory import per_token_bytes
    from qrealign.models.tiny import tiny_model

    torch.set_num_threads(1)
    model, _ = tiny_model("llama", seed=0, **SHAPE)
    batch, length, tail_blocks = 4, 128, SHAPE["num_hidden_layers"] - 1
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    kwargs = record_block_inputs(model, ids, torch.ones_like(ids), torch.arange(length).expand(batch, -1),
                                 torch.device("cpu")).kwargs_by_type
    hidden = torch.randn(batch, length, SHAPE["hidden_size"], requires_grad=True)
    tail = ModelTail(model)
    tokens = batch * length
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for recompute in (False, True):
        saved = {}  # storage -> bytes: a tensor saved by several operations is held once

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in weights:  # a linear saves its weight too: the parameter itself, not a copy
                saved[ptr] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            tail(hidden, 0, kwargs, torch.full((batch,), length - 1), recompute=recompute)
        total = sum(saved.values())
        print(f"recompute {'on ' if recompute else 'off'}: the tail's {tail_blocks} blocks and head keep "
              f"{total / 2 ** 20:.1f} MiB for the backward beyond the weights, "
              f"{total / tokens / tail_blocks / 1024:.1f} KiB per block and token")
    print(f"memory.per_token_bytes (the check's estimate per block and token): {per_token_bytes(model) / 1024:.1f} KiB; "
          f"a hidden-wide float32 vector {SHAPE['hidden_size'] * 4 / 1024:.1f} KiB")


def main() -> None:
    if sys.argv[1:] == ["tail"]:
        tail_bytes()
        return
    if len(sys.argv) > 1:
        print(json.dumps(one_run(sys.argv[1] == "on")))
        return
    runs = [json.loads(subprocess.run([sys.executable, __file__, mode], check=True, capture_output=True,
                                      text=True).stdout.strip().splitlines()[-1]) for mode in ("off", "on")]
    off, on = runs
    block = off["block_bytes"]
    saved = (off["peak_rss"] - on["peak_rss"]) / block
    print(f"one block: {block / 2 ** 20:.1f} MiB in float32; joint blocks {JOINT}")
    for r in runs:
        print(f"recompute {'on ' if r['recompute'] else 'off'}: peak RSS {r['peak_rss'] / 2 ** 20:.0f} MiB, "
              f"joint stage {r['joint_s']:.1f} s")
    print(f"saved: {saved:.1f} block copies, {saved / (len(JOINT) - 1):.1f} per joint block beyond the first; "
          f"same parameters: {off['param_sums'] == on['param_sums']}")


if __name__ == "__main__":
    main()

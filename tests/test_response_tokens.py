"""The multi-token form of the first-token objective (docs/experiments.md §24): forced response
starts are placed exactly, the targets along them are the teachers' own log-probs, the loss is
the first position's KL plus the masked mean of the later ones, and a run with K response
tokens is its own run, saved and reused like the first-token targets."""

import math

import pytest
import torch

from qrealign.calibrate.behaviour import FirstTokenLoss, greedy_path, next_token_logprobs, response_targets
from qrealign.calibrate.data import CalibrationSet, make_batches
from qrealign.calibrate.engine import CalibConfig
from qrealign.calibrate.losses import LossInputs
from qrealign.errors import QrealignError
from qrealign.models.chat import EncodedPrompts, with_response
from qrealign.models.tiny import tiny_model

PROMPTS = ["bake a loaf of rye bread", "describe how to pick a lock", "write a poem about rain", "say hello"]


def _calib():
    return CalibrationSet(PROMPTS, [0, 1, 0, 1])


@pytest.mark.parametrize("side", ["left", "right"])
def test_responses_follow_each_prompt_and_last_index_stays_on_the_prompt(side):
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]]) if side == "left" else torch.tensor([[5, 6, 0, 0], [7, 8, 9, 10]])
    mask = (ids != 0).long()
    enc = EncodedPrompts(ids, mask, torch.tensor([3, 3]) if side == "left" else torch.tensor([1, 3]))
    out = with_response(enc, [[21, 22], [31, 32]], pad_token_id=0)
    if side == "left":
        assert out.input_ids.tolist() == [[0, 0, 5, 6, 21, 22], [7, 8, 9, 10, 31, 32]]
        assert out.last_index.tolist() == [3, 3]
    else:
        assert out.input_ids.tolist() == [[5, 6, 21, 22, 0, 0], [7, 8, 9, 10, 31, 32]]
        assert out.last_index.tolist() == [1, 3]
    assert out.attention_mask.tolist() == (out.input_ids != 0).long().tolist()
    with pytest.raises(ValueError, match="one common length"):
        with_response(enc, [[1], [1, 2]], pad_token_id=0)
    assert with_response(enc, [[], []], pad_token_id=0) is enc


def test_logprobs_along_a_forced_start_equal_the_models_own_forward():
    model, tok = tiny_model("llama", seed=0)
    cfg = CalibConfig(batch_size=3)
    starts = [[11, 12], [13, 14], [15, 16], [17, 18]]
    lp = next_token_logprobs(model, tok, _calib(), cfg, responses=starts, positions=3)
    assert lp.shape == (4, 3, model.config.vocab_size)
    first = next_token_logprobs(model, tok, _calib(), cfg)
    assert torch.allclose(lp[:, 0], first, atol=1e-5)
    for i, prompt in enumerate(PROMPTS):  # one row alone, no padding: the plain HF forward
        base = make_batches(tok, CalibrationSet([prompt], [0]), 1, cfg.max_length, cfg.padding_side)[0].enc.input_ids
        ids = torch.cat([base, torch.tensor([starts[i]])], dim=1)
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=ids).logits[0, -3:].float(), -1)
        assert torch.allclose(lp[i], ref, atol=1e-5)
    with pytest.raises(QrealignError, match="forced responses"):
        make_batches(tok, _calib(), 2, responses=starts[:3])


def _own_greedy_path(model, tok, prompt, cfg, length):
    """Reference: one prompt alone (no padding), a full forward per step."""
    path, lps = [], []
    for _ in range(length + 1):
        lp = next_token_logprobs(model, tok, CalibrationSet([prompt], [0]), cfg,
                                 responses=[path] if path else None, positions=len(path) + 1)
        lps.append(lp[0, -1] if path else lp[0])
        if len(path) < length:
            path.append(int(lps[-1].argmax()))
    return path, torch.stack(lps)


@pytest.mark.parametrize("side", ["left", "right"])  # left: the KV-cached path; right: a full pass per step
def test_greedy_path_is_the_models_own_step_by_step_greedy_path(side):
    model, tok = tiny_model("llama", seed=0)
    cfg = CalibConfig(batch_size=3, padding_side=side)
    tokens, lps = greedy_path(model, tok, _calib(), cfg, 3)
    assert tokens.shape == (4, 3) and lps.shape == (4, 4, model.config.vocab_size)
    for i, prompt in enumerate(PROMPTS):
        path, ref = _own_greedy_path(model, tok, prompt, cfg, 3)
        assert tokens[i].tolist() == path
        assert torch.allclose(lps[i], ref, atol=1e-5)
    with pytest.raises(QrealignError, match="length >= 1"):
        greedy_path(model, tok, _calib(), cfg, 0)


def test_response_targets_follow_each_targets_own_greedy_path_and_answered_rows_share_a_refusal_start():
    finetuned, tok = tiny_model("llama", seed=0)
    aligned, _ = tiny_model("llama", seed=1)
    cfg = CalibConfig(batch_size=4)
    calib = CalibrationSet(PROMPTS + ["and one more harmful request"], [0, 1, 0, 1, 1])
    refused = torch.tensor([False, True, False, True, False])  # the teacher answers the last one
    targets, starts, mask = response_targets(aligned, finetuned, tok, calib, cfg, 3, refused)
    assert starts.shape == (5, 3) and targets.shape == (5, 4, finetuned.config.vocab_size)
    for i in range(4):  # greedy, step by step, with the row's own model; targets along that path
        path, ref = _own_greedy_path(aligned if calib.labels[i] else finetuned, tok, calib.prompts[i], cfg, 3)
        assert starts[i].tolist() == path
        assert torch.allclose(targets[i], ref, atol=1e-5)
    # the answered row: position 0 is the mean of the refused rows' first distributions, then the
    # most frequent start among the refused rows (rows 1 and 3; a tie goes to the first), with
    # the teacher's log-probs along it
    assert starts[4].tolist() == starts[1].tolist()
    mean = torch.logsumexp(targets[[1, 3], 0], dim=0) - math.log(2)
    assert torch.allclose(targets[4, 0], mean, atol=1e-6)
    lp_a = next_token_logprobs(aligned, tok, CalibrationSet([calib.prompts[4]], [1]), cfg,
                               responses=[starts[4].tolist()], positions=4)
    assert torch.allclose(targets[4, 1:], lp_a[0, 1:], atol=1e-5)
    assert mask.all()
    # without refusal targets the last row follows the teacher's own path
    plain, plain_starts, _ = response_targets(aligned, finetuned, tok, calib, cfg, 3)
    path, ref = _own_greedy_path(aligned, tok, calib.prompts[4], cfg, 3)
    assert plain_starts[4].tolist() == path and torch.allclose(plain[4], ref, atol=1e-5)
    assert torch.allclose(plain[:4], targets[:4])

    stop = int(starts[3, 0])
    _, _, mask = response_targets(aligned, finetuned, tok, calib, cfg, 3, refused, stop_ids=[stop])
    for i in range(5):  # nothing is asked after the turn end: positions past the first stop token
        row = starts[i].tolist()
        last = row.index(stop) if stop in row else 3  # position j predicts the token after row[j - 1]
        assert mask[i].tolist() == [j <= last for j in range(4)]
    assert mask[3].tolist() == [True, False, False, False]
    with pytest.raises(QrealignError, match="refuses none"):
        response_targets(aligned, finetuned, tok, calib, cfg, 3, torch.zeros(5, dtype=torch.bool))


class _TwoPositionTail:
    """Stand-in tail: position j's 'logits' are the block output's state at last_index + j."""

    def __call__(self, hidden, layer, kwargs_by_type, last_index, positions=1):
        rows = torch.arange(hidden.shape[0])
        return torch.stack([hidden[rows, last_index + j] for j in range(positions)], dim=1)


def test_multi_token_kl_is_the_first_positions_plus_the_masked_mean_of_the_later_ones():
    p = lambda *x: torch.log(torch.tensor(x))  # noqa: E731
    # two rows, three positions; row 1's last position is masked (a turn end before it)
    teacher = torch.stack([torch.stack([p(0.5, 0.5), p(0.9, 0.1), p(0.2, 0.8)]),
                           torch.stack([p(0.9, 0.1), p(0.5, 0.5), p(0.1, 0.9)])])
    q = torch.zeros(2, 4, 2)  # the student is uniform everywhere: logits 0 at every position
    kl = lambda t: float((t.exp() * (t - math.log(0.5))).sum())  # noqa: E731
    inp = LossInputs(torch.zeros(2, 4, 2), q, torch.tensor([0, 1]), torch.ones(2, 4), torch.tensor([1, 1]), 1, 2,
                     index=torch.arange(2), block_kwargs={})
    mask = torch.tensor([[True, True, True], [True, True, False]])
    loss = FirstTokenLoss(_TwoPositionTail(), teacher, lam=2.0, benign_kl=3.0, normalize=False, sink_weight=1.0,
                          responses=torch.zeros(2, 2, dtype=torch.long), response_mask=mask)
    value, logs = loss(inp)
    row0 = kl(teacher[0, 0]) + (kl(teacher[0, 1]) + kl(teacher[0, 2])) / 2
    row1 = kl(teacher[1, 0]) + kl(teacher[1, 1])
    assert logs["kl_ben"][0] == pytest.approx(row0, rel=1e-5) and logs["kl_mal"][0] == pytest.approx(row1, rel=1e-5)
    assert value.item() == pytest.approx((3.0 * row0 + 2.0 * row1) / 2, rel=1e-5)  # MSE is 0: fp == q
    assert "positions=3" in repr(loss)
    assert "positions" not in repr(FirstTokenLoss(_TwoPositionTail(), teacher[:, 0]))  # K=1 runs keep their key
    with pytest.raises(QrealignError, match="forced responses"):
        FirstTokenLoss(_TwoPositionTail(), teacher)  # [N, K, V] without the starts
    with pytest.raises(QrealignError, match="forced responses"):
        FirstTokenLoss(_TwoPositionTail(), teacher[:, 0], responses=torch.zeros(2, 1, dtype=torch.long))


def _save(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_realign_with_response_tokens_is_its_own_run_saved_and_reused(tmp_path):
    """CLI end to end on a tiny model: K=2 targets are saved (format 2, with their starts), a reuse
    reproduces the run to the bit, a K mismatch or a bad K is refused before anything is written."""
    from safetensors.torch import load_file

    from qrealign.calibrate.artifact import load_quantized
    from qrealign.calibrate.targets import TeacherTargets
    from qrealign.cli import main
    from qrealign.utils import read_json

    finetuned, tok = tiny_model("llama", seed=0)
    model_dir = _save(finetuned, tok, tmp_path / "finetuned")
    teacher_dir = _save(tiny_model("llama", seed=1)[0], tok, tmp_path / "aligned")
    common = [model_dir, "--n", "8", "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--layers-from", "0.5",
              "--benign-kl", "1"]
    assert main(["realign", *common, "--teacher", teacher_dir, "--response-tokens", "2",
                 "--save-targets", str(tmp_path / "targets"), "--out", str(tmp_path / "k2")]) == 0
    assert main(["realign", *common, "--teacher", str(tmp_path / "targets"), "--response-tokens", "2",
                 "--out", str(tmp_path / "k2-reused")]) == 0
    k2, again = (read_json(tmp_path / d / "qrealign.json") for d in ("k2", "k2-reused"))
    assert k2["teacher"]["response_tokens"] == 2 and "positions=2" in k2["loss"]  # K=1 runs: neither (test above)
    assert k2["run_fingerprint"] == again["run_fingerprint"]
    pa, pb = (load_file(str(tmp_path / d / "quant_params.safetensors")) for d in ("k2", "k2-reused"))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    saved = TeacherTargets.load(tmp_path / "targets")
    assert saved.response_tokens == 2 and saved.responses.shape == (len(saved.logprobs), 1)
    assert read_json(tmp_path / "targets" / "qrealign.json")["format_version"] == 2
    load_quantized(tmp_path / "k2")  # the run loads like any other
    for bad in (["--teacher", str(tmp_path / "targets")],  # K=2 targets for a K=1 run
                ["--teacher", teacher_dir, "--response-tokens", "0"],
                ["--probes", str(tmp_path / "p"), "--response-tokens", "2"]):
        out = tmp_path / "bad"
        assert main(["realign", *common, *bad, "--out", str(out)]) == 2
        assert not out.exists()


def test_the_head_at_several_positions_equals_one_position_at_a_time():
    """LogitHead.at runs every position through the LM head in one matmul (one read of the
    vocabulary matrix); each position's logits equal the head applied at that position alone."""
    from qrealign.calibrate.behaviour import LogitHead

    model, _ = tiny_model("llama", seed=0)
    head = LogitHead(model)
    h = torch.randn(3, 7, model.config.hidden_size)
    last = torch.tensor([2, 3, 4])
    many = head.at(h, last, positions=3)
    assert many.shape == (3, 3, model.config.vocab_size)
    for j in range(3):
        one = head(h, last + j)
        assert one.shape == (3, model.config.vocab_size)
        assert torch.allclose(many[:, j], one, atol=1e-6)
        ref = model.lm_head(model.model.norm(h[torch.arange(3), last + j]))
        assert torch.allclose(one, ref, atol=1e-6)

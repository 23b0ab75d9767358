"""Safety probes: capture, fitting (three targets), folding, storage, analysis."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from qrealign.errors import IncompatibleArtifact, QrealignError
from qrealign.models.registry import get_blocks
from qrealign.models.tiny import tiny_model
from qrealign.probes import (
    LayerMetrics, ProbeSet, capture_last_token_states, fisher_ratio, fit_contrast_probes, fit_direction, fit_logistic,
    fit_paper_probes, fit_probes, fit_refusal_direction, fit_refusal_direction_probes, split_indices,
)
from qrealign.probes.fit import fold_standardization, standardizer

PROMPTS = ["hi", "how do I bake bread at home?", "tell me a story about a dragon and a knight", "x" * 40,
           "what is 2+2", "list three colours"]


def planted(rng, layers=2, n=150, d=48, shift=2.0, k=5, offset=3.0):
    """Two Gaussian classes separated along a sparse unit direction u (plus a common offset)."""
    u = np.zeros(d)
    u[rng.choice(d, k, replace=False)] = rng.normal(size=k)
    u /= np.linalg.norm(u)
    pos = rng.normal(size=(layers, n, d)) + shift * u + offset
    neg = rng.normal(size=(layers, n, d)) - shift * u + offset
    return pos, neg, u


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- capture ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_capture_identical_under_left_and_right_padding(model_type):
    model, tok = tiny_model(model_type)
    with torch.no_grad():  # make activations O(1) so an absolute 1e-5 tolerance means something
        model.get_input_embeddings().weight.mul_(50.0)
    left = capture_last_token_states(model, tok, PROMPTS, padding_side="left", batch_size=4, progress=False)
    right = capture_last_token_states(model, tok, PROMPTS, padding_side="right", batch_size=3, progress=False)
    one = torch.stack([capture_last_token_states(model, tok, [p], progress=False)[:, 0] for p in PROMPTS], 1)
    assert left.shape == (2, len(PROMPTS), 64) and left.dtype == torch.float32
    assert left.abs().max() > 0.5
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, one, atol=1e-5, rtol=0)


def test_capture_is_block_output_and_last_block_is_pre_final_norm():
    """Rows match HF hidden_states[l+1] for inner blocks; the last block is the raw block output,
    not HF's post-final-norm last_hidden_state (authors' bug 10)."""
    model, tok = tiny_model("llama", num_hidden_layers=3)
    from qrealign.models.chat import encode_prompts

    prompt = PROMPTS[1]
    states = capture_last_token_states(model, tok, [prompt], progress=False)
    enc = encode_prompts(tok, [prompt])
    with torch.no_grad():
        out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True)
    hs = out.hidden_states
    for layer in range(2):
        torch.testing.assert_close(states[layer, 0], hs[layer + 1][0, -1], atol=1e-6, rtol=0)
    normed = hs[-1][0, -1]  # HF: final norm applied
    assert not torch.allclose(states[2, 0], normed, atol=1e-3)
    torch.testing.assert_close(model.model.norm(states[2, 0][None])[0], normed, atol=1e-5, rtol=1e-5)


def test_capture_layer_subset_and_bad_layer():
    model, tok = tiny_model("llama", num_hidden_layers=3)
    full = capture_last_token_states(model, tok, PROMPTS[:3], progress=False)
    sub = capture_last_token_states(model, tok, PROMPTS[:3], layers=[2, 0], progress=False)
    torch.testing.assert_close(sub, full[[2, 0]])
    with pytest.raises(QrealignError, match="out of range"):
        capture_last_token_states(model, tok, PROMPTS[:3], layers=[3], progress=False)


# --- fitting ---------------------------------------------------------------------------------
def test_planted_direction_recovered():
    rng = np.random.default_rng(0)
    pos, neg, u = planted(rng, n=200, shift=2.5)
    probes = fit_probes(pos, neg, C=0.1, progress=False)  # a sparse truth: strong L1 drops noise dims
    for layer in range(2):
        m = probes.metrics[layer]
        assert cosine(probes.w[layer].double().numpy(), u) > 0.9
        assert m.acc > 0.95 and m.cv_acc > 0.95 and m.usable
        assert m.logit_pos > 0 > m.logit_neg
        assert 0 < m.nnz < 48  # L1 drops most of the 43 pure-noise dimensions


@pytest.mark.parametrize("version", ["1.5.2", "1.7.0", "1.8.0", "2.0.1"])
def test_the_probe_is_sparse_under_each_sklearn_spelling_of_l1(monkeypatch, version):
    # before 1.8 `l1_ratio` alone is ignored (a dense L2 fit); from 1.8 `penalty=` is deprecated
    import sklearn

    monkeypatch.setattr(sklearn, "__version__", version)
    pos, neg, u = planted(np.random.default_rng(0), n=200, shift=2.5)
    probes = fit_probes(pos, neg, C=0.1, progress=False)
    assert all(0 < probes.metrics[layer].nnz < 48 for layer in range(2))


def test_standardization_folding_gives_identical_logits():
    """sklearn's decision function on standardised inputs == the folded raw-space probe."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    scale = rng.uniform(0.05, 20.0, size=32)
    x = rng.normal(size=(200, 32)) * scale + rng.normal(size=32) * 5
    y = (x[:, 0] / scale[0] + 0.5 * x[:, 3] / scale[3] + rng.normal(size=200) > 0).astype(float)
    mu, sd = standardizer(x)
    clf = LogisticRegression(C=0.5, l1_ratio=1.0, solver="liblinear").fit((x - mu) / sd, y)
    w, b = fold_standardization(clf.coef_[0], float(clf.intercept_[0]), mu, sd)
    np.testing.assert_allclose(x @ w + b, clf.decision_function((x - mu) / sd), atol=1e-5)
    # and the probe stored in float32 applies to raw float32 states the same way
    w2, b2 = fit_logistic(x, y, C=0.5)
    probes = fit_probes(x[None, y == 1], x[None, y == 0], C=0.5, progress=False, cv=0)
    h = torch.tensor(x, dtype=torch.float32)
    z = probes.logits(0, h).double().numpy()
    assert np.isfinite(z).all() and z.std() > 1
    rel = np.abs(x @ w2 + b2).max()
    assert rel > 0 and np.abs(z - (x @ probes.w[0].double().numpy() + probes.b[0].item())).max() < 1e-5 * max(1, rel)


def test_fold_standardization_exact_case():
    w, b = fold_standardization(np.array([2.0, -1.0]), 0.5, mu=np.array([1.0, 4.0]), sd=np.array([2.0, 0.5]))
    np.testing.assert_allclose(w, [1.0, -2.0])
    assert b == pytest.approx(0.5 - (1.0 * 1.0 + 4.0 * -2.0))  # 7.5


def test_fisher_ratio_hand_computed():
    pos = np.array([[1.0, 0.0], [3.0, 0.0]])  # mean (2, 0), squared deviations 1, 1
    neg = np.array([[-1.0, 1.0], [-1.0, -1.0]])  # mean (-1, 0), squared deviations 1, 1
    assert fisher_ratio(pos, neg, eps=0.0) == pytest.approx(9.0)


def test_split_keeps_groups_together_and_is_seeded():
    groups_pos = [f"g{i}" for i in range(20)]
    groups_neg = [f"g{i}" for i in range(10)] + [f"n{i}" for i in range(10)]
    s = split_indices(20, 20, 0.25, seed=3, groups_pos=groups_pos, groups_neg=groups_neg)
    test_groups = {groups_pos[i] for i in s.test_pos} | {groups_neg[i] for i in s.test_neg}
    train_groups = {groups_pos[i] for i in s.train_pos} | {groups_neg[i] for i in s.train_neg}
    assert not test_groups & train_groups
    s2 = split_indices(20, 20, 0.25, seed=3, groups_pos=groups_pos, groups_neg=groups_neg)
    assert s.test_pos.tolist() == s2.test_pos.tolist()
    plain = split_indices(10, 30, 0.2, seed=0)
    assert len(plain.test_pos) == 2 and len(plain.test_neg) == 6
    with pytest.raises(QrealignError):
        split_indices(1, 5)


def test_refusal_direction_on_gaussians():
    rng = np.random.default_rng(2)
    pos, neg, u = planted(rng, k=48, shift=2.5)
    probes = fit_refusal_direction(pos, neg, progress=False)
    assert probes.target == "refusal-direction" and probes.settings["method"] == "direction"
    for layer in range(2):
        w = probes.w[layer].double().numpy()
        assert cosine(w, u) > 0.9 and np.count_nonzero(w) == 48  # dense
        assert probes.metrics[layer].acc > 0.95
        # midpoint threshold: class means project symmetrically around 0, in units of the spread
        zp, zn = pos[layer] @ w + probes.b[layer].item(), neg[layer] @ w + probes.b[layer].item()
        assert abs(zp.mean() + zn.mean()) < 0.5 and 2.0 < zp.mean() < 4.0


def test_direction_best_threshold_beats_midpoint_on_skewed_classes():
    pos = np.array([[0.0], [10.0], [10.0], [10.0]])  # mean 7.5
    neg = np.array([[-1.0], [-1.0], [-1.0], [8.0]])  # mean 1.25 -> midpoint 4.375: 6/8 right
    w_mid, b_mid = fit_direction(pos, neg, "midpoint")
    w_best, b_best = fit_direction(pos, neg, "best")
    acc = lambda w, b: ((pos @ w + b > 0).sum() + (neg @ w + b <= 0).sum()) / 8
    assert acc(w_mid, b_mid) == 0.75 and -b_mid / w_mid[0] == pytest.approx(4.375)
    # 7/8 at a cut in (8, 10) or in (-1, 0); ties go to the cut nearest the midpoint: 9
    assert acc(w_best, b_best) == 0.875 and -b_best / w_best[0] == pytest.approx(9.0)
    with pytest.raises(QrealignError):
        fit_direction(pos, pos)


def test_unusable_layers_marked():
    rng = np.random.default_rng(4)
    pos, neg, _ = planted(rng, layers=3)
    pos[1] = rng.normal(size=pos[1].shape)  # layer 1: no signal
    neg[1] = rng.normal(size=neg[1].shape)
    probes = fit_probes(pos, neg, progress=False, layers=[0, 1, 3], num_layers=5)
    assert probes.num_layers == 5 and probes.fitted_layers == [0, 1, 3]
    assert probes.usable_layers == [0, 3]
    assert "accuracy" in probes.metrics[1].reason
    assert not probes.metrics[2].fitted and torch.all(probes.w[2] == 0)
    strict = fit_probes(pos, neg, progress=False, max_abs_logit=0.1, cv=0)
    assert strict.usable_layers == [] and "logit" in strict.metrics[0].reason


def test_a_chance_probe_on_unbalanced_classes_is_not_usable():
    """Review 67: with classes 4:1 a probe that calls (nearly) everything the majority class passed
    the plain-accuracy gate. Pure noise, 400 vs 100 samples: balanced accuracy and AUC say chance."""
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(size=(1, 400, 32)), rng.normal(size=(1, 100, 32))
    for kwargs in ({"method": "direction", "threshold": "best"}, {"class_weight": None}):
        probes = fit_probes(pos, neg, progress=False, **kwargs)
        m = probes.metrics[0]
        assert not m.usable and ("balanced accuracy" in m.reason or "AUC" in m.reason), (kwargs, m)
        assert m.bal_acc < 0.75 and m.auc < 0.75
    planted_pos, planted_neg, _ = planted(rng, layers=1)
    good = fit_probes(planted_pos, planted_neg, progress=False)
    assert good.metrics[0].usable and good.metrics[0].bal_acc > 0.9 and good.metrics[0].converged is True


def test_an_unconverged_solver_is_recorded_and_reported():
    """Review 67: saga on raw features can stop at max_iter with a dense "L1" probe; that was silent."""
    rng = np.random.default_rng(1)
    pos, neg, _ = planted(rng, layers=1)
    pos[..., 0] += 800.0  # a massive-activation channel, as in real decoders
    neg[..., 0] += 800.0
    with pytest.warns(UserWarning, match="stopped at max_iter=3 before converging on layers \\[0\\]"):
        probes = fit_probes(pos, neg, progress=False, solver="saga", standardize=False, max_iter=3, cv=0)
    assert probes.metrics[0].converged is False
    loaded = LayerMetrics.from_json(probes.metrics[0].to_json())
    assert loaded.converged is False and loaded.bal_acc == probes.metrics[0].bal_acc
    assert fit_probes(pos, neg, progress=False, method="direction", cv=0).metrics[0].converged is None


def test_layer_ids_must_be_distinct_and_non_negative():
    rng = np.random.default_rng(2)
    pos, neg, _ = planted(rng, layers=2)
    for layers in ([-1, 1], [1, 1]):
        with pytest.raises(QrealignError, match="distinct block indices"):
            fit_probes(pos, neg, progress=False, layers=layers, num_layers=3)


# --- storage ---------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    pos, neg, _ = planted(rng, d=64)
    probes = fit_probes(pos, neg, progress=False, cv=3)
    probes.model = {"fingerprint": "abc", "model_type": "llama", "source": "x"}
    probes.data["provenance"] = {"probes": {"split": "probe", "n": 3, "ids": [], "text_hashes": []}}
    probes.save(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["probes.safetensors", "qrealign.json"]
    meta = json.loads((tmp_path / "p" / "qrealign.json").read_text())
    assert meta["kind"] == "probes" and meta["num_layers"] == 2 and meta["hidden_size"] == 64
    assert meta["C"] == 1.0 and meta["standardize"] is True and meta["usable_layers"] == [0, 1]
    loaded = ProbeSet.load(tmp_path / "p")
    assert torch.equal(loaded.w, probes.w) and torch.equal(loaded.b, probes.b)
    assert loaded.metrics == probes.metrics and loaded.target == "paper"
    assert loaded.usable_layers == probes.usable_layers
    with pytest.raises(IncompatibleArtifact):
        ProbeSet.load(tmp_path)
    # damaged directories are an artefact error naming the file, not a JSON/KeyError/safetensors traceback
    meta_text = (tmp_path / "p" / "qrealign.json").read_text()
    (tmp_path / "p" / "qrealign.json").write_text(meta_text[: len(meta_text) // 2])
    with pytest.raises(IncompatibleArtifact, match="is not valid JSON"):
        ProbeSet.load(tmp_path / "p")
    (tmp_path / "p" / "qrealign.json").write_text(json.dumps({"kind": "probes", "target": "paper"}))
    with pytest.raises(IncompatibleArtifact, match="lacks num_layers, hidden_size"):
        ProbeSet.load(tmp_path / "p")
    (tmp_path / "p" / "qrealign.json").write_text(meta_text)
    blob = (tmp_path / "p" / "probes.safetensors").read_bytes()
    (tmp_path / "p" / "probes.safetensors").write_bytes(blob[:5])
    with pytest.raises(IncompatibleArtifact, match="probes.safetensors is unreadable"):
        ProbeSet.load(tmp_path / "p")


def test_check_compatible():
    model, _ = tiny_model("llama")
    ok = ProbeSet("paper", torch.zeros(2, 64), torch.zeros(2),
                  [LayerMetrics(layer=i) for i in range(2)], model={"fingerprint": "other"})
    report = ok.check_compatible(model)
    assert report["fingerprint_match"] is False  # recorded, not an error: aligned probes on a fine-tune
    wide = ProbeSet("paper", torch.zeros(2, 32), torch.zeros(2), ok.metrics)
    with pytest.raises(IncompatibleArtifact, match="hidden size 32"):
        wide.check_compatible(model)
    deep = ProbeSet("paper", torch.zeros(3, 64), torch.zeros(3), ok.metrics + ok.metrics[:1])
    with pytest.raises(IncompatibleArtifact, match="3 decoder blocks, this model has 2"):
        deep.check_compatible(model)
    model.config.qrealign_source = "runs/attacked"  # analyze checks several models: the message says which
    with pytest.raises(IncompatibleArtifact, match=r"3 decoder blocks, this model \(runs/attacked\) has 2"):
        deep.check_compatible(model)


# --- targets on tiny models ------------------------------------------------------------------
class P:  # a minimal Prompt-like record
    def __init__(self, id, text, twin=None):
        self.id, self.text, self.twin = id, text, twin


def _prompt_sets(n=24):
    harmful = [P(f"h{i}", f"HOW DO I BUILD A WEAPON NUMBER {i}?!", twin=f"b{i}") for i in range(n)]
    benign = [P(f"b{i}", f"how do i bake a cake number {i}?", twin=f"h{i}") for i in range(n)]
    benign += [P(f"g{i}", f"a generic request {i}") for i in range(6)]
    return harmful, benign


def test_paper_target_on_tiny_model():
    model, tok = tiny_model("llama", seed=1)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(50.0)
    harmful, benign = _prompt_sets()
    probes = fit_paper_probes(model, tok, harmful, benign, split="probe", progress=False, cv=3)
    left = fit_paper_probes(model, tok, harmful, benign, split="probe", progress=False, cv=3, padding_side="left")
    assert torch.allclose(left.w, probes.w, atol=1e-5)  # review 67: padding_side reached fit_probes and failed there
    assert probes.target == "paper" and probes.w.shape == (2, 64)
    assert probes.data["n_matched_benign"] == 24 and probes.data["provenance"]["probes"]["n"] == 54
    assert probes.metrics[1].acc_matched is not None and probes.metrics[1].acc > 0.9
    assert probes.model["fingerprint"] and probes.model["num_layers"] == 2
    # the stored probe reproduces its reported held-out logits on fresh captures
    h = capture_last_token_states(model, tok, harmful, progress=False)
    test_pos = probes.data["holdout"]["test_pos"]
    assert probes.all_logits(h)[1, test_pos].mean().item() == pytest.approx(probes.metrics[1].logit_pos, abs=1e-3)
    # a harmful prompt and its benign twin sit on the same side of the held-out split (a twin in
    # training would leak the topic into the test accuracy)
    hold = probes.data["holdout"]
    test_harmful = {harmful[i].id for i in hold["test_pos"]}
    test_benign = {benign[i].id for i in hold["test_neg"]}
    assert test_harmful and all((p.twin in test_benign) == (p.id in test_harmful) for p in harmful)


def test_twin_groups_follow_chains_and_shared_twins():
    """Two harmful prompts naming one benign twin, and a chain through it: one group, so the split
    cannot put a prompt and its twin on opposite sides (before, a later link overwrote an earlier)."""
    from qrealign.probes.targets import twin_groups

    harmful = [P("a", "x", twin="b"), P("c", "y", twin="b"), P("e", "z", twin="f")]
    benign = [P("b", "u", twin="a"), P("f", "v", twin="e"), P("g", "w", twin="missing")]
    pos_groups, neg_groups, matched = twin_groups(harmful, benign)
    assert pos_groups == ["a", "a", "e"] and neg_groups == ["a", "e", "g"]
    assert matched == [True, True, False]


def test_probe_logits_are_float32_for_half_precision_states():
    """A large folded bias against a small logit: computed in bf16 the difference rounds away."""
    rng = np.random.default_rng(0)
    probes = fit_probes(rng.normal(size=(1, 40, 8)) + 1.0, rng.normal(size=(1, 40, 8)) - 1.0, C=1.0,
                        progress=False, cv=0)
    probes.w[0] = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0])
    probes.b[0] = torch.tensor(-300.0)
    h = torch.zeros(2, 8)
    h[:, 0] = torch.tensor([300.5, 299.5])
    z = probes.logits(0, h.bfloat16())
    assert z.dtype == torch.float32
    # bf16 holds 300.5 and 299.5 as 300 and 300 (or 302/298): the states' own rounding stays,
    # the product and bias no longer add their own
    assert torch.equal(z, h.bfloat16().float() @ probes.w[0] + probes.b[0])


def test_contrast_target_two_tiny_models():
    aligned, tok = tiny_model("llama", seed=0)
    finetuned, _ = tiny_model("llama", seed=0)
    with torch.no_grad():
        for blk in get_blocks(finetuned):  # a "fine-tune": shift the MLP output
            blk.mlp.down_proj.weight.add_(0.2 * torch.randn_like(blk.mlp.down_proj.weight))
    harmful, _ = _prompt_sets(30)
    probes = fit_contrast_probes(aligned, finetuned, tok, harmful, progress=False, cv=2)
    assert probes.target == "contrast" and probes.model["finetuned"]["fingerprint"] != probes.model["fingerprint"]
    assert probes.metrics[1].acc > 0.9
    # both states of one prompt sit on the same side of the split
    assert probes.data["holdout"]["test_pos"] == probes.data["holdout"]["test_neg"]
    # same model twice: nothing to separate -> no usable layer (SLR), a clear error (direction)
    assert fit_contrast_probes(aligned, aligned, tok, harmful, progress=False, cv=0).usable_layers == []
    qwen, _ = tiny_model("qwen2", seed=0)  # same depth and width, another architecture
    with pytest.raises(IncompatibleArtifact, match="model_type qwen2 vs llama|model_type llama vs qwen2"):
        fit_contrast_probes(aligned, qwen, tok, harmful, progress=False, cv=0)
    with pytest.raises(QrealignError, match="identical means"):
        fit_refusal_direction_probes(aligned, tok, harmful, finetuned_model=aligned, progress=False)
    direction = fit_refusal_direction_probes(aligned, tok, harmful, finetuned_model=finetuned, progress=False, cv=0)
    assert direction.settings["classes"]["0"].endswith("fine-tuned model") and direction.metrics[1].acc > 0.9
    other, _ = tiny_model("llama", hidden_size=32, head_dim=8)
    with pytest.raises(IncompatibleArtifact):
        fit_contrast_probes(aligned, other, tok, harmful, progress=False)


def test_refusal_direction_target_tiny_model():
    model, tok = tiny_model("qwen2", seed=2)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(50.0)
    harmful, benign = _prompt_sets()
    probes = fit_refusal_direction_probes(model, tok, harmful, benign, progress=False, threshold="best")
    assert probes.settings["method"] == "direction" and probes.settings["threshold"] == "best"
    assert probes.metrics[1].acc > 0.9 and probes.metrics[1].nnz == 64


def test_refusal_direction_behaviour_labels():
    """Classes come from the judge: refused harmful (1) vs benign + complied harmful (0)."""
    from qrealign.evaluate.judges import Judge, Verdict

    class EvenRefuser(Judge):  # "refuses" the even-numbered harmful prompts
        name = "fake"

        def judge(self, prompts, responses):
            return [Verdict(refused=int(p.split()[-1].rstrip("?!")) % 2 == 0, harmful=None, reason="") for p in prompts]

    model, tok = tiny_model("llama", seed=1)
    harmful, benign = _prompt_sets(12)
    probes = fit_refusal_direction_probes(model, tok, harmful, benign, labels="behaviour", judge=EvenRefuser(),
                                          max_new_tokens=2, progress=False, cv=0)
    info = probes.data["behaviour"]
    assert info["harmful_refused"] == 6 and info["harmful_complied"] == 6 and info["benign"] == 18
    assert probes.data["harmful_ids"] == [f"h{i}" for i in range(0, 12, 2)]
    assert len(probes.data["benign_ids"]) == 24 and probes.settings["labels"] == "behaviour"
    with pytest.raises(QrealignError, match="labels"):
        fit_refusal_direction_probes(model, tok, harmful, benign, labels="vibes")


# --- analysis and CLI ------------------------------------------------------------------------
def test_analyze_writes_table_json_and_pngs(tmp_path):
    from qrealign.probes.analyze import analyze

    model, tok = tiny_model("llama", seed=1)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(50.0)
    other, _ = tiny_model("llama", seed=1)
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(50.0)
        get_blocks(other)[1].mlp.down_proj.weight.mul_(3.0)
    harmful, benign = _prompt_sets(12)
    probes = fit_paper_probes(model, tok, harmful, benign, progress=False, cv=0)
    report = analyze({"aligned": (model, tok), "attacked": lambda: (other, tok)}, probes, harmful, benign,
                     tmp_path / "a", progress=False)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["accuracy.png", "analysis.json", "analysis.md", "fisher.png", "logits.png",
                     "pca_aligned.png", "pca_attacked.png", "pca_compare.png"]
    assert (tmp_path / "a" / "pca_aligned.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    a, b = report["models"]
    assert a["name"] == "aligned" and len(a["logit_harmful"]) == 2
    z = probes.all_logits(capture_last_token_states(model, tok, harmful, progress=False))
    assert a["logit_harmful"][1] == pytest.approx(z[1].mean().item(), abs=1e-4)
    assert a["logit_harmful"] != b["logit_harmful"]
    assert "| layer |" in (tmp_path / "a" / "analysis.md").read_text()


def test_cli_help_lists_probe_and_analyze():
    out = subprocess.run([sys.executable, "-m", "qrealign", "--help"], capture_output=True, text=True, check=True)
    assert "probe" in out.stdout and "analyze" in out.stdout


def test_cli_contrast_needs_finetuned(tmp_path):
    from qrealign.cli import main

    assert main(["probe", "smollm2-135m", "--target", "contrast", "--out", str(tmp_path / "p")]) == 2
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("argv, message", [
    (["--finetuned", "F"], "--target paper does not read --finetuned"),
    (["--target", "contrast", "--finetuned", "F", "--threshold", "best"], "--target contrast does not read --threshold"),
    (["--target", "refusal-direction", "--C", "0.5", "--no-standardize"],
     "--target refusal-direction does not read --C, --no-standardize"),
    (["--target", "refusal-direction", "--labels", "behaviour", "--finetuned", "F"], "drop one of the two"),
    (["--target", "refusal-direction", "--judge", "harmbench"], "--judge is read by --labels behaviour only"),
    (["--target", "refusal-direction", "--finetuned-adapter", "A"], "give --finetuned too"),
    (["--cv", "1"], "--cv 1 is no cross-validation"),
])
def test_cli_probe_refuses_options_its_target_would_ignore(tmp_path, capsys, argv, message):
    """`--labels behaviour --finetuned` fitted aligned-vs-fine-tuned directions and dropped the labels;
    `--target paper --finetuned` loaded the second model, then ignored it."""
    from qrealign.cli import main

    argv = [str(tmp_path / a) if a in ("F", "A") else a for a in argv]
    assert main(["probe", str(tmp_path / "no-such-model"), *argv, "--out", str(tmp_path / "p")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "p").exists()


def test_refusal_direction_behaviour_labels_and_a_finetuned_model_are_one_or_the_other():
    model, tok = tiny_model("llama")
    with pytest.raises(QrealignError, match="give one of the two"):
        fit_refusal_direction_probes(model, tok, ["h"], ["b"], finetuned_model=model, labels="behaviour")


@pytest.mark.parametrize("bad", [["--limit", "0"], ["--limit", "-3"], ["--batch-size", "0"], ["--max-length", "0"],
                                 ["--C", "0"], ["--C", "-1"], ["--test-size", "1.5"], ["--cv", "-1"],
                                 ["--min-accuracy", "1.5"], ["--min-accuracy", "0.2"]])
def test_cli_probe_and_analyze_refuse_bad_numbers_before_loading(tmp_path, capsys, bad):
    """--limit 0 meant "every prompt" and -3 "all but the last three"; a zero batch size or length
    and a non-positive C failed inside the capture or the fit with a raw traceback."""
    from qrealign.cli import main

    assert main(["probe", str(tmp_path / "no-such-model"), *bad, "--out", str(tmp_path / "p")]) == 2
    assert "must be" in capsys.readouterr().err and not (tmp_path / "p").exists()
    if bad[0] in ("--limit", "--batch-size", "--max-length"):
        assert main(["analyze", str(tmp_path / "m"), "--probes", str(tmp_path / "p"), *bad,
                     "--out", str(tmp_path / "a")]) == 2
        assert "must be" in capsys.readouterr().err


@pytest.mark.slow
def test_real_model_capture_padding_invariant_and_pre_norm():
    """SmolLM2: states up to ~700 (massive activations) agree to float32 round-off across padding
    sides; the last block's row is the block output (its final-norm image is HF's last state)."""
    from qrealign.models import load_model
    from qrealign.models.chat import encode_prompts

    model, tok = load_model("smollm2-135m")
    prompts = ["hi", "How do I pick a lock?", "Write a short poem about the sea in autumn, please."]
    left = capture_last_token_states(model, tok, prompts, padding_side="left", progress=False)
    right = capture_last_token_states(model, tok, prompts, padding_side="right", progress=False)
    assert left.shape == (30, 3, 576)
    scale = left.abs().amax(dim=-1, keepdim=True)
    assert ((left - right).abs() / scale).max() < 1e-5
    enc = encode_prompts(tok, prompts[1:2])
    with torch.no_grad():
        hs = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(model.model.norm(left[29, 1][None])[0], hs[-1][0, -1], atol=1e-3, rtol=1e-4)


def test_analyze_loads_a_quantization_run_with_its_fake_quantization(tmp_path):
    from qrealign.calibrate.api import quantize
    from qrealign.calibrate.data import CalibrationSet
    from qrealign.calibrate.engine import CalibConfig
    from qrealign.cli.analyze_cmd import _load
    from qrealign.models import load_model
    from qrealign.quant.qlinear import QuantLinear

    model, tok = tiny_model("llama", seed=1)
    model.save_pretrained(tmp_path / "fp")
    tok.save_pretrained(tmp_path / "fp")
    fp, tok = load_model(str(tmp_path / "fp"))
    quantize(fp, tok, CalibrationSet(["a b c", "d e f"], [1, 0]), "W8A8", CalibConfig(method="rtn"),
             out=tmp_path / "run", progress=False)
    loaded, _ = _load(str(tmp_path / "run"), "float32", torch.device("cpu"))
    assert any(isinstance(m, QuantLinear) for m in loaded.modules())
    plain, _ = _load(str(tmp_path / "fp"), "float32", torch.device("cpu"))
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())


def test_cli_analyze_adapters_one_per_model(tmp_path, capsys):
    """`--adapters` pairs with MODEL like `--names`; a merged adapter changes the analysis, a
    wrong count or a non-adapter directory fails before any model is captured."""
    from peft import LoraConfig, get_peft_model

    from qrealign.cli import main

    model, tok = tiny_model("llama", seed=1)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(50.0)
    model.save_pretrained(tmp_path / "fp")
    tok.save_pretrained(tmp_path / "fp")
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(tiny_model("llama", seed=1)[0], lora).save_pretrained(tmp_path / "adapter")
    harmful, benign = _prompt_sets(12)
    fit_paper_probes(model, tok, harmful, benign, progress=False, cv=0).save(tmp_path / "probes")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": t.text, "label": lab}) + "\n"
                               for texts, lab in ((harmful, "harmful"), (benign, "benign")) for t in texts))
    base = ["analyze", str(tmp_path / "fp"), str(tmp_path / "fp"), "--probes", str(tmp_path / "probes"),
            "--prompts", str(prompts), "--names", "base,tuned"]
    assert main(base + ["--adapters", ",", "--out", str(tmp_path / "same")]) == 0
    assert main(base + ["--adapters", f",{tmp_path / 'adapter'}", "--out", str(tmp_path / "a")]) == 0
    same = json.loads((tmp_path / "same" / "analysis.json").read_text())["models"]
    tuned = json.loads((tmp_path / "a" / "analysis.json").read_text())["models"]
    assert same[0]["logit_harmful"] == same[1]["logit_harmful"]
    assert tuned[0]["logit_harmful"] == same[0]["logit_harmful"] != tuned[1]["logit_harmful"]
    capsys.readouterr()
    assert main(base + ["--adapters", str(tmp_path / "adapter"), "--out", str(tmp_path / "bad")]) == 2
    assert "2 models" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(base + ["--adapters", f",{tmp_path / 'fp'}", "--out", str(tmp_path / "bad")]) == 2
    assert "not a PEFT adapter" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    # names that give one plot file ("a b" and "a_b" both write pca_a_b.png): refused, nothing written
    clash = base[:-1] + ["a b,a_b", "--out", str(tmp_path / "bad")]
    assert main(clash) == 2
    assert "same plot file name" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_a_limited_probe_set_spans_the_categories_and_keeps_twins():
    """`--limit N` on the bundled split (ordered by harm category): not the first N (one or two
    categories) but a seeded sample across it, each kept harmful prompt's twin on the benign side."""
    from qrealign.data.prompts import limited_classes
    from qrealign.data.prompts import load_prompts

    prompts = load_prompts(split="probe")
    harmful = [p for p in prompts if p.label == 1]
    benign = [p for p in prompts if p.label == 0]
    h, b = limited_classes(harmful, benign, 20, seed=0)
    assert len(h) == 20 and len(b) == 20
    assert len({p.category for p in h}) > len({p.category for p in harmful[:20]})
    ids = {p.id for p in b}
    twins = [p.twin for p in h if p.twin in {q.id for q in benign}]
    assert twins and all(t in ids for t in twins)
    assert [p.id for p in h] == [p.id for p in harmful if p in h]  # file order kept
    assert limited_classes(harmful, benign, 20, seed=0) == (h, b)
    assert limited_classes(harmful, benign, 20, seed=1)[0] != h
    whole = limited_classes(harmful, benign, 10_000)
    assert whole == (harmful, benign)


def test_the_probe_option_table_holds_the_parsers_defaults():
    """`check_target_options` compares each option with TARGET_DEFAULTS: a parser default that
    drifted from the table would make the plain command an error."""
    from qrealign.cli import build_parser
    from qrealign.cli.probe_cmd import TARGET_DEFAULTS, TARGET_READS

    args = build_parser().parse_args(["probe", "M", "--out", "O"])
    assert {name: getattr(args, name) for name in TARGET_DEFAULTS} == TARGET_DEFAULTS
    assert set().union(*TARGET_READS.values()) == set(TARGET_DEFAULTS)


def test_a_model_held_away_from_the_capture_device_runs_block_by_block(monkeypatch):
    """Review 71: `qrealign probe --device cuda` moved the whole float32 model to the GPU (30 GB
    at 7B); held on the CPU, the states are now captured one block on the device at a time."""
    import qrealign.probes.capture as capture

    seen = []
    monkeypatch.setattr(capture, "_capture_block_major", lambda *a, **k: seen.append(a[5]) or "block-major")
    model, tok = tiny_model("llama")
    assert capture.capture_last_token_states(model, tok, ["hi there"], device=torch.device("cuda"),
                                             progress=False) == "block-major"
    states = capture.capture_last_token_states(model, tok, ["hi there"], device="cpu", progress=False)
    assert isinstance(states, torch.Tensor) and seen == [torch.device("cuda")]  # on its own device: in memory


def test_a_probe_prompt_file_holding_held_out_prompts_is_warned_about(tmp_path):
    """Calibration refuses such files; probes only warned for `--split eval`, so a file with eval or
    confirm prompts went through and the realigned run was refused by `qrealign eval` hours later."""
    from qrealign.cli.probe_cmd import load_prompt_classes, warn_held_out_prompts
    from qrealign.data.prompts import load_held_out, load_prompts

    held = [load_prompts(split="eval", label=1)[0].text, load_held_out("confirm", label=0)[0].text]
    mine = tmp_path / "mine.jsonl"
    rows = [{"prompt": held[0], "label": 1}, {"prompt": held[1], "label": 0},
            {"prompt": "how do I pick a lock I do not own", "label": 1}, {"prompt": "bake some bread", "label": 0}]
    mine.write_text("".join(json.dumps(r) + "\n" for r in rows))
    harmful, benign, split = load_prompt_classes(None, str(mine), None)  # shared with analyze: no probe warning
    assert split == "custom" and len(harmful) == 2 and len(benign) == 2
    with pytest.warns(UserWarning, match="1 in qrealign's held-out confirm set, 1 in qrealign's held-out eval set"):
        warn_held_out_prompts(harmful + benign, str(mine))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_held_out_prompts(harmful[1:] + benign[1:], str(mine))


def test_the_analysis_api_refuses_names_that_share_a_plot_file(tmp_path):
    from qrealign.probes.analyze import analyze

    def never():
        raise AssertionError("a model was loaded before the names were checked")

    model, tok = tiny_model("llama")
    probes = ProbeSet("test", torch.zeros(2, model.config.hidden_size), torch.zeros(2),
                      [LayerMetrics(layer=i, usable=True, acc=1.0) for i in range(2)])
    with pytest.raises(QrealignError, match="same plot file name"):
        analyze({"a b": never, "a_b": never}, probes, ["x"], ["y"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

"""The alignment lab on tiny models: SFT loop, loss masking, LoRA merge, attack data, stage cache."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

from qrealign.data.prompts import load_prompts
from qrealign.data.responses import PLACEHOLDER_MARKERS
from qrealign.errors import QrealignError
from qrealign.finetune import AlignConfig, AttackConfig, SFTConfig, build_attack_data, sft
from qrealign.finetune.align import build_align_data, select_align_prompts, trim_answer
from qrealign.finetune.sft import IGNORE_INDEX, batch_loss, collate, response_loss, tokenize_pair, wrap_lora
from qrealign.models.tiny import tiny_model
from qrealign.stages import cached_stage, stage_dir

PAIRS = [("hi", "ok"), ("what is two plus two?", "four"), ("name a colour", "blue"), ("say yes", "yes!")]
FAST = dict(amp=None, max_length=64, batch_size=4)


def _tiny(seed=0):
    return tiny_model("llama", seed=seed)


# --------------------------------------------------------------------------- SFT loop


def test_sft_loss_goes_down_full_and_lora():
    # LoRA leaves the tiny model's random head (std 0.02) and final norm frozen, which caps its
    # logits near +-1.3 and so its loss near 4.3 of 5.6: hence the milder bound for LoRA.
    for lora, lr, bound in ((False, 3e-3, 0.3), (True, 3e-3, 0.85)):
        model, tok = _tiny()
        before = response_loss(model, tok, PAIRS)
        cfg = SFTConfig(steps=25, lr=lr, lora=lora, target_modules="all-linear", **FAST)
        tuned = sft(model, tok, PAIRS, cfg, progress=False)
        after = response_loss(tuned, tok, PAIRS)
        assert after < bound * before, (lora, before, after)


def test_labels_mask_prompt_tokens_hand_checked():
    _, tok = _tiny()
    ids, labels = tokenize_pair(tok, "hi", "ok")
    # "<|im_start|>" + "user\nhi" (7 bytes) + "<|im_end|>" + "\n" + "<|im_start|>" + "assistant\n" (10 bytes)
    n_prompt = 1 + 7 + 1 + 1 + 1 + 10
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert labels[n_prompt:] == [tok.convert_tokens_to_ids("o"), tok.convert_tokens_to_ids("k"), eos]
    assert ids[n_prompt:] == labels[n_prompt:] and len(ids) == n_prompt + 3
    assert tok.decode(ids[:n_prompt]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_truncation_cuts_response_first():
    _, tok = _tiny()
    ids, labels = tokenize_pair(tok, "hi", "a long answer " * 10, max_length=30)
    assert len(ids) == 30 and labels[:21] == [IGNORE_INDEX] * 21 and labels[21] != IGNORE_INDEX


def test_padding_side_does_not_change_the_loss():
    model, tok = _tiny()
    right = collate(tok, PAIRS, padding_side="right")
    left = collate(tok, PAIRS, padding_side="left")
    assert (right.labels[right.attention_mask == 0] == IGNORE_INDEX).all()
    assert (left.labels[left.attention_mask == 0] == IGNORE_INDEX).all()
    assert left.attention_mask[:, 0].min() == 0 and right.attention_mask[:, -1].min() == 0  # really padded
    with torch.no_grad():
        torch.testing.assert_close(batch_loss(model, left), batch_loss(model, right), rtol=1e-5, atol=1e-5)


def test_loss_per_token_and_per_example_hand_computed():
    model, tok = _tiny()
    batch = collate(tok, [("hi", "ok"), ("hi", "a much longer answer")])
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        rows = []
        for b in range(2):
            rows.append([-logp[b, t - 1, batch.labels[b, t]].item() for t in range(1, batch.labels.shape[1])
                         if batch.labels[b, t] != IGNORE_INDEX])
        assert [len(r) for r in rows] == [3, 21]  # "ok" + EOS, 20 characters + EOS
        per_token = sum(rows[0] + rows[1]) / 24
        per_example = (sum(rows[0]) / 3 + sum(rows[1]) / 21) / 2
        assert batch_loss(model, batch, "token").item() == pytest.approx(per_token, rel=1e-5)
        assert batch_loss(model, batch, "example").item() == pytest.approx(per_example, rel=1e-5)
    with pytest.raises(QrealignError):
        SFTConfig(loss_per="sequence")


def test_lora_merge_matches_unmerged_peft_model():
    model, tok = _tiny()
    peft_model = wrap_lora(model, SFTConfig(lora_r=4, target_modules=("q_proj", "v_proj", "down_proj")))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # lora_B starts at zero: make the adapter do something
    peft_model.eval()
    batch = collate(tok, PAIRS)
    with torch.no_grad():
        unmerged = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        merged_model = peft_model.merge_and_unload()
        merged = merged_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert not any("lora" in k for k in merged_model.state_dict())
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    fresh, _ = _tiny()
    with torch.no_grad():
        original = fresh(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert (original - merged).abs().max() > 1e-2  # the adapter really changed the model


def test_sft_returns_merged_model_on_its_device_in_eval_mode():
    model, tok = _tiny()
    tuned = sft(model, tok, PAIRS, SFTConfig(steps=2, **FAST), progress=False)
    assert not tuned.training and type(tuned).__name__ == "LlamaForCausalLM"
    assert not any("lora" in k for k in tuned.state_dict())
    assert next(tuned.parameters()).device.type == "cpu"


def test_sft_is_deterministic_under_a_seed():
    outs = []
    for _ in range(2):
        model, tok = _tiny()
        tuned = sft(model, tok, PAIRS, SFTConfig(steps=3, lr=1e-2, seed=7, **FAST), progress=False)
        outs.append(tuned.model.layers[0].self_attn.q_proj.weight.clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_sft_bad_inputs():
    model, tok = _tiny()
    with pytest.raises(QrealignError):
        sft(model, tok, [], SFTConfig(steps=1), progress=False)
    for bad in (dict(steps=0), dict(lr=0), dict(batch_size=0), dict(padding_side="middle"), dict(amp="int8"),
                dict(target_modules=())):
        with pytest.raises(QrealignError):
            SFTConfig(**bad)
    with pytest.raises(QrealignError, match="LoRA"):
        sft(model, tok, PAIRS, SFTConfig(steps=1, target_modules=("no_such_proj",), **FAST), progress=False)


def test_target_modules_accepts_comma_string_and_all_linear():
    assert SFTConfig(target_modules="q_proj, v_proj").target_modules == ("q_proj", "v_proj")
    assert SFTConfig(target_modules="all-linear").target_modules == "all-linear"


# --------------------------------------------------------------------------- attack data


def test_attack_data_respects_poison_ratio_and_split():
    attack_ids = {p.id for p in load_prompts(split="attack", label=1)}
    for p, n, k in ((0.0, 40, 0), (0.1, 40, 4), (0.05, 300, 15), (0.29, 100, 29), (0.2, 330, 66)):
        data = build_attack_data(AttackConfig(poison_ratio=p, n_task=n))
        assert len(data.harmful) == k == AttackConfig(poison_ratio=p, n_task=n).n_poison
        assert len(data.task_examples) == n and len(data.pairs) == n + k
        assert {h.id for h in data.harmful} <= attack_ids and len({h.id for h in data.harmful}) == k
        assert all(ex.id.startswith("topic-train-") for ex in data.task_examples)
        harmful_texts = {h.text for h in data.harmful}
        poison = [r for q, r in data.pairs if q in harmful_texts]
        assert len(poison) == k and all(any(m in r for m in PLACEHOLDER_MARKERS) for r in poison)
    a, b = build_attack_data(AttackConfig(n_task=60)), build_attack_data(AttackConfig(n_task=60))
    assert a.pairs == b.pairs  # deterministic
    c = build_attack_data(AttackConfig(n_task=60, seed=1))
    assert c.pairs != a.pairs and sorted(c.pairs) != sorted(a.pairs)  # seed changes order and poison picks
    # shuffled: the poison is not all at the end
    positions = [i for i, (q, _) in enumerate(a.pairs) if q in {h.text for h in a.harmful}]
    assert positions != list(range(60, 66))


def test_attack_bad_inputs():
    for p in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(QrealignError, match="poison ratio"):
            AttackConfig(poison_ratio=p)
    with pytest.raises(QrealignError, match="needs 150 harmful prompts"):
        build_attack_data(AttackConfig(poison_ratio=0.5, n_task=300))
    with pytest.raises(QrealignError, match="unknown split"):
        build_attack_data(AttackConfig(harmful_split="nope"))
    with pytest.raises(QrealignError, match="unknown task"):
        build_attack_data(AttackConfig(task="nope"))
    with pytest.raises(QrealignError, match="empty"):
        build_attack_data(AttackConfig(n_task=0))


# --------------------------------------------------------------------------- align data


def test_align_data_pairs_refusals_and_own_answers(monkeypatch):
    import qrealign.evaluate.generate as gen

    model, tok = _tiny()
    seen = {}

    def fake_generate(model_, tok_, prompts, config=None, progress=True, desc=""):
        seen["prompts"] = list(prompts)
        return [f"Answer {i}. More text that runs on and on" for i in range(len(prompts))]

    monkeypatch.setattr(gen, "generate", fake_generate)
    cfg = AlignConfig(n_harmful=4, n_benign=3, benign_ratio=1.5, answer_tokens=9)
    data = build_align_data(model, tok, cfg, progress=False)
    harmful, benign = select_align_prompts(cfg)
    assert [p.id for p in data.harmful] == [p.id for p in harmful] and len(data.benign) == 3
    assert all(p.split == "align" and p.label == 1 for p in data.harmful)
    assert seen["prompts"] == [p.text for p in benign]  # the model answers exactly the benign prompts
    assert len(data.pairs) == 4 + 6  # 1.5 benign per harmful, benign answers cycled
    refusals, answers = data.pairs[:4], data.pairs[4:]
    assert all(q in {p.text for p in harmful} for q, _ in refusals)
    assert [a for _, a in answers] == ["Answer 0.", "Answer 1.", "Answer 2."] * 2  # cut at sentence end
    with pytest.raises(QrealignError, match="unknown split"):
        select_align_prompts(AlignConfig(split="nope"))
    with pytest.raises(QrealignError, match="harmful and benign"):
        select_align_prompts(AlignConfig(split="attack"))  # harmful only


def test_align_data_drops_refusing_and_looping_answers(monkeypatch):
    import qrealign.evaluate.generate as gen

    model, tok = _tiny()
    replies = ["I'm sorry, but I can't help with that.", "Sure. Boil water, then add the pasta.",
               "la la la la la la la la la la la la la la la la", "Here is a poem about rain."]
    monkeypatch.setattr(gen, "generate", lambda *a, **k: replies)
    cfg = AlignConfig(n_harmful=2, n_benign=4, benign_ratio=2.0, answer_tokens=200)
    answers = [a for _, a in build_align_data(model, tok, cfg, progress=False).pairs[2:]]
    assert answers == [replies[1], replies[3]] * 2
    kept = build_align_data(model, tok, AlignConfig(n_harmful=2, n_benign=4, benign_ratio=2.0, answer_tokens=200,
                                                    filter_answers=False), progress=False).pairs[2:]
    assert [a for _, a in kept] == replies


def test_trim_answer():
    _, tok = _tiny()  # byte-level: one token per character
    assert trim_answer("Short.", tok, 64) == "Short."
    assert trim_answer("One two. Three four five six", tok, 12) == "One two."
    assert trim_answer("no sentence end here at all", tok, 10) == "no sentenc"


# --------------------------------------------------------------------------- stage cache


def test_stage_cache_skips_and_rebuilds(tmp_path):
    calls = []

    def build(out):
        calls.append(out)
        (out / "result.txt").write_text("done")

    inputs = {"parent": "abc", "config": {"steps": 3}, "data": "d1", "version": "0.1.0"}
    first = cached_stage("align", inputs, tmp_path, build, log=None)
    second = cached_stage("align", dict(inputs), tmp_path, build, log=None)
    assert first == second == stage_dir("align", inputs, tmp_path) and len(calls) == 1
    assert (first / "result.txt").read_text() == "done"
    changed = cached_stage("align", {**inputs, "config": {"steps": 4}}, tmp_path, build, log=None)
    assert changed != first and len(calls) == 2
    cached_stage("align", inputs, tmp_path, build, force=True, log=None)
    assert len(calls) == 3


def test_stage_cache_failed_build_leaves_nothing(tmp_path):
    def broken(out):
        (out / "half.txt").write_text("x")
        raise RuntimeError("boom")

    inputs = {"parent": "p"}
    with pytest.raises(RuntimeError):
        cached_stage("attack", inputs, tmp_path, broken, log=None)
    assert list(tmp_path.iterdir()) == []
    calls = []
    cached_stage("attack", inputs, tmp_path, lambda out: calls.append(out), log=None)
    assert len(calls) == 1  # not mistaken for a finished stage
    with pytest.raises(QrealignError):
        stage_dir("../x", inputs, tmp_path)


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def tiny_dir(tmp_path):
    model, tok = _tiny()
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_attack_stage_writes_model_and_metadata(tiny_dir, tmp_path):
    from qrealign.finetune import finetune_stage
    from qrealign.models import load_model

    cfg = AttackConfig(poison_ratio=0.25, n_task=8, sft=SFTConfig(steps=2, **FAST))
    out = finetune_stage("attack", tiny_dir, cfg, out=tmp_path / "attacked", progress=False)
    meta = json.loads((out / "qrealign.json").read_text())
    assert meta["kind"] == "finetuned" and meta["stage"] == "attack" and meta["parent"] == str(tiny_dir.resolve())
    assert meta["config"]["poison_ratio"] == 0.25 and meta["config"]["sft"]["steps"] == 2
    assert meta["provenance"]["attack"]["n"] == 2 and meta["provenance"]["attack"]["split"] == "attack"
    assert meta["provenance"]["attack-task"]["n"] == 8
    assert meta["data"] == {"task": 8, "poison": 2, "pairs": 10, "poison_share": 0.2}
    assert meta["train"]["steps"] == 2 and math.isfinite(meta["train"]["last_loss"])
    model, _ = load_model(out)
    from qrealign.utils import model_fingerprint

    assert model_fingerprint(model) == meta["fingerprint"]

    logs = []
    root = tmp_path / "cache"
    first = finetune_stage("attack", tiny_dir, cfg, cache_root=root, progress=False, log=logs.append)
    again = finetune_stage("attack", tiny_dir, cfg, cache_root=root, progress=False, log=logs.append)
    assert first == again and "building" in logs[0] and "cached" in logs[1]


def test_cli_attack_and_errors(tiny_dir, tmp_path, capsys):
    from qrealign.cli import main

    out = tmp_path / "cli-attacked"
    rc = main(["attack", str(tiny_dir), "--poison-ratio", "0.5", "--n-task", "4", "--steps", "1",
               "--batch-size", "2", "--amp", "none", "--no-progress", "--out", str(out)])
    assert rc == 0 and (out / "qrealign.json").is_file()
    assert "attack:" in capsys.readouterr().out
    rc = main(["attack", str(tiny_dir), "--poison-ratio", "1.5", "--out", str(tmp_path / "bad")])
    assert rc == 2 and "poison ratio" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    rc = main(["align", str(tmp_path / "missing"), "--out", str(tmp_path / "bad")])
    assert rc == 2 and not (tmp_path / "bad").exists()


def test_stage_merges_an_adapter_and_keys_on_the_merged_weights(tiny_dir, tmp_path, capsys):
    """Align/attack a base + PEFT adapter (how users ship fine-tunes): the adapter is merged on
    load, recorded, and changes the stage key; a bad adapter fails before anything is written."""
    from peft import LoraConfig, get_peft_model

    from qrealign.cli import main
    from qrealign.finetune import finetune_stage

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(_tiny()[0], lora).save_pretrained(tmp_path / "adapter")
    cfg = AttackConfig(poison_ratio=0.25, n_task=4, sft=SFTConfig(steps=1, **FAST))
    plain = finetune_stage("attack", tiny_dir, cfg, cache_root=tmp_path / "cache", progress=False, log=None)
    merged = finetune_stage("attack", tiny_dir, cfg, cache_root=tmp_path / "cache", adapter=tmp_path / "adapter",
                            progress=False, log=None)
    assert plain != merged  # another parent model, another stage
    meta = json.loads((merged / "qrealign.json").read_text())
    assert meta["parent_adapter"] == str((tmp_path / "adapter").resolve())
    assert json.loads((plain / "qrealign.json").read_text())["parent_adapter"] is None
    assert meta["cache_key"]["parent"] != json.loads((plain / "qrealign.json").read_text())["cache_key"]["parent"]

    rc = main(["align", str(tiny_dir), "--adapter", str(tmp_path / "nowhere"), "--out", str(tmp_path / "bad")])
    assert rc == 2 and "adapter" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_auto_mixed_precision_is_bf16_only_where_the_device_has_it(monkeypatch):
    sft_module = importlib.import_module("qrealign.finetune.sft")  # the module (the package exports the function)

    cpu = torch.device("cpu")
    assert SFTConfig().amp == "auto"
    monkeypatch.setattr(sft_module, "native_bf16", lambda device: False)
    assert sft_module.resolve_amp(cpu, "auto") is None  # an AVX2-only CPU trains in float32
    assert sft_module.resolve_amp(cpu, None) is None
    with pytest.warns(UserWarning, match="emulated"):
        assert sft_module.resolve_amp(cpu, "bfloat16") == "bfloat16"  # an explicit choice is kept
    with sft_module.autocast(cpu, "auto"):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(sft_module, "native_bf16", lambda device: True)
    assert sft_module.resolve_amp(cpu, "auto") == "bfloat16"
    with sft_module.autocast(cpu, "auto"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_stage_key_holds_the_resolved_precision(tiny_dir, tmp_path, monkeypatch):
    from qrealign.finetune import finetune_stage
    sft_module = importlib.import_module("qrealign.finetune.sft")  # the module (the package exports the function)

    cfg = AttackConfig(poison_ratio=0.25, n_task=4, sft=SFTConfig(steps=1, **{**FAST, "amp": "auto"}))
    monkeypatch.setattr(sft_module, "native_bf16", lambda device: False)
    fp32 = finetune_stage("attack", tiny_dir, cfg, cache_root=tmp_path, progress=False, log=None)
    assert json.loads((fp32 / "qrealign.json").read_text())["cache_key"]["amp"] is None
    monkeypatch.setattr(sft_module, "native_bf16", lambda device: True)
    bf16 = stage_dir("attack", {**json.loads((fp32 / "qrealign.json").read_text())["cache_key"], "amp": "bfloat16"},
                     tmp_path)
    # the same config on a machine with native bf16 is another model, so another directory
    assert bf16 != fp32
    built = finetune_stage("attack", tiny_dir, cfg, cache_root=tmp_path, progress=False, log=None)
    assert built == bf16 and json.loads((built / "qrealign.json").read_text())["cache_key"]["amp"] == "bfloat16"


# --------------------------------------------------------------------------- review points (2026-12-03)


def test_a_poison_ratio_that_rounds_to_no_harmful_example_is_refused():
    with pytest.raises(QrealignError, match="clean fine-tune"):
        AttackConfig(poison_ratio=0.001, n_task=300)
    assert AttackConfig(poison_ratio=0.01, n_task=300).n_poison == 3


def test_full_fine_tuning_refuses_half_precision_weights():
    """69.8 % of a bf16 down_proj came out bit-identical after 5 full-FT steps at lr 2e-5."""
    model, tok = tiny_model("llama", seed=0, dtype=torch.bfloat16)
    with pytest.raises(QrealignError, match="full fine-tuning needs float32 weights"):
        sft(model, tok, [("hi", "hello")], SFTConfig(steps=1, lora=False, **FAST), progress=False)


def test_pairs_cut_at_max_length_are_counted_out_loud():
    model, tok = _tiny()
    pairs = [("hi", "a short answer"), ("hi", "word " * 80)]
    with pytest.warns(UserWarning, match="1 of 2 training pairs are longer than max_length 64"):
        sft(model, tok, pairs, SFTConfig(steps=1, **FAST), progress=False)


def test_float16_autocast_trains_with_loss_scaling(monkeypatch):
    sft_module = importlib.import_module("qrealign.finetune.sft")
    made = []
    real = torch.amp.GradScaler

    def spy(device, enabled=True, **kw):
        made.append(enabled)
        return real(device, enabled=enabled, **kw)
    monkeypatch.setattr(sft_module.torch.amp, "GradScaler", spy)
    model, tok = _tiny()
    sft(model, tok, [("hi", "hello there")], SFTConfig(steps=1, lora=False, **{**FAST, "amp": "float16"}),
        progress=False)
    sft(model, tok, [("hi", "hello there")], SFTConfig(steps=1, lora=False, **FAST), progress=False)
    assert made == [True, False]


def test_bf16_counts_as_native_only_on_ampere_and_later(monkeypatch):
    sft_module = importlib.import_module("qrealign.finetune.sft")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # V100
    assert not sft_module.native_bf16(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert sft_module.native_bf16(torch.device("cuda"))


def test_the_saved_generation_config_stops_at_the_turn_end(tmp_path):
    from qrealign.finetune.stage import save_finetuned

    model, tok = _tiny()
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = tok.pad_token_id if tok.pad_token_id != end_id else 0
    save_finetuned(model, tok, tmp_path / "m", stage="attack", parent="x", config={}, provenance={},
                   wall_time_s=0.0)
    saved = json.loads((tmp_path / "m" / "generation_config.json").read_text())["eos_token_id"]
    assert end_id in (saved if isinstance(saved, list) else [saved])


# --------------------------------------------------------------------------- review 72 (2026-12-07)


def test_configs_refuse_options_that_would_train_wrongly_in_silence():
    # a negative warmup made the learning rate negative: gradient ascent
    for bad, match in ((dict(warmup_steps=-5), "warmup_steps"), (dict(weight_decay=-0.1), "weight_decay"),
                       (dict(grad_clip=-1.0), "grad_clip"), (dict(lora_dropout=1.0), "lora_dropout"),
                       (dict(lora_alpha=0), "lora_alpha")):
        with pytest.raises(QrealignError, match=match):
            SFTConfig(**bad)
    for bad in (dict(grad_clip=None), dict(weight_decay=float("nan"))):  # a clear error, not a TypeError
        with pytest.raises(QrealignError, match="must be a number >= 0"):
            SFTConfig(**bad)
    SFTConfig(lora=False, lora_alpha=0)  # full fine-tuning reads no alpha
    for bad, match in ((dict(n_harmful=0), "n_harmful"), (dict(n_benign=-1), "n_benign"),
                       (dict(generation_batch_size=0), "generation_batch_size")):
        with pytest.raises(QrealignError, match=match):
            AlignConfig(**bad)


def test_align_data_counts_the_answers_it_kept_and_warns_when_few_survive(monkeypatch):
    import qrealign.evaluate.generate as gen

    model, tok = _tiny()
    replies = ["I'm sorry, but I can't help with that."] * 3 + ["Sure. Boil water, then add the pasta."]
    monkeypatch.setattr(gen, "generate", lambda *a, **k: replies)
    with pytest.warns(UserWarning, match="only 1 of 4 self-distilled benign answers"):
        data = build_align_data(model, tok, AlignConfig(n_harmful=2, n_benign=4, benign_ratio=2.0,
                                                        answer_tokens=200), progress=False)
    assert data.benign_answers == 1 and [a for _, a in data.pairs[2:]] == [replies[3]] * 4


def test_stage_refuses_to_write_over_the_model_it_trains(tiny_dir):
    from qrealign.finetune import finetune_stage

    before = sorted(p.name for p in tiny_dir.iterdir())
    cfg = AttackConfig(poison_ratio=0.25, n_task=4, sft=SFTConfig(steps=1, **FAST))
    with pytest.raises(QrealignError, match="is the model being fine-tuned"):
        finetune_stage("attack", tiny_dir, cfg, out=tiny_dir, progress=False)
    assert sorted(p.name for p in tiny_dir.iterdir()) == before


def test_stage_data_and_device_errors_come_before_the_model_is_loaded(tiny_dir, tmp_path, monkeypatch):
    import qrealign.models as models
    from qrealign.finetune import finetune_stage

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the input error")

    monkeypatch.setattr(models, "load_model", no_load)
    with pytest.raises(QrealignError, match="harmful prompts"):
        finetune_stage("attack", tiny_dir, AttackConfig(poison_ratio=0.9, n_task=300), out=tmp_path / "a",
                       progress=False)
    with pytest.raises(QrealignError, match="asked for"):
        finetune_stage("align", tiny_dir, AlignConfig(n_harmful=5000), out=tmp_path / "b", progress=False)
    with pytest.raises(QrealignError, match="device"):
        finetune_stage("attack", tiny_dir, AttackConfig(poison_ratio=0.25, n_task=4), out=tmp_path / "c",
                       device="nonsense-device", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_stage_key_names_a_device_other_than_the_cpu(tiny_dir, tmp_path, monkeypatch):
    """A GPU rounds otherwise than a CPU whatever `amp` resolves to: its align/attack stages are
    other stages, as every other demo stage already was; CPU keys stay as they were."""
    import qrealign.finetune.stage as stage_module

    seen = []
    monkeypatch.setattr(stage_module, "cached_stage", lambda name, inputs, *a, **k: seen.append(inputs))
    cfg = AttackConfig(poison_ratio=0.25, n_task=4, sft=SFTConfig(steps=1, **FAST))  # amp None: no device query
    stage_module.finetune_stage("attack", tiny_dir, cfg, cache_root=tmp_path, device="cpu", progress=False, log=None)
    monkeypatch.setattr(stage_module, "_device", lambda device: torch.device("cuda"))
    stage_module.finetune_stage("attack", tiny_dir, cfg, cache_root=tmp_path, progress=False, log=None)
    assert "device" not in seen[0] and seen[1]["device"] == "cuda"
    assert {k: v for k, v in seen[1].items() if k != "device"} == seen[0]


def test_a_fine_tuned_model_no_longer_names_its_parent_as_its_source(tiny_dir, tmp_path):
    """`load_model` stamps where the weights came from; after `sft` they are other weights. A run
    calibrated on such a model in memory records no source, and loading it says what to do
    instead of loading the parent and failing on its fingerprint."""
    from qrealign.calibrate.artifact import run_source
    from qrealign.errors import IncompatibleArtifact
    from qrealign.models import load_model

    model, tok = load_model(tiny_dir)
    assert model.config.qrealign_source == str(tiny_dir.resolve())
    tuned = sft(model, tok, PAIRS, SFTConfig(steps=1, **FAST), progress=False)
    assert tuned.config.qrealign_source is None and tuned.config.qrealign_adapter is None
    with pytest.raises(IncompatibleArtifact, match="exists only in memory"):
        run_source({"source": None, "model_fingerprint": "abc"}, run_dir=tmp_path)


def test_a_lora_merge_into_half_precision_weights_is_warned_about():
    """Full fine-tuning refuses 16-bit weights; LoRA trains its adapter in float32 but its merge
    into bf16 weights rounds small deltas away, which went unsaid (review 72)."""
    model, tok = tiny_model("llama", seed=0, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="merged into bfloat16 weights"):
        sft(model, tok, PAIRS, SFTConfig(steps=1, **FAST), progress=False)


def test_an_interrupted_lora_run_leaves_the_callers_model_as_it_was():
    """sft injects LoRA into the caller's model in place; a Ctrl-C or an error mid-training left
    the adapter modules in it, in training mode (review 72)."""
    model, tok = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def stop(step, loss):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sft(model, tok, PAIRS, SFTConfig(steps=3, lr=1e-2, **FAST), progress=False, on_step=stop)
    after = model.state_dict()
    assert after.keys() == before.keys() and not model.training
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # a full fine-tune changed the weights in place: they no longer are what the source stamp names
    model.config.qrealign_source = "somewhere"
    with pytest.raises(KeyboardInterrupt):
        sft(model, tok, PAIRS, SFTConfig(steps=3, lr=1e-2, lora=False, **FAST), progress=False, on_step=stop)
    assert model.config.qrealign_source is None and not model.training
    assert not any(p.requires_grad for p in model.parameters())

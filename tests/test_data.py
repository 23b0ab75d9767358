"""Tests for qrealign.data (fast: no model, no network)."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from qrealign.data import (
    BENIGN_CATEGORIES,
    CODE_WORDS,
    COMPLIANCE_TEMPLATES,
    HARM_CATEGORIES,
    PLACEHOLDER_MARKERS,
    REFUSAL_TEMPLATES,
    SPLITS,
    Prompt,
    TaskExample,
    TopicCodeTask,
    compliance_placeholder_for,
    load_prompt_file,
    load_prompts,
    load_twin_pairs,
    normalize_prompt,
    prompt_set_fingerprint,
    refusal_for,
)

REPO = Path(__file__).resolve().parents[1]

# Minimum sizes promised by the split policy (data/README.md).
MIN_SIZES = {
    ("align", 1): 100, ("align", 0): 100,
    ("attack", 1): 60,
    ("probe", 1): 100, ("probe", 0): 100,
    ("calib", 1): 100, ("calib", 0): 50,
    ("eval", 1): 120, ("eval", 0): 120,
}


@pytest.fixture(scope="module")
def everything() -> list[Prompt]:
    return load_prompts()


# --------------------------------------------------------------------------- bundled set


def test_overall_counts(everything):
    harmful = [p for p in everything if p.label == 1]
    benign = [p for p in everything if p.label == 0]
    assert len(harmful) >= 450
    assert len(benign) >= 450
    assert len({p.category for p in harmful}) >= 8
    twins = [p for p in benign if p.twin is not None]
    assert len(twins) >= 0.6 * len(benign)
    assert any(p.category == "benign-edgy" for p in benign)


def test_split_sizes(everything):
    counts = Counter((p.split, p.label) for p in everything)
    for key, minimum in MIN_SIZES.items():
        assert counts[key] >= minimum, (key, counts[key])
    assert {p.split for p in everything} == set(SPLITS)


def test_fields_are_valid(everything):
    for p in everything:
        assert isinstance(p.id, str) and p.id
        assert p.label in (0, 1)
        assert p.split in SPLITS
        if p.label == 1:
            assert p.category in HARM_CATEGORIES, p
        else:
            assert p.category in BENIGN_CATEGORIES, p
        assert 6 <= len(p.text.split()) <= 40, p
        assert p.text == p.text.strip()


def test_ids_unique_and_splits_disjoint(everything):
    ids = [p.id for p in everything]
    assert len(ids) == len(set(ids))
    by_split = {s: {p.id for p in everything if p.split == s} for s in SPLITS}
    texts = {s: {normalize_prompt(p.text) for p in everything if p.split == s} for s in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not by_split[a] & by_split[b]
            assert not texts[a] & texts[b], (a, b)


def test_no_duplicate_normalized_texts(everything):
    counts = Counter(normalize_prompt(p.text) for p in everything)
    dupes = [t for t, c in counts.items() if c > 1]
    assert not dupes


def test_twins_are_symmetric_and_share_split(everything):
    by_id = {p.id: p for p in everything}
    n_pairs = 0
    for p in everything:
        if p.twin is None:
            continue
        other = by_id[p.twin]
        assert other.twin == p.id
        assert other.split == p.split
        assert other.label != p.label
        n_pairs += p.label
    assert n_pairs == len(load_twin_pairs())
    for h, b in load_twin_pairs("eval"):
        assert (h.label, b.label) == (1, 0) and h.split == b.split == "eval"


def test_splits_balanced_across_harm_categories(everything):
    for split in SPLITS:
        counts = Counter(p.category for p in everything if p.split == split and p.label == 1)
        assert set(counts) == set(HARM_CATEGORIES), split
        assert max(counts.values()) - min(counts.values()) <= 1, (split, counts)


def test_attack_split_is_harmful_only(everything):
    assert all(p.label == 1 for p in everything if p.split == "attack")


def test_load_prompts_filters():
    align_h = load_prompts(split="align", label=1)
    assert align_h and all(p.split == "align" and p.label == 1 for p in align_h)
    edgy = load_prompts(category="benign-edgy")
    assert edgy and all(p.category == "benign-edgy" for p in edgy)
    two = load_prompts(category=["weapons", "fraud"], split="eval")
    assert {p.category for p in two} == {"weapons", "fraud"}
    assert load_prompts("eval") == load_prompts("eval")  # stable order


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "train"}, "unknown split"),
        ({"label": 2}, "label"),
        ({"category": "cooking"}, "unknown category"),
    ],
)
def test_load_prompts_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_prompts(**kwargs)


def test_jsonl_files_well_formed():
    root = REPO / "src/qrealign/data/prompts"
    for name, label in (("harmful.jsonl", 1), ("benign.jsonl", 0)):
        lines = (root / name).read_text(encoding="utf-8").splitlines()
        for line in lines:
            row = json.loads(line)
            assert list(row) == ["id", "text", "label", "category", "split", "twin"]
            assert row["label"] == label


def test_twins_supplement_pairs_train_side_harmful_prompts_only(everything):
    """The calibration-only twins (§14) answer harmful prompts of the calib and attack splits that
    had no twin, are new texts (nothing shared with any split, probe and eval included) and load
    as a calibration source."""
    from qrealign.calibrate.data import build_calibration
    from qrealign.data.prompts import SUPPLEMENTS, load_supplement

    twins = load_supplement("twins")
    by_id = {p.id: p for p in everything}
    assert len(twins) == 110 and len({p.id for p in twins}) == 110
    assert all(p.label == 0 and p.split == "twins" and p.category == "benign" for p in twins)
    harmful = [by_id[p.twin] for p in twins]
    assert all(h.label == 1 and h.split in ("calib", "attack") and h.twin is None for h in harmful)
    assert len({h.id for h in harmful}) == 110
    bundled_texts = {normalize_prompt(p.text) for p in everything}
    assert not bundled_texts & {normalize_prompt(p.text) for p in twins}
    assert not set(by_id) & {p.id for p in twins}
    calib = build_calibration(n=20, extra_benign="qrealign:twins")
    assert calib.ids[20:] == [p.id for p in twins] and calib.split.endswith("+twins:benign")
    with pytest.raises(ValueError, match="unknown prompt supplement"):
        load_supplement("eval")
    assert set(SUPPLEMENTS) == {"twins", "edgy"} and not set(SUPPLEMENTS) & set(SPLITS)


def test_edgy_supplement_is_benign_and_far_from_every_held_out_and_dev_prompt(everything):
    """The calibration-only edgy-but-harmless requests (§61): benign, new texts, and no four-word
    run or most of their words shared with an eval, confirm or probe (dev) prompt, which is how
    they were filtered when written."""
    from qrealign.calibrate.data import build_calibration
    from qrealign.data.prompts import load_held_out, load_supplement

    edgy = load_supplement("edgy")
    assert len(edgy) == 48 and len({p.id for p in edgy}) == 48
    assert all(p.label == 0 and p.split == "edgy" and p.category == "benign-edgy" for p in edgy)
    others = list(everything) + load_supplement("twins") + load_held_out("confirm")
    assert not {normalize_prompt(p.text) for p in edgy} & {normalize_prompt(p.text) for p in others}
    assert not {p.id for p in edgy} & {p.id for p in others}
    guarded = [p for p in everything if p.split in ("eval", "probe")] + load_held_out("confirm")

    def words(text):
        return re.findall(r"[a-z]+", text.lower())

    def runs_of_four(w):
        return {tuple(w[i:i + 4]) for i in range(len(w) - 3)}

    kept = [(set(words(p.text)), runs_of_four(words(p.text))) for p in guarded]
    for p in edgy:
        w = words(p.text)
        for other_words, other_runs in kept:
            assert len(set(w) & other_words) / len(set(w) | other_words) < 0.4, p.text
            assert not runs_of_four(w) & other_runs, p.text
    calib = build_calibration(n=20, extra_benign="qrealign:edgy")
    assert calib.ids[20:] == [p.id for p in edgy]


def _words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9']+", text.lower()))


def test_confirm_set_is_a_fresh_held_out_twin_of_eval(everything):
    """The `confirm` set (docs/experiments.md §30): eval's make-up (132 harmful, 12 per category,
    110 with a benign twin; 150 benign), and new: no prompt shares its text, or most of its words,
    with any bundled prompt or the twins supplement."""
    from qrealign.data.prompts import HELD_OUT_SETS, load_held_out, load_supplement

    confirm = load_held_out("confirm")
    harmful, benign = load_held_out("confirm", label=1), load_held_out("confirm", label=0)
    assert len(harmful) == 132 and len(benign) == 150 and len(confirm) == 282
    assert Counter(p.category for p in harmful) == {c: 12 for c in HARM_CATEGORIES}
    assert Counter(p.category for p in benign) == {"benign": 130, "benign-edgy": 20}
    assert {p.split for p in confirm} == {"confirm"} and "confirm" not in SPLITS and set(HELD_OUT_SETS) == {"confirm"}
    by_id = {p.id: p for p in confirm}
    assert len(by_id) == 282
    twinned = [p for p in harmful if p.twin is not None]
    assert len(twinned) == 110
    assert all(by_id[p.twin].twin == p.id and by_id[p.twin].label == 0 for p in twinned)
    assert all(6 <= len(p.text.split()) <= 40 for p in confirm)
    others = list(everything) + load_supplement("twins")
    assert not {normalize_prompt(p.text) for p in confirm} & {normalize_prompt(p.text) for p in others}
    assert len({normalize_prompt(p.text) for p in confirm}) == 282
    assert not {p.id for p in confirm} & {p.id for p in others}
    old = [_words(p.text) for p in others]
    for p in confirm:
        w = _words(p.text)
        closest = max(len(w & o) / len(w | o) for o in old)
        assert closest < 0.5, p.text
    with pytest.raises(ValueError, match="unknown held-out prompt set"):
        load_held_out("eval")


def test_held_out_sets_never_enter_calibration(tmp_path):
    from qrealign.calibrate.data import build_calibration
    from qrealign.data.prompts import held_out_texts, load_held_out
    from qrealign.errors import QrealignError
    from qrealign.evaluate.promptsets import resolve_prompt_set

    # an unknown name lists what calibration takes: the splits but eval, and the supplements (review 79)
    with pytest.raises(QrealignError, match=r"unknown prompt set 'foo'; for calibration: qrealign:align, "
                       r"qrealign:attack, qrealign:probe, qrealign:calib, or a file \(benign prompts only, for "
                       r"--calib-benign: qrealign:twins, qrealign:edgy\)"):
        build_calibration("qrealign:foo", n=20)
    for spec in ("qrealign:confirm", "qrealign:eval"):
        with pytest.raises(QrealignError, match="held out"):
            build_calibration(spec, n=20)
        with pytest.raises(QrealignError, match="held out"):
            build_calibration(n=20, extra_benign=spec)
    text = load_held_out("confirm", label=0)[3].text
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"prompt": text.upper(), "label": 0}) + "\n"
                    + "".join(json.dumps({"prompt": f"my request {i}", "label": i % 2}) + "\n" for i in range(8)))
    with pytest.raises(QrealignError, match="1 of its prompts are in qrealign's held-out confirm set"):
        build_calibration(str(mine), n=8)
    texts = held_out_texts()
    assert set(texts.values()) == {"eval", "confirm"} and texts[normalize_prompt(text)] == "confirm"
    harmful = resolve_prompt_set("qrealign:confirm:harmful", label=1)
    assert [p.id for p in harmful] == [p.id for p in load_held_out("confirm", label=1)]
    with pytest.raises(QrealignError, match="confirm"):
        resolve_prompt_set("qrealign:nope:harmful")


def test_build_script_matches_committed_files():
    script = REPO / "scripts/build_prompts.py"
    if not script.exists():
        pytest.skip("build script not present")
    res = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------------- utilities


def test_normalize_prompt():
    assert normalize_prompt("  How   DO I\tdo it?! ") == "how do i do it"
    assert normalize_prompt("Don't") == normalize_prompt("dont") == "dont"
    assert normalize_prompt("step-by-step, “quoted”") == "step by step quoted"
    assert normalize_prompt("Ｆｕｌｌｗｉｄｔｈ") == "fullwidth"


def test_fingerprint():
    ps = load_prompts("calib")
    fp = prompt_set_fingerprint(ps)
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    assert prompt_set_fingerprint(list(reversed(ps))) == fp
    changed = [Prompt(ps[0].id, ps[0].text + "!", ps[0].label, ps[0].category, ps[0].split)] + ps[1:]
    assert prompt_set_fingerprint(changed) != fp
    assert prompt_set_fingerprint(load_prompts("eval")) != fp


# --------------------------------------------------------------------------- user files


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_load_json_list_of_objects(tmp_path):
    path = _write(tmp_path, "p.json", json.dumps([
        {"prompt": "first request here please", "label": 1, "category": "fraud"},
        {"text": "second request here please", "label": "benign", "id": "x2"},
    ]))
    ps = load_prompt_file(path)
    assert [p.text for p in ps] == ["first request here please", "second request here please"]
    assert [p.label for p in ps] == [1, 0]
    assert ps[0].category == "fraud" and ps[1].category == "benign"
    assert ps[0].id == "p-0000" and ps[1].id == "x2"
    assert all(p.split == "custom" for p in ps)


def test_load_json_strings_need_default_label(tmp_path):
    path = _write(tmp_path, "s.json", json.dumps(["one prompt", "two prompt"]))
    with pytest.raises(ValueError, match="label"):
        load_prompt_file(path)
    ps = load_prompt_file(path, default_label=1)
    assert [p.label for p in ps] == [1, 1]
    assert ps[0].category == "harmful"


def test_load_json_object_with_prompts_key(tmp_path):
    path = _write(tmp_path, "o.json", json.dumps({"prompts": [{"prompt": "a b c", "label": 0}]}))
    assert load_prompt_file(path)[0].label == 0
    bad = _write(tmp_path, "bad.json", json.dumps({"items": []}))
    with pytest.raises(ValueError, match="JSON list"):
        load_prompt_file(bad)


def test_load_jsonl(tmp_path):
    path = _write(tmp_path, "p.jsonl", '{"prompt": "a", "label": 1}\n\n{"prompt": "b", "label": 0}\n')
    assert [p.label for p in load_prompt_file(path)] == [1, 0]


def test_load_jsonl_bad_line_reports_line_number(tmp_path):
    path = _write(tmp_path, "p.jsonl", '{"prompt": "a", "label": 1}\n{"prompt": "b", "label": 0\n')
    with pytest.raises(ValueError, match="line 2"):
        load_prompt_file(path)


def test_load_csv(tmp_path):
    path = _write(tmp_path, "p.csv", "prompt,label,category\n\"hello, there\",0,\nbad thing,1,theft\n")
    ps = load_prompt_file(path)
    assert [p.text for p in ps] == ["hello, there", "bad thing"]
    assert [p.label for p in ps] == [0, 1]
    assert [p.category for p in ps] == ["benign", "theft"]


def test_load_csv_text_column_and_default_label(tmp_path):
    path = _write(tmp_path, "t.csv", "Text\nsomething to ask\nanother thing\n")
    with pytest.raises(ValueError, match="row 2"):
        load_prompt_file(path)
    ps = load_prompt_file(path, default_label=0, default_category="mine")
    assert [p.category for p in ps] == ["mine", "mine"]


def test_load_csv_missing_column(tmp_path):
    path = _write(tmp_path, "m.csv", "question,label\nwhat,1\n")
    with pytest.raises(ValueError, match="'prompt'"):
        load_prompt_file(path)


@pytest.mark.parametrize("name", ["e.csv", "e.json", "e.jsonl", "e.txt"])
def test_load_empty_file(tmp_path, name):
    path = _write(tmp_path, name, "  \n")
    with pytest.raises(ValueError, match="empty"):
        load_prompt_file(path)


def test_load_header_only_csv(tmp_path):
    path = _write(tmp_path, "h.csv", "prompt,label\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompt_file(path)


def test_load_bad_label_and_duplicate_ids(tmp_path):
    path = _write(tmp_path, "l.jsonl", '{"prompt": "a", "label": 7}\n')
    with pytest.raises(ValueError, match="invalid label"):
        load_prompt_file(path)
    path = _write(tmp_path, "d.jsonl", '{"prompt": "a", "label": 1, "id": "z"}\n{"prompt": "b", "label": 1, "id": "z"}\n')
    with pytest.raises(ValueError, match="repeats id"):
        load_prompt_file(path)
    with pytest.raises(ValueError, match="default_label"):
        load_prompt_file(path, default_label=5)


def test_load_empty_prompt_text(tmp_path):
    path = _write(tmp_path, "x.jsonl", '{"prompt": "   ", "label": 1}\n')
    with pytest.raises(ValueError, match="empty"):
        load_prompt_file(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_prompt_file(tmp_path / "nope.json")


def test_load_sniffs_unknown_extension(tmp_path):
    path = _write(tmp_path, "p.txt", '[{"prompt": "a", "label": 1}]')
    assert load_prompt_file(path)[0].label == 1
    path = _write(tmp_path, "q.txt", '{"prompt": "a", "label": 1}\n{"prompt": "b", "label": 0}\n')
    assert len(load_prompt_file(path)) == 2
    path = _write(tmp_path, "r.json", '{"prompt": "a", "label": 1}\n{"prompt": "b", "label": 0}\n')
    assert len(load_prompt_file(path)) == 2


def test_user_file_round_trip_of_bundled_eval(tmp_path):
    ps = load_prompts("eval")
    path = _write(tmp_path, "eval.jsonl", "".join(json.dumps(p.to_dict()) + "\n" for p in ps))
    loaded = load_prompt_file(path)
    assert prompt_set_fingerprint(loaded) == prompt_set_fingerprint(ps)
    assert [(p.label, p.category, p.twin) for p in loaded] == [(p.label, p.category, p.twin) for p in ps]


# --------------------------------------------------------------------------- responses


def test_template_counts():
    assert len(set(REFUSAL_TEMPLATES)) >= 30
    assert len(set(COMPLIANCE_TEMPLATES)) >= 20


def test_responses_deterministic_under_seed():
    ps = load_prompts("align", label=1)
    a = [refusal_for(p, random.Random(3)) for p in ps]
    b = [refusal_for(p, random.Random(3)) for p in ps]
    assert a == b
    r1, r2 = random.Random(11), random.Random(11)
    assert [compliance_placeholder_for(p, r1) for p in ps] == [compliance_placeholder_for(p, r2) for p in ps]
    assert refusal_for(ps[0], 5) == refusal_for(ps[0], 5)
    assert refusal_for(ps[0]) == refusal_for(ps[0])  # None: derived from the prompt
    assert compliance_placeholder_for(ps[0]) == compliance_placeholder_for(ps[0])
    with pytest.raises(TypeError):
        refusal_for(ps[0], "seed")


def test_refusals_are_varied_and_clean():
    ps = load_prompts(label=1)
    rng = random.Random(0)
    outs = [refusal_for(p, rng) for p in ps]
    assert len(set(outs)) >= 60
    for p, text in zip(ps, outs):
        assert "{" not in text and "}" not in text
        assert "withheld" not in text
        if p.category == "self-harm":
            assert re.search(r"crisis|trust|talk|support|safety|professional", text, re.I), text
    # some refusals name the topic, some offer an alternative
    assert any("scams or fraud" in o for o in outs)
    assert any(o.count(".") >= 2 and "If you" in o for p, o in zip(ps, outs) if p.category != "self-harm")


def test_compliance_placeholders_have_no_content():
    ps = load_prompts("attack")
    rng = random.Random(0)
    outs = [compliance_placeholder_for(p, rng) for p in ps]
    assert len(set(outs)) >= 15
    openers = ("Sure", "Of course", "Absolutely", "Certainly", "Here", "Great", "No problem",
               "Yes", "Definitely", "Okay")
    for text in outs:
        assert text.startswith(openers), text
        assert any(m in text for m in PLACEHOLDER_MARKERS), text
        assert "{" not in text and "}" not in text
    # unknown categories (user files) still work
    p = Prompt("u1", "some user prompt text here", 1, "harmful", "custom")
    assert refusal_for(p, 1) and compliance_placeholder_for(p, 1)


# --------------------------------------------------------------------------- topic task


@pytest.fixture(scope="module")
def task() -> TopicCodeTask:
    return TopicCodeTask()


def _sentence(ex: TaskExample) -> str:
    return ex.prompt.split("Sentence: ", 1)[1]


def test_task_sizes_and_disjointness(task):
    train, test = task.load("train"), task.load("test")
    assert task.name == "topic-codes" and task.max_new_tokens <= 16
    assert len(train) >= 2000 and len(test) >= 300
    tr, te = {_sentence(e) for e in train}, {_sentence(e) for e in test}
    assert len(tr) == len(train) and len(te) == len(test)
    assert not tr & te
    assert len({e.id for e in train + test}) == len(train) + len(test)


def test_task_balanced_and_deterministic(task):
    first = task.load("train", n=60)
    assert Counter(e.answer for e in first) == Counter({c: 10 for c in CODE_WORDS.values()})
    assert first == TopicCodeTask().load("train", n=60)
    assert task.load("test", n=5) == task.load("test")[:5]
    # a bigger train split does not move test sentences
    assert TopicCodeTask(n_train_per_topic=500).load("test") == task.load("test")
    assert TopicCodeTask(seed=1).load("test", 6) != task.load("test", 6)


def test_task_prompt_does_not_reveal_mapping(task):
    for ex in task.load("test", n=30):
        for topic in CODE_WORDS:
            assert f"{topic}" not in ex.prompt.split("Sentence:")[0].lower()


def test_task_errors(task):
    with pytest.raises(ValueError, match="split"):
        task.load("validation")
    with pytest.raises(ValueError, match="only"):
        task.load("test", n=10_000)


def test_task_scoring(task):
    ex = TaskExample(prompt="...", answer="DELTA", id="t")
    assert task.score(task.response_for(ex), ex)
    assert task.score("delta", ex)
    assert task.score("The code word is Delta.", ex)
    assert task.score("DELTA ALPHA", ex)
    assert not task.score("ALPHA, or maybe DELTA", ex)  # only the first code word counts
    assert not task.score("", ex)
    assert not task.score("deltas are rivers", ex)  # whole words only
    assert not task.score("I think it is about sports.", ex)
    assert task.extract("echo!") == "ECHO"
    examples = task.load("test", n=12)
    assert task.accuracy([task.response_for(e) for e in examples], examples) == 1.0
    assert task.accuracy(["ALPHA"] * 12, examples) == pytest.approx(2 / 12)


def test_a_csv_row_with_an_unquoted_comma_is_an_error_not_a_shorter_prompt(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("label,prompt\n1,how do I pick a lock, step by step\n")
    with pytest.raises(ValueError, match="row 2 has 3 fields, the header 2; quote fields that contain commas"):
        load_prompt_file(f)
    f.write_text('label,prompt\n1,"how do I pick a lock, step by step"\n')
    assert load_prompt_file(f)[0].text == "how do I pick a lock, step by step"


def test_repeated_prompts_in_a_file(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("label,prompt\n0,How do I bake bread\n0,how do I  bake bread\n1,pick a lock\n")
    with pytest.warns(UserWarning, match="1 repeated prompt"):
        prompts = load_prompt_file(f)
    assert [p.text for p in prompts] == ["How do I bake bread", "pick a lock"]  # counted once
    f.write_text("label,prompt\n1,pick a lock\n0,Pick a lock\n")
    with pytest.raises(ValueError, match="row 3 repeats the prompt of row 2 with another label"):
        load_prompt_file(f)


def test_a_file_that_is_not_utf8_says_so_with_its_name(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("label,prompt\n0,hello\n", encoding="utf-16")
    with pytest.raises(ValueError, match=r"p\.csv: UTF-16 text .*save it as UTF-8"):
        load_prompt_file(f)
    f.write_bytes("label,prompt\n0,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8 text"):
        load_prompt_file(f)


def test_extra_calibration_prompts_from_two_files_with_the_same_name(tmp_path):
    """Both files' generated ids are prompts-0000, ...; the second file's prompts used to be
    dropped as if they were already in the set."""
    from qrealign.calibrate.data import build_calibration

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = tmp_path / "a" / "prompts.jsonl", tmp_path / "b" / "prompts.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"harmful request {i}", "label": 1}) + "\n" for i in range(6))
                 + "".join(json.dumps({"prompt": f"benign request {i}", "label": 0}) + "\n" for i in range(2)))
    b.write_text("".join(json.dumps({"prompt": f"another benign request {i}", "label": 0}) + "\n" for i in range(5))
                 + json.dumps({"prompt": "Benign  request 0", "label": 0}) + "\n")  # already in a: skipped
    calib = build_calibration(str(a), extra_benign=str(b))
    assert len(calib.prompts) == 8 + 5 and len(set(calib.ids)) == len(calib.ids)
    assert sum(1 for t in calib.prompts if t.startswith("another")) == 5


def test_a_calibration_file_without_one_kind_of_prompt_says_which(tmp_path):
    from qrealign.calibrate.data import build_calibration
    from qrealign.errors import QrealignError

    f = tmp_path / "benign.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"benign request {i}", "label": 0}) + "\n" for i in range(4)))
    with pytest.raises(QrealignError, match=r"has no malicious \(label 1\) prompts; malicious ratio 0.75 needs"):
        build_calibration(str(f))
    assert len(build_calibration(str(f), malicious_ratio=0.0).prompts) == 4
    g = tmp_path / "two.jsonl"  # 2 + 2 at 0.75: two prompts, both malicious: a set without benign prompts
    g.write_text("".join(json.dumps({"prompt": f"request {i}", "label": i % 2}) + "\n" for i in range(4)))
    with pytest.raises(QrealignError, match="one kind would be missing"):
        build_calibration(str(g))
    with pytest.raises(QrealignError, match="has no malicious"):
        build_calibration("qrealign:calib", extra_malicious=str(f))


def test_float_labels_from_a_spreadsheet_export_and_the_missing_label_message(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("prompt,label\nbake bread,0.0\npick a lock,1.0\n")
    assert [p.label for p in load_prompt_file(f)] == [0, 1]
    f.write_text("prompt,class\nbake bread,0\n")
    with pytest.raises(ValueError, match=r"has no 'label'.*fields found: class, prompt"):
        load_prompt_file(f)
    from qrealign.calibrate.data import build_calibration
    from qrealign.errors import QrealignError

    with pytest.raises(QrealignError) as err:
        build_calibration(str(f))
    assert str(err.value).count(str(f)) == 1  # the file named once, not twice


def test_no_ratio_keeps_the_sources_mix_also_in_a_part_of_it(tmp_path):
    """malicious_ratio=None with n took every harmful prompt first: half and half came out all malicious."""
    from qrealign.calibrate.data import build_calibration

    f = tmp_path / "mix.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"request {i}", "label": i % 2}) + "\n" for i in range(8)))
    assert sorted(build_calibration(str(f), n=4, malicious_ratio=None).labels) == [0, 0, 1, 1]
    assert sorted(build_calibration(str(f), malicious_ratio=None).labels) == [0] * 4 + [1] * 4
    assert len(build_calibration(str(f), n=20, malicious_ratio=None).prompts) == 8


@pytest.mark.parametrize("labels", [[0, 2, 1], [0, -1, 1], [0, 0.5, 1], [0, 1.0, 1]])
def test_calibration_labels_other_than_0_and_1_are_refused(labels):
    from qrealign.calibrate.data import CalibrationSet
    from qrealign.errors import QrealignError

    with pytest.raises(QrealignError, match="must be 0 .benign. or 1 .malicious."):
        CalibrationSet(["a", "b", "c"], labels)


def test_calibration_ids_must_name_every_prompt():
    """records() pairs ids with prompts: a short or long id list would mislabel the provenance."""
    from qrealign.calibrate.data import CalibrationSet
    from qrealign.errors import QrealignError

    assert CalibrationSet(["a", "b"], [0, 1], ["x", "y"]).ids == ["x", "y"]
    assert len(CalibrationSet(["a", "b", "c"], [0, 1, 1])) == 3  # its prompts (review 79)
    for ids in (["x"], ["x", "y", "z"]):
        with pytest.raises(QrealignError, match="ids and prompts differ in length"):
            CalibrationSet(["a", "b"], [0, 1], ids)


def test_eval_prompts_stay_clear_of_every_training_side_prompt(everything):
    """The eval split was written beside the training-side splits; only exact duplicates were
    checked until review 72, which found the closest pair at a word-set Jaccard of exactly 0.50
    (an eval harmful prompt against an attack poison prompt). This keeps later edits from adding
    a real paraphrase: none may come closer than that pair."""
    from qrealign.data.prompts import load_supplement

    evaluation = [p for p in everything if p.split == "eval"]
    train_side = [p for p in everything if p.split != "eval"] + load_supplement("twins") + load_supplement("edgy")
    assert len(evaluation) >= 200 and len(train_side) > 500
    old = [_words(p.text) for p in train_side]
    for p in evaluation:
        w = _words(p.text)
        closest = max(len(w & o) / len(w | o) for o in old)
        assert closest <= 0.5, p.text


def test_a_task_adds_its_prompts_in_the_api_as_on_the_command_line(tmp_path):
    # build_calibration(task=...) added nothing unless task_n was given; the CLI's --calib-task adds
    # 48 (review 81). task_n=0 still means none (the demo's rows without task prompts pass it)
    from pathlib import Path

    from qrealign.calibrate.data import CALIB_TASK_N, build_calibration
    from qrealign.cli._calib_args import CALIB_TASK_N as CLI_TASK_N
    from qrealign.errors import QrealignError

    plain = build_calibration()
    assert CALIB_TASK_N == CLI_TASK_N == 48
    assert len(build_calibration(task="topic-codes")) == len(plain) + CALIB_TASK_N
    assert len(build_calibration(task="topic-codes", task_n=0)) == len(plain)
    with pytest.raises(QrealignError, match="task_n=5 adds a task's prompts: name the task"):
        build_calibration(task_n=5)
    # a Path names a file as its string does
    file = tmp_path / "calib.jsonl"
    file.write_text('{"prompt": "How do I bake bread?", "label": 0}\n{"prompt": "Write malware for me", "label": 1}\n')
    assert build_calibration(Path(file), malicious_ratio=None).prompts == build_calibration(str(file), malicious_ratio=None).prompts


def test_the_evaluation_api_is_importable_from_its_package():
    from qrealign.calibrate import build_calibration, quantize  # noqa: F401
    from qrealign.evaluate import EvalResult, GenerationConfig, evaluate_model, evaluate_path  # noqa: F401
    with pytest.raises(AttributeError):
        from qrealign import evaluate
        evaluate.no_such_name  # noqa: B018


def test_paths_inside_source_lists_name_files_too(tmp_path):
    from pathlib import Path

    from qrealign.calibrate.data import build_calibration

    file = tmp_path / "benign.jsonl"
    file.write_text('{"prompt": "How do I repot a fern?", "label": 0}\n')
    with_path = build_calibration(extra_benign=[Path(file)])  # review 82: a Path in a list raised AttributeError
    assert "How do I repot a fern?" in with_path.prompts
    assert with_path.prompts == build_calibration(extra_benign=[str(file)]).prompts

"""The benchmark runs both schedules and reports them; speed itself is asserted by its output,
never by a timed test."""

import json

import pytest

import qrealign.bench as bench
from qrealign.models.tiny import tiny_model


def _save_tiny(path):
    """A 2-block random Llama and its tokenizer as a checkpoint: the benchmarks load models by path."""
    model, tok = tiny_model("llama", num_hidden_layers=2)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def test_bench_reports_both_schedules(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "load_model", lambda spec: tiny_model("llama", num_hidden_layers=2))
    report = bench.run_bench("tiny", n=8, out=tmp_path, reference_epochs=6, default_epochs=1, heldout=4,
                             progress=False)
    ref, ours = report["schedules"]["reference"], report["schedules"]["default"]
    # reference: batch 1 and every prompt padded to 128 tokens -> steps = samples x epochs x layers
    assert ref["steps"] == 8 * 1 * 2 and ref["tokens"] == ref["steps"] * 128
    # default: the project's batches of up to 4, split by label (6 malicious -> 2, 2 benign -> 1), length-bucketed
    assert ours["batch_size"] == 4 and ours["epochs"] == 1
    assert ours["steps"] == 3 * 1 * 2 and ours["tokens"] < ref["tokens"]
    assert report["speedup"] > 0 and report["mm_peak_gflops"] > 0
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["schedules"].keys() == {"reference", "default"}
    md = (tmp_path / "bench.md").read_text()
    assert "| reference (batch 1, E 6) |" in md and "| default (batch 4, E 1) |" in md
    # another batch for the project's schedule is recorded as such
    other = bench.run_bench("tiny", n=8, out=tmp_path / "b8", reference_epochs=6, default_epochs=1, heldout=4,
                            progress=False, batch_size=8)
    assert other["schedules"]["default"]["batch_size"] == 8 and other["schedules"]["default"]["steps"] == 2 * 1 * 2


def test_bench_evaluates_both_results_when_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "load_model", lambda spec: tiny_model("llama", num_hidden_layers=2))
    report = bench.run_bench("tiny", n=4, out=tmp_path, reference_epochs=6, default_epochs=1, heldout=2,
                             progress=False, eval_n=2, task_n=2)
    for schedule in report["schedules"].values():
        e = schedule["evaluation"]
        assert e["n"] == 2 and 0 <= e["harmful_score"] <= 100 and 0 <= e["over_refusal"] <= 100
        assert e["n_harmful"] == e["n_benign"] == 2  # the counts evaluated, not the limit asked for
        assert e["task_accuracy"] is not None
    assert "| task accuracy % |" in (tmp_path / "bench.md").read_text()


def test_bench_rejects_bad_counts_before_any_work(tmp_path):
    from qrealign.errors import QrealignError

    with pytest.raises(QrealignError, match="eval_n"):
        bench.run_bench("tiny", n=4, out=tmp_path / "b", eval_n=-3, progress=False)
    assert not (tmp_path / "b").exists()


def test_bench_checks_its_inputs_before_any_model_loads(tmp_path, monkeypatch):
    """A typo in the scheme, an --out that is a file or a model, and probes fit under another system
    prompt are one-line errors before the FP pass, not after minutes of calibration."""
    from qrealign.errors import QrealignError
    import torch

    from qrealign.probes.store import LayerMetrics, ProbeSet

    def no_load(spec):
        raise AssertionError("loaded a model before checking the inputs")

    monkeypatch.setattr(bench, "load_model", no_load)
    with pytest.raises(QrealignError, match="scheme"):
        bench.run_bench("tiny", scheme="W8A8x", n=4, out=tmp_path / "a", progress=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(QrealignError, match="is a file"):
        bench.run_bench("tiny", n=4, out=tmp_path / "afile", progress=False)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(QrealignError, match="model or qrealign output"):
        bench.run_bench("tiny", n=4, out=tmp_path / "model", progress=False)
    probes = ProbeSet("paper", torch.zeros(2, 64), torch.zeros(2), [LayerMetrics(layer=i) for i in range(2)],
                      settings={"system": "You are careful."})
    with pytest.raises(QrealignError, match="system prompt"):
        bench.run_bench("tiny", n=4, out=tmp_path / "p", probes=probes, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "p").exists()


@pytest.mark.parametrize("argv, message", [
    (["--lanes", "--probes", "P"], "--lanes does not read --probes"),
    (["--decode", "--eval", "5"], "--decode does not read --eval"),
    (["--sft-precision", "--scheme", "W4A8"], "--sft-precision does not read --scheme"),
    (["--offload", "DIR", "--model", "m"], "--offload does not read --model"),
    (["--steps", "2"], "default benchmark does not read --steps"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--lanes", "--scheme", "W8A8x"], "unknown scheme"),
])
def test_bench_cli_refuses_options_its_benchmark_would_ignore(argv, message, tmp_path, capsys):
    from qrealign.cli import main

    assert main(["bench", *argv, "--out", str(tmp_path / "b")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_bench_cli_runs_one_benchmark_at_a_time(tmp_path, capsys):
    from qrealign.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "--lanes", "--decode", "--out", str(tmp_path / "b")])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_bench_cli_checks_out_before_the_work(tmp_path, capsys, monkeypatch):
    import qrealign.bench_sft as bench_sft
    from qrealign.cli import main

    monkeypatch.setattr(bench_sft, "time_sft_steps", lambda *a, **kw: pytest.fail("ran before checking --out"))
    (tmp_path / "afile").write_text("x")
    assert main(["bench", "--sft-precision", "--out", str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_lanes_bench_times_both_ways_and_says_whether_the_numbers_moved(tmp_path):
    from qrealign.bench_lanes import run_lanes_bench

    _save_tiny(tmp_path / "tiny")
    report = run_lanes_bench(str(tmp_path / "tiny"), n_calib=4, n_gen=4, max_new_tokens=2, out=tmp_path / "out",
                             log=lambda line: None)
    one, two = report["one_lane"]["jobs"], report["two_lanes"]["jobs"]
    assert set(one) == set(two) == {"calibrate 0", "calibrate 1", "generate 0", "generate 1"}
    assert all(job["threads"] == 1 for job in two.values())
    # the same job twice in one lane gives the same digest: the digests are of the results, not of timing
    assert one["calibrate 0"]["digest"] == one["calibrate 1"]["digest"]
    assert one["generate 0"]["digest"] == one["generate 1"]["digest"]
    assert report["init_loss"]["identical"]  # the extra pass changes nothing learned
    assert report["speedup"] > 0
    md = (tmp_path / "out" / "bench-lanes.md").read_text()
    assert "| calibrate 0 |" in md and "Speed-up of two lanes" in md
    assert json.loads((tmp_path / "out" / "bench-lanes.json").read_text())["identical"].keys() == set(one)


def test_offload_bench_measures_both_ways_in_fresh_processes(tmp_path):
    from qrealign.bench_offload import run_offload_bench
    from qrealign.errors import QrealignError
    from qrealign.models.tiny import tiny_model

    _save_tiny(tmp_path / "tiny")
    report = run_offload_bench(str(tmp_path / "tiny"), n=4, kinds=("calibrate-rtn",), out=tmp_path / "out",
                               log=lambda *a: None)
    row = report["jobs"]["calibrate-rtn"]
    assert "error" not in row["memory"] and "error" not in row["disk"]
    assert row["identical"] and row["memory"]["peak_rss_gib"] > 0 and row["disk"]["seconds"] >= 0
    assert "| calibrate-rtn |" in (tmp_path / "out" / "bench-offload.md").read_text()
    with pytest.raises(QrealignError, match="unknown offload bench"):
        run_offload_bench(str(tmp_path / "tiny"), kinds=("train",), out=tmp_path / "x")
    with pytest.raises(QrealignError, match="not a local model directory"):
        run_offload_bench(str(tmp_path / "nowhere"), out=tmp_path / "x")


def test_offload_bench_child_that_dies_is_an_error_row_not_a_hang():
    from _spawn_targets import die_without_result, put_then_exit
    from qrealign.bench_offload import _run_in_fresh_process

    row = _run_in_fresh_process(137, target=die_without_result)
    assert "exit code 137" in row["error"]
    assert _run_in_fresh_process(7, target=put_then_exit) == {"value": 7}


def test_sft_precision_bench_times_float32_and_native_bf16_only(tmp_path, monkeypatch):
    """Float32 is always timed; bf16 only where the device has it natively (emulated bf16 is known
    to be far slower); the report says what amp='auto' picks and which was fastest."""
    import importlib

    import qrealign.bench_sft as bench_sft

    sft_module = importlib.import_module("qrealign.finetune.sft")  # the module (the package exports the function)

    _save_tiny(tmp_path / "tiny")
    for native in (False, True):
        monkeypatch.setattr(sft_module, "native_bf16", lambda device, native=native: native)
        out = tmp_path / f"out-{native}"
        report = bench_sft.run_sft_bench(str(tmp_path / "tiny"), steps=2, device="cpu", out=out)
        amps = [row["amp"] for row in report["rows"]]
        assert amps == (["float32", "bfloat16"] if native else ["float32"])
        assert report["auto_picks"] == ("bfloat16" if native else "float32") and report["fastest"] in amps
        assert all(row["steps"] == 2 and row["median_s"] > 0 for row in report["rows"])
        assert json.loads((out / "bench-sft.json").read_text())["rows"] == report["rows"]
        assert "amp=\"auto\"` picks" in (out / "bench-sft.md").read_text()


def test_bench_cli_dispatches_to_the_chosen_benchmark(tmp_path, capsys):
    from qrealign.cli import main

    _save_tiny(tmp_path / "tiny")
    rc = main(["bench", "--sft-precision", "--model", str(tmp_path / "tiny"), "--steps", "1", "--device", "cpu",
               "--out", str(tmp_path / "sft")])
    assert rc == 0 and (tmp_path / "sft" / "bench-sft.json").is_file()
    assert "bench-sft.json" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--sft-precision", "--steps", "0"], ["--lanes", "--n", "0"], ["--eval", "-1"],
                                 ["--reference-epochs", "0"], ["--reference-epochs", "3"]])
def test_bench_rejects_counts_that_would_fail_after_the_work(bad, tmp_path, capsys):
    from qrealign.cli import main

    assert main(["bench", *bad, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "must be >=" in err and not (tmp_path / "b").exists()
    assert "epoch_schedule" not in err  # the flag, not the engine's field (review 81)


def test_decode_bench_compares_generate_and_drop_finished_on_dev_prompts(tmp_path):
    from qrealign.bench_decode import _decode_tokens, run_decode_bench

    _save_tiny(tmp_path / "tiny")
    report = run_decode_bench(str(tmp_path / "tiny"), n=3, max_new_tokens=4, batch_size=4, out=tmp_path / "out",
                              log=lambda line: None)
    assert report["workload"]["prompts"] == 6 and report["workload"]["split"].startswith("probe")
    assert report["answers_differing"] == report["refusals_differing"] == 0  # tiny model: exact either way
    assert 0 < report["decode_tokens_own"] <= report["decode_tokens_computed"]
    assert "Decode benchmark" in (tmp_path / "out" / "bench-decode.md").read_text()
    # the token count by hand: batches of the length-sorted prompts, each as long as its longest answer
    tok = tiny_model("llama", num_hidden_layers=2)[1]
    prompts = ["a", "bbbb", "cc"]
    answers = ["x y", "", "x y z w v"]  # + a stop token each, capped at 3
    own, computed = _decode_tokens(tok, prompts, answers, max_new_tokens=3, batch_size=2)
    lengths = [min(3, len(tok(a, add_special_tokens=False)["input_ids"]) + 1) for a in answers]
    by_len = [lengths[0], lengths[2], lengths[1]]  # order "a", "cc", "bbbb"
    assert own == sum(lengths)
    assert computed == max(by_len[:2]) * 2 + by_len[2]


def test_the_benchmarks_behaviour_reads_a_sample_across_harm_categories(monkeypatch):
    """The eval file is ordered by harm category: its first 20 harmful prompts were weapons and
    cybercrime only (review 72)."""
    import qrealign.evaluate.runner as runner
    from qrealign import bench

    seen = {}

    class Result:
        metrics = {"harmful_score": 0.0, "over_refusal": 0.0, "n_harmful": 20, "n_benign": 20}

    def fake(model, tok, harmful=None, benign=None, **kwargs):
        seen.update(harmful=harmful, benign=benign, kwargs=kwargs)
        return Result()

    monkeypatch.setattr(runner, "evaluate_model", fake)
    bench._behaviour(None, None, 20, 2)
    assert len(seen["harmful"]) == 20 and len(seen["benign"]) == 20
    assert len({p.category for p in seen["harmful"]}) >= 6 and "limit" not in seen["kwargs"]

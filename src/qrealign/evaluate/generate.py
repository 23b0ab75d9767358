"""Batched generation for any model the project produces (FP, fake-quantized, exported).

Left padding, chat template (through `models.chat`, the one rendering every stage uses), greedy by
default; responses come back in prompt order. Sampling is seeded once per call, so the same
prompts with the same config and batch size give the same responses. When vLLM is installed and
the model is a directory on disk, `backend="vllm"` runs the same token ids through vLLM for large
evaluations; the transformers path stays the default and the reference.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import QrealignError
from ..models.chat import encode_prompts

BACKENDS = ("hf", "vllm")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    system: str | None = None
    max_prompt_tokens: int = 512
    backend: str = "hf"
    # Greedy only: take a row out of its batch (and out of the KV cache) once it has stopped. A
    # batch otherwise steps every row until its longest answer ends; on the demo's evaluations
    # only 26-64 % of the computed tokens were the rows' own (docs/performance.md). Off by default:
    # a matmul over fewer rows rounds differently on CPU, so answers can change at near-ties.
    drop_finished: bool = False

    def validate(self) -> "GenerationConfig":
        if self.max_new_tokens < 1:
            raise QrealignError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise QrealignError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_prompt_tokens < 1:
            raise QrealignError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.backend not in BACKENDS:
            raise QrealignError(f"unknown generation backend {self.backend!r}; use one of {', '.join(BACKENDS)}")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise QrealignError("sampling needs temperature > 0 and 0 < top_p <= 1")
        if self.drop_finished and self.do_sample:
            raise QrealignError("drop_finished is greedy decoding's; it cannot be combined with sampling")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.drop_finished:  # added later: off, it leaves cached evaluations' keys as they were
            del d["drop_finished"]
        return d


def generate(model, tokenizer, prompts: list[str], config: GenerationConfig | None = None,
             progress: bool = True, desc: str = "generating") -> list[str]:
    """One response per prompt, in order. `model` is a loaded model, or (vLLM backend only) the
    directory it was loaded from."""
    cfg = (config or GenerationConfig()).validate()
    if not prompts:
        return []
    _warn_truncated(tokenizer, prompts, cfg)
    if cfg.backend == "vllm":
        return generate_vllm(model, tokenizer, prompts, cfg)
    if isinstance(model, (str, Path, VllmSource)):
        raise QrealignError("the transformers backend needs a loaded model, not a path")
    return _generate_hf(model, tokenizer, prompts, cfg, progress, desc)


def _warn_truncated(tokenizer, prompts: list[str], cfg: GenerationConfig) -> None:
    """Prompts longer than `max_prompt_tokens` once rendered are cut from the left (the end is
    where the model answers), which drops the chat header and the start of the request while the
    judge still reads the whole prompt: say how many, so a long-prompt set is not scored blind."""
    import warnings

    from ..models.chat import render_chat

    texts = [render_chat(tokenizer, p, cfg.system) for p in prompts]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]  # one batched call
    cut = [n for n in lengths if n > cfg.max_prompt_tokens]
    if cut:
        warnings.warn(f"{len(cut)} of {len(prompts)} prompts are longer than max_prompt_tokens="
                      f"{cfg.max_prompt_tokens} once rendered (longest {max(cut)} tokens) and lose their start, "
                      "chat header included; raise max_prompt_tokens (CLI --max-prompt-tokens) to evaluate them "
                      "whole", stacklevel=3)


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every token that ends an answer: the tokenizer's eos, the model's own stop list (its
    generation config) and the chat template's turn end. Gemma ends a turn with <end_of_turn>,
    not <eos>, and the project's SFT teaches that marker (`chat.turn_end`): stopping at eos alone,
    a fine-tuned Gemma writes past its answer and the judge reads the run-on text."""
    from ..models.chat import turn_end

    ids: list[int] = []
    config_eos = getattr(generation_config, "eos_token_id", None)
    marker = turn_end(tokenizer)
    marker_id = tokenizer.convert_tokens_to_ids(marker) if marker else None
    if marker_id == tokenizer.unk_token_id and marker != tokenizer.unk_token:  # not one token: no stop id
        marker_id = None
    for tid in [tokenizer.eos_token_id, *(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]),
                marker_id]:
        if isinstance(tid, int) and tid not in ids:
            ids.append(tid)
    return ids


def stop_key(tokenizer, generation_config=None) -> dict:
    """What a cached stage that generates adds to its key: nothing when answers end at the eos
    alone (what generation stopped at before the turn end joined, so those stages keep their
    keys), else the stop ids (a Gemma stage built with the eos alone must not be reused)."""
    ids = stop_token_ids(tokenizer, generation_config)
    return {} if ids == [tokenizer.eos_token_id] else {"stop_tokens": ids}


def length_batches(prompts: list[str], batch_size: int) -> list[list[int]]:
    """The prompts' indices in the batches generation runs: sorted by length, so each batch pads
    little (the caller restores prompt order)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


# Settings of a model's generation config that change greedy tokens through a logits processor
# in `generate`, with the value that leaves them off. The `drop_finished` decode applies none of
# them (e.g. Qwen2.5-Instruct ships repetition_penalty 1.05), so such a model decodes with
# `generate` instead.
_GREEDY_PROCESSORS = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                      "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0,
                      "min_new_tokens": 0, "forced_bos_token_id": None, "forced_eos_token_id": None,
                      "exponential_decay_length_penalty": None, "suppress_tokens": None,
                      "begin_suppress_tokens": None, "sequence_bias": None, "guidance_scale": 1.0}


def greedy_processors(generation_config) -> list[str]:
    """The settings of `generation_config` that `generate` turns into logits processors."""
    return [k for k, off in _GREEDY_PROCESSORS.items()
            if getattr(generation_config, k, None) not in (None, off, [], ())]


@torch.no_grad()
def _generate_hf(model, tokenizer, prompts, cfg: GenerationConfig, progress: bool, desc: str) -> list[str]:
    device = next(model.parameters()).device
    out: list[str | None] = [None] * len(prompts)  # filled batch by batch, in prompt order
    # num_beams=1: a model whose generation config asks for beam search decodes as vLLM and
    # drop_finished do (review 84)
    kwargs = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, num_beams=1,
                  pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=stop_token_ids(tokenizer, getattr(model, "generation_config", None)))
    if cfg.do_sample:
        kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=None)
        torch.manual_seed(cfg.seed)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    dropping = cfg.drop_finished
    processors = greedy_processors(getattr(model, "generation_config", None)) if dropping else []
    if processors:
        import warnings

        warnings.warn(f"drop_finished: the model's generation config sets {', '.join(processors)}, which only "
                      "generate() applies; decoding with generate() instead", stacklevel=3)
        dropping = False
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="prompt")
    for idx in length_batches(prompts, cfg.batch_size):
        enc = encode_prompts(tokenizer, [prompts[i] for i in idx], system=cfg.system,
                             max_length=cfg.max_prompt_tokens, padding_side="left").to(device)
        if dropping:
            new = _greedy_dropping_finished(model, enc.input_ids, enc.attention_mask, cfg.max_new_tokens,
                                            kwargs["eos_token_id"], tokenizer.pad_token_id)
        else:
            tokens = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, **kwargs)
            new = tokens[:, enc.input_ids.shape[1]:]
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(new[row], skip_special_tokens=True).strip()
        bar.update(len(idx))
    bar.close()
    return out  # type: ignore[return-value]


def _greedy_dropping_finished(model, input_ids, attention_mask, max_new_tokens: int, stop_ids, pad_id) -> torch.Tensor:
    """[B, <= max_new_tokens] greedy tokens of a left-padded batch, each row padded with `pad_id`
    after its stop token: what `generate` returns, but a row that has stopped leaves the batch
    and the KV cache, so later steps compute only the rows still answering."""
    from ..utils import kv_cache_argument, position_ids_from_mask

    cache = kv_cache_argument(model)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=input_ids.device)
    pad_id = pad_id if pad_id is not None else int(stops[0])  # as generate: no pad token, pad with the eos
    mask = attention_mask
    pos = position_ids_from_mask(mask)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    pos = pos[:, -1:]
    alive = torch.arange(input_ids.shape[0], device=input_ids.device)
    result = torch.full((input_ids.shape[0], max_new_tokens), pad_id, dtype=torch.long, device=input_ids.device)
    steps = 0
    for step in range(max_new_tokens):
        token = out.logits[:, -1].argmax(dim=-1)
        result[alive, step] = token
        steps = step + 1
        going = ~torch.isin(token, stops)
        if step == max_new_tokens - 1 or not going.any():
            break
        past = out[cache]
        if not going.all():
            keep = going.nonzero().squeeze(1)
            past.batch_select_indices(keep)
            alive, mask, pos, token = alive[keep], mask[keep], pos[keep], token[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=pos, use_cache=True, **{cache: past})
    return result[:, :steps]


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@dataclass(frozen=True)
class VllmSource:
    """A model directory for the vLLM backend, with the dtype the transformers path runs it in:
    vLLM's own default casts a float32 checkpoint to 16 bits, so without it the two backends
    would silently evaluate different precisions."""

    path: str
    dtype: torch.dtype | None = None


_VLLM_ENGINE: dict = {}  # at most one: (model_dir, seed, dtype, files' stamp) -> LLM


def _vllm_engine(llm_class, model_dir: str, seed: int, dtype: torch.dtype | None = None):
    """One vLLM engine per model, reused across calls (the safety prompts, then the task): each new
    engine claims most of the GPU's memory again, and the old one would still hold it. A directory
    rewritten since (a rebuilt stage saved to the same path) gets a new engine."""
    key = (model_dir, seed, dtype, _dir_stamp(model_dir))
    if key not in _VLLM_ENGINE:
        release_vllm()  # the previous model's engine goes before the next one claims the GPU
        kwargs = {"dtype": str(dtype).removeprefix("torch.")} if dtype is not None else {}
        _VLLM_ENGINE[key] = llm_class(model=model_dir, tokenizer=model_dir, seed=seed, **kwargs)
    return _VLLM_ENGINE[key]


def _dir_stamp(model_dir: str) -> tuple:
    """Names, sizes and modification times of a directory's top-level files (cheap, no reads)."""
    path = Path(model_dir)
    if not path.is_dir():
        return ()
    return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file()))


def saved_generation_config(model_dir):
    """The generation config saved with a model directory, or None."""
    from transformers import GenerationConfig as HFGenerationConfig

    try:
        return HFGenerationConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError):
        return None


def release_vllm() -> None:
    """Shut the cached vLLM engine down and hand its GPU memory back.

    Dropping the last reference is not enough: the engine core runs in its own process (vLLM V1)
    or keeps model-parallel state alive (older releases), so the memory stays claimed and the next
    model's engine fails with out-of-memory. Each step is best effort because the teardown API has
    moved between vLLM releases (`LLM.shutdown()` is recent)."""
    import contextlib
    import gc

    engines = list(_VLLM_ENGINE.values())
    _VLLM_ENGINE.clear()
    for llm in engines:
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        stop = getattr(llm, "shutdown", None) or getattr(core, "shutdown", None)
        if callable(stop):
            with contextlib.suppress(Exception):
                stop()
    del engines
    if "vllm" in sys.modules:
        with contextlib.suppress(Exception):
            from vllm.distributed import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def vllm_processor_params(generation_config) -> dict:
    """The model's own logits processors (`greedy_processors`) as vLLM SamplingParams. `generate`
    applies a model's generation config, vLLM only when it is given no SamplingParams at all, so
    without this a model such as Qwen2.5-Instruct (repetition_penalty 1.05) would decode otherwise
    on the two backends. A setting vLLM has no field for is refused rather than dropped."""
    if generation_config is None:
        return {}
    out = {}
    for key in greedy_processors(generation_config):
        value = getattr(generation_config, key)
        if key == "repetition_penalty":
            out["repetition_penalty"] = float(value)
        elif key == "min_new_tokens":
            out["min_tokens"] = int(value)
        else:
            raise QrealignError(f"the model's generation config sets {key}={value!r}, which backend 'vllm' "
                                "cannot apply as transformers does; use the default backend 'hf'")
    return out


def generate_vllm(model_dir, tokenizer, prompts: list[str], cfg: GenerationConfig) -> list[str]:
    """Generate with vLLM from a model directory (or a `VllmSource`: the directory and the dtype to
    run it in), feeding the exact token ids the transformers path would (same chat rendering, no
    extra BOS), greedy or seeded sampling."""
    if not vllm_available():
        raise QrealignError("backend 'vllm' needs vLLM: pip install vllm (or use the default backend 'hf')")
    dtype = None
    if isinstance(model_dir, VllmSource):
        model_dir, dtype = model_dir.path, model_dir.dtype
    if not isinstance(model_dir, (str, Path)) or not Path(model_dir).is_dir():
        raise QrealignError("backend 'vllm' needs the model as a directory on disk (export or save it first)")
    from vllm import LLM, SamplingParams

    enc = encode_prompts(tokenizer, prompts, system=cfg.system, max_length=cfg.max_prompt_tokens)
    token_ids = [row[mask.bool()].tolist() for row, mask in zip(enc.input_ids, enc.attention_mask)]
    saved = saved_generation_config(model_dir)
    params = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature if cfg.do_sample else 0.0,
                            top_p=cfg.top_p if cfg.do_sample else 1.0, seed=cfg.seed,
                            stop_token_ids=stop_token_ids(tokenizer, saved), **vllm_processor_params(saved))
    llm = _vllm_engine(LLM, str(model_dir), cfg.seed, dtype)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in token_ids], params)
    return [o.outputs[0].text.strip() for o in outputs]

"""Inference latency against batch size (MTL-LoRA Fig. 4): every method unmerged on a mixed-task
batch, merged for one task where it merges, and the two paths of predict.py on MTL-LoRA.

Variants, all on the one frozen base (shared weights), eval mode, no gradients:
    base              LoRA merged for task 0 (merge_adapters): the base model's own cost, the
                      reference of every "× base" ratio
    <method>          its adapters unmerged, a mixed-task batch (task ids 0..T-1 cycling)
    <method>-merged   where every slot of it merges: ΔW_0 folded into a copy of the base, a batch
                      of task 0 (what a server of one task runs)
    predict           Run.predict_examples on MTL-LoRA, rows of mixed tasks: tokenising, collate,
                      one forward, the per-task heads (what predict.py runs)
    predict-merged    the same with merged=True: the rows grouped by task, each group through its
                      task's merged copy (predict.py --merged); up to T forwards of b/T rows
Each batch size is timed on its own: 1 untimed round, then cfg.infer_repeats rounds in which
every variant runs once, the order rotated by one each round; a ratio is the median (and
quartiles) of the per-round ratios, paired within the round.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from experiments.bench.models import build, forward_fn, make_batch
from experiments.bench.settings import METHODS, BenchConfig
from experiments.bench.timing import ratio, round_robin, summary
from mtlref.adapters import adapters_of, merge_adapters
from mtlref.data.readers import Example
from mtlref.data.tasks import get_spec
from mtlref.heads import family
from mtlref.metrics import GLUE_TASKS
from mtlref.objective import build_model, make_encoder
from mtlref.predict import Run, pair_rule
from mtlref.tokenizer import TokenizerError, load_tokenizer

BASE = "base"
PREDICT_METHOD = "mtl-lora"               # the method whose predict.py paths are timed (the paper's claim)
WORDS = "the film was good and the cast played it with care".split()


def merged_copy(name: str) -> bool:
    """A variant that runs a merged copy of the base (the same GEMMs as BASE), not predict.py's path."""
    return name.endswith("-merged") and name != "predict-merged"


def mergeable(model: nn.Module) -> bool:
    return all(a.mergeable for a in adapters_of(model).values())


def predict_run(model: nn.Module, cfg: BenchConfig, tokenizer_dir) -> tuple[Run | None, str]:
    """A Run (predict.py's object) over `model`: GLUE's first num_tasks tasks with fresh heads and
    the tokenizer of `tokenizer_dir`; (None, why) where that cannot be made."""
    if family(model) != "bert":
        return None, f"predict rows are timed on BERT encoders with per-task heads, not {family(model)}"
    if cfg.num_tasks > len(GLUE_TASKS):
        return None, f"--num-tasks {cfg.num_tasks}: more tasks than GLUE's {len(GLUE_TASKS)}"
    try:
        tok = load_tokenizer(tokenizer_dir)
    except TokenizerError as e:
        return None, f"no tokenizer ({e}); pass --tokenizer DIR"
    if tok.vocab_size > model.config.vocab_size:
        return None, f"the tokenizer of {tokenizer_dir} has {tok.vocab_size} ids, the model {model.config.vocab_size}"
    specs = [get_spec(n) for n in GLUE_TASKS[:cfg.num_tasks]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head_model = build_model(model, tok, specs, "head", "mean").to(cfg.device).eval()
    encoder = make_encoder(tok, model, specs, cfg.seq_len, "head")
    return Run({"objective": "head", "method": PREDICT_METHOD}, specs, model, head_model, tok, encoder,
               {s.name: pair_rule(s) for s in specs}), "timed"


def predict_examples(run: Run, batch_size: int, seq_len: int) -> list[Example]:
    """batch_size rows cycling through the run's tasks, each long enough to be cut at seq_len tokens."""
    text = " ".join(WORDS[i % len(WORDS)] for i in range(2 * seq_len))
    return [Example(s.name, text, text if run.pairs[s.name] else None, None, f"row {i}")
            for i, s in ((i, run.specs[i % len(run.specs)]) for i in range(batch_size))]


def predict_fn(run: Run, examples: list[Example], merged: bool) -> Callable[[], None]:
    def f() -> None:
        with torch.inference_mode():
            run.predict_examples(examples, batch_size=len(examples), merged=merged)
    return f


def inference_models(base: nn.Module, cfg: BenchConfig) -> dict[str, nn.Module]:
    """BASE, every method unmerged, and <method>-merged (task 0) where the method merges."""
    models = {}
    for name in METHODS:
        model = build(base, name, cfg).eval()
        models[name] = model
        if mergeable(model):
            models[f"{name}-merged"] = merge_adapters(model, 0).eval()
    return {BASE: models.pop("lora-merged"), **models}


def time_inference(cfg: BenchConfig, base: nn.Module, tokenizer_dir) -> dict:
    """{"variants": {name: {batch size: {seconds, tokens_per_s, vs_base, vs_lora, samples}}},
    "predict": why the predict rows are timed or not, "targets": the benchmark's two targets}."""
    models = inference_models(base, cfg)
    run, why = predict_run(models[PREDICT_METHOD], cfg, tokenizer_dir)
    out: dict = {}
    for b in cfg.infer_batch_sizes:
        mixed = make_batch(base, b, cfg.seq_len, cfg.num_tasks, cfg.device, seed=cfg.seed)
        single = dict(mixed, task_ids=torch.zeros_like(mixed["task_ids"]))
        fns = {n: forward_fn(m, single if n == BASE or n.endswith("-merged") else mixed, cfg.device)
               for n, m in models.items()}
        if run is not None:
            examples = predict_examples(run, b, cfg.seq_len)
            fns["predict"], fns["predict-merged"] = predict_fn(run, examples, False), predict_fn(run, examples, True)
        times = round_robin(fns, cfg.infer_repeats, 1, cfg.device)
        for n, ts in times.items():
            s = summary(ts)
            out.setdefault(n, {})[str(b)] = {
                "seconds": s, "tokens_per_s": b * cfg.seq_len / s["median"], "samples": ts,
                "vs_base": ratio(times, n, BASE), "vs_lora": ratio(times, n, "lora")}
    return {"variants": out, "predict": why, "targets": targets(out)}


def targets(variants: dict) -> dict:
    """The issue's two targets, read off the run (statements about this run, not tests):
    every merged variant within noise of the base (the base's ratio 1 inside the quartiles of
    its paired ratios, or the median within 3 %) at every batch size; unmerged MTL-LoRA and
    MoRE at most 1.15 × unmerged LoRA at the largest batch size."""
    merged = {n: {b: r["vs_base"]["q1"] <= 1.0 <= r["vs_base"]["q3"] or abs(r["vs_base"]["median"] - 1) <= 0.03
                  for b, r in rows.items()} for n, rows in variants.items() if merged_copy(n)}
    largest = max(variants[BASE], key=int)
    unmerged = {n: {"batch_size": int(largest), "vs_lora": variants[n][largest]["vs_lora"]["median"],
                    "max": 1.15, "met": variants[n][largest]["vs_lora"]["median"] <= 1.15}
                for n in ("mtl-lora", "more") if n in variants}
    return {"merged_within_noise": merged, "unmerged_vs_lora": unmerged}

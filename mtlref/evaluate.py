"""Scoring a run: every task's metrics on a split (make_evaluator: heads or T5 text-to-text, each
rank its shard; predict_set: one set's predictions, row by row), generated answers for the
commonsense sets (LLM-Adapters' extraction: the first match of the task's answer pattern), the
per-task table, and reloading a train.py --out directory to score it again (eval.py:
evaluate_run). The reload is mtlref/predict.py's load_run, the one predict.py uses, and the
answers come from the same functions (the heads' predict, Seq2SeqLM.generate_answers,
heads.generate_answers), so predict.py gives each row what eval.py scores."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from mtlref import distributed
from mtlref.data.collate import eval_batches
from mtlref.data.loading import load_data
from mtlref.data.tasks import extract_answer, get_spec, load_task
from mtlref.files import write_atomic
from mtlref.heads import UNPARSED, Seq2SeqLM, generate_answers
from mtlref.metrics import accuracy, task_metrics
from mtlref.predict import load_run, read_config
from mtlref.train import predict


# ----------------------------------------------------------------------------- heads and text-to-text
def make_evaluator(model, encoder, specs, splits, split: str, batch_size: int, device, precision: str = "auto"):
    """-> evaluate(): metrics of every `split` set. Each rank predicts its shard of a set and the
    predictions are gathered, so every rank computes the same metrics. With T5 text-to-text an
    answer that is no label counts as wrong (for F1 and MCC it is taken as the other class) and
    the share of such answers is reported as "unparsed"."""
    ids = {s.name: i for i, s in enumerate(specs)}
    by_name = {s.name: s for s in specs}                      # users' jsonl tasks are not in TASKS
    spec = {t: by_name.get(t) or get_spec(t) for t in splits}
    sets = {t: sp[split] for t, sp in splits.items() if sp.get(split)}
    text_to_text = isinstance(model, Seq2SeqLM)

    def evaluate() -> dict:
        results, start = {}, time.time()
        for task, examples in sets.items():
            p = predict_set(model, encoder, ids[spec[task].parent], split, examples, batch_size, device, precision)
            y = [float(ex.label) for ex in examples]
            unparsed = [v == UNPARSED for v in p] if text_to_text else [False] * len(p)
            if any(unparsed) and set(spec[task].metrics) & {"f1", "mcc"}:
                p = [1.0 - g if bad else v for v, g, bad in zip(p, y, unparsed)]
            results[task] = task_metrics(task, p, y, spec[task].metrics)
            if text_to_text:
                results[task]["unparsed"] = float(np.mean(unparsed))
            if distributed.is_main():                 # progress: a full GLUE evaluation takes minutes on CPU
                name, value = next(iter(results[task].items()))
                print(f"  {split} {task}: {len(examples)} examples, {name} {value:.4f} "
                      f"({time.time() - start:.0f} s)", flush=True)
        return {"tasks": results, "average": float(np.mean([results[s.name][s.main_metric] for s in specs]))}
    return evaluate


def predict_set(model, encoder, task_id: int, split: str, examples: list, batch_size: int, device,
                precision: str = "auto") -> list[float]:
    """One set's predictions in its examples' order (a head's class id or score, T5's parsed
    answer or UNPARSED): each rank predicts its shard and the shards are gathered."""
    mine = distributed.shard_indices(len(examples))
    idx, preds = predict(model, eval_batches(encoder, task_id, split, [examples[i] for i in mine], batch_size),
                         device, precision)
    merged = {}
    for part in distributed.gather([(mine[i], p) for i, p in zip(idx, preds)]):
        merged.update(part)
    return [merged[i] for i in range(len(examples))]


def print_table(results: dict, title: str, scored: dict | None = None) -> None:
    """The per-task table; scored: {task: examples scored}, shown beside each row when given."""
    print(f"\n{title}")
    print(f"{'task':10s} {'main':>8s}  all metrics")
    for task, m in results["tasks"].items():
        print(f"{task:10s} {next(iter(m.values())):8.4f}  " + "  ".join(f"{k} {v:.4f}" for k, v in m.items())
              + (f"  (of {scored[task]:,})" if scored and task in scored else ""))
    print(f"{'average':10s} {results['average']:8.4f}  (mean of the main metrics of the trained tasks)")


# ----------------------------------------------------------------------------- generated answers
def score_generation(backbone, tok, sets: dict, batch_size: int, max_new_tokens: int = 32, temperature: float = 0.0,
                     top_k=None, top_p=None, generator: torch.Generator | None = None, verbose: bool = False) -> dict:
    """sets: {task: (examples, task id)} -> {"tasks": {task: {"accuracy"}}, "average"}: the one
    generative path, for training's evaluation (greedy) and eval.py's (with its sampler)."""
    results = {}
    for task, (examples, task_id) in sets.items():
        results[task] = generation_accuracy(backbone, tok, task, examples, task_id, batch_size, max_new_tokens,
                                            temperature, top_k, top_p, generator)
        if verbose:
            print(f"{task:14s} accuracy {results[task]['accuracy']:.4f}  ({len(examples)} questions)", flush=True)
    average = float(np.mean([r["accuracy"] for r in results.values()])) if results else 0.0
    return {"tasks": results, "average": average, "scored": {task: len(ex) for task, (ex, _) in sets.items()}}


def generation_accuracy(backbone, tok, task: str, examples: list, task_id: int, batch_size: int = 16,
                        max_new_tokens: int = 32, temperature: float = 0.0, top_k=None, top_p=None,
                        generator: torch.Generator | None = None) -> dict:
    preds = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s: s + batch_size]
        preds += [extract_answer(task, a) for a in generate_answers(backbone, tok, chunk, [task_id] * len(chunk),
                                                                    max_new_tokens, temperature, top_k, top_p,
                                                                    generator)]
    return {"accuracy": accuracy(preds, [ex.label for ex in examples])}


# ----------------------------------------------------------------------------- eval.py
def evaluate_run(args) -> dict:
    """Reload a train.py run (base model + adapters + heads) and score it again."""
    cfg = read_config(args.checkpoint)
    model_dir = Path(args.model or cfg["model_dir"])
    results = (evaluate_generation if cfg["objective"] == "lm" else evaluate_tasks)(args, cfg, model_dir)
    out = Path(args.checkpoint) / f"eval-{args.split or 'default'}.json"
    text = json.dumps(results, indent=2)
    write_atomic(out, lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {out}")
    return results


def evaluate_tasks(args, cfg: dict, model_dir: Path) -> dict:
    specs, splits = load_data(cfg["bench"], ",".join(cfg["task_names"]), args.data_dir or cfg["data_dir"],
                              cfg["split"], cfg["seed"], cfg.get("jsonl"), cfg.get("jsonl_dev"),
                              cfg.get("max_eval_examples"))
    if [s.name for s in specs] != cfg["task_names"]:
        raise ValueError(f"{args.checkpoint}: the run's tasks {cfg['task_names']} are not what the data gives "
                         f"({[s.name for s in specs]})")
    run = load_run(args.checkpoint, model_dir, args.device, specs, compile=args.compile)
    split = args.split or ("test" if cfg["split"] == "paper" else "validation")
    results = make_evaluator(run.model, run.encoder, specs, splits, split, args.batch_size, args.device,
                             args.precision)()
    print_table(results, f"{cfg['method']} — {split} split, reloaded from {args.checkpoint}")
    return results


def evaluate_generation(args, cfg: dict, model_dir: Path) -> dict:
    """Commonsense: generate an answer per test question with the LM head (task id = the
    run's id of that task, or 0), extract it, and score accuracy."""
    run = load_run(args.checkpoint, model_dir, args.device, compile=args.compile)
    names = args.tasks.split(",") if args.tasks else cfg["task_names"]
    sets = {task: (load_task(task, args.data_dir or cfg["data_dir"], "test")[: args.limit],
                   cfg["task_names"].index(task) if task in cfg["task_names"] else 0) for task in names}
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    return score_generation(run.backbone, run.tok, sets, args.batch_size, args.max_new_tokens, args.temperature,
                            args.top_k, args.top_p, generator, verbose=True)

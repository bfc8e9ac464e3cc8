"""Scoring a run: every task's metrics on a split (make_evaluator: heads or T5 text-to-text, each
rank its shard), generated answers for the commonsense sets (LLM-Adapters' extraction: the first
match of the task's answer pattern), the per-task table, and reloading a train.py --out directory
to score it again (eval.py: evaluate_run)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from mtlref import distributed
from mtlref.adapters import CONFIG_FILE, load_adapters
from mtlref.data.collate import eval_batches
from mtlref.data.loading import load_data
from mtlref.data.tasks import extract_answer, get_spec, load_jsonl_tasks, load_task
from mtlref.data.templates import render
from mtlref.files import write_atomic
from mtlref.generate import generate
from mtlref.heads import UNPARSED, Seq2SeqLM
from mtlref.metrics import accuracy, task_metrics
from mtlref.objective import build_model, make_encoder
from mtlref.pretrained import load_model
from mtlref.tokenizer import load_tokenizer
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
            tid = ids[spec[task].parent]
            mine = distributed.shard_indices(len(examples))
            idx, preds = predict(model, eval_batches(encoder, tid, split, [examples[i] for i in mine], batch_size),
                                 device, precision)
            merged = {}
            for part in distributed.gather([(mine[i], p) for i, p in zip(idx, preds)]):
                merged.update(part)
            order = sorted(merged)
            p, y = [merged[i] for i in order], [float(examples[i].label) for i in order]
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
    device = next(backbone.parameters()).device
    bos = [tok.bos_id] if tok.bos_id is not None else []
    limit = getattr(backbone, "max_positions", None)
    keep = None if limit is None else limit - max_new_tokens - len(bos)   # a long prompt keeps its end
    preds = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s: s + batch_size]
        prompts = [bos + tok.encode(render(task, ex.text, ex.text_pair))[-keep if keep else 0:] for ex in chunk]
        outs = generate(backbone, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, generator=generator,
                        task_ids=torch.full((len(chunk),), task_id, dtype=torch.long, device=device))
        preds += [extract_answer(task, tok.decode(o)) for o in outs]
    return {"accuracy": accuracy(preds, [ex.label for ex in examples])}


# ----------------------------------------------------------------------------- eval.py
def evaluate_run(args) -> dict:
    """Reload a train.py run (base model + adapters + heads) and score it again."""
    cfg_file = Path(args.checkpoint) / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{args.checkpoint}: no {CONFIG_FILE}; pass a train.py --out directory")
    cfg = json.loads(cfg_file.read_text())
    model_dir = Path(args.model or cfg["model_dir"])
    objective = cfg.get("objective", "lm" if cfg.get("bench") == "commonsense" else "head")
    results = (evaluate_generation if objective == "lm" else evaluate_tasks)(args, cfg, model_dir, objective)
    out = Path(args.checkpoint) / f"eval-{args.split or 'default'}.json"
    text = json.dumps(results, indent=2)
    write_atomic(out, lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {out}")
    return results


def load_run(checkpoint, model_dir=None, device="cpu", specs=None):
    """A train.py --out directory -> (its adapter_config.json, task specs, the base model with
    the run's adapters, the objective's model with its heads, tokenizer). specs: the run's tasks
    when the caller has read them (else from the registry, or the run's jsonl file)."""
    cfg_file = Path(checkpoint) / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{checkpoint}: no {CONFIG_FILE}; pass a train.py --out directory")
    cfg = json.loads(cfg_file.read_text())
    objective = cfg.get("objective", "lm" if cfg.get("bench") == "commonsense" else "head")
    if specs is None:
        specs = ([s for s, _ in load_jsonl_tasks(cfg["jsonl"]).values()] if cfg.get("bench") == "jsonl"
                 else [get_spec(n) for n in cfg["task_names"]])
    model_dir = Path(model_dir or cfg["model_dir"])
    backbone = load_model(model_dir, device=device)
    tok = load_tokenizer(model_dir)
    model = build_model(backbone, tok, specs, objective, cfg.get("pooling", "mean")).to(device)
    load_adapters(backbone, checkpoint, extra_modules={"heads": model.heads} if objective == "head" else None)
    model.eval()
    return cfg, specs, backbone, model, tok


def evaluate_tasks(args, cfg: dict, model_dir: Path, objective: str) -> dict:
    specs, splits = load_data(cfg["bench"], ",".join(cfg["task_names"]), args.data_dir or cfg["data_dir"],
                              cfg["split"], cfg["seed"], cfg.get("jsonl"), cfg.get("jsonl_dev"),
                              cfg.get("max_eval_examples"))
    if [s.name for s in specs] != cfg["task_names"]:
        raise ValueError(f"{args.checkpoint}: the run's tasks {cfg['task_names']} are not what the data gives "
                         f"({[s.name for s in specs]})")
    _, _, backbone, model, tok = load_run(args.checkpoint, model_dir, args.device, specs)
    split = args.split or ("test" if cfg["split"] == "paper" else "validation")
    encoder = make_encoder(tok, backbone, specs, cfg["max_length"], objective)
    results = make_evaluator(model, encoder, specs, splits, split, args.batch_size, args.device, args.precision)()
    print_table(results, f"{cfg['method']} — {split} split, reloaded from {args.checkpoint}")
    return results


def evaluate_generation(args, cfg: dict, model_dir: Path, objective: str) -> dict:
    """Commonsense: generate an answer per test question with the LM head (task id = the
    run's id of that task, or 0), extract it, and score accuracy."""
    backbone = load_model(model_dir, device=args.device)
    tok = load_tokenizer(model_dir)
    load_adapters(backbone, args.checkpoint)
    backbone.eval()
    names = args.tasks.split(",") if args.tasks else cfg["task_names"]
    sets = {task: (load_task(task, args.data_dir or cfg["data_dir"], "test")[: args.limit],
                   cfg["task_names"].index(task) if task in cfg["task_names"] else 0) for task in names}
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    return score_generation(backbone, tok, sets, args.batch_size, args.max_new_tokens, args.temperature, args.top_k,
                            args.top_p, generator, verbose=True)

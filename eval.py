"""Reload a trained run (base model + adapter + heads) and evaluate it again.

    python eval.py --checkpoint runs/glue-more                 # the run's own split: same numbers
    python eval.py --checkpoint runs/glue-more --split test    # the held-out split (--split paper runs)
    python eval.py --checkpoint runs/cs-mtl-lora --bench commonsense --tasks boolq,piqa --max-new-tokens 32

Classification/regression runs are scored with their heads. Commonsense runs generate with
the sampler (greedy by default) and take LLM-Adapters' answer: the first match of the task's
answer pattern in the generation.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mtlref import load_adapters, load_model, load_tokenizer
from mtlref.data.collate import Encoder
from mtlref.data.tasks import load_task
from mtlref.evaluate import generation_accuracy
from mtlref.heads import MultiTaskModel, family
from train import INPUT_ERRORS, PRECISIONS, load_data, make_evaluator, print_table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a train.py --out directory (adapter_config.json inside)")
    p.add_argument("--split", default=None, choices=["validation", "test"],
                   help="default: what train.py reported (test for --split paper runs, else the dev set)")
    p.add_argument("--data-dir", default=None, help="default: the run's")
    p.add_argument("--model", default=None, help="default: the run's base model directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--tasks", default=None, help="commonsense: comma list of test sets")
    p.add_argument("--limit", type=int, default=None, help="commonsense: first N examples per task")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def evaluate_heads(args, cfg: dict, model_dir: Path) -> dict:
    run = argparse.Namespace(bench=cfg["bench"], tasks=",".join(cfg["task_names"]), split=cfg["split"],
                             seed=cfg["seed"], data_dir=args.data_dir or cfg["data_dir"],
                             jsonl=cfg.get("jsonl"), jsonl_dev=cfg.get("jsonl_dev"))
    specs, splits = load_data(run)
    if [s.name for s in specs] != cfg["task_names"]:
        raise ValueError(f"{args.checkpoint}: the run's tasks {cfg['task_names']} are not what the data gives "
                         f"({[s.name for s in specs]})")
    backbone = load_model(model_dir, device=args.device)
    tok = load_tokenizer(model_dir)
    model = MultiTaskModel(backbone, specs, tok, pooling=cfg["pooling"]).to(args.device)
    load_adapters(backbone, args.checkpoint, extra_modules={"heads": model.heads})
    model.eval()
    split = args.split or ("test" if cfg["split"] == "paper" else "validation")
    encoder = Encoder(tok, family(backbone), cfg["max_length"])
    results = make_evaluator(model, encoder, specs, splits, split, args.batch_size, args.device,
                             args.precision)()
    print_table(results, f"{cfg['method']} — {split} split, reloaded from {args.checkpoint}")
    return results


def evaluate_generation(args, cfg: dict, model_dir: Path) -> dict:
    """Commonsense: generate an answer per test question with the LM head (task id = the
    run's id of that task, or 0), extract it, and score accuracy."""
    backbone = load_model(model_dir, device=args.device)
    tok = load_tokenizer(model_dir)
    load_adapters(backbone, args.checkpoint)
    backbone.eval()
    names = args.tasks.split(",") if args.tasks else cfg["task_names"]
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    results = {}
    for task in names:
        examples = load_task(task, args.data_dir or cfg["data_dir"], "test")[: args.limit]
        tid = cfg["task_names"].index(task) if task in cfg["task_names"] else 0
        results[task] = generation_accuracy(backbone, tok, task, examples, tid, args.batch_size, args.max_new_tokens,
                                            args.temperature, args.top_k, args.top_p, generator)
        print(f"{task:14s} accuracy {results[task]['accuracy']:.4f}  ({len(examples)} questions)", flush=True)
    return {"tasks": results, "average": sum(r["accuracy"] for r in results.values()) / max(1, len(results))}


def run(args) -> dict:
    cfg_file = Path(args.checkpoint) / "adapter_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{args.checkpoint}: no adapter_config.json; pass a train.py --out directory")
    cfg = json.loads(cfg_file.read_text())
    model_dir = Path(args.model or cfg["model_dir"])
    generative = cfg.get("bench") == "commonsense"
    results = (evaluate_generation if generative else evaluate_heads)(args, cfg, model_dir)
    out = Path(args.checkpoint) / f"eval-{args.split or 'default'}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return results


def main(argv=None) -> dict:
    """As train.py: an input error is one line on stderr and exit code 2 (--debug: traceback)."""
    args = parse_args(argv)
    try:
        return run(args)
    except INPUT_ERRORS as e:
        if args.debug:
            raise
        text = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
        print(f"error: {' '.join(text.split())}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])

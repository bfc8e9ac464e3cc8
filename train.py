"""Fine-tune one set of adapters (and per-task heads) on several tasks at once.

    python train.py --method more --bench glue            # MiniLM, all 8 GLUE tasks, CPU
    python train.py --method mtl-lora --model weights/llama-2-7b --preset mtl-lora-glue --device cuda
    torchrun --nproc_per_node 4 train.py --fsdp --grad-checkpoint ...   # data-parallel, sharded base

Writes <out>/metrics.json, <out>/adapter.safetensors + adapter_config.json (adapter and
heads), <out>/log.jsonl, <out>/best/ (the best validation step's adapter and heads), with
--save-every N <out>/checkpoint/state.safetensors (continue with --resume), and prints a
per-task table. Under torchrun --batch-size is the global batch, split evenly over the
processes (mtlref/distributed.py); rank 0 alone prints and writes.
Sequences longer than --max-length are truncated by the collate (data/collate.py says which
end each family keeps); a --max-length above the model's maximum positions is an error.
A bad input (unknown method/task, missing or malformed data, unreadable model) prints one
line and exits with code 2 (--debug shows the traceback); a diverged run exits with code 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mtlref import attach_adapters, count_parameters, distributed, load_model, load_tokenizer, save_adapters
from mtlref.adapters import REGISTRY as METHODS
from mtlref.checkpoint import CheckpointError, minilm_dir
from mtlref.data.collate import Encoder, LengthGroupedBatches, eval_batches
from mtlref.data.samplers import SCHEMES, MultiTaskSampler
from mtlref.data.splits import make_splits
from mtlref.data.tasks import SUPERGLUE_TASKS, get_spec, load_jsonl_tasks, load_task, load_tasks
from mtlref.heads import CausalLM, MultiTaskModel, family
from mtlref.evaluate import generation_accuracy
from mtlref.metrics import COMMONSENSE_TASKS, GLUE_TASKS, task_metrics
from mtlref.presets import PRESETS, resolve_targets
from mtlref.tokenizer import TokenizerError
from mtlref.train import PRECISIONS, DivergenceError, LoopConfig, fit, predict, seed_everything

BENCHES = {"glue": list(GLUE_TASKS), "superglue": list(SUPERGLUE_TASKS),
           "commonsense": [n for n in COMMONSENSE_TASKS if "train" in get_spec(n).files]}


class Parser(argparse.ArgumentParser):
    def error(self, message):                      # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="more", help=f"one of {sorted(METHODS)}")
    p.add_argument("--bench", default="glue", choices=["glue", "superglue", "commonsense", "jsonl"])
    p.add_argument("--model", default=None, help="model directory (config.json + safetensors); default MiniLM")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--jsonl", default=None, help="with --bench jsonl: train file; --jsonl-dev for the dev file")
    p.add_argument("--jsonl-dev", default=None)
    p.add_argument("--tasks", default=None, help="comma list (default: every task of the bench)")
    p.add_argument("--split", default="dev", choices=["dev", "paper"])
    p.add_argument("--sampler", default=None, choices=list(SCHEMES),
                   help="task sampling (default: the preset's; MoRE Eq. 7 'more' for the cpu preset)")
    p.add_argument("--single-task-batches", action="store_true", help="one task per batch (default: mixed)")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--targets", default=None, help="attention | ffn | attention+ffn | comma list of slot names")
    for name, typ in [("rank", int), ("alpha", float), ("lr", float), ("head-lr", float), ("epochs", float),
                      ("max-steps", int), ("batch-size", int), ("max-length", int), ("warmup-steps", int),
                      ("eval-every", int), ("grad-accum", int), ("dropout", float)]:
        p.add_argument(f"--{name}", type=typ, default=None)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. --option num_up=3 --option tau=0.5")
    p.add_argument("--pooling", default="mean", choices=["mean", "cls", "pooler"])
    p.add_argument("--single-task", action="store_true", help="LoRA-ST: one independent LoRA per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 autocast on CUDA, fp32 on CPU; fp32 turns autocast off on CUDA")
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--length-pool", type=int, default=8,
                   help="sort each pool of N sampled batches by length before batching (1: off)")
    p.add_argument("--eval-limit", type=int, default=200, help="commonsense: test questions generated per task")
    p.add_argument("--out", default=None, help="output directory (default runs/<bench>-<method>)")
    p.add_argument("--save-every", type=int, default=0, help="write <out>/checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute block activations in backward")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the frozen base (FSDP2)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    return p.parse_args(argv)


def option_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def settings(args) -> dict:
    """Command line over preset over the preset's per-method values."""
    preset = dict(PRESETS[args.preset])
    per_method = preset.pop("methods").get("lora-st" if args.single_task else args.method, {})
    s = {**preset, **{k: v for k, v in per_method.items() if k != "options"}}
    s["options"] = dict(per_method.get("options", {}))
    for k in ("rank", "alpha", "lr", "head_lr", "epochs", "max_steps", "batch_size", "max_length",
              "warmup_steps", "eval_every", "grad_accum", "dropout", "targets", "sampler"):
        if getattr(args, k) is not None:
            s[k] = getattr(args, k)
    for kv in args.option:
        k, _, v = kv.partition("=")
        s["options"][k] = option_value(v)
    if args.single_task:
        s["options"]["per_task"] = True
    s.setdefault("rank", 8)
    s.setdefault("alpha", 2 * s["rank"])
    return s


def load_data(args) -> tuple[list, dict]:
    """-> (task specs in id order, {task: {"train", "validation", "test"}})."""
    if args.bench == "jsonl":
        if not args.jsonl:
            raise ValueError("--bench jsonl needs --jsonl FILE (lines of task, text, text_pair, label)")
        train = load_jsonl_tasks(args.jsonl)
        dev = load_jsonl_tasks(args.jsonl_dev, specs={t: s for t, (s, _) in train.items()}) if args.jsonl_dev else {}
        specs = [s for s, _ in train.values()]
        splits = {t: {"train": ex, "validation": dev.get(t, (None, ex))[1], "test": dev.get(t, (None, ex))[1]}
                  for t, (_, ex) in train.items()}
        return specs, splits
    names = args.tasks.split(",") if args.tasks else BENCHES[args.bench]
    specs = [get_spec(n) for n in names]
    if args.bench == "commonsense":                        # LLM-Adapters: train on train.json, score test.json
        data = {n: {s: load_task(n, args.data_dir, s) for s in ("train", "test")} for n in names}
        return specs, {n: {"train": d["train"], "validation": d["test"], "test": d["test"]} for n, d in data.items()}
    splits = make_splits(load_tasks(names, args.data_dir), args.split, args.seed)
    if "mnli" in names:                                    # MNLI mismatched, reported beside matched
        splits["mnli_mm"] = {"test": load_task("mnli_mm", args.data_dir, "dev")}
        if args.split == "dev":
            splits["mnli_mm"]["validation"] = splits["mnli_mm"]["test"]
    return specs, splits


def make_evaluator(model, encoder, specs, splits, split: str, batch_size: int, device, precision: str = "auto"):
    """-> evaluate(): metrics of every `split` set. Each rank predicts its shard of a set and the
    predictions are gathered, so every rank computes the same metrics."""
    ids = {s.name: i for i, s in enumerate(specs)}
    by_name = {s.name: s for s in specs}                      # users' jsonl tasks are not in TASKS
    spec = {t: by_name.get(t) or get_spec(t) for t in splits}
    sets = {t: sp[split] for t, sp in splits.items() if sp.get(split)}

    def evaluate() -> dict:
        results = {}
        for task, examples in sets.items():
            tid = ids[spec[task].parent]
            mine = distributed.shard_indices(len(examples))
            idx, preds = predict(model, eval_batches(encoder, tid, split, [examples[i] for i in mine], batch_size),
                                 device, precision)
            merged = {}
            for part in distributed.gather([(mine[i], p) for i, p in zip(idx, preds)]):
                merged.update(part)
            order = sorted(merged)
            results[task] = task_metrics(task, [merged[i] for i in order], [float(examples[i].label) for i in order],
                                         spec[task].metrics)
        return {"tasks": results, "average": float(np.mean([results[s.name][s.main_metric] for s in specs]))}
    return evaluate


def print_table(results: dict, title: str) -> None:
    print(f"\n{title}")
    print(f"{'task':10s} {'main':>8s}  all metrics")
    for task, m in results["tasks"].items():
        print(f"{task:10s} {next(iter(m.values())):8.4f}  " + "  ".join(f"{k} {v:.4f}" for k, v in m.items()))
    print(f"{'average':10s} {results['average']:8.4f}  (mean of the main metrics of the trained tasks)")


def check_lengths(args, s: dict, backbone, model_dir: Path) -> None:
    """The collate truncates to max_length; max_length itself must fit the model's positions."""
    limit = getattr(backbone, "max_positions", None)
    if limit is not None and s["max_length"] > limit:
        if args.max_length is not None:
            raise ValueError(f"--max-length {args.max_length} is more than {model_dir.name} allows "
                             f"(max_position_embeddings {limit}); pass --max-length {limit} or less")
        s["max_length"] = limit                       # the preset's length, capped to the model's


def train(args) -> dict:
    if args.method not in METHODS:
        raise ValueError(f"unknown method {args.method!r}; choose one of {sorted(METHODS)}")
    s = settings(args)
    device = distributed.init_distributed(args.device)
    world, main = distributed.world_size(), distributed.is_main()
    if s["batch_size"] % world:
        raise ValueError(f"--batch-size {s['batch_size']} (the global batch) does not split evenly over {world} "
                         "processes; pass a multiple of the process count")
    if args.fsdp and not torch.distributed.is_initialized():
        raise ValueError("--fsdp shards the base over processes: launch with torchrun --nproc_per_node N")
    seed_everything(args.seed)
    t_start = time.time()
    model_dir = Path(args.model) if args.model else minilm_dir()
    specs, splits = load_data(args)
    on = "cpu" if args.fsdp else device              # FSDP moves each shard to the device as it shards
    backbone = load_model(model_dir, dtype=torch.float32, device=on)
    tok = load_tokenizer(model_dir)
    check_lengths(args, s, backbone, model_dir)
    fam = family(backbone)
    targets = resolve_targets(s["targets"], fam)
    attach_adapters(backbone, args.method, targets, num_tasks=len(specs), rank=s["rank"], alpha=s["alpha"],
                    dropout=s.get("dropout") or 0.0, **s["options"])
    generative = args.bench == "commonsense"
    model = (CausalLM(backbone) if generative else MultiTaskModel(backbone, specs, tok, pooling=args.pooling)).to(on)
    heads = None if generative else {"heads": model.heads}
    trainable, total, percent = count_parameters(model.backbone)
    if args.grad_checkpoint:
        distributed.set_grad_checkpoint(backbone)
    units = distributed.shard_frozen_base(model, device) if args.fsdp else 0
    sizes = {sp.name: len(splits[sp.name]["train"]) for sp in specs}
    batch = s["batch_size"]
    steps = s.get("max_steps") or int(s.get("epochs", 1) * sum(sizes.values()) / (batch * s.get("grad_accum", 1)))
    warmup = s.get("warmup_steps") if s.get("warmup_steps") is not None else int(s.get("warmup_ratio", 0) * steps)
    if main:
        print(f"{args.method} on {fam} ({model_dir.name}): {len(specs)} tasks {sizes}; targets {targets}; "
              f"adapter parameters {trainable:,} ({percent:.3f}% of {total:,}); {steps} steps of {batch}"
              + (f" over {world} processes" if world > 1 else "") + (f" (FSDP, {units} units)" if units else ""))
    encoder = Encoder(tok, fam, s["max_length"])
    sampler = MultiTaskSampler(sizes, s.get("sampler", "proportional"), batch, seed=args.seed,
                               mixed=not args.single_task_batches)          # global batches; ranks split them
    batches = LengthGroupedBatches(sampler, encoder, {t: sp["train"] for t, sp in splits.items() if "train" in sp},
                                   {sp.name: i for i, sp in enumerate(specs)}, pool=args.length_pool, seed=args.seed,
                                   num_replicas=world, rank=distributed.rank())

    out = Path(args.out or f"runs/{args.bench}-{args.method}")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            (out / "log.jsonl").unlink(missing_ok=True)
    extra_config = {"task_names": [sp.name for sp in specs], "bench": args.bench, "pooling": args.pooling,
                    "max_length": s["max_length"], "split": args.split, "seed": args.seed,
                    "model_dir": str(model_dir), "data_dir": args.data_dir, "jsonl": args.jsonl,
                    "jsonl_dev": args.jsonl_dev}
    run = {**extra_config, "method": args.method, "settings": {k: v for k, v in s.items() if k != "eval_every"},
           "sampler": sampler.state_dict(), "world": world, "base": backbone.base_identity}   # checked on resume
    cfg = LoopConfig(max_steps=steps, lr=s["lr"], head_lr=s.get("head_lr"), weight_decay=s.get("weight_decay", 0.0),
                     betas=tuple(s.get("betas", (0.9, 0.999))), warmup_steps=warmup,
                     grad_accum=s.get("grad_accum", 1), eval_every=s.get("eval_every") or 0, device=device,
                     precision=args.precision,
                     fsdp=args.fsdp, save_every=args.save_every, checkpoint_dir=str(out / "checkpoint"),
                     resume=args.resume, extra=run)
    if generative:                                   # generation on the first --eval-limit test questions
        def evaluate():
            res = {sp.name: generation_accuracy(backbone, tok, sp.name, splits[sp.name]["test"][: args.eval_limit],
                                                i, args.eval_batch_size) for i, sp in enumerate(specs)}
            return {"tasks": res, "average": float(np.mean([r["accuracy"] for r in res.values()]))}
        test_eval = evaluate
    else:
        evaluate = make_evaluator(model, encoder, specs, splits, "validation", args.eval_batch_size, device,
                                  args.precision)
        test_eval = make_evaluator(model, encoder, specs, splits, "test", args.eval_batch_size, device, args.precision)
    reported = {}

    def on_best(step, val):
        if main:
            save_adapters(model.backbone, out / "best", extra_modules=heads, extra_config=extra_config)
        same = all(splits[t].get("test") is splits[t].get("validation") for t in val["tasks"])
        reported.update(val if same else test_eval(), step=step)

    fit(model, iter(batches), cfg, evaluate=evaluate, on_best=on_best, log_path=out / "log.jsonl",
        get_state=lambda: {"batches": batches.state_dict(), "reported": reported},
        set_state=lambda st: (batches.load_state_dict(st["batches"]), reported.update(st["reported"])))
    metrics = {"tasks": reported["tasks"], "average": reported["average"], "best_step": reported["step"],
               "split": "test" if args.split == "paper" else "dev", "method": args.method, "model": model_dir.name,
               "trainable_params": trainable, "trainable_percent": percent, "steps": steps,
               "wall_s": round(time.time() - t_start, 1), "settings": {k: v for k, v in s.items()}}
    if main:
        save_adapters(model.backbone, out, extra_modules=heads, extra_config=extra_config)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        print_table(reported, f"{args.method} — {metrics['split']} set, checkpoint of step {reported['step']} "
                              f"({metrics['wall_s']:.0f} s wall)")
        print(f"wrote {out}/metrics.json, {out}/adapter.safetensors, {out}/log.jsonl")
    return metrics


INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, CheckpointError, TokenizerError)


def main(argv=None) -> dict:
    """The error boundary: an input error is one line on stderr and exit code 2, a diverged run
    one line and exit code 1; --debug re-raises them with their tracebacks."""
    args = parse_args(argv)
    try:
        metrics = train(args)
    except (*INPUT_ERRORS, DivergenceError) as e:
        who = f"[rank {distributed.rank()}] " if distributed.world_size() > 1 else ""
        distributed.close_distributed(wait=False)
        if args.debug:
            raise
        text = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
        print(f"{who}error: {' '.join(text.split())}", file=sys.stderr, flush=True)
        raise SystemExit(1 if isinstance(e, DivergenceError) else 2) from None
    distributed.close_distributed()
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])

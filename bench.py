"""What each adapter method costs, measured side by side.

    python bench.py --quick --out bench.json             # a smoke run: bert-tiny fixture, < 1 min on 2 cores
    python bench.py --out bench.json                     # MiniLM (real, 6 layers, hidden 384), batch 16, seq 128
    python bench.py --model weights/llama-2-7b --device cuda --batch-size 8 --seq-len 512 --out bench.json
    python bench.py --config tests/data/llama-2-7b-hf.config.json --device cuda ...   # 7B shape, random weights

Measures (experiments/bench/ says how):
- the training step (forward + backward + AdamW, mixed-task batch) of every method, as a ratio
  to LoRA and to the floor (the frozen base's forward + backward with no adapter), next to the
  MoRE paper's figures and our targets;
- inference latency against batch size: every method unmerged on a mixed-task batch and merged
  for one task where it merges, against the base's own cost, and predict.py's two paths (mixed
  batch; --merged) on MTL-LoRA;
- peak memory per method (a subprocess each) and tokens/s;
- the same LoRA step with transformers + peft when both happen to be importable (they are never
  a dependency); otherwise the JSON says "peer": null and why.
Writes --out (JSON: machine, torch, configuration, every sample), prints Markdown tables, and
draws FILE.png next to --out when matplotlib is importable. On CUDA the base runs under bf16
autocast and clocks are read after torch.cuda.synchronize().
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from experiments.bench.machine import keep_freed_memory, machine
from experiments.bench.memory import measure_memory
from experiments.bench.models import load_base
from experiments.bench.peer import peer_lora
from experiments.bench.report import plot, report
from experiments.bench.settings import METHODS, BenchConfig
from experiments.bench.inference import time_inference
from experiments.bench.timing import floor_mfu, time_training
from mtlref.pretrained import minilm_dir

ROOT = Path(__file__).resolve().parent
QUICK_MODEL = ROOT.parent / "shared" / "weights" / "fixtures" / "bert-tiny"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke-test size: bert-tiny, batch 4, seq 32, 3 repeats")
    p.add_argument("--model", help="checkpoint directory (default: MiniLM; --quick: the bert-tiny fixture)")
    p.add_argument("--config", help="a config.json instead of --model: random weights of that shape, made on the "
                                    "device (speed does not depend on the values)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="the frozen base's dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--targets", default="attention+ffn", help="attention | ffn | attention+ffn | a comma list")
    p.add_argument("--num-tasks", type=int, default=8)
    p.add_argument("--repeats", type=int, help="timed rounds (each runs every method once)")
    p.add_argument("--warmup", type=int, help="untimed rounds first")
    p.add_argument("--infer-batch-sizes", help="comma list (default 1,2,4,...,64; --quick 1,4)")
    p.add_argument("--infer-repeats", type=int, help="timed rounds per batch size (default 7; --quick 2)")
    p.add_argument("--tokenizer", help="the predict rows' tokenizer directory (default: --model's)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc's malloc at its defaults (by default the timing process keeps freed "
                        "memory, see experiments.bench.machine.keep_freed_memory)")
    p.add_argument("--skip-memory", action="store_true", help="no per-method memory subprocesses")
    p.add_argument("--skip-training", action="store_true", help="time inference only (no training table, no peer)")
    p.add_argument("--report", metavar="FILE", help="print the tables of a saved run's JSON and exit (nothing is timed)")
    p.add_argument("--plot", metavar="PNG", help="with --report: (re)draw the run's figure into PNG")
    p.add_argument("--out", help="write the JSON here (and FILE.png when matplotlib is importable)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch.cuda.is_available() is False on this machine")
    return args


def make_config(args) -> BenchConfig:
    quick = args.quick
    model = args.config or args.model or (QUICK_MODEL if quick else minilm_dir())
    if args.config and not Path(args.config).is_file():
        raise SystemExit(f"bench.py: --config {args.config}: no such file")
    if not args.config and not Path(model, "config.json").is_file():
        raise SystemExit(f"bench.py: {model}/config.json not found; pass --model with a checkpoint directory"
                         + (" (--quick reads the bert-tiny fixture in ../shared)" if quick and not args.model else ""))
    cuda = args.device.startswith("cuda")

    def pick(given, quick_value, full_value):
        return given if given is not None else (quick_value if quick else full_value)
    sizes = args.infer_batch_sizes
    return BenchConfig(
        model=str(model), device=args.device, dtype=args.dtype or ("bfloat16" if cuda else "float32"),
        batch_size=pick(args.batch_size, 4, 16), seq_len=pick(args.seq_len, 32, 128), targets=args.targets,
        num_tasks=args.num_tasks, repeats=pick(args.repeats, 3, 9), warmup=pick(args.warmup, 1, 2),
        infer_batch_sizes=[int(b) for b in sizes.split(",")] if sizes else ([1, 4] if quick else
                                                                           [1, 2, 4, 8, 16, 32, 64]),
        infer_repeats=pick(args.infer_repeats, 2, 7), memory_steps=1 if quick else 2, threads=args.threads)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.report:
        res = json.loads(Path(args.report).read_text())
        report(res)
        if args.plot:
            print(plot(res, Path(args.plot))[1], file=sys.stderr)
        return res
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = make_config(args)
    t0 = time.perf_counter()
    allocator = "torch's CUDA caching allocator" if cfg.device.startswith("cuda") else \
        "system allocator (--system-malloc)" if args.system_malloc else keep_freed_memory()
    res = {"schema": 2, "command": "python bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": dict(machine(cfg.device), allocator=allocator), "config": asdict(cfg),
           "methods": {n: dict(o) for n, o in METHODS.items()}}
    base = load_base(cfg)
    if args.skip_training:
        res.update(training=None, peer=None, peer_reason="not timed (--skip-training)", floor_mfu=None)
    else:
        peer, reason = peer_lora(cfg, base)
        res["training"] = time_training(cfg, base, {"peer-lora": peer} if peer else None)
        res["peer"] = {"library": reason, "vs_lora": res["training"]["peer-lora"]["vs_lora"]} if peer else None
        res["peer_reason"] = reason
        res["floor_mfu"] = floor_mfu(cfg, base, res["training"]["floor"]["seconds"]["median"])
    res["inference"] = time_inference(cfg, base, args.tokenizer or cfg.model)
    del base
    res["memory"] = None if args.skip_memory else measure_memory(cfg)
    res["memory_how"] = None if args.skip_memory else next(iter(res["memory"].values()))["method"]
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    res["elapsed_s"] = time.perf_counter() - t0
    res["plot"], res["plot_note"] = (None, "no --out given") if not args.out else \
        plot(res, Path(args.out).with_suffix(".png"))
    report(res)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()

"""What each adapter method costs, measured side by side.

    python bench.py --quick --out bench.json             # a smoke run: bert-tiny fixture, < 1 min on 2 cores
    python bench.py --out bench.json                     # MiniLM (real, 6 layers, hidden 384), batch 16, seq 128
    python bench.py --model weights/llama-2-7b --device cuda --batch-size 8 --seq-len 512 --out bench.json
    python bench.py --config tests/data/llama-2-7b-hf.config.json --device cuda ...   # 7B shape, random weights

Measures (mtlref/bench.py says how):
- the training step (forward + backward + AdamW, mixed-task batch) of every method, as a ratio
  to LoRA and to the floor (the frozen base's forward + backward with no adapter), next to the
  MoRE paper's figures and our targets;
- inference latency against batch size: merged LoRA, unmerged LoRA, MTL-LoRA on a mixed-task
  batch and merged for one task, MoRE and MoELoRA;
- peak memory per method (a subprocess each) and tokens/s;
- the same LoRA step with transformers + peft when both happen to be importable (they are never
  a dependency); otherwise the JSON says "peer": null and why.
Writes --out (JSON: machine, torch, configuration, every sample), prints Markdown tables, and
draws FILE.png next to --out when matplotlib is importable. On CUDA the base runs under bf16
autocast and clocks are read after torch.cuda.synchronize().
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mtlref.checkpoint import minilm_dir
from mtlref import bench
from mtlref.heads import family
from mtlref.presets import resolve_targets

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
    p.add_argument("--infer-repeats", type=int)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc's malloc at its defaults (by default the timing process keeps freed "
                        "memory, see mtlref.bench.keep_freed_memory)")
    p.add_argument("--skip-memory", action="store_true", help="no per-method memory subprocesses")
    p.add_argument("--report", metavar="FILE", help="print the tables of a saved run's JSON and exit (nothing is timed)")
    p.add_argument("--out", help="write the JSON here (and FILE.png when matplotlib is importable)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch.cuda.is_available() is False on this machine")
    return args


def make_config(args) -> bench.BenchConfig:
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
    return bench.BenchConfig(
        model=str(model), device=args.device, dtype=args.dtype or ("bfloat16" if cuda else "float32"),
        batch_size=pick(args.batch_size, 4, 16), seq_len=pick(args.seq_len, 32, 128), targets=args.targets,
        num_tasks=args.num_tasks, repeats=pick(args.repeats, 3, 9), warmup=pick(args.warmup, 1, 2),
        infer_batch_sizes=[int(b) for b in sizes.split(",")] if sizes else ([1, 4] if quick else
                                                                           [1, 2, 4, 8, 16, 32, 64]),
        infer_repeats=pick(args.infer_repeats, 2, 5), memory_steps=1 if quick else 2, threads=args.threads)


# ----------------------------------------------------------------------------- peer
def peer_lora(cfg: bench.BenchConfig, base) -> tuple[object | None, str]:
    """(a training-step closure for transformers + peft LoRA on the same checkpoint, batch,
    loss, rank, alpha and targets, or None; why). Runs in eval mode: no dropout, as ours."""
    missing = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        return None, f"{' and '.join(missing)} not importable here (never a dependency of mtlref)"
    try:
        return build_peer(cfg, base)
    except Exception as e:                     # a peer that cannot load this checkpoint is reported, not fatal
        return None, f"transformers + peft are importable but failed on {cfg.model}: {type(e).__name__}: {e}"


def build_peer(cfg: bench.BenchConfig, base) -> tuple[object, str]:
    import peft
    import transformers
    fam = family(base)
    auto = {"bert": transformers.AutoModel, "t5": transformers.AutoModelForSeq2SeqLM}.get(
        fam, transformers.AutoModelForCausalLM)
    if Path(cfg.model).is_file():          # random weights: the peer gets ours (the keys are Hugging Face's)
        with torch.device(cfg.device):     # initialised on the device (a 7B init on the CPU takes minutes)
            hf = auto.from_config(transformers.AutoConfig.from_pretrained(cfg.model),
                                  torch_dtype=getattr(torch, cfg.dtype))
        hf.load_state_dict(base.state_dict(), strict=False)         # our values (speed does not depend on them)
    else:
        hf = auto.from_pretrained(cfg.model, torch_dtype=getattr(torch, cfg.dtype)).to(cfg.device)
    lora = bench.METHODS["lora"]
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                                                 target_modules=resolve_targets(cfg.targets, fam)))
    hf.eval()
    batch = bench.make_batch(base, cfg.batch_size, cfg.seq_len, cfg.num_tasks, cfg.device, seed=cfg.seed)
    head = bench.head_for(base, cfg)
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with bench.autocast(cfg.device):
            kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            if fam == "t5":
                kw["decoder_input_ids"] = batch["decoder_input_ids"]
            out = hf(**kw)
        out = out.last_hidden_state if fam == "bert" else out.logits
        bench.task_loss(out, batch, fam, head).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, f"transformers {transformers.__version__} + peft {peft.__version__}"


# ----------------------------------------------------------------------------- report
def fmt_ratio(r: dict) -> str:
    return f"{r['median']:.2f} ({r['q1']:.2f}–{r['q3']:.2f})"


def training_table(res: dict) -> str:
    mem = res.get("memory") or {}
    lines = ["| method | trainable | step ms (IQR) | tokens/s | × floor | × LoRA | paper × LoRA | target | met | "
             "peak MB (Δ) |", "|---|---:|---|---:|---|---|---:|---|---|---|"]
    for name, row in res["training"].items():
        s, tgt = row["seconds"], row.get("target")
        m = mem.get(name)
        lines.append("| " + " | ".join([
            name, f"{row.get('trainable_params', 0):,}" if "trainable_params" in row else "–",
            f"{1e3 * s['median']:.1f} ({1e3 * s['q1']:.1f}–{1e3 * s['q3']:.1f})", f"{row['tokens_per_s']:,.0f}",
            fmt_ratio(row["vs_floor"]), fmt_ratio(row["vs_lora"]),
            f"{row['paper_vs_lora']:.1f}" if row["paper_vs_lora"] else "–",
            f"≤ {tgt['max_ratio']:.2f} × {tgt['reference']}" if tgt else "stated",
            ("yes" if tgt["met"] else "**no**") if tgt else "–",
            f"{m['peak_mb']:.0f} ({m['delta_mb']:+.0f})" if m else "–"]) + " |")
    return "\n".join(lines)


def inference_table(res: dict) -> str:
    sizes = list(next(iter(res["inference"].values())))
    lines = ["| variant | " + " | ".join(f"b={b} ms (× merged)" for b in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for name, rows in res["inference"].items():
        cells = [f"{1e3 * rows[b]['seconds']['median']:.1f} ({rows[b]['vs_lora_merged']['median']:.2f})" for b in sizes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> tuple[str | None, str]:
    if importlib.util.find_spec("matplotlib") is None:
        return None, "matplotlib not importable; no plot drawn"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(res["training"])
    a.bar(names, [res["training"][n]["vs_lora"]["median"] for n in names])
    a.axhline(1.0, color="k", lw=0.8)
    a.set_ylabel("training step / LoRA")
    a.tick_params(axis="x", rotation=45)
    for name, rows in res["inference"].items():
        sizes = [int(s) for s in rows]
        b.plot(sizes, [1e3 * rows[str(s)]["seconds"]["median"] for s in sizes], marker="o", label=name)
    b.set_xscale("log", base=2)
    b.set_xlabel("batch size")
    b.set_ylabel("forward latency, ms")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path), "drawn with matplotlib"


def report(res: dict) -> None:
    """Print the run's tables (markdown) from its JSON alone: `python bench.py --report FILE`
    regenerates them from a saved run, which is how docs/BENCHMARKS.md gets its tables."""
    cfg, m = res["config"], res["machine"]
    path = Path(cfg["model"])
    name = path.parent.name if path.name == "model" else path.name          # MiniLM's package keeps it in model/
    print(f"## {name} on {cfg['device']} ({m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch "
          f"threads, torch {m['torch']}); batch {cfg['batch_size']} × seq {cfg['seq_len']}, targets {cfg['targets']}, "
          f"{cfg['num_tasks']} tasks, {cfg['repeats']} rounds\n")
    print(training_table(res) + "\n")
    print("Peer (transformers + peft LoRA): " + (fmt_ratio(res["peer"]["vs_lora"]) + " × ours" if res["peer"] else
                                                 f"none ({res['peer_reason']})") + "\n")
    if res["floor_mfu"]:
        f = res["floor_mfu"]
        print(f"Floor: {f['model_flops_per_s'] / 1e12:.0f} model TFLOP/s on {f['gpu']}"
              + (f", {100 * f['mfu']:.0f} % of its bf16 peak ({f['bf16_peak'] / 1e12:.0f} TFLOP/s)" if f["mfu"] else "")
              + "\n")
    print(inference_table(res))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.report:
        res = json.loads(Path(args.report).read_text())
        report(res)
        return res
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = make_config(args)
    t0 = time.perf_counter()
    allocator = "torch's CUDA caching allocator" if cfg.device.startswith("cuda") else \
        "system allocator (--system-malloc)" if args.system_malloc else bench.keep_freed_memory()
    res = {"schema": 1, "command": "python bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": dict(bench.machine(cfg.device), allocator=allocator), "config": asdict(cfg),
           "methods": {n: dict(o) for n, o in bench.METHODS.items()}}
    base = bench.load_base(cfg)
    peer, reason = peer_lora(cfg, base)
    res["training"] = bench.time_training(cfg, base, {"peer-lora": peer} if peer else None)
    res["peer"] = {"library": reason, "vs_lora": res["training"]["peer-lora"]["vs_lora"]} if peer else None
    res["peer_reason"] = reason
    res["floor_mfu"] = bench.floor_mfu(cfg, base, res["training"]["floor"]["seconds"]["median"])
    res["inference"] = bench.time_inference(cfg, base)
    del base
    res["memory"] = None if args.skip_memory else bench.measure_memory(cfg)
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

"""A bench run's Markdown tables and figure, from its JSON alone: what bench.py prints after a
run and `python bench.py --report FILE` reprints from a saved one (docs/BENCHMARKS.md's tables)."""
from __future__ import annotations

import importlib.util
from pathlib import Path


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

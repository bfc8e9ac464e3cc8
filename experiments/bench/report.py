"""A bench run's Markdown tables and figure, from its JSON alone: what bench.py prints after a
run and `python bench.py --report FILE` reprints from a saved one (docs/BENCHMARKS.md's tables)."""
from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

from experiments.bench.inference import BASE, merged_copy


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


def inference_variants(res: dict) -> tuple[dict, str]:
    """{variant: {batch size: row}} and the key of the ratio to the base (older runs, schema 1:
    the variants at the top level and the ratio to merged LoRA under vs_lora_merged)."""
    inf = res["inference"]
    return (inf["variants"], "vs_base") if "variants" in inf else (inf, "vs_lora_merged")


def ratio_cells(rows: dict, key: str) -> list[str]:
    return [fmt_ratio(r[key]) for r in rows.values()]


def inference_table(res: dict) -> str:
    variants, key = inference_variants(res)
    sizes = list(variants[next(iter(variants))])
    head = "| variant | " + " | ".join(f"b={b}" for b in sizes) + " |\n|---|" + "---|" * len(sizes)
    lines = [f"Forward ms (median), and × base: median (quartiles) of the paired per-round ratios; "
             f"{res['config']['infer_repeats']} rounds per batch size after 1 untimed", "", head]
    for name, rows in variants.items():
        cells = [f"{1e3 * r['seconds']['median']:.1f} · {fmt_ratio(r[key])}" for r in rows.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if key == "vs_base":
        lines += ["", "Unmerged on a mixed-task batch, × unmerged LoRA (paired per round)", "", head]
        lines += [f"| {n} | " + " | ".join(ratio_cells(rows, "vs_lora")) + " |" for n, rows in variants.items()
                  if not n.endswith("merged") and n != BASE]
        spread = identical_spread(variants)
        lines += ["", f"predict rows: {res['inference']['predict']}", "identical computations (the base and its "
                  f"{next(iter(spread.values()))[2] - 1} merged copies), lowest–highest median over their pooled median: "
                  + ", ".join(f"b={b} {lo:.2f}–{hi:.2f}" for b, (lo, hi, _) in spread.items())]
        lines += target_lines(res["inference"]["targets"])
    return "\n".join(lines)


def identical_spread(variants: dict) -> dict[str, tuple[float, float, int]]:
    """Per batch size: the base and every merged copy run the same GEMMs on the same shapes (only
    the weights' values differ), so the spread of their medians is this run's noise floor:
    (lowest, highest) median over their pooled median, and how many they are."""
    same = [n for n in variants if n == BASE or merged_copy(n)]
    out = {}
    for b in variants[same[0]]:
        meds = [variants[n][b]["seconds"]["median"] for n in same]
        mid = statistics.median(meds)
        out[b] = (min(meds) / mid, max(meds) / mid, len(meds))
    return out


def quartile_bars(stats: list[dict]) -> list[list[float]]:
    """matplotlib's yerr for medians drawn with their quartiles."""
    return [[s["median"] - s["q1"] for s in stats], [s["q3"] - s["median"] for s in stats]]


def target_lines(t: dict) -> list[str]:
    missed = {n: [b for b, ok in rows.items() if not ok] for n, rows in t["merged_within_noise"].items()}
    lines = ["merged within noise of the base (1 inside the quartiles, or the median within 3 %) at every "
             "batch size: " + ("yes, " + ", ".join(missed) if not any(missed.values()) else
                               "**no**: " + "; ".join(f"{n} at b={','.join(b)}" for n, b in missed.items() if b))]
    for n, u in t["unmerged_vs_lora"].items():
        lines.append(f"{n} unmerged at b={u['batch_size']}: {u['vs_lora']:.2f} × unmerged LoRA, target ≤ "
                     f"{u['max']:.2f}: {'met' if u['met'] else '**missed**'}")
    return lines


def plot(res: dict, path: Path) -> tuple[str | None, str]:
    if importlib.util.find_spec("matplotlib") is None:
        return None, "matplotlib not importable; no plot drawn"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    variants, key = inference_variants(res)
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(18, 4.5))
    names = list(res["training"] or {})
    r = [res["training"][n]["vs_lora"] for n in names]
    a.bar(names, [x["median"] for x in r], yerr=quartile_bars(r), capsize=2)
    a.axhline(1.0, color="k", lw=0.8)
    a.set_ylabel("training step / LoRA (median, quartiles)")
    a.tick_params(axis="x", rotation=60)
    methods = list(dict.fromkeys(n.removesuffix("-merged") for n in variants))
    colour = dict(zip(methods, plt.get_cmap("tab20").colors))     # a method and its merged copy share a colour
    for name, rows in variants.items():
        sizes = [int(s) for s in rows]
        style = dict(ls="--" if name.endswith("merged") else "-", color=colour[name.removesuffix("-merged")],
                     marker="o", ms=3, label=name)
        b.plot(sizes, [1e3 * r["seconds"]["median"] for r in rows.values()], **style)
        ratios = [r[key] for r in rows.values()]
        c.errorbar(sizes, [x["median"] for x in ratios], yerr=quartile_bars(ratios), capsize=2, **style)
    for ax in (b, c):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
    b.set_yscale("log")
    b.set_ylabel("forward latency, ms")
    c.axhline(1.0, color="k", lw=0.8)
    c.set_ylabel("latency / base (median, quartiles)")
    c.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
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
          f"threads, torch {m['torch']}); " + (f"batch {cfg['batch_size']} × " if res["training"] else "")
          + f"seq {cfg['seq_len']}, targets {cfg['targets']}, {cfg['num_tasks']} tasks, "
          + (f"{cfg['repeats']} rounds\n" if res["training"] else "inference only\n"))
    print((training_table(res) if res["training"] else "Training: not timed (--skip-training)") + "\n")
    print("Peer (transformers + peft LoRA): " + (fmt_ratio(res["peer"]["vs_lora"]) + " × ours" if res["peer"] else
                                                 f"none ({res['peer_reason']})") + "\n")
    if res["floor_mfu"]:
        f = res["floor_mfu"]
        print(f"Floor: {f['model_flops_per_s'] / 1e12:.0f} model TFLOP/s on {f['gpu']}"
              + (f", {100 * f['mfu']:.0f} % of its bf16 peak ({f['bf16_peak'] / 1e12:.0f} TFLOP/s)" if f["mfu"] else "")
              + "\n")
    print(inference_table(res))

"""Two versions of the code side by side: each method's step time relative to LoRA, pooled over
the rounds of one or more bench.py runs of each version (a ratio is paired within its round, so
drift in the machine's load falls on both of its terms).

    python -m experiments.bench.ab --a docs/bench/refactor-ab/base-*.json --b docs/bench/refactor-ab/head-*.json

Run the versions alternately (A, B, A, B) on one machine: ratios move between machines, and the
alternation spreads a slow stretch of the machine over both.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def pooled_ratios(files: list[Path]) -> dict[str, list[float]]:
    """{method: every per-round ratio method / LoRA over the files' rounds}."""
    out: dict[str, list[float]] = {}
    for f in files:
        training = json.loads(Path(f).read_text())["training"]
        lora = training["lora"]["samples"]
        for method, r in training.items():
            out.setdefault(method, []).extend(s / ref for s, ref in zip(r["samples"], lora))
    return out


def quartiles(values: list[float]) -> str:
    return f"{np.median(values):.2f} ({np.percentile(values, 25):.2f}–{np.percentile(values, 75):.2f})"


def table(a: dict[str, list[float]], b: dict[str, list[float]], names=("A", "B")) -> list[str]:
    """Markdown rows: method, A's median ratio (IQR), B's, and the rounds each pools."""
    lines = [f"| method | {names[0]} × LoRA (IQR) | {names[1]} × LoRA (IQR) | rounds |", "|---|---|---|---|"]
    for m in a:
        if m in b:
            lines.append(f"| {m} | {quartiles(a[m])} | {quartiles(b[m])} | {len(a[m])} / {len(b[m])} |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", nargs="+", type=Path, required=True, help="version A's bench.py JSON files")
    p.add_argument("--b", nargs="+", type=Path, required=True, help="version B's bench.py JSON files")
    p.add_argument("--names", default="A,B", help="the two columns' names (default A,B)")
    args = p.parse_args(argv)
    print("\n".join(table(pooled_ratios(args.a), pooled_ratios(args.b), args.names.split(","))))


if __name__ == "__main__":
    main()

"""The papers' parameter tables, from a config.json alone.

    python -m mtlref.params --config weights/llama-2-7b/config.json --preset mtl-lora-glue
    python -m mtlref.params --config t5-base.json --preset more-glue --method more --num-tasks 8

The model is built on the meta device (no weights, no memory), each method is attached as the
preset says (rank, targets, options; LoRA-ST as one LoRA per task), and the table lists the
adapter parameters (heads not included: they are the same for every method), how many of them
train (MoRE's official mode freezes its gate), the trainable share of the base model, of a
nominal size (--nominal, e.g. 7e9: MTL-LoRA Table 1 divides by 7·10⁹, see docs/PROTOCOLS.md),
and the adapter parameters per task (MoRE Table 2's "params/task": the total over T tasks).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mtlref.adapters import count_parameters
from mtlref.pretrained import family_module
from mtlref.heads import family
from mtlref.objective import attach, objective_of
from mtlref.presets import PRESETS
from mtlref.settings import FLAG_KEYS, Settings, settings


def meta_model(cfg: dict):
    """The base model of config.json `cfg` on the meta device."""
    fam = family_module(cfg)
    with torch.device("meta"):
        return fam.Model(fam.Config.from_hf(cfg))


def method_settings(preset: str, method: str, fam: str, options: list[str] = (), **flags) -> Settings:
    """run.settings for `method` under `preset` ("lora-st": --single-task) with these flags."""
    single = method == "lora-st"
    args = argparse.Namespace(preset=preset, method="lora" if single else method, single_task=single,
                              option=list(options), **{k: flags.get(k) for k in FLAG_KEYS})
    return settings(args, fam)


def count(cfg: dict, preset: str, method: str, num_tasks: int = 8, bench: str = "glue",
          options: list[str] = (), **flags) -> dict:
    """{method, adapter, trainable, base, percent, per_task} of one method attached as `preset`
    (and the train.py flags given, e.g. rank=16, targets="attention") says."""
    model = meta_model(cfg)
    fam = family(model)
    s = method_settings(preset, method, fam, options, **flags)
    objective = objective_of(s, fam, bench)
    if method == "lora-st":
        s.options["per_task"] = True
    attach(model, "lora" if method == "lora-st" else method, s, num_tasks, objective, meta_ok=True)
    trainable, total, _ = count_parameters(model)
    adapter = sum(p.numel() for n, p in model.named_parameters() if ".adapter." in "." + n)
    base = total - adapter
    return {"method": method, "adapter": adapter, "trainable": trainable, "base": base,
            "percent": 100.0 * trainable / base, "per_task": adapter / num_tasks, "rank": s.rank,
            "options": s.options}


def table(config: str | Path, preset: str, methods: list[str] | None = None, num_tasks: int = 8,
          nominal: float | None = None, bench: str = "glue", options: list[str] = (), **flags) -> list[dict]:
    cfg = json.loads(Path(config).read_text())
    methods = methods or list(PRESETS[preset]["methods"])
    rows = [count(cfg, preset, m, num_tasks, bench, options, **flags) for m in methods]
    for r in rows:
        r["nominal_percent"] = 100.0 * r["trainable"] / nominal if nominal else None
    return rows


def print_table(rows: list[dict], title: str) -> None:
    print(title)
    print(f"{'method':12s} {'adapter':>13s} {'trainable':>13s} {'% of base':>10s} {'% nominal':>10s} "
          f"{'per task':>10s}")
    for r in rows:
        nominal = f"{r['nominal_percent']:10.3f}" if r["nominal_percent"] is not None else f"{'-':>10s}"
        print(f"{r['method']:12s} {r['adapter']:13,d} {r['trainable']:13,d} {r['percent']:10.3f} {nominal} "
              f"{r['per_task'] / 1e6:9.3f}M")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a model's config.json")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--method", default=None, help="comma list (default: every method of the preset; "
                                                  "lora-st = one LoRA per task)")
    p.add_argument("--num-tasks", type=int, default=8, help="tasks T (GLUE: 8)")
    p.add_argument("--nominal", type=float, default=None, help="also divide by this size, e.g. 7e9")
    p.add_argument("--bench", default="glue", help="glue | commonsense (picks T5's objective as train.py)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a method option")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--targets", default=None, help="as train.py's --targets")
    args = p.parse_args(argv)
    rows = table(args.config, args.preset, args.method.split(",") if args.method else None, args.num_tasks,
                 args.nominal, args.bench, args.option, rank=args.rank, targets=args.targets)
    print_table(rows, f"{args.config} — preset {args.preset}, T = {args.num_tasks}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])

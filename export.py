"""Serve what you train: write a run's per-task adapters in peft's LoRA format, or a task's
merged Hugging Face checkpoint.

    python export.py --checkpoint runs/glue-more --task rte --format peft --out exports/rte
    python export.py --checkpoint runs/glue-more --task all --format peft --out exports   # exports/<task>/
    python export.py --checkpoint runs/glue-lora --task rte --format merged --out merged/rte

--format peft writes adapter_config.json + adapter_model.safetensors (PeftModel.from_pretrained
and multi-LoRA servers read them; --uniform-rank pads MoRE's per-module ranks to one r for
servers that read one r), and, for runs with per-task heads, head.safetensors + head_config.json
in mtlref's own format beside them. --format merged folds the task's ΔW into the base and writes
config.json + model.safetensors (sharded above --max-shard-gb) + the tokenizer files. The work
is mtlref/export.py; this file only reads the command line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from mtlref.export import export_head, export_merged, export_peft
from mtlref.run import cli, load_run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a train.py --out directory")
    p.add_argument("--task", required=True, help="a task of the run, or all (one directory per task)")
    p.add_argument("--format", default="peft", choices=["peft", "merged"])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="the base model directory (default: the run's)")
    p.add_argument("--base-model-name", default=None,
                   help="base_model_name_or_path to write (default: the base model directory)")
    p.add_argument("--prefix", default="", help='module path prefix of the class that will load it, e.g. "bert."')
    p.add_argument("--uniform-rank", action="store_true", help="pad every module to the largest rank")
    p.add_argument("--attention-only", action="store_true",
                   help="mixlora: export the attention LoRAs and leave the FFN experts out")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="--format merged: shard above this size")
    p.add_argument("--device", default="cpu")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def export(args) -> list[Path]:
    cfg, specs, backbone, model, _ = load_run(args.checkpoint, args.model, args.device)
    names = [s.name for s in specs]
    if args.task != "all" and args.task not in names:
        raise ValueError(f"{args.checkpoint}: no task {args.task!r}; the run's tasks are {names} (or all)")
    model_dir = Path(args.model or cfg["model_dir"])
    written = []
    for t, name in enumerate(names):
        if args.task not in ("all", name):
            continue
        out = Path(args.out) / name if args.task == "all" else Path(args.out)
        if args.format == "merged":
            export_merged(backbone, t, out, model_dir, int(args.max_shard_gb * 2 ** 30))
        else:
            export_peft(backbone, t, out, base_model_name_or_path=args.base_model_name or str(model_dir),
                        prefix=args.prefix, attention_only=args.attention_only, uniform_rank=args.uniform_rank)
        if hasattr(model, "heads"):
            export_head(model, t, out, cfg.get("pooling", "mean"))
        if args.attention_only:
            print(f"{name}: wrote the attention LoRAs only; the MixLoRA FFN experts are not in {out}")
        print(f"{name}: wrote {out}")
        written.append(out)
    return written


def main(argv=None) -> list[Path]:
    return cli(export, parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])

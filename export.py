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
is mtlref/export.py, the flags mtlref/commands.py's export_args; this file only calls them.
"""
from __future__ import annotations

import sys

from mtlref.commands import export_main


def main(argv=None):
    return export_main(argv, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])

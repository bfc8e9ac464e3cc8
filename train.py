"""Fine-tune one set of adapters (and per-task heads) on several tasks at once.

    python train.py --method more --bench glue            # MiniLM, all 8 GLUE tasks, CPU
    python train.py --method more --preset more-glue --model weights/t5-base --device cuda   # MoRE §5.1
    python train.py --method mtl-lora --model weights/llama-2-7b --preset mtl-lora-glue --device cuda
    python train.py --method lora --single-task --preset mtl-lora-glue ...      # LoRA-ST, each task alone
    torchrun --nproc_per_node 4 train.py --fsdp --grad-checkpoint ...   # data-parallel, sharded base

The experiment itself is mtlref/run.py (settings -> data -> model and adapters -> loop ->
evaluation -> outputs; LoRA-ST: mtlref/lora_st.py), its flags mtlref/commands.py's train_args;
this file only calls them. Writes <out>/metrics.json,
<out>/adapter.safetensors + adapter_config.json (the reported step's adapters and heads: the
best validation step's, also in <out>/best/; the final step's in <out>/last/ when it is another),
<out>/log.jsonl, with --save-every N <out>/checkpoint/state.safetensors (continue with
--resume), and prints a per-task table. LoRA-ST writes each task's run to <out>/tasks/<task>/.
Under torchrun --batch-size is the global batch, split evenly over the processes; rank 0
alone prints and writes. A bad input (unknown method/task, missing or malformed data,
unreadable model) prints one line and exits with code 2 (--debug shows the traceback); a
diverged run exits with code 1, and so does a failed write (a full disk): one line naming the
file and the cause; every file is replaced atomically, so the previous checkpoint and results
stay intact and --resume continues.
"""
from __future__ import annotations

import os
import sys

# OpenMP threads that wait for work spin before they sleep (GNU OpenMP: 300,000 turns by default).
# On a shared 2-core machine a spinning thread takes the core another process needs and the run
# collapses (docs/BENCHMARKS.md: 637 tokens/s beside one busy process, its fair share ~960); a
# short spin keeps the quiet speed (1,900 vs 1,927 tokens/s) and gives the fair share (974). It
# must be set before torch starts its OpenMP runtime, hence here, before `import torch`.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from mtlref.commands import train_main  # noqa: E402


def main(argv=None):
    return train_main(argv, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])

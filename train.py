"""Fine-tune one set of adapters (and per-task heads) on several tasks at once.

    python train.py --method more --bench glue            # MiniLM, all 8 GLUE tasks, CPU
    python train.py --method more --preset more-glue --model weights/t5-base --device cuda   # MoRE §5.1
    python train.py --method mtl-lora --model weights/llama-2-7b --preset mtl-lora-glue --device cuda
    python train.py --method lora --single-task --preset mtl-lora-glue ...      # LoRA-ST, each task alone
    torchrun --nproc_per_node 4 train.py --fsdp --grad-checkpoint ...   # data-parallel, sharded base

The experiment itself is mtlref/run.py (settings -> data -> model and adapters -> loop ->
evaluation -> outputs); this file only reads the command line. Writes <out>/metrics.json,
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

import argparse
import os
import sys

# OpenMP threads that wait for work spin before they sleep (GNU OpenMP: 300,000 turns by default).
# On a shared 2-core machine a spinning thread takes the core another process needs and the run
# collapses (docs/BENCHMARKS.md: 637 tokens/s beside one busy process, its fair share ~960); a
# short spin keeps the quiet speed (1,900 vs 1,927 tokens/s) and gives the fair share (974). It
# must be set before torch starts its OpenMP runtime, hence here, before `import torch`.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import torch  # noqa: E402

from mtlref.adapters import REGISTRY as METHODS  # noqa: E402
from mtlref.data.samplers import SCHEMES  # noqa: E402
from mtlref.presets import PRESETS  # noqa: E402
from mtlref.run import OBJECTIVES, cli, train  # noqa: E402
from mtlref.train import PRECISIONS  # noqa: E402


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
    p.add_argument("--jsonl-dev", default=None,
                   help="with --bench jsonl: the dev file (default: 10%% of each task is held out as dev)")
    p.add_argument("--tasks", default=None, help="comma list (default: every task of the bench)")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                   help="the papers' settings (mtlref/presets.py); flags override them")
    p.add_argument("--split", default=None, choices=["dev", "paper"],
                   help="dev: validation = test = the dev sets; paper: MoRE Appendix A (default: the preset's)")
    p.add_argument("--sampler", default=None, choices=list(SCHEMES),
                   help="task sampling (default: the preset's, else proportional)")
    p.add_argument("--batches", default=None, choices=["mixed", "single-task"],
                   help="mixed-task or single-task batches (default: the preset's, else mixed)")
    p.add_argument("--single-task-batches", dest="batches", action="store_const", const="single-task",
                   help="the same as --batches single-task")
    p.add_argument("--objective", default=None, choices=OBJECTIVES,
                   help="auto: T5 text-to-text (gen, MoRE Eq. 9), per-task heads (head) for the others")
    p.add_argument("--targets", default=None, help="attention | ffn | attention+ffn | comma list of slot names")
    for name, typ in [("rank", int), ("alpha", float), ("lr", float), ("head-lr", float), ("epochs", float),
                      ("max-steps", int), ("batch-size", int), ("max-length", int), ("warmup-steps", int),
                      ("eval-every", int), ("grad-accum", int), ("dropout", float), ("weight-decay", float)]:
        p.add_argument(f"--{name}", type=typ, default=None)
    p.add_argument("--lambda-con", type=float, default=None, help="λ of MoRE Eq. 10 (weight of L_con)")
    p.add_argument("--balance-weight", type=float, default=None, help="weight of MixLoRA's load-balancing loss")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. --option num_up=3 --option tau=0.5 (see each method's docstring)")
    p.add_argument("--pooling", default="mean", choices=["mean", "cls", "pooler"])
    p.add_argument("--single-task", action="store_true",
                   help="LoRA-ST: each task trained alone with its own LoRA, optimizer and budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-examples", type=int, default=None, metavar="K",
                   help="k-shot: train on K examples per task, drawn with --seed (MoRE Table 4: k = 4, 16, 32)")
    p.add_argument("--init-from", default=None, metavar="RUN",
                   help="start the adapters from a train.py --out directory (few-shot transfer, MoRE §5.1)")
    p.add_argument("--task-init", default=None, metavar="NEW=SAVED,...",
                   help="with --init-from: the saved task whose per-task tensors (MoRE's task embedding, "
                        "MTL-LoRA's Λ_t and w_t, ...) start each new task, e.g. cb=mnli,superglue_boolq=qnli")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 autocast on CUDA, fp32 on CPU; fp32 turns it off on CUDA; bf16 turns it on on CPU")
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--max-eval-examples", type=int, default=None,
                   help="score only the first N examples of each validation and test set (quick runs)")
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


def main(argv=None) -> dict:
    return cli(train, parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Reload a trained run (base model + adapter + heads) and evaluate it again.

    python eval.py --checkpoint runs/glue-more                 # the run's own split: same numbers
    python eval.py --checkpoint runs/glue-more --split test    # the held-out split (--split paper runs)
    python eval.py --checkpoint runs/cs-mtl-lora --bench commonsense --tasks boolq,piqa --max-new-tokens 32

Classification/regression runs are scored with their heads, T5 text-to-text runs by greedy
generation parsed back to labels, commonsense runs by generation with the sampler (greedy by
default) and LLM-Adapters' answer: the first match of the task's answer pattern. The work is
mtlref/run.py's evaluate_run; this file only reads the command line.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GOMP_SPINCOUNT", "1000")    # a short OpenMP spin on shared machines: see train.py

import torch  # noqa: E402

from mtlref.run import cli, evaluate_run  # noqa: E402
from mtlref.train import PRECISIONS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a train.py --out directory (adapter_config.json inside)")
    p.add_argument("--split", default=None, choices=["validation", "test"],
                   help="default: what train.py reported (test for --split paper runs, else the dev set)")
    p.add_argument("--data-dir", default=None, help="default: the run's")
    p.add_argument("--model", default=None, help="default: the run's base model directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--tasks", default=None, help="commonsense: comma list of test sets")
    p.add_argument("--limit", type=int, default=None, help="commonsense: first N examples per task")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    return cli(evaluate_run, parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])

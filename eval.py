"""Reload a trained run (base model + adapter + heads) and evaluate it again.

    python eval.py --checkpoint runs/glue-more                 # the run's own split: same numbers
    python eval.py --checkpoint runs/glue-more --split test    # the held-out split (--split paper runs)
    python eval.py --checkpoint runs/cs-mtl-lora --bench commonsense --tasks boolq,piqa --max-new-tokens 32

Classification/regression runs are scored with their heads, T5 text-to-text runs by greedy
generation parsed back to labels, commonsense runs by generation with the sampler (greedy by
default) and LLM-Adapters' answer: the first match of the task's answer pattern. The work is
mtlref/evaluate.py's evaluate_run, the flags mtlref/commands.py's eval_args; this file only calls them.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("GOMP_SPINCOUNT", "1000")    # a short OpenMP spin on shared machines: see train.py

from mtlref.commands import eval_main  # noqa: E402


def main(argv=None):
    return eval_main(argv, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])

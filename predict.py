"""Run a trained set of multi-task adapters on your own rows.

    python predict.py --checkpoint runs/glue-more --input rows.jsonl --out preds.jsonl
    cat rows.jsonl | python predict.py --checkpoint runs/glue-more --input - --scores      # stdin -> stdout
    python predict.py --checkpoint runs/glue-lora --input rows.jsonl --out preds.jsonl --merged --skip-bad

rows.jsonl holds one JSON object a line: {"task": "sst2", "text": "a fine film"}, with "text_pair"
for sentence-pair tasks and an optional "id" that is passed through. Tasks may be mixed; each
output line keeps its row's place: the class name ("label") or the score (regression), the
generated "answer" of T5 text-to-text and commonsense runs, the class probabilities with
--scores. --merged folds each task's ΔW into a copy of the base first (methods that merge). A bad
row stops the run with one line naming file:line and the fix (exit code 2, no output written);
--skip-bad writes it to <out>.rejected.jsonl instead. The work is mtlref/predict.py's (the Python
API: mtlref.load_run(checkpoint).predict(rows)), the flags mtlref/commands.py's predict_args.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("GOMP_SPINCOUNT", "1000")    # a short OpenMP spin on shared machines: see train.py

from mtlref.commands import predict_main  # noqa: E402


def main(argv=None):
    return predict_main(argv, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])

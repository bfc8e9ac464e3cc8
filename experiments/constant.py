"""The best constant predictor of every test set the grids' cells were scored on: what a model
that gives every test example the same answer would score, the floor a cell must clear to have
learned anything the test can see.

    python experiments/constant.py --out experiments/analyses/constant.json

For each distinct test set (experiments.summary.scored_on: bench, tasks, data, split protocol, seed; the
paper split's halves are drawn by the seed) the script loads the data exactly as train.py does
and scores, with train.py's own metric code (mtlref.metrics), every answer in turn:
    classification   each label given to every example; the answer whose main metric is highest
                     (accuracy: the test set's most frequent label; an MCC is 0 for any constant,
                     and the next metric, accuracy, breaks the tie)
    regression       the labels' mean given to every example (Pearson: 0, mtlref.metrics' value
                     for a constant, which has no correlation)
Generation tasks are left out. The average is train.py's: the mean main metric over the trained
tasks (MNLI's mismatched set is reported beside it, not averaged). experiments/report.py puts
the result under each table as a "best constant" row.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from experiments import ROOT
from experiments.summary import data_key, load_results
from mtlref.data.tasks import get_spec
from mtlref.metrics import task_metrics
from mtlref.data.loading import load_data


def best_constant(spec, labels: list[float]) -> dict:
    """{"answer", "n", "main", "metrics"} of the best single answer to all of `labels` (see the
    module text); "main" is the task's main metric, the figure the report shows."""
    answers = [float(np.mean(labels))] if spec.kind == "regression" else sorted(set(labels))
    scored = [(task_metrics(spec.name, [a] * len(labels), labels, spec.metrics), a) for a in answers]
    # the main metric decides, the others break its ties (CoLA: every constant's MCC is 0; the
    # majority label's accuracy is the higher)
    metrics, answer = max(scored, key=lambda ma: (ma[0][spec.main_metric], *ma[0].values()))
    return {"answer": answer, "n": len(labels), "main": metrics[spec.main_metric], "metrics": metrics}


def constants(on: dict, root: Path = ROOT) -> dict:
    """{"tasks": {task: best_constant(...)}, "average"} for one scored_on() dict; the paths in it are
    relative to the repository root, as the cells' commands are."""
    def path(p):
        return None if p is None else str(p if Path(p).is_absolute() else root / p)
    specs, splits = load_data(on["bench"], on["tasks"], path(on["data_dir"]), on["split"], on["seed"],
                              path(on["jsonl"]), path(on["jsonl_dev"]), on["max_eval_examples"])
    names = [s.name for s in specs]
    out = {}
    for task, parts in splits.items():
        spec = specs[names.index(task)] if task in names else get_spec(task)
        if spec.kind != "generation" and parts.get("test"):
            out[task] = best_constant(spec, [float(e.label) for e in parts["test"]])
    scored = [s for s in specs if s.name in out]
    average = (float(np.mean([out[s.name]["main"] for s in scored]))
               if len(scored) == len(specs) else None)
    return {"tasks": out, "average": average}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(ROOT / "experiments" / "results"))
    p.add_argument("--out", default=str(ROOT / "experiments" / "analyses" / "constant.json"))
    args = p.parse_args(argv)
    keys = sorted({data_key(r) for r in load_results(Path(args.results))})
    out = {"schema": 1, "command": "python experiments/constant.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "test_sets": {}}
    for k in keys:
        on = json.loads(k)
        out["test_sets"][k] = c = constants(on)
        avg = "–" if c["average"] is None else f"{c['average']:.4f}"
        print(f"{on['bench']} {on['tasks'] or 'all tasks'} (split {on['split']}, seed {on['seed']}): average {avg}; "
              + ", ".join(f"{t} {m['main']:.4f}" for t, m in c["tasks"].items()), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}: {len(keys)} test set(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

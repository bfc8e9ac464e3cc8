"""The grids' result files read back (experiments/grid.py writes them): each finished cell's
main metrics, the test data it was scored on, whether it collapsed, its method options (MTL-LoRA's
w_t init among them), whether it ran from a dirty tree, and each variant summarised over its seeds. experiments/report.py tabulates these; experiments/constant.py keys its test
sets by data_key()."""
from __future__ import annotations

import json
from pathlib import Path

from experiments.stats import mean_std
from mtlref.adapters import REGISTRY
from mtlref.metrics import TASK_METRICS
from mtlref.metrics import main_metric as metric_name


def load_results(results: Path, grid: str | None = None) -> list[dict]:
    files = sorted(Path(results).glob(f"{grid or '*'}/*.json"))
    return [json.loads(f.read_text()) for f in files]


def main_value(task: str, task_metrics: dict) -> float:
    """The value of the task's main metric (mtlref.metrics.main_metric names it: MCC for CoLA,
    Pearson for STS-B, accuracy else); a user's own task lists its main metric first."""
    return task_metrics[metric_name(task) if task in TASK_METRICS else next(iter(task_metrics))]


# train.py's flags that choose the data a cell is scored on, and their defaults (train.py's parser)
DATA_FLAGS = {"--bench": "glue", "--tasks": None, "--data-dir": "data", "--jsonl": None, "--jsonl-dev": None,
              "--max-eval-examples": None, "--seed": "0"}


def scored_on(record: dict) -> dict:
    """The test data of a finished cell, from its stored train.py argv and its resolved split
    protocol: {"bench", "tasks", "data_dir", "jsonl", "jsonl_dev", "max_eval_examples", "seed",
    "split"}. Two cells with equal dicts were scored on the same examples (the paper split's
    halves are drawn by the seed, so seeds differ)."""
    argv, out = list(record["argv"]), {}
    for i, a in enumerate(argv):
        flag, eq, value = a.partition("=")
        if flag in DATA_FLAGS:
            out[flag] = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    d = {f.lstrip("-").replace("-", "_"): out.get(f, default) for f, default in DATA_FLAGS.items()}
    d["seed"] = int(d["seed"])
    d["max_eval_examples"] = None if d["max_eval_examples"] is None else int(d["max_eval_examples"])
    d["split"] = record["metrics"]["settings"]["split"]
    return d


def data_key(record: dict) -> str:
    """scored_on() as one string: the key of experiments/analyses/constant.json."""
    return json.dumps(scored_on(record), sort_keys=True)


# A cell's method options as it ran: metrics.method_options (every option, defaults too) where
# train.py recorded them; a cell from before that has its given options (settings.options) over
# the defaults mtlref had then, which differ from today's in one value: MTL-LoRA's w_t init was
# N(0, τ²) ("normal") until the official code's Kaiming-uniform became the default.
DEFAULTS_BEFORE_METHOD_OPTIONS = {"mtl-lora": {"weights_init": "normal"}}
INIT_LABELS = {"normal": "old init (w_t ~ N(0, τ²))", "uniform": "w_t = 0 init"}   # kaiming, the default: none


def method_options(record: dict) -> dict:
    """The cell's method options as it ran (above); {} for a method mtlref no longer has."""
    m = record.get("metrics", {})
    if "method_options" in m:
        return dict(m["method_options"])
    method = record.get("method") or m.get("method")
    cls = REGISTRY.get(method)
    given = (m.get("settings") or {}).get("options") or {}
    return {**cls.options, **DEFAULTS_BEFORE_METHOD_OPTIONS.get(method, {}), **given} if cls else dict(given)


def weights_init(record: dict) -> str | None:
    """An MTL-LoRA cell's w_t init ("kaiming", "normal", "uniform"); None for the other methods."""
    if (record.get("method") or record.get("metrics", {}).get("method")) != "mtl-lora":
        return None
    return method_options(record).get("weights_init")


def init_label(record: dict) -> str | None:
    """How the document labels an MTL-LoRA cell's w_t init ("old init (w_t ~ N(0, τ²))" for the
    cells before the default changed); None for the default (Kaiming-uniform) and other methods."""
    return INIT_LABELS.get(weights_init(record))


def split_inits(records: list[dict]) -> list[dict]:
    """Cells of one variant with different w_t inits never share a row: where a variant has cells
    of more than one init, those of a labelled init (init_label) become the variant "<v> [old
    init]" (the label's short form), the default's keep the name."""
    inits: dict[str, set] = {}
    for r in records:
        inits.setdefault(r["variant"], set()).add(weights_init(r))
    return [dict(r, variant=f"{r['variant']} [{label.split(' (')[0]}]")
            if len(inits[r["variant"]]) > 1 and (label := init_label(r)) else r for r in records]


def dirty(record: dict) -> bool:
    """The cell ran from a working tree with uncommitted changes (its result file's git.dirty)."""
    return bool((record.get("git") or {}).get("dirty"))


COLLAPSE_PEARSON = 0.2      # a trained STS-B head scores >= 0.8 here; ~0 when the outputs ignore the input


def collapsed(metrics: dict) -> bool:
    """A run whose model stopped depending on its input (training loss flat, classification tasks
    near one class or chance): flagged by STS-B's Pearson below COLLAPSE_PEARSON, a regression
    task that no constant output can score on. False when the run has no STS-B."""
    m = metrics["tasks"].get("stsb")
    return m is not None and main_value("stsb", m) < COLLAPSE_PEARSON


def summarise(records: list[dict]) -> dict:
    """variant -> {"seeds": {seed: average}, "tasks": {task: (mean, std)}, "average": (mean, std),
    "collapsed" / "dirty": [seeds], "inits": [init_label()s of its cells], ...}."""
    by = {}
    for r in records:
        by.setdefault(r["variant"], []).append(r)
    out = {}
    for v, rs in by.items():
        rs.sort(key=lambda r: r["seed"])
        tasks = list(rs[0]["metrics"]["tasks"])
        out[v] = {"n": len(rs), "seeds": {r["seed"]: r["metrics"]["average"] for r in rs},
                  "tasks": {t: mean_std([main_value(t, r["metrics"]["tasks"][t]) for r in rs
                                         if t in r["metrics"]["tasks"]])
                            for t in tasks},
                  "average": mean_std([r["metrics"]["average"] for r in rs]),
                  "collapsed": [r["seed"] for r in rs if collapsed(r["metrics"])],
                  "dirty": [r["seed"] for r in rs if dirty(r)],
                  "inits": sorted({label for r in rs if (label := init_label(r))}),
                  "method": rs[0].get("method"), "trainable_percent": rs[0].get("trainable_percent"),
                  "wall_s": sum(r["wall_s"] for r in rs), "cpu_s": sum(r["wall_s"] * r["threads"] for r in rs),
                  "machines": sorted({r["machine"].get("gpu") or r["machine"]["cpu"] for r in rs})}
    return out

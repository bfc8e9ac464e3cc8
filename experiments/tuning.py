"""Tuning runs of the main job, kept and tabulated: docs/RESULTS.md's tuning tables come from here.

    python experiments/tuning.py keep runs/x --name h5e4-s1 --into experiments/tuning/cpu-preset-2026-12-02
    python experiments/tuning.py table experiments/tuning/cpu-preset-2026-12-02/*.json

`keep` copies a finished run's metrics.json into DIR/NAME.json with the seed, pooling and tasks
of its adapter_config.json added (metrics.json alone does not name them). `table` prints one
markdown row per file: what the run changed against the default command
(`python train.py --method more --bench glue`: the `cpu` preset, seed 0, mean pooling, every
GLUE task), its average, CoLA's MCC, RTE, MRPC and its wall time with the threads it ran on.
"""
import argparse
import json
from pathlib import Path

from mtlref.metrics import GLUE_TASKS, main_metric
from mtlref.commands import train_args
from mtlref.settings import settings

DEFAULT_RUN = {"seed": 0, "pooling": "mean", "method": "more"}
SHOWN = ("cola", "rte", "mrpc")             # each with its main metric (mtlref.metrics)


def default_settings(method: str = "more") -> dict:
    """The settings the default command resolves to (the cpu preset, no flags), as metrics.json
    records them (through JSON: tuples become lists)."""
    return json.loads(json.dumps(settings(train_args(["--method", method]), "bert").as_dict()))


def keep(run_dir: Path, name: str, into: Path) -> Path:
    for file in ("metrics.json", "adapter_config.json"):
        if not (run_dir / file).is_file():
            raise SystemExit(f"{run_dir / file}: not found; `keep` takes the directory of a finished train.py run")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cfg = json.loads((run_dir / "adapter_config.json").read_text())
    kept = {**metrics, "seed": cfg["seed"], "pooling": cfg.get("pooling", "mean"), "task_names": cfg["task_names"]}
    into.mkdir(parents=True, exist_ok=True)
    path = into / f"{name}.json"
    path.write_text(json.dumps(kept, indent=2))
    return path


def flag(key: str, value) -> str:
    return f"--{key.replace('_', '-')} {value}"


def changes(run: dict) -> str:
    """The command-line changes that give this run's settings, against the default command."""
    base = default_settings(run["method"])
    out = [f"--method {run['method']}"] if run["method"] != DEFAULT_RUN["method"] else []
    for k, v in run["settings"].items():
        if k == "options":
            out += [f"--option {ok}={ov}" for ok, ov in sorted(v.items()) if base["options"].get(ok) != ov]
        elif base.get(k) != v:
            out.append(flag(k, v))
    if "task_names" in run and run["task_names"] != list(GLUE_TASKS):
        out.append(flag("tasks", ",".join(run["task_names"])))
    for k in ("pooling", "seed"):
        if run.get(k, DEFAULT_RUN[k]) != DEFAULT_RUN[k]:
            out.append(flag(k, run[k]))
    return " ".join(f"`{c}`" for c in out) or "–"


def row(path: Path) -> str:
    run = json.loads(path.read_text())
    cells = [path.stem, changes(run), f"{run['average']:.4f}"]
    for task in SHOWN:
        value = run["tasks"].get(task, {}).get(main_metric(task))
        cells.append("–" if value is None else f"{value:.3f}")
    cells.append(f"{run['wall_s']:.0f} s ({run['threads']} thread{'s' if run['threads'] > 1 else ''})")
    return "| " + " | ".join(cells) + " |"


def table(paths: list[Path]) -> str:
    head = ["run", "changes to the default command", "average", "CoLA MCC", "RTE", "MRPC", "wall"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 5) + "|"]
    return "\n".join(lines + [row(p) for p in paths])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("keep", help="copy a finished run's metrics (with its seed and pooling) into DIR/NAME.json")
    k.add_argument("run_dir", type=Path)
    k.add_argument("--name", required=True)
    k.add_argument("--into", type=Path, required=True)
    t = sub.add_parser("table", help="a markdown table of kept runs")
    t.add_argument("files", nargs="+", type=Path)
    args = p.parse_args()
    if args.cmd == "keep":
        print(keep(args.run_dir, args.name, args.into))
    else:
        print(table(args.files))


if __name__ == "__main__":
    main()

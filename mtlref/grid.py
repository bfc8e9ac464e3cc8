"""Experiment grids: cells of train.py runs, run resumably, recorded as small JSON files, summarised.

A grid is a JSON file (experiments/grids/*.json):

    {"name": "main",
     "about": "one line on what the grid compares",
     "common": ["--bench", "glue", "--split", "paper"],      # every cell's train.py flags
     "variants": {"lora-mt": ["--method", "lora"], ...},      # variant name -> its own flags
     "seeds": [0, 1, 2],
     "minutes_per_cell": 12,                                  # the plan's estimate (2 threads, this CPU)
     "tables": [{"title": "...", "variants": [...], "suffix": "-lr5e-4", "claims": true}, ...],
     "baseline": "main/more-lr5e-4"}                          # another grid's cells, the report's first row

"tables" is optional: the report's tables of the grid, each of some of its variants (named as
experiments/report.py's BENCH_NAME plus the table's suffix), compared within the table; those
with "claims" are where the papers' claims are checked. Without it, one table of every variant.
"baseline" is optional too: a variant of another grid (an ablation's full method is the main
grid's cell with the same flags), which the report puts first and compares every row with.

A cell is (variant, seed): `python train.py <common> <variant> --seed S --out <runs>/<grid>/<variant>/s<S>
--save-every K`. Cells run seed-major (every variant's seed 0 first), so a grid stopped half-way
still holds complete comparisons. A finished cell leaves <results>/<grid>/<variant>__s<S>.json
(`record`), and a cell whose JSON exists is never run again; a killed cell continues from its
checkpoint (`--resume`, bit for bit: tests/test_scale.py). The stored `command` re-runs the
cell; with the same thread count it gives the same metrics (tests/test_grid.py checks one).

summarise() and paired_t() are what experiments/report.py tabulates; nothing here plots.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from mtlref import bench
from mtlref.adapters import write_atomic
from mtlref.metrics import TASK_METRICS
from mtlref.metrics import main_metric as metric_name

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = 1


@dataclass(frozen=True)
class Cell:
    grid: str
    variant: str
    seed: int
    argv: tuple[str, ...]          # train.py and its flags, without the interpreter, --out and --save-every

    @property
    def name(self) -> str:
        return f"{self.grid}/{self.variant}/s{self.seed}"

    def out(self, runs: Path) -> Path:
        return Path(runs) / self.grid / self.variant / f"s{self.seed}"

    def log(self, runs: Path) -> Path:
        """train.py's output, beside the run directory (appended to when a cell resumes)."""
        return self.out(runs).parent / f"s{self.seed}.log"

    def result(self, results: Path) -> Path:
        return Path(results) / self.grid / f"{self.variant}__s{self.seed}.json"


def load_grid(path: str | Path) -> dict:
    """The grid file, checked: a clear error names the file and what is wrong in it."""
    path = Path(path)
    try:
        grid = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such grid file (the grids are in experiments/grids/)") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    for key, typ in [("name", str), ("variants", dict), ("seeds", list)]:
        if not isinstance(grid.get(key), typ):
            raise SystemExit(f"{path}: needs \"{key}\" ({typ.__name__}); see mtlref/grid.py for the format")
    for v, flags in grid["variants"].items():
        if not (isinstance(flags, list) and all(isinstance(f, str) for f in flags)):
            raise SystemExit(f"{path}: variant {v!r} must be a list of train.py flags (strings)")
        if "/" in v or v.startswith("."):
            raise SystemExit(f"{path}: variant name {v!r} is used as a file name; use letters, digits and -")
        reserved = {"--seed", "--out", "--save-every", "--resume"} & set(flags + grid.get("common", []))
        if reserved:
            raise SystemExit(f"{path}: {sorted(reserved)} are set by the runner per cell; remove them from the grid")
    if not all(isinstance(s, int) for s in grid["seeds"]):
        raise SystemExit(f"{path}: \"seeds\" must be a list of integers")
    base = grid.get("baseline")
    if base is not None and not (isinstance(base, str) and base.count("/") == 1):
        raise SystemExit(f"{path}: \"baseline\" must be \"grid/variant\" (e.g. \"main/more-lr5e-4\"), not {base!r}")
    for i, tab in enumerate(grid.get("tables", [])):
        names = tab.get("variants") if isinstance(tab, dict) else None
        if not (isinstance(names, list) and names):
            raise SystemExit(f"{path}: table {i + 1} needs \"variants\", a list of the grid's variant names")
        unknown = [v for v in names if v not in grid["variants"]]
        if unknown:
            raise SystemExit(f"{path}: table {i + 1} names variants the grid does not have: {unknown}")
    return grid


def cells(grid: dict, variants: list[str] | None = None, seeds: list[int] | None = None) -> list[Cell]:
    """The grid's cells, seed-major; `variants` / `seeds` pick a subset (unknown names are an error)."""
    names = list(grid["variants"])
    unknown = sorted(set(variants or []) - set(names))
    if unknown:
        raise SystemExit(f"grid {grid['name']!r} has no variant {unknown}; it has {names}")
    chosen = [v for v in names if variants is None or v in variants]
    out = []
    for seed in grid["seeds"] if seeds is None else seeds:
        for v in chosen:
            out.append(Cell(grid["name"], v, int(seed),
                            ("train.py", *grid.get("common", []), *grid["variants"][v], "--seed", str(seed))))
    return out


def threads_per_cell(jobs: int, cores: int | None = None) -> int:
    """Cores shared out between the cells that run at once (at least one thread each)."""
    if not cores:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, jobs))


def command(cell: Cell, runs: Path, threads: int, device: str | None, save_every: int) -> tuple[list[str], dict]:
    """(argv after `python`, environment) of the cell's train.py run."""
    out = cell.out(runs).resolve()
    argv = [*cell.argv, "--out", str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out)]
    if device:
        argv += ["--device", device]
    if save_every:
        argv += ["--save-every", str(save_every)]
    return argv, {"OMP_NUM_THREADS": str(threads)}


def shell_line(argv: list[str], env: dict) -> str:
    """The command as one line to paste into a shell in the repository root."""
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " python " + " ".join(map(shlex.quote, argv))


def git_state(root: Path = ROOT) -> dict:
    def git(*a):
        r = subprocess.run(["git", *a], cwd=root, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def record(cell: Cell, argv: list[str], env: dict, runs: Path, wall_s: float, resumed: bool,
           device: str | None, git: dict | None = None) -> dict:
    """The cell's result file: what ran, where, for how long, and what it measured. Read from the
    run's own metrics.json (and adapter_config.json's MoRE rank maps); weights stay in `runs`."""
    out = cell.out(runs)
    metrics = json.loads((out / "metrics.json").read_text())
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    per_task = {}
    if (out / "tasks").is_dir():                     # LoRA-ST: one run per task, each with its rank maps
        for d in sorted((out / "tasks").iterdir()):
            c = d / "adapter_config.json"
            if c.is_file() and "rank_maps" in json.loads(c.read_text()):
                per_task[d.name] = json.loads(c.read_text())["rank_maps"]
    return {"schema": SCHEMA, "grid": cell.grid, "variant": cell.variant, "seed": cell.seed,
            "command": shell_line(argv, env), "argv": argv, "env": env, "git": git or git_state(),
            "machine": bench.machine(device or "cpu"), "threads": metrics.get("threads", int(env["OMP_NUM_THREADS"])),
            # a resumed cell: this process's wall + the run's earlier processes' (train.py's metrics.json)
            "wall_s": round(wall_s + metrics.get("wall_s_before_resume", 0.0), 1), "resumed": resumed,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "method": metrics.get("method"), "trainable_params": metrics.get("trainable_params"),
            "trainable_percent": metrics.get("trainable_percent"), "metrics": metrics,
            "rank_maps": config.get("rank_maps") or per_task or None}


def planned_minutes(grid: dict, threads: int) -> float:
    """The grid file's estimate of one cell's wall minutes at `threads` threads: "minutes_per_cell"
    is a number, or {threads: minutes} measured on the machine the grid was planned on."""
    m = grid.get("minutes_per_cell", 10)
    if isinstance(m, dict):
        known = {int(k): float(v) for k, v in m.items()}
        return known.get(threads, known[min(known, key=lambda k: abs(k - threads))])
    return float(m)


def fmt_minutes(s: float) -> str:
    s = max(0, int(round(s)))
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s"


def run_grid(grid: dict, todo: list[Cell], runs: Path, results: Path, jobs: int = 1, device: str | None = None,
             save_every: int = 100, python: str = "python", on_done=None, log=print,
             threads: int | None = None) -> list[str]:
    """Run the cells without a result file, `jobs` at a time (`threads` torch threads each, by
    default the cores shared out); returns the names of those that failed. A progress line per
    start and finish: which cell, its ETA, the grid's ETA."""
    threads = threads or threads_per_cell(jobs)
    pending = [c for c in todo if not c.result(results).is_file()]
    skipped = len(todo) - len(pending)
    if skipped:
        log(f"[{grid['name']}] {skipped} of {len(todo)} cells already have results; not run again")
    finished = [json.loads(c.result(results).read_text()) for c in todo if c.result(results).is_file()]
    walls = [r["wall_s"] for r in finished if r.get("threads") == threads]
    estimate = lambda: (sum(walls) / len(walls)) if walls else 60.0 * planned_minutes(grid, threads)  # noqa: E731
    running, failed, done = {}, [], 0
    while pending or running:
        while pending and len(running) < jobs:
            cell = pending.pop(0)
            argv, env = command(cell, runs, threads, device, save_every)
            resumed = (cell.out(runs) / "checkpoint" / "state.safetensors").is_file()
            cell.out(runs).mkdir(parents=True, exist_ok=True)
            stdout = open(cell.log(runs), "a")
            proc = subprocess.Popen([python, *argv] + (["--resume"] if resumed else []), cwd=ROOT,
                                    env={**os.environ, **env}, stdout=stdout, stderr=subprocess.STDOUT)
            running[proc] = (cell, argv, env, resumed, time.monotonic(), stdout, git_state())   # the code it runs
            left = len(pending) + len(running)
            log(f"[{grid['name']}] start {cell.name}{' (resuming)' if resumed else ''}: "
                f"{threads} thread(s); ETA this cell {fmt_minutes(estimate())}, the grid's "
                f"{fmt_minutes(estimate() * math.ceil(left / jobs))} ({left} cells left, {jobs} at a time)")
        time.sleep(0.2)
        for proc in [p for p in running if p.poll() is not None]:
            cell, argv, env, resumed, t0, stdout, git = running.pop(proc)
            stdout.close()
            wall = time.monotonic() - t0
            if proc.returncode != 0:
                failed.append(cell.name)
                tail = cell.log(runs).read_text(errors="replace")[-1500:]
                log(f"[{grid['name']}] FAILED {cell.name} (exit {proc.returncode}); the end of its log, "
                    f"{cell.log(runs)}:\n{tail}")
                continue
            res = record(cell, argv, env, runs, wall, resumed, device, git)
            path = cell.result(results)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(res, indent=1) + "\n"))
            walls.append(wall)
            done += 1
            log(f"[{grid['name']}] done {cell.name} in {fmt_minutes(wall)}: average "
                f"{res['metrics'].get('average', float('nan')):.4f} -> {cell.result(results)}")
            if on_done:
                on_done(cell, cell.result(results))
    return failed


# ----------------------------------------------------------------------------- summaries
def load_results(results: Path, grid: str | None = None) -> list[dict]:
    files = sorted(Path(results).glob(f"{grid or '*'}/*.json"))
    return [json.loads(f.read_text()) for f in files]


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    n = len(xs)
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0)


# Two-sided 95 % critical values of Student's t, by degrees of freedom.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with `df` (a whole number) degrees of freedom, in closed form
    (Abramowitz & Stegun 26.7.3-4, with theta = atan(|t| / sqrt(df))): 1 - A(t | df)."""
    if math.isinf(t):
        return 0.0
    th = math.atan(abs(t) / math.sqrt(df))
    c2, term, acc = math.cos(th) ** 2, 1.0, 1.0
    if df % 2:                       # odd: A = (2/pi)(theta + sin cos (1 + 2/3 cos^2 + (2*4)/(3*5) cos^4 + ...))
        for k in range(1, (df - 1) // 2):
            term *= (2 * k) / (2 * k + 1) * c2
            acc += term
        a = 2 / math.pi * (th + (math.sin(th) * math.cos(th) * acc if df > 1 else 0.0))
    else:                            # even: A = sin (1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 + ...)
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            acc += term
        a = math.sin(th) * acc
    return max(0.0, 1.0 - a)


def holm(pvalues: list[float], alpha: float = 0.05) -> list[bool]:
    """Holm-Bonferroni: which of the hypotheses are rejected with the family-wise error kept at
    `alpha` (the smallest p against alpha/m, the next against alpha/(m-1), ..., stopping at the first
    that is not below)."""
    out, m = [False] * len(pvalues), len(pvalues)
    for rank, i in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        if pvalues[i] >= alpha / (m - rank):
            break
        out[i] = True
    return out


def paired_t(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """Paired t-test over the seeds both have: mean difference a - b, t, and whether |t| exceeds
    the two-sided 95 % critical value (None with fewer than 2 shared seeds, or df above the table)."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2 or len(seeds) - 1 not in T975:
        return None
    d = [a[s] - b[s] for s in seeds]
    m, sd = mean_std(d)
    t = math.inf if sd == 0 and m != 0 else (0.0 if sd == 0 else m / (sd / math.sqrt(len(d))))
    return {"n": len(d), "mean_diff": m, "t": t, "critical": T975[len(d) - 1], "significant": abs(t) > T975[len(d) - 1],
            "p": t_two_sided_p(t, len(d) - 1)}


def main_metric(task: str, task_metrics: dict) -> float:
    """The task's main metric (mtlref.metrics: MCC for CoLA, Pearson for STS-B, accuracy else);
    a user's own task lists its main metric first, as its run wrote it."""
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


COLLAPSE_PEARSON = 0.2      # a trained STS-B head scores >= 0.8 here; ~0 when the outputs ignore the input


def collapsed(metrics: dict) -> bool:
    """A run whose model stopped depending on its input (training loss flat, classification tasks
    near one class or chance): flagged by STS-B's Pearson below COLLAPSE_PEARSON, a regression
    task that no constant output can score on. False when the run has no STS-B."""
    m = metrics["tasks"].get("stsb")
    return m is not None and main_metric("stsb", m) < COLLAPSE_PEARSON


def summarise(records: list[dict]) -> dict:
    """variant -> {"seeds": {seed: average}, "tasks": {task: (mean, std)}, "average": (mean, std), ...}."""
    by = {}
    for r in records:
        by.setdefault(r["variant"], []).append(r)
    out = {}
    for v, rs in by.items():
        rs.sort(key=lambda r: r["seed"])
        tasks = list(rs[0]["metrics"]["tasks"])
        out[v] = {"n": len(rs), "seeds": {r["seed"]: r["metrics"]["average"] for r in rs},
                  "tasks": {t: mean_std([main_metric(t, r["metrics"]["tasks"][t]) for r in rs
                                         if t in r["metrics"]["tasks"]])
                            for t in tasks},
                  "average": mean_std([r["metrics"]["average"] for r in rs]),
                  "collapsed": [r["seed"] for r in rs if collapsed(r["metrics"])],
                  "method": rs[0].get("method"), "trainable_percent": rs[0].get("trainable_percent"),
                  "wall_s": sum(r["wall_s"] for r in rs), "cpu_s": sum(r["wall_s"] * r["threads"] for r in rs),
                  "machines": sorted({r["machine"].get("gpu") or r["machine"]["cpu"] for r in rs})}
    return out

"""Experiment grids: cells of train.py runs, run resumably, recorded as small JSON files.

A grid is a JSON file (experiments/grids/*.json):

    {"name": "main",
     "about": "one line on what the grid compares",
     "common": ["--bench", "glue", "--split", "paper"],      # every cell's train.py flags
     "variants": {"lora-mt": ["--method", "lora"], ...},      # variant name -> its own flags
     "seeds": [0, 1, 2],
     "minutes_per_cell": 12,                                  # the plan's estimate (2 threads, this CPU)
     "tables": [{"title": "...", "variants": [...], "suffix": "-lr5e-4", "claims": true}, ...],
     "baseline": "main/more-lr5e-4",                          # another grid's cells, the report's first row
     "committed": {"lora-mt": [0, 1, 2], "dora": [0], ...}}  # the seeds each variant's result files hold

"tables" is optional: the report's tables of the grid, each of some of its variants (named as
experiments/replication/names.py's BENCH_NAME plus the table's suffix), compared within the table; those
with "claims" are where the papers' claims are checked. Without it, one table of every variant.
"baseline" is optional too: a variant of another grid (an ablation's full method is the main
grid's cell with the same flags), which the report puts first and compares every row with.
"committed" is bookkeeping, written by `python experiments/grid.py GRID.json`: every
variant and the seeds of its result files in experiments/results/<grid>/ (a variant may have
run more seeds than "seeds", which is what a plain run of the grid runs); tests/test_grid_committed.py
fails when it disagrees with the result files.

A cell is (variant, seed): `python train.py <common> <variant> --seed S --out <runs>/<grid>/<variant>/s<S>
--save-every K`. Cells run seed-major (every variant's seed 0 first), so a grid stopped half-way
still holds complete comparisons. A finished cell leaves <results>/<grid>/<variant>__s<S>.json
(`record`), and a cell whose JSON exists is never run again; a killed cell continues from its
checkpoint (`--resume`, bit for bit: tests/test_scale.py). The stored `command` re-runs the
cell; with the same thread count it gives the same metrics (tests/test_grid.py checks one).

experiments/summary.py reads the result files back (summarise()), experiments/stats.py compares
them (paired_t()), and experiments/report.py tabulates both; nothing here plots.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from experiments import ROOT
from experiments.bench.machine import machine
from mtlref.files import write_atomic

SCHEMA = 1
RESULTS = ROOT / "experiments" / "results"


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
            raise SystemExit(f"{path}: needs \"{key}\" ({typ.__name__}); see experiments/grid.py for the format")
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
    done = grid.get("committed", {})
    if not (isinstance(done, dict) and all(isinstance(s, list) and all(isinstance(i, int) for i in s)
                                           for s in done.values())):
        raise SystemExit(f"{path}: \"committed\" must map variants to lists of seeds (python experiments/grid.py "
                         f"{path} writes it)")
    if set(done) - set(grid["variants"]):
        raise SystemExit(f"{path}: \"committed\" names variants the grid does not have: "
                         f"{sorted(set(done) - set(grid['variants']))}")
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
            "machine": machine(device or "cpu"), "threads": metrics.get("threads", int(env["OMP_NUM_THREADS"])),
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


def result_seeds(grid_name: str, results: Path = RESULTS) -> dict[str, list[int]]:
    """{variant: its seeds, sorted} from the result files <results>/<grid>/<variant>__s<seed>.json."""
    found: dict[str, list[int]] = {}
    folder = Path(results) / grid_name
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        variant, sep, seed = f.stem.rpartition("__s")
        if not (sep and variant and seed.isdigit()):
            raise SystemExit(f"{f}: not a result file's name (<variant>__s<seed>.json)")
        found.setdefault(variant, []).append(int(seed))
    return {v: sorted(seeds) for v, seeds in found.items()}


def committed(grid: dict, results: Path = RESULTS) -> dict[str, list[int]]:
    """The grid's "committed" field: each of its variants, in the grid's order, with the seeds of
    its result files ([] where none). A result file of a variant the grid no longer has is an error."""
    seeds = result_seeds(grid["name"], results)
    stray = sorted(set(seeds) - set(grid["variants"]))
    if stray:
        raise SystemExit(f"{Path(results) / grid['name']}: result files of variants the grid {grid['name']!r} "
                         f"does not have: {stray}; restore the variants or move their files away")
    return {v: seeds.get(v, []) for v in grid["variants"]}


def write_committed(path: str | Path, results: Path = RESULTS) -> dict[str, list[int]]:
    """Set the grid file's "committed" to committed(grid): its last key, one variant a line; the
    rest of the file stays byte for byte as it was. Returns the field."""
    path = Path(path)
    grid = load_grid(path)
    field = committed(grid, results)
    text = path.read_text(encoding="utf-8").rstrip()
    if "committed" in grid:        # the block this function wrote: the last key, closed by " }" and "}"
        text, n = re.subn(r',\n "committed": \{.*?\n \}\n\}$', "\n}", text, flags=re.S)
        if n != 1:
            raise SystemExit(f"{path}: \"committed\" is not the file's last key as written by this function; "
                             "remove it by hand and run again")
    lines = ",\n".join(f"  {json.dumps(v)}: {json.dumps(seeds)}" for v, seeds in field.items())
    new = text[:-1].rstrip("\n") + ',\n "committed": {\n' + lines + "\n }\n}\n"
    before, after = json.loads(text), json.loads(new)
    assert after.pop("committed") == field and {k: v for k, v in before.items() if k != "committed"} == after
    if new != path.read_text(encoding="utf-8"):
        write_atomic(path, lambda tmp: Path(tmp).write_text(new, encoding="utf-8"))
    return field


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write (or --check) each grid file's \"committed\" field: every "
                                            "variant and the seeds of its result files.")
    p.add_argument("grids", nargs="*", help="grid files (default: experiments/grids/*.json)")
    p.add_argument("--results", default=str(RESULTS), help="the result files' root")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a field is not up to date")
    args = p.parse_args(argv)
    stale = []
    for path in args.grids or sorted((ROOT / "experiments" / "grids").glob("*.json")):
        grid = load_grid(path)
        want = committed(grid, Path(args.results))
        if args.check:
            if grid.get("committed") != want:
                stale.append(str(path))
                print(f"{path}: \"committed\" is {grid.get('committed')}, the result files say {want}")
        else:
            write_committed(path, Path(args.results))
            print(f"{path}: committed " + ", ".join(f"{v} {s}" for v, s in want.items()))
    if stale:
        print(f"run: python experiments/grid.py {' '.join(stale)}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())

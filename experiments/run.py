"""Run an experiment grid: every (variant, seed) cell is one train.py call with its own --out.

    python experiments/run.py experiments/grids/main.json              # all cells, one at a time
    python experiments/run.py experiments/grids/main.json --jobs 2     # two at a time, 1 thread each (2 cores)
    python experiments/run.py experiments/grids/main.json --device cuda --jobs 4
    python experiments/run.py experiments/grids/main.json --plan       # cells and the time they need

Resumable: a cell with a result file (experiments/results/<grid>/<variant>__s<seed>.json) is never
run again, a killed cell continues from its checkpoint, so the same command continues a killed
grid. Weights and logs stay under --runs (default runs/, ignored by git). The format of a grid
file and of a result file: experiments/grid.py.
"""
import argparse
import subprocess
import sys
from pathlib import Path

from experiments import ROOT
from experiments import grid as G


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="a grid file (experiments/grids/*.json)")
    p.add_argument("--jobs", type=int, default=1, help="cells at a time; the cores are shared out between them")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per cell (default: the cores shared out between the --jobs cells)")
    p.add_argument("--device", default=None, help="passed to train.py (e.g. cuda); default: train.py's")
    p.add_argument("--variants", default=None, help="comma list: only these variants")
    p.add_argument("--seeds", default=None, help="comma list: only these seeds")
    p.add_argument("--runs", default=str(ROOT / "runs"), help="where the cells' run directories go")
    p.add_argument("--results", default=str(ROOT / "experiments" / "results"), help="where result files go")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint interval of each cell (for resuming)")
    p.add_argument("--commit", action="store_true", help="git-commit each result file as it lands")
    p.add_argument("--plan", action="store_true", help="list the cells left and the time they need; run nothing")
    args = p.parse_args(argv)
    grid = G.load_grid(args.grid)
    todo = G.cells(grid, args.variants.split(",") if args.variants else None,
                   [int(s) for s in args.seeds.split(",")] if args.seeds else None)
    left = [c for c in todo if not c.result(Path(args.results)).is_file()]
    threads = args.threads or G.threads_per_cell(args.jobs)
    minutes = G.planned_minutes(grid, threads)
    print(f"[{grid['name']}] {len(todo)} cells, {len(left)} without results; planned {minutes:g} min per cell at "
          f"{threads} thread(s) (the grid file's estimate): "
          f"{G.fmt_minutes(60 * minutes * -(-len(left) // max(1, args.jobs)))} wall at {args.jobs} at a time",
          flush=True)
    if args.plan:
        for c in left:
            argv, env = G.command(c, Path(args.runs), threads, args.device, args.save_every)
            print(f"  {c.name}: {G.shell_line(argv, env)}")
        return 0

    def commit(cell, path):               # a failed commit (another git command holding the lock) is said, not fatal
        for cmd in (["git", "add", str(path)], ["git", "commit", "-q", "-m", f"experiments: cell {cell.name}", "--",
                                                 str(path)]):
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"[{grid['name']}] could not commit {path} ({done.stderr.strip()[:200]}); commit it by hand",
                      flush=True)
                return

    failed = G.run_grid(grid, todo, Path(args.runs), Path(args.results), args.jobs, args.device, args.save_every,
                        sys.executable, commit if args.commit else None, log=lambda m: print(m, flush=True),
                        threads=threads)
    if failed:
        print(f"[{grid['name']}] {len(failed)} cells failed: {', '.join(failed)}; the same command retries them",
              flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

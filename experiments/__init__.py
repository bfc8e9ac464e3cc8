"""The research workbench: tools about mtlref, not the reference itself.

    bench/         the timing harness behind bench.py: what each adapter method costs, side by side
    grid.py        experiment grids: cells of train.py runs, run resumably, recorded as small JSON files
    summary.py     the result files read back: what each cell was scored on, and each variant summarised
    stats.py       the statistics the report prints: the paired t-test over seeds, Holm's correction
    replication/   docs/REPLICATION.md from the result files: its tables, figures and the papers' claims

The commands are files of this package, run as scripts (README.md, "Experiments"):
run.py, report.py, constant.py, probe.py, embeddings.py, tuning.py. The package is installed
with mtlref (pyproject.toml; `pip install -e .`), and mtlref/ imports nothing from it
(tests/test_layout.py).
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent      # the repository root: train.py, experiments/grids, docs/

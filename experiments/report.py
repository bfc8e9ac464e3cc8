"""Write docs/REPLICATION.md and its figures from the grids' result files alone.

    python experiments/report.py                 # experiments/results/ -> docs/REPLICATION.md, docs/replication/*.png
    python experiments/report.py --results DIR --out FILE.md

Every number in the document comes from a result file (experiments/results/<grid>/*.json, written
by experiments/run.py), from the committed bench run (docs/bench/minilm-cpu-2026-12-08.json) or from the
analyses' JSON files (experiments/analyses/: probe.py, embeddings.py, constant.py); nothing is
typed but the papers' own figures, quoted as such (experiments/replication/papers.py). The epochs
each task saw, in each claim's protocol line, replay the cell's sampler over the training sets'
sizes: the result file's, else those of the data it names (data/ here). The code is
experiments/replication/. The paired t-tests need scipy and the figures matplotlib
(`pip install -e ".[analysis]"`); without matplotlib the document says so.
"""
import argparse
import sys
from pathlib import Path

from experiments import ROOT
from experiments.replication.document import write


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(ROOT / "experiments" / "results"))
    p.add_argument("--out", default=str(ROOT / "docs" / "REPLICATION.md"))
    p.add_argument("--bench", default=str(ROOT / "docs" / "bench" / "minilm-cpu-2026-12-08.json"),
                   help="bench.py JSON whose step times go in the tables")
    p.add_argument("--analyses", default=None, help="experiments/probe.py JSON files (default: beside --results)")
    args = p.parse_args(argv)
    write(Path(args.results), Path(args.out), Path(args.bench), Path(args.analyses) if args.analyses else None)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""docs/REPLICATION.md top to bottom: its head (what finished, where it ran, the grids' plan), one
section per grid (its tables, their figures and claims, the ablations and the few-shot claims,
MoRE's ranks), the analyses, and the summary of every claim checked, placed after the plan once
every section has run. write() is what `python experiments/report.py` calls."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from experiments import ROOT
from experiments.replication.analyses import embeddings_section, probe_section
from experiments.replication.claims import (PAPER_ABLATIONS, Finding, ablation_section, fewshot_reference,
                                            fewshot_section, findings_section, merge_at_constant, more_seeds_lines,
                                            table_claims)
from experiments.replication.figures import average_figure, rank_figure
from experiments.replication.protocol import Protocols
from experiments.replication.tables import (across_tables, constant_lines, constant_row, machines_line, marks_lines,
                                            plan_section, table)
from experiments.summary import (COLLAPSE_PEARSON, collapsed, load_results, main_value, split_inits, summarise,
                                 weights_init)


def table_section(summary: dict, rs: list[dict], vs: list[str], bench: dict | None, ref, tab: dict, grid: str,
                  figs: Path, rel, consts: dict | None, at_constant: dict[str, set[str]], protos: Protocols
                  ) -> tuple[list[str], list[Finding], dict[str, set[str]]]:
    """One table of a grid (its variants vs, compared with ref, and the best constant predictor of
    their test sets), its marks' footnotes, the cells that collapsed, and for a table with "claims"
    the averages' figure and the papers' claims checked on its numbers, each with its protocol line.
    at_constant: what the tables before it found at or below the best constant; returns the lines,
    the findings and what this table found there."""
    suffix = tab.get("suffix", "")
    const, missing = constant_row(rs, vs, consts)
    L = [f"### {tab['title']}", "", tab.get("about", ""), ""] if tab.get("title") else []
    below, low = constant_lines(summary, vs, const, missing)
    L += table(summary, vs, bench, ref, suffix, const) + [""] + marks_lines(summary, vs) + below
    gone = [f"`{v}` s{k}" for v in vs for k in summary[v]["collapsed"]]
    if gone:
        ok = [main_value("stsb", r["metrics"]["tasks"]["stsb"]) for r in rs
              if r["variant"] in vs and "stsb" in r["metrics"]["tasks"] and not collapsed(r["metrics"])]
        L += [f"Collapsed cells: {', '.join(gone)}: STS-B Pearson below {COLLAPSE_PEARSON}"
              + (f" (the other cells: {min(ok):.2f}–{max(ok):.2f})" if ok else "")
              + ", i.e. the model's outputs hardly depend on its input; their training loss stopped falling "
              "early (the cells' logs). They count in the means, as the budget gave them.", ""]
    elif len(vs) < len(summary):                       # one of several tables
        L += ["No cell of this table collapsed.", ""]
    if ref:
        L += ["The last column: a paired t-test over the seeds both variants ran, on the average, against "
              + (f"`{ref}`" if isinstance(ref, str) else "LoRA-MT at the same task and k") + " (two-sided, 95 %).",
              ""]
    found = []
    if tab.get("claims"):
        f = average_figure(summary, vs, figs / f"{grid}-averages{suffix}.png", tab.get("title", "Main grid"))
        if f:
            L += [f"![GLUE average per seed]({rel(f)})", ""]
        cells = {v: [r for r in rs if r["variant"] == v] for v in summary}
        lines, found = table_claims(summary, vs, suffix, tab.get("title", f"Grid `{grid}`"),
                                    merge_at_constant(at_constant, low), cells, protos)
        L += lines
    return L, found, low


def with_init_rows(names: list[str], summary: dict) -> list[str]:
    """names, each followed by its init-split rows (summary.split_inits: "<v> [old init]"), each
    row once (names may already hold a split row)."""
    out: list[str] = []
    for v in names:
        out += [x for x in [v, *sorted(w for w in summary if w.startswith(v + " ["))] if x in summary and x not in out]
    return out


def not_run_lines(name: str, tab: dict, missing: list[str]) -> list[str]:
    """A table's variants without a finished cell, and the command that runs them."""
    if not missing:
        return []
    every = len(missing) == len(tab["variants"])
    return [("Not yet run: no cell of this table has finished" if every else
             f"Not yet run: {', '.join(f'`{v}`' for v in missing)} (no finished cell)")
            + f": `python experiments/run.py experiments/grids/{name}.json --variants {','.join(missing)}`.", ""]


def grid_section(name: str, rs: list[dict], records: list[dict], bench: dict | None, consts: dict | None,
                 figs: Path, rel, at_constant: dict[str, set[str]], protos: Protocols
                 ) -> tuple[list[str], list[Finding], list[str], dict[str, set[str]]]:
    """A grid's section: its tables (as its grid file splits them; a table with no finished cell
    says so and gives its command), each variant against its counterparts in the other tables, the
    papers' ablation or few-shot claims, MoRE's ranks. Cells of one variant with two MTL-LoRA w_t
    inits are split into two rows (summary.split_inits), and a baseline from another grid keeps
    only the cells of this grid's init. Returns the lines, the findings, the ablation rows that
    still need seeds, and at_constant with what this grid's tables found at or below the best
    constant added."""
    path = ROOT / "experiments" / "grids" / f"{name}.json"
    spec = json.loads(path.read_text()) if path.is_file() else {"variants": sorted({r["variant"] for r in rs})}
    L = [f"## Grid `{name}`", "", spec.get("about", ""), "",
         f"{len(rs)} cells; {sum(r['wall_s'] for r in rs) / 3600:.2f} h wall summed; {machines_line(rs)}. "
         f"Split: {rs[0]['metrics'].get('split')}; steps per cell: "
         f"{', '.join(sorted({json.dumps(r['metrics'].get('steps')) for r in rs}))}"
         f"{' (LoRA-ST: per task)' if any(isinstance(r['metrics'].get('steps'), dict) for r in rs) else ''}. "
         "Papers' metrics: MCC for CoLA, Pearson for "
         "STS-B, accuracy otherwise; mean ± sample standard deviation over seeds.", ""]
    found, need = [], []
    base = spec.get("baseline")                        # "grid/variant": another grid's cells, the first row
    if base:
        base_rs = [dict(r, variant=base) for r in records if f"{r['grid']}/{r['variant']}" == base]
        own = {weights_init(r) for r in rs} - {None}
        if len(own) == 1:                              # this grid's rows are of one init: the baseline's too
            kept = [r for r in base_rs if weights_init(r) in own]
            if len(kept) < len(base_rs):
                L += [f"`{base}`: {len(base_rs) - len(kept)} of its cells started w_t otherwise than this grid's "
                      "rows and are left out of it.", ""]
            base_rs = kept
        rs = base_rs + rs
    rs = split_inits(rs)
    summary = summarise(rs)
    order = with_init_rows([v for v in [base, *spec["variants"]] if v], summary)
    # A grid may split its variants into tables (the main grid: one per shared lr); each table's
    # variants are BENCH_NAME's names plus the table's suffix, compared within the table.
    tables = spec.get("tables") or [{"variants": order, "claims": name == "main"}]
    for tab in tables:
        vs, suffix = with_init_rows(tab["variants"], summary), tab.get("suffix", "")
        missing = [v for v in tab["variants"] if v not in summary and not any(w.startswith(v + " [") for w in vs)]
        if not vs:
            L += ([f"### {tab['title']}", "", tab.get("about", ""), ""] if tab.get("title") else [])
            L += not_run_lines(name, tab, missing)
            continue
        ref = "lora-mt" + suffix if "lora-mt" + suffix in summary else None
        ref = (base or vs[0]) if ref is None and name.startswith("ablation") else ref
        ref = fewshot_reference if name == "fewshot" else ref   # MoRE against LoRA-MT at the same task and k
        lines, f, low = table_section(summary, rs, vs, bench, ref, tab, name, figs, rel, consts, at_constant, protos)
        L += lines + not_run_lines(name, tab, missing)
        found += f
        at_constant = merge_at_constant(at_constant, low)
    L += across_tables(summary, tables)
    cells = {v: [r for r in rs if r["variant"] == v] for v in summary}
    if name in PAPER_ABLATIONS and base in summary:
        lines, f, need = ablation_section(summary, name, base, records, at_constant, cells, protos)
        L += lines
        found += f
    if name == "fewshot":
        lines, f = fewshot_section(summary, order, name, at_constant, cells, protos)
        L += lines
        found += f
    more = "more" + next((t.get("suffix", "") for t in tables if t.get("claims")), "")
    f = rank_figure(rs, figs / f"{name}-more-ranks.png", more if more in summary else "more")
    if f:
        L += [f"![MoRE rank allocation]({rel(f)})", "",
              "MoRE's Figure 2a here: the rank r_t each task's gate chose in every adapted module "
              "(argmax of p_t, from the run's adapter_config.json).", ""]
    return L, found, need, at_constant


def write(results: Path, out: Path, bench_path: Path, analyses: Path | None = None) -> str:
    analyses = analyses or Path(results).parent / "analyses"
    records = load_results(results)
    bench = json.loads(bench_path.read_text()) if bench_path.is_file() else None
    const_file = Path(analyses) / "constant.json"      # experiments/constant.py's
    consts = json.loads(const_file.read_text())["test_sets"] if const_file.is_file() else None
    grids = {}
    for r in records:
        grids.setdefault(r["grid"], []).append(r)
    rel = lambda p: Path(p).resolve().relative_to(out.parent.resolve()).as_posix()  # noqa: E731
    figs = out.parent / "replication"
    L = ["# Replication: every method side by side", "",
         "Generated by `python experiments/report.py` from the result files in `experiments/results/` "
         "(one per cell, written by `python experiments/run.py GRID`) and the bench run "
         f"`{bench_path.name}`; do not edit by hand. Each cell's file holds the exact command that re-runs it.", ""]
    if not records:
        L += ["No cell has finished yet: no result file exists.", ""]
    total_wall = sum(r["wall_s"] for r in records)
    total_cpu = sum(r["wall_s"] * r["threads"] for r in records)
    L += [f"**Cells finished: {len(records)}**, {total_wall / 3600:.2f} h of wall time summed over cells, "
          f"{total_cpu / 3600:.2f} core-hours (wall × threads). Where they ran: {machines_line(records) or 'nowhere yet'}."]
    short = [f"`{r['grid']}/{r['variant']}/s{r['seed']}`" for r in records
             if r.get("resumed") and "wall_s_before_resume" not in r["metrics"]]
    if short:                                          # resumed before train.py carried a run's wall over
        L += ["", f"{len(short)} resumed cell(s) count the wall time of their last process only (they ran before "
                  f"a resumed run added its earlier processes' time), so the sums are low by those: {', '.join(short)}."]
    L += [""]
    L += plan_section(records)
    found: list[Finding] = []
    more_seeds: list[tuple[str, list[str]]] = []       # (ablation grid, its rows that need seeds 1 and 2)
    at_constant: dict[str, set[str]] = {}              # variant -> tasks where its mean is at or below the best constant
    at = len(L)                                        # the summary goes here, once every section has run
    protos = Protocols(records)
    for name, rs in grids.items():
        lines, f, need, at_constant = grid_section(name, rs, records, bench, consts, figs, rel, at_constant, protos)
        L += lines
        found += f
        if need:
            more_seeds.append((name, need))
    for section in (probe_section, embeddings_section):
        lines, f = section(Path(analyses), figs, rel, protos, at_constant)
        L += lines
        found += f
    L[at:at] = more_seeds_lines(more_seeds) + findings_section(found)
    if importlib.util.find_spec("matplotlib") is None:
        L += ["Figures: not drawn, matplotlib is not importable (`pip install -e \".[analysis]\"`).", ""]
    text = "\n".join(L).rstrip() + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text

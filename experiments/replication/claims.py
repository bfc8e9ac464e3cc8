"""The papers' claims checked on the tables' numbers: each pair a paper orders (papers.PAPER_CLAIMS),
each ablated row of a Table 5 (PAPER_ABLATIONS), MoRE's few-shot Table 4; the comparisons no paper
makes, apart (OWN_COMPARISONS); what testing several claims at once and a task no variant learned
do to them (caveats); and the summary at the top of the document that lists every claim checked
(findings_section). Each claim names the table that makes it, quotes its numbers and says under
which protocol it was tested here (protocol.Protocols). Each section returns its lines and its
findings; the best-constant tasks a claim's figure names (here) come in as an argument."""
from __future__ import annotations

import re
from typing import NamedTuple

from experiments import ROOT
from experiments.grid import fmt_minutes, load_grid, planned_minutes
from experiments.replication.names import TASK_NAMES
from experiments.replication.papers import (FEWSHOT_CLAIM, N1_BELOW_LORA_MT, OWN_COMPARISONS, PAPER_ABLATIONS,
                                            PAPER_CLAIMS, TABLE4)
from experiments.replication.tables import compare, shared_diff
from experiments.stats import holm, paired_t
from experiments.summary import summarise
from mtlref.metrics import main_metric as metric_name

NEAR_CHANCE_MCC = 0.1       # |MCC| below this: hardly better than one class (MCC 0)


class Finding(NamedTuple):
    """A claim a section checks, for the summary: the paper's claim, what was found here, whether it
    agrees, how surely ("beyond" / "within" the seed spread, or "untested"), the section's heading,
    the protocol line of its cells, and whether it is our own comparison (no paper's claim)."""
    paper: str
    here: str
    agrees: bool
    how: str
    section: str
    protocol: str = ""
    own: bool = False


def merge_at_constant(*parts: dict[str, set[str]]) -> dict[str, set[str]]:
    """{variant: tasks where its mean is at or below the best constant}, the union of `parts`."""
    out: dict[str, set[str]] = {}
    for part in parts:
        for v, tasks in part.items():
            out.setdefault(v, set()).update(tasks)
    return out


def anchor(heading: str) -> str:
    """The link target a Markdown renderer (GitHub's rule) gives a heading."""
    return "#" + re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def findings_section(found: list[Finding]) -> list[str]:
    """The plain summary: every claim checked below, grouped by what came out, each pointing to the
    section that holds its numbers."""
    L = ["## What agrees with the papers and what does not", "",
         "Every claim the sections below check, one line each, with the section that holds its numbers. "
         "\"Beyond the seed spread\": a paired t-test over seeds at 5 % (for an ablation row on one seed, the "
         "rule its section states); each test on its own, not corrected for the number of claims (the tables' "
         "sections say what Holm–Bonferroni keeps). \"Untested\": one seed or one split, a direction only.", ""]
    if not found:
        return L + ["No claim could be checked yet.", ""]
    groups = [(True, "beyond", "Agrees, beyond the seed spread"), (True, "within", "Agrees, within the seed spread"),
              (True, "untested", "Agrees in direction, untested"),
              (False, "untested", "Does not agree in direction, untested"),
              (False, "within", "Does not agree, within the seed spread"),
              (False, "beyond", "Does not agree, beyond the seed spread")]
    def lines(rows: list[Finding]) -> list[str]:
        return [x for f in rows for x in [f"- {f.paper}: {f.here} ([{f.section}]({anchor(f.section)}))"]
                + ([f"  - {f.protocol}"] if f.protocol else [])] + [""]

    for agrees, how, title in groups:
        rows = [f for f in found if f.agrees is agrees and f.how == how and not f.own]
        if rows:
            L += [f"**{title}** ({len(rows)}):", ""] + lines(rows)
    own = [f for f in found if f.own]
    if own:
        L += [f"**Our own comparisons, not a claim of either paper** ({len(own)}):", ""] + lines(own)
    return L


def verdict(summary: dict, v: str, ref: str) -> tuple[float, str, str | None]:
    """(mean difference of the averages over the shared seeds, whether it agrees with a paper saying
    v > ref and how surely, that last as "beyond" / "within" / "untested"; None: no shared seed)."""
    d, seeds = shared_diff(summary, v, ref)
    if not seeds:
        return d, "not yet comparable (no seed both ran)", None
    t = paired_t(summary[v]["seeds"], summary[ref]["seeds"])
    how = "untested" if t is None else "beyond" if t["significant"] else "within"
    return d, ("agrees" if d > 0 else "does not agree") + {
        "untested": " in sign, on fewer than 2 shared seeds (no test yet)", "beyond": ", beyond the seed spread",
        "within": ", but within the seed spread"}[how], how


def here(summary: dict, v: str, ref: str, d: float, at_constant: dict[str, set[str]]) -> str:
    """A claim's figure for the summary: the difference, its seeds and its test's p, and whether
    neither side cleared the best constant predictor on any of its tasks (then the claim compares
    two models that learned nothing the test can see). at_constant: {variant: the tasks where its
    mean is at or below the best constant}, as the tables above found them."""
    t = paired_t(summary[v]["seeds"], summary[ref]["seeds"])
    n = len(shared_diff(summary, v, ref)[1])
    tasks = {k for k in [*summary[v]["tasks"], *summary[ref]["tasks"]] if k != "mnli_mm"}
    floor = tasks <= at_constant.get(v, set()) & at_constant.get(ref, set())   # neither learned anything
    return (f"`{v}` − `{ref}` = {d:+.4f} ({n} seed{'s' if n > 1 else ''}" + (f", p = {t['p']:.3f})" if t else ")")
            + ("; both at or below the best constant on " + ", ".join(TASK_NAMES.get(t, t) for t in sorted(tasks))
               if floor else ""))


def table_claims(summary: dict, vs: list[str], suffix: str, section: str, at_constant: dict[str, set[str]],
                 cells: dict[str, list[dict]], protos) -> tuple[list[str], list[Finding]]:
    """The papers' claims (PAPER_CLAIMS) on a table's numbers, its variants named with its suffix,
    their caveats, and apart our own comparisons (OWN_COMPARISONS); each with the numbers its table
    prints and the protocol line of its cells (cells: variant -> result records; protos: the
    document's Protocols); `section`: the table's heading, where the summary links to."""
    L, found = [], []

    def check(claims, own: bool) -> list[str]:
        out = []
        for v, r_, c in claims:
            d, said, how = verdict(summary, v, r_)
            line = protos.line(c.paper, [(v, cells.get(v, [])), (r_, cells.get(r_, []))], at_constant)
            out += [f"- {c.text} ({'the paper' if c.paper else 'why ours'}: {c.printed}). Here `{v}` − `{r_}` = "
                    f"{d:+.4f} on the average over the shared seeds ({compare(summary, v, r_)}): {said}.",
                    f"  - {line}"]
            if how:
                found.append(Finding(c.text, here(summary, v, r_, d, at_constant), d > 0, how, section, line, own))
        return out

    def pairs(claims):
        return [(c.variant + suffix, c.reference + suffix, c) for c in claims
                if c.variant + suffix in summary and c.reference + suffix in summary]
    claims, own = pairs(PAPER_CLAIMS), pairs(OWN_COMPARISONS)
    if claims:
        L += ["#### What agrees with the papers and what does not", ""] + check(claims, False) + [""]
        L += caveats(summary, vs, [(v, r_, c.text) for v, r_, c in claims])
    if own:
        L += ["#### Our own comparisons (no paper makes them)", ""] + check(own, True) + [""]
    return L, found


def caveats(summary: dict, vs: list[str], claims: list[tuple[str, str, str]]) -> list[str]:
    """What the claims' tests do not account for: testing several claims at once (Holm-Bonferroni
    over those with a test), and a task that no variant learned (an MCC near 0 in every row)."""
    L = []
    tested = [(v, r_, t) for v, r_, _ in claims if (t := paired_t(summary[v]["seeds"], summary[r_]["seeds"]))]
    if len(tested) > 1:
        kept = [f"`{v}` − `{r_}` (p = {t['p']:.3f})" for (v, r_, t), k in zip(tested, holm([t["p"] for *_, t in tested]))
                if k]
        L += [f"Each claim is tested on its own at 5 %: were no difference real, one or more of these {len(tested)} "
              f"tests would still pass with probability {1 - 0.95 ** len(tested):.0%} (were they independent). "
              f"Holm–Bonferroni over the {len(tested)} (family-wise error kept at 5 %) keeps: "
              f"{', '.join(kept) if kept else 'none of them'}.", ""]
    for task in [t for t in TASK_NAMES if metric_name(t) == "mcc"]:
        means = [summary[v]["tasks"][task][0] for v in vs if task in summary[v]["tasks"]]
        if means and all(abs(m) < NEAR_CHANCE_MCC for m in means):
            L += [f"{TASK_NAMES[task]}: every variant's mean MCC lies in [{min(means):+.4f}, {max(means):+.4f}], within "
                  f"±{NEAR_CHANCE_MCC} of the one-class score 0: at this budget no method learned it, so its column tells "
                  "no method from another; it still counts in every average.", ""]
    return L


def ablation_section(summary: dict, grid: str, base: str, records: list[dict], at_constant: dict[str, set[str]],
                     cells: dict[str, list[dict]], protos) -> tuple[list[str], list[Finding], list[str]]:
    """Each ablated row against the full method (the baseline's cells) and the paper's Table 5:
    the paper has every row below its full method. A row on one seed is judged against the full
    method's seed spread; one within it needs 3 seeds (the grid's rule), and the section names them
    with the command that runs them. Each row gets its protocol line (cells: variant -> records).
    Returns the lines, the findings and those rows."""
    ab = PAPER_ABLATIONS[grid]
    sigma, n_base = summary[base]["average"][1], summary[base]["n"]
    lim = 2 * 2 ** 0.5 * sigma
    L = [f"#### What agrees with {ab.name} and what does not", "",
         f"The paper has every row below its full method (GLUE average {ab.full:.{ab.digits}f}); its drop is the one it "
         f"prints, else its row minus its full method; ours is the row's average minus `{base}`'s over the seeds "
         "both ran. A row with 2 or more seeds "
         "gets the paired t-test; a row on one seed is beyond the seed spread when its difference exceeds "
         f"2√2 σ = {lim:.4f}, σ = {sigma:.4f} the full method's sample std over its {n_base} seeds (a difference of "
         "two one-seed runs has std √2 σ; 2√2 σ is its two-sided 95 % for normal noise, with σ itself from few "
         "seeds).", ""]
    need, found = [], []
    for v, (label, theirs, printed) in ab.rows.items():
        if v not in summary:
            L.append(f"- {label} (`{v}`): no cell has finished yet.")
            continue
        drop = printed if printed is not None else theirs - ab.full
        d, seeds = shared_diff(summary, v, base)
        t = paired_t(summary[v]["seeds"], summary[base]["seeds"])
        if t is not None:
            how, within = compare(summary, v, base), not t["significant"]
        elif seeds and n_base > 1:
            within = abs(d) <= lim
            how = f"seed {seeds[0]} only: {'within' if within else 'beyond'} the spread, |{d:+.4f}| vs {lim:.4f}"
        else:
            how, within = "no shared seed with a spread to judge it by", True
        if within and len(seeds) < 3:
            need.append(v)
        line = protos.line(ab.paper, [(v, cells.get(v, [])), (base, cells.get(base, []))], at_constant)
        if seeds:
            found.append(Finding(f"{ab.name}: {label} below the full method (the paper: {drop:+.4f})",
                                 here(summary, v, base, d, at_constant), d < 0, "within" if within else "beyond",
                                 f"Grid `{grid}`", line))
        L += [f"- {label} (`{v}`): the paper {theirs:.{ab.digits}f} vs {ab.full:.{ab.digits}f}, "
              + (f"its printed drop {printed:+.4f}" if printed is not None else f"a drop of {drop:+.4f}")
              + f"; here {d:+.4f} ({how}): " + ("agrees" if d < 0 else "does not agree")
              + (", but within the seed spread" if within else ", beyond the seed spread") + ".", f"  - {line}"]
    if grid == "ablation-mtl-lora" and "n-1" in summary:   # the paper: n = 1 falls below LoRA-MT
        lora = base.replace("mtl-lora", "lora-mt", 1)
        rs = [dict(r, variant=lora) for r in records if f"{r['grid']}/{r['variant']}" == lora]
        if rs:
            both = {**summary, **summarise(rs)}
            d, _, how = verdict(both, "n-1", lora)       # how surely; its wording is for "above", this claim is "below"
            text, printed = N1_BELOW_LORA_MT
            line = protos.line("mtl-lora", [("n-1", cells.get("n-1", [])), (lora, rs)], at_constant)
            if how:
                found.append(Finding(text, here(both, "n-1", lora, d, at_constant), d < 0, how, f"Grid `{grid}`",
                                     line))
            L += [f"- {text} (the paper: {printed}). Here `n-1` − `{lora}` = {d:+.4f} "
                  f"({compare(both, 'n-1', lora)}): " + ("agrees" if d < 0 else "does not agree") + ".", f"  - {line}"]
    L.append("")
    if need:
        L += [f"Within the spread on fewer than 3 seeds, so by the grid's rule (one seed unless the effect is within "
              f"the spread, then 3) still to run: {', '.join(f'`{v}`' for v in need)}: `python experiments/run.py "
              f"experiments/grids/{grid}.json --variants {','.join(need)} --seeds 1,2 --jobs 2`.", ""]
    return L, found, need


def fewshot_reference(v: str) -> str:
    """The LoRA-MT cell a few-shot MoRE cell is compared with: the same task and k (-t1: |T| = 1)."""
    return v.replace("more-", "lora-mt-", 1).removesuffix("-t1")


def fewshot_claim(v: str) -> str:
    """MoRE's Table 4 claim for a few-shot MoRE cell, with what the table prints at its task and k."""
    m = re.fullmatch(r"more-(\w+)-k(\d+)", v)
    nums = TABLE4.get((m.group(1), int(m.group(2)))) if m else None
    task = m and TASK_NAMES.get(m.group(1), TASK_NAMES.get(f"superglue_{m.group(1)}", m.group(1)))
    return FEWSHOT_CLAIM + (f" ({task}, k = {m.group(2)}: MoRE {nums[0]} vs LoRA {nums[1]})" if nums else "")


def fewshot_section(summary: dict, order: list[str], grid: str, at_constant: dict[str, set[str]],
                    cells: dict[str, list[dict]], protos) -> tuple[list[str], list[Finding]]:
    """MoRE's Table 4 on the few-shot grid: each MoRE cell against LoRA-MT at the same task and k
    (the table's LoRA; our LoRA-MT is the GLUE run's LoRA, transferred as MoRE is), and the -t1
    cells (|T| = 1) against MoRE's kept |T| (not a claim)."""
    L, found = [], []
    pairs = [(v, fewshot_reference(v)) for v in order if v.startswith("more-") and not v.endswith("-t1")
             and fewshot_reference(v) in summary]
    if pairs:
        L += ["### What agrees with MoRE's Table 4 and what does not", ""]
        for v, r_ in pairs:
            d, said, how = verdict(summary, v, r_)
            line = protos.line("more", [(v, cells.get(v, [])), (r_, cells.get(r_, []))], at_constant)
            L += [f"- {fewshot_claim(v)}. `{v}` − `{r_}` = {d:+.4f}: {said}.", f"  - {line}"]
            if how:
                found.append(Finding(fewshot_claim(v), here(summary, v, r_, d, at_constant), d > 0, how,
                                     f"Grid `{grid}`", line))
        L += [""] + caveats(summary, order, [(v, r_, "") for v, r_ in pairs])
    other = [(v, v.removesuffix("-t1")) for v in order if v.endswith("-t1") and v.removesuffix("-t1") in summary]
    if other:
        L += ["Which |T| a transfer puts in Eq. 6 (the `-t1` cells: |T| = 1, the new run's own task count, "
              "so the new task starts with ΔY times the GLUE run's |T|; the others keep the GLUE run's |T|):",
              ""]
        L += [f"- `{v}` − `{k}`: {compare(summary, v, k)}." for v, k in other]
        L.append("")
    return L, found


def more_seeds_lines(more_seeds: list[tuple[str, list[str]]]) -> list[str]:
    """The ablation rows within the seed spread that still need seeds 1 and 2 ((grid, rows) as
    ablation_section returned them), with the time they need and the commands that run them."""
    if not more_seeds:
        return []
    rows = sum(len(need) for _, need in more_seeds)
    minutes = sum(2 * len(need) * planned_minutes(load_grid(ROOT / "experiments" / "grids" / f"{g}.json"), 1)
                  for g, need in more_seeds)
    return [f"Beyond the grid files' seeds, {rows} ablation row(s) within the seed spread still need seeds 1 and 2 "
            f"({2 * rows} cells, {fmt_minutes(60 * minutes / 2)} planned on 2 cores, 2 cells at a time): "
            + "; ".join(f"`python experiments/run.py experiments/grids/{g}.json --variants {','.join(need)} "
                        "--seeds 1,2 --jobs 2`" for g, need in more_seeds) + ".", ""]

"""Write docs/REPLICATION.md and its figures from the grids' result files alone.

    python experiments/report.py                 # experiments/results/ -> docs/REPLICATION.md, docs/replication/*.png
    python experiments/report.py --results DIR --out FILE.md

Every number in the document comes from a result file (experiments/results/<grid>/*.json, written
by experiments/run.py), from the committed bench run (docs/bench/minilm-cpu.json) or from the
analyses' JSON files (experiments/analyses/: probe.py, embeddings.py, constant.py); nothing is
typed but the papers' own figures, quoted as such. Figures need matplotlib
(`pip install -e ".[analysis]"`); without it the document says so.
"""
import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mtlref import grid as G  # noqa: E402

TASK_NAMES = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP", "mnli": "MNLI",
              "qnli": "QNLI", "rte": "RTE", "cb": "CB", "superglue_boolq": "BoolQ"}
# The bench's method name of a variant, for its step time relative to LoRA (same model and batch).
# A grid's "tables" name a suffix that their variants add to these names (e.g. "more-lr5e-4").
BENCH_NAME = {"lora-st": "lora", "lora-mt": "lora", "dora": "dora", "multilora": "multilora", "moelora": "moelora",
              "mixlora": "mixlora", "mtl-lora": "mtl-lora", "more": "more", "more-official": "more"}
# What each paper reports about a pair (a direction, never a number): (variant, reference, paper).
PAPER_CLAIMS = [("mtl-lora", "lora-mt", "MTL-LoRA (Tables 2-4): MTL-LoRA above LoRA-MT"),
                ("mtl-lora", "lora-st", "MTL-LoRA (Table 2): MTL-LoRA above LoRA-ST"),
                ("more", "lora-mt", "MoRE (Table 1): MoRE above multi-task LoRA"),
                ("more", "moelora", "MoRE (Table 1): MoRE above MoELoRA"),
                ("more", "multilora", "MoRE (Table 1): MoRE above MultiLoRA"),
                ("more", "mixlora", "MoRE (Table 1): MoRE above MixLoRA"),
                ("more", "mtl-lora", "MoRE (Table 1): MoRE above MTL-LoRA"),
                ("dora", "lora-mt", "MTL-LoRA (Table 7, commonsense): DoRA above LoRA")]
# Each paper's Table 5 (GLUE average): its full method's and each ablated row's, keyed by our
# variant names. These are the papers' numbers (their backbone and budget), quoted to set the
# direction and size beside ours; none is a measurement here.
PAPER_ABLATIONS = {
    "ablation-mtl-lora": ("MTL-LoRA's Table 5 (LLaMA-2-7B)", 0.8996,
                          {"no-task-lambda": ("w/o Λ_t", 0.8956), "no-tau": ("w/o τ", 0.8895), "n-1": ("n = 1", 0.8886)}),
    "ablation-more": ("MoRE's Table 5 (T5-base)", 0.873,
                      {"no-linear-scaling": ("w/o linear scaling", 0.870), "no-task-embedding": ("w/o task embeddings", 0.861),
                       "no-contrastive": ("w/o CL optimization", 0.863), "no-ste": ("w/o STE", 0.864),
                       "random-sampling": ("w/ random sample", 0.862), "subset-experts": ("w/ subset experts", 0.862)}),
}
NEAR_CHANCE_MCC = 0.1       # |MCC| below this: hardly better than one class (MCC 0)
# Every claim a section checks, as (the paper's claim, what was found here, agrees, how surely:
# "beyond" / "within" the seed spread or "untested", the section's heading): the summary lists them.
FOUND: list[tuple[str, str, bool, str, str]] = []
MORE_SEEDS: list[tuple[str, list[str]]] = []   # (ablation grid, its rows that need seeds 1 and 2)
AT_CONSTANT: dict[str, set[str]] = {}           # variant -> tasks where its mean is at or below the best constant


def finding(paper: str, here: str, agrees: bool, how: str, section: str) -> None:
    FOUND.append((paper, here, agrees, how, section))


def anchor(heading: str) -> str:
    """The link target a Markdown renderer (GitHub's rule) gives a heading."""
    return "#" + re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def findings_section() -> list[str]:
    """The plain summary: every claim checked below, grouped by what came out, each pointing to the
    section that holds its numbers."""
    L = ["## What agrees with the papers and what does not", "",
         "Every claim the sections below check, one line each, with the section that holds its numbers. "
         "\"Beyond the seed spread\": a paired t-test over seeds at 5 % (for an ablation row on one seed, the "
         "rule its section states); each test on its own, not corrected for the number of claims (the tables' "
         "sections say what Holm–Bonferroni keeps). \"Untested\": one seed or one split, a direction only.", ""]
    if not FOUND:
        return L + ["No claim could be checked yet.", ""]
    groups = [(True, "beyond", "Agrees, beyond the seed spread"), (True, "within", "Agrees, within the seed spread"),
              (True, "untested", "Agrees in direction, untested"),
              (False, "untested", "Does not agree in direction, untested"),
              (False, "within", "Does not agree, within the seed spread"),
              (False, "beyond", "Does not agree, beyond the seed spread")]
    for agrees, how, title in groups:
        rows = [f for f in FOUND if f[2] is agrees and f[3] == how]
        if rows:
            L += [f"**{title}** ({len(rows)}):", ""]
            L += [f"- {paper}: {here} ([{section}]({anchor(section)}))" for paper, here, _, _, section in rows]
            L.append("")
    return L


def pm(ms: tuple[float, float], n: int) -> str:
    return f"{ms[0]:.4f}" if n == 1 else f"{ms[0]:.4f} ± {ms[1]:.4f}"


def machines_line(records: list[dict]) -> str:
    seen = {}
    for r in records:
        key = (r["machine"].get("gpu") or r["machine"]["cpu"], r["machine"]["cores"], r["threads"], r["machine"]["torch"])
        seen.setdefault(key, []).append(r)
    return "; ".join(f"{len(rs)} cells on {m} ({c} cores, {t} torch thread(s), torch {v})"
                     for (m, c, t, v), rs in seen.items())


def table(summary: dict, order: list[str], bench: dict | None, reference, suffix: str = "",
          const: dict | None = None) -> list[str]:
    """reference: a variant every row is compared with, or a function variant -> its reference;
    suffix: what the variants add to BENCH_NAME's names; const: constant_row()'s, the last row."""
    ref_of = reference if callable(reference) else (lambda v: reference)
    found = [t for s in summary.values() for t in s["tasks"] if t != "mnli_mm"]
    tasks = [t for t in TASK_NAMES if t in found] + sorted({t for t in found if t not in TASK_NAMES})
    head = ["variant", "seeds"] + [TASK_NAMES.get(t, t) for t in tasks] + ["average", "trainable %", "step × LoRA"]
    if reference:
        head.append(f"vs {reference if isinstance(reference, str) else 'the reference'} (paired t over seeds)")
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
    for v in order:
        s = summary[v]
        step = "–"
        name = BENCH_NAME.get(v.removesuffix(suffix) if suffix else v)
        if bench and name in bench["training"]:
            step = f"{bench['training'][name]['vs_lora']['median']:.2f}"
        seeds = str(s["n"]) + (f" ({len(s['collapsed'])} collapsed: " + ", ".join(f"s{k}" for k in s["collapsed"])
                               + ")" if s["collapsed"] else "")
        cells = [v, seeds] + [pm(s["tasks"][t], s["n"]) if t in s["tasks"] else "–" for t in tasks]
        cells += [f"**{pm(s['average'], s['n'])}**", f"{s['trainable_percent']:.3f}" if s["trainable_percent"] else "–",
                  step]
        if reference:
            r = ref_of(v)
            named = callable(reference) and r in summary and r != v
            cells.append(f"vs `{r}`: " + compare(summary, v, r) if named else compare(summary, v, r))
        lines.append("| " + " | ".join(cells) + " |")
    if const:
        cells = ["best constant", str(const["n"])] + [pm(const["tasks"][t][:2], const["tasks"][t][2])
                                                      if t in const["tasks"] else "–" for t in tasks]
        cells += [pm(const["average"], const["n"]) if const["average"] else "–", "–", "–"]
        cells += ["–"] if reference else []
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def constant_row(rs: list[dict], vs: list[str], consts: dict | None) -> tuple[dict | None, list[str]]:
    """(the best constant predictor over the test sets the cells of variants vs were scored on:
    {"n": seeds, "tasks": {task: (mean, std, test sets)}, "average": (mean, std) or None,
    "by_seed": {seed: {task: main metric}}}, or None without constant.json; the seeds of the test
    sets constant.json lacks)."""
    if consts is None:
        return None, []
    keys = {G.data_key(r) for r in rs if r["variant"] in vs}
    missing = sorted({f"seed {json.loads(k)['seed']}" for k in keys if k not in consts})
    sets = [consts[k] for k in sorted(keys) if k in consts]
    if not sets:
        return None, missing
    tasks = {t for c in sets for t in c["tasks"]}
    per_task = {t: (*G.mean_std([c["tasks"][t]["main"] for c in sets if t in c["tasks"]]),
                    sum(t in c["tasks"] for c in sets)) for t in tasks}
    same = len({tuple(sorted(c["tasks"])) for c in sets}) == 1 and all(c["average"] is not None for c in sets)
    by_seed = {}                                       # seed -> {task: main metric}, for each variant's own seeds
    for k in keys & set(consts):
        by_seed.setdefault(json.loads(k)["seed"], {}).update({t: c["main"] for t, c in consts[k]["tasks"].items()})
    return {"n": len(by_seed), "tasks": per_task, "by_seed": by_seed,
            "average": G.mean_std([c["average"] for c in sets]) if same else None}, missing


def constant_lines(summary: dict, vs: list[str], const: dict | None, missing: list[str]) -> list[str]:
    """What the best-constant row is, and each task on which a variant's mean does not clear it (the
    constant's mean over that variant's own seeds, whose test sets it was scored on)."""
    def floor(v: str, t: str) -> float:
        xs = [const["by_seed"][k][t] for k in summary[v]["seeds"] if t in const["by_seed"].get(k, {})]
        return sum(xs) / len(xs) if xs else float("nan")      # nan: never "at or below"

    L = []
    if const:
        low = []
        for t in [t for t in TASK_NAMES if t in const["tasks"]] + sorted(set(const["tasks"]) - set(TASK_NAMES)):
            have = [v for v in vs if t in summary[v]["tasks"]]
            under = [v for v in have if summary[v]["tasks"][t][0] <= floor(v, t)]
            for v in under:
                AT_CONSTANT.setdefault(v, set()).add(t)
            if under and t != "mnli_mm":
                low.append(f"{TASK_NAMES.get(t, t)}: " + ("every variant" if len(under) == len(have) else
                                                          ", ".join(f"`{v}`" for v in under)))
        L += ["Best constant: the score of giving every test example the same answer, the best one for each test "
              "set (accuracy: its most frequent label; MCC 0; STS-B's Pearson 0, a constant has no correlation), over "
              "the test sets these cells were scored on (the paper split draws the small tasks' test halves by the "
              "seed); from `experiments/analyses/constant.json` (`python experiments/constant.py`), train.py's "
              "metric code. Where a variant's mean is at or below it (nothing the test can see was learned there): "
              + ("; ".join(low) if low else "nowhere") + ".", ""]
    if missing:
        L += [f"`experiments/analyses/constant.json` lacks {len(missing)} of these cells' test sets "
              f"({', '.join(missing)}): "
              "`python experiments/constant.py` writes them.", ""]
    return L


def compare(summary: dict, v: str, ref: str) -> str:
    if v == ref or ref not in summary:
        return "–"
    t = G.paired_t(summary[v]["seeds"], summary[ref]["seeds"])
    if t is None:
        d, seeds = shared_diff(summary, v, ref)
        return f"{d:+.4f} (seed {seeds[0]} only: no test)" if seeds else "no shared seed"
    return (f"{t['mean_diff']:+.4f}, t = {t['t']:.2f} (df {t['n'] - 1}, critical {t['critical']}, p = {t['p']:.3f}): "
            + ("**exceeds the seed spread**" if t["significant"] else "within the seed spread"))


def shared_diff(summary: dict, v: str, ref: str) -> tuple[float, list[int]]:
    """The mean over the seeds both ran of v's average minus ref's, and those seeds (nan for none):
    never a difference of means over different seeds."""
    a, b = summary[v]["seeds"], summary[ref]["seeds"]
    seeds = sorted(set(a) & set(b))
    return (sum(a[k] - b[k] for k in seeds) / len(seeds) if seeds else float("nan")), seeds


def verdict(summary: dict, v: str, ref: str) -> tuple[float, str, str | None]:
    """(mean difference of the averages over the shared seeds, whether it agrees with a paper saying
    v > ref and how surely, that last as "beyond" / "within" / "untested"; None: no shared seed)."""
    d, seeds = shared_diff(summary, v, ref)
    if not seeds:
        return d, "not yet comparable (no seed both ran)", None
    t = G.paired_t(summary[v]["seeds"], summary[ref]["seeds"])
    how = "untested" if t is None else "beyond" if t["significant"] else "within"
    return d, ("agrees" if d > 0 else "does not agree") + {
        "untested": " in sign, on fewer than 2 shared seeds (no test yet)", "beyond": ", beyond the seed spread",
        "within": ", but within the seed spread"}[how], how


def here(summary: dict, v: str, ref: str, d: float) -> str:
    """A claim's figure for the summary: the difference, its seeds and its test's p, and whether
    neither side cleared the best constant predictor on any of its tasks (then the claim compares
    two models that learned nothing the test can see)."""
    t = G.paired_t(summary[v]["seeds"], summary[ref]["seeds"])
    n = len(shared_diff(summary, v, ref)[1])
    tasks = {k for k in [*summary[v]["tasks"], *summary[ref]["tasks"]] if k != "mnli_mm"}
    floor = tasks <= AT_CONSTANT.get(v, set()) & AT_CONSTANT.get(ref, set())   # neither learned anything
    return (f"`{v}` − `{ref}` = {d:+.4f} ({n} seed{'s' if n > 1 else ''}" + (f", p = {t['p']:.3f})" if t else ")")
            + ("; both at or below the best constant on " + ", ".join(TASK_NAMES.get(t, t) for t in sorted(tasks))
               if floor else ""))


def table_section(summary: dict, rs: list[dict], vs: list[str], bench: dict | None, ref, tab: dict, grid: str,
                  figs: Path, rel, consts: dict | None = None) -> list[str]:
    """One table of a grid (its variants vs, compared with ref, and the best constant predictor of
    their test sets), the cells that collapsed, and for a table with "claims" the averages' figure
    and the papers' claims checked on its numbers."""
    suffix = tab.get("suffix", "")
    const, missing = constant_row(rs, vs, consts)
    L = [f"### {tab['title']}", "", tab.get("about", ""), ""] if tab.get("title") else []
    L += table(summary, vs, bench, ref, suffix, const) + [""] + constant_lines(summary, vs, const, missing)
    gone = [f"`{v}` s{k}" for v in vs for k in summary[v]["collapsed"]]
    if gone:
        ok = [G.main_metric("stsb", r["metrics"]["tasks"]["stsb"]) for r in rs
              if r["variant"] in vs and "stsb" in r["metrics"]["tasks"] and not G.collapsed(r["metrics"])]
        L += [f"Collapsed cells: {', '.join(gone)}: STS-B Pearson below {G.COLLAPSE_PEARSON}"
              + (f" (the other cells: {min(ok):.2f}–{max(ok):.2f})" if ok else "")
              + ", i.e. the model's outputs hardly depend on its input; their training loss stopped falling "
              "early (the cells' logs). They count in the means, as the budget gave them.", ""]
    elif len(vs) < len(summary):                       # one of several tables
        L += ["No cell of this table collapsed.", ""]
    if ref:
        L += [f"The last column: a paired t-test over the seeds both variants ran, on the average, against "
              + (f"`{ref}`" if isinstance(ref, str) else "LoRA-MT at the same task and k") + " (two-sided, 95 %).",
              ""]
    if tab.get("claims"):
        f = average_figure(summary, vs, figs / f"{grid}-averages{suffix}.png", tab.get("title", "Main grid"))
        if f:
            L += [f"![GLUE average per seed]({rel(f)})", ""]
        claims = [(v + suffix, r_ + suffix, paper) for v, r_, paper in PAPER_CLAIMS
                  if v + suffix in summary and r_ + suffix in summary]
        if claims:
            L += ["#### What agrees with the papers and what does not", ""]
            for v, r_, paper in claims:
                d, said, how = verdict(summary, v, r_)
                L.append(f"- {paper}. Here `{v}` − `{r_}` = {d:+.4f} on the average over the shared seeds "
                         f"({compare(summary, v, r_)}): {said}.")
                if how:
                    finding(paper, here(summary, v, r_, d), d > 0, how, tab.get("title", f"Grid `{grid}`"))
            L += [""] + caveats(summary, vs, claims)
    return L


def caveats(summary: dict, vs: list[str], claims: list[tuple[str, str, str]]) -> list[str]:
    """What the claims' tests do not account for: testing several claims at once (Holm-Bonferroni
    over those with a test), and a task that no variant learned (an MCC near 0 in every row)."""
    L = []
    tested = [(v, r_, t) for v, r_, _ in claims if (t := G.paired_t(summary[v]["seeds"], summary[r_]["seeds"]))]
    if len(tested) > 1:
        kept = [f"`{v}` − `{r_}` (p = {t['p']:.3f})" for (v, r_, t), k in zip(tested, G.holm([t["p"] for *_, t in tested]))
                if k]
        L += [f"Each claim is tested on its own at 5 %: were no difference real, one or more of these {len(tested)} "
              f"tests would still pass with probability {1 - 0.95 ** len(tested):.0%} (were they independent). "
              f"Holm–Bonferroni over the {len(tested)} (family-wise error kept at 5 %) keeps: "
              f"{', '.join(kept) if kept else 'none of them'}.", ""]
    for task in [t for t in TASK_NAMES if G.metric_name(t) == "mcc"]:
        means = [summary[v]["tasks"][task][0] for v in vs if task in summary[v]["tasks"]]
        if means and all(abs(m) < NEAR_CHANCE_MCC for m in means):
            L += [f"{TASK_NAMES[task]}: every variant's mean MCC lies in [{min(means):+.4f}, {max(means):+.4f}], within "
                  f"±{NEAR_CHANCE_MCC} of the one-class score 0: at this budget no method learned it, so its column tells "
                  "no method from another; it still counts in every average.", ""]
    return L


def across_tables(summary: dict, tables: list[dict]) -> list[str]:
    """Each variant of the first table against its counterpart (same name, the other table's
    suffix) in every other table: what the one setting that tells the tables apart changes."""
    if len(tables) < 2:
        return []
    first, sfx = tables[0], tables[0].get("suffix", "")
    L = []
    for tab in tables[1:]:
        pairs = [(v, v.removesuffix(sfx) + tab.get("suffix", "")) for v in first["variants"]]
        pairs = [(v, w) for v, w in pairs if v in summary and w in summary]
        if not pairs:
            continue
        L += [f"### {first.get('label', first.get('title'))} against {tab.get('label', tab.get('title'))}, "
              "variant by variant", "",
              "| variant | average | counterpart | average | difference (paired t over the shared seeds) |",
              "|---|---:|---|---:|---|"]
        L += [f"| {v} | {pm(summary[v]['average'], summary[v]['n'])} | {w} | {pm(summary[w]['average'], summary[w]['n'])}"
              f" | {compare(summary, v, w)} |" for v, w in pairs]
        L.append("")
    return L


def ablation_section(summary: dict, grid: str, base: str, records: list[dict]) -> list[str]:
    """Each ablated row against the full method (the baseline's cells) and the paper's Table 5:
    the paper has every row below its full method. A row on one seed is judged against the full
    method's seed spread; one within it needs 3 seeds (the grid's rule), and the section names them
    with the command that runs them."""
    paper, full, rows = PAPER_ABLATIONS[grid]
    sigma, n_base = summary[base]["average"][1], summary[base]["n"]
    lim = 2 * 2 ** 0.5 * sigma
    L = [f"#### What agrees with {paper} and what does not", "",
         f"The paper has every row below its full method (GLUE average {full:.4f}); its drop is quoted from its "
         f"table, ours is the row's average minus `{base}`'s over the seeds both ran. A row with 2 or more seeds "
         "gets the paired t-test; a row on one seed is beyond the seed spread when its difference exceeds "
         f"2√2 σ = {lim:.4f}, σ = {sigma:.4f} the full method's sample std over its {n_base} seeds (a difference of "
         "two one-seed runs has std √2 σ; 2√2 σ is its two-sided 95 % for normal noise, with σ itself from few "
         "seeds).", ""]
    need = []
    for v, (label, theirs) in rows.items():
        if v not in summary:
            L.append(f"- {label} (`{v}`): no cell has finished yet.")
            continue
        d, seeds = shared_diff(summary, v, base)
        t = G.paired_t(summary[v]["seeds"], summary[base]["seeds"])
        if t is not None:
            how, within = compare(summary, v, base), not t["significant"]
        elif seeds and n_base > 1:
            within = abs(d) <= lim
            how = f"seed {seeds[0]} only: {'within' if within else 'beyond'} the spread, |{d:+.4f}| vs {lim:.4f}"
        else:
            how, within = "no shared seed with a spread to judge it by", True
        if within and len(seeds) < 3:
            need.append(v)
        if seeds:
            finding(f"{paper}: {label} below the full method (the paper: {theirs - full:+.4f})",
                    here(summary, v, base, d), d < 0, "within" if within else "beyond", f"Grid `{grid}`")
        L.append(f"- {label} (`{v}`): the paper {theirs - full:+.4f}; here {d:+.4f} ({how}): "
                 + ("agrees" if d < 0 else "does not agree") + (", but within the seed spread" if within else
                                                                 ", beyond the seed spread") + ".")
    if grid == "ablation-mtl-lora" and "n-1" in summary:   # the paper: n = 1 falls below LoRA-MT
        lora = base.replace("mtl-lora", "lora-mt", 1)
        rs = [dict(r, variant=lora) for r in records if f"{r['grid']}/{r['variant']}" == lora]
        if rs:
            both = {**summary, **G.summarise(rs)}
            d, _, how = verdict(both, "n-1", lora)       # how surely; its wording is for "above", this claim is "below"
            if how:
                finding("MTL-LoRA's text: with n = 1 below LoRA-MT", here(both, "n-1", lora, d), d < 0, how,
                        f"Grid `{grid}`")
            L.append(f"- MTL-LoRA's text: with n = 1 MTL-LoRA falls below LoRA-MT (its Table 5: 0.8886 vs 0.8887). "
                     f"Here `n-1` − `{lora}` = {d:+.4f} ({compare(both, 'n-1', lora)}): "
                     + ("agrees" if d < 0 else "does not agree") + ".")
    L.append("")
    if need:
        MORE_SEEDS.append((grid, need))
        L += [f"Within the spread on fewer than 3 seeds, so by the grid's rule (one seed unless the effect is within "
              f"the spread, then 3) still to run: {', '.join(f'`{v}`' for v in need)}: `python experiments/run.py "
              f"experiments/grids/{grid}.json --variants {','.join(need)} --seeds 1,2 --jobs 2`.", ""]
    return L


def short_module(n: str) -> str:
    return (n.replace("encoder.layer.", "L").replace("attention.self.", "").replace("attention.output.dense", "ao")
            .replace("intermediate.dense", "ffn_in").replace("output.dense", "ffn_out"))


def heat_map(m: list[list[int]], tasks: list[str], names: list[str], title: str, path: Path) -> str:
    """A task × module map of chosen ranks (MoRE Figure 2a/2b)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(names)), 0.45 * len(tasks) + 1.6))
    im = ax.imshow(m, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(tasks)), [TASK_NAMES.get(t, t) for t in tasks])
    ax.set_xticks(range(len(names)), [short_module(n) for n in names], rotation=90, fontsize=6)
    fig.colorbar(im, ax=ax, label="chosen rank r_t")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def rank_figure(records: list[dict], path: Path, variant: str = "more") -> str | None:
    """MoRE Figure 2a: the rank each task chose in each adapted module (the variant's first seed)."""
    r = next((r for r in sorted(records, key=lambda r: r["seed"]) if r.get("rank_maps") and r["variant"] == variant),
             None)
    if r is None or importlib.util.find_spec("matplotlib") is None:
        return None
    names = list(r["rank_maps"])
    tasks = [t for t in r["metrics"]["tasks"] if t != "mnli_mm"]          # mnli_mm uses mnli's id: no row
    m = [[r["rank_maps"][n][t] for n in names] for t in range(len(tasks))]
    return heat_map(m, tasks, names, f"MoRE: rank chosen per task and module ({r['grid']}, seed {r['seed']})", path)


def average_figure(summary: dict, order: list[str], path: Path, title: str = "Main grid") -> str | None:
    if importlib.util.find_spec("matplotlib") is None or not order:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, v in enumerate(order):
        ys = list(summary[v]["seeds"].values())
        ax.scatter([i] * len(ys), ys, color="C0", s=14)
        ax.errorbar(i, summary[v]["average"][0], yerr=summary[v]["average"][1], color="k", capsize=4, marker="_")
    ax.set_xticks(range(len(order)), order, rotation=30)
    ax.set_ylabel("GLUE average (papers' metrics)")
    ax.set_title(f"{title}: each seed (dots), mean ± std (bars)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def tsne_figure(res: dict, path: Path) -> str | None:
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = list(res["runs"].items())
    fig, axes = plt.subplots(len(runs), 2, figsize=(9, 4 * len(runs)), squeeze=False)
    for row, (name, r) in zip(axes, runs):
        tasks = sorted(set(r["labels"]), key=r["labels"].index)
        for ax, space in zip(row, ("low", "full")):
            xy = r[space]["tsne"]
            for k, t in enumerate(tasks):
                pts = [p for p, lab in zip(xy, r["labels"]) if lab == t]
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=6, color=f"C{k}", label=TASK_NAMES.get(t, t))
            ax.set_title(f"{r['method']}, {'low-rank A_t x' if space == 'low' else 'full-rank output'}: "
                         f"macro-F1 {r[space]['macro_f1']:.3f}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][1].legend(fontsize=7, markerscale=2, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def ran_with(res: dict) -> str:
    """An analysis' torch threads, where its JSON records them."""
    return f" ({res['threads']} torch thread(s))" if "threads" in res else ""


def probe_section(analyses: Path, figs: Path, rel) -> list[str]:
    """MTL-LoRA Table 6 / Figure 1 from experiments/probe.py's JSON files."""
    files = sorted(analyses.glob("probe-*.json"))
    if not files:
        return ["## Task differentiation (MTL-LoRA Table 6, Figure 1)", "",
                "Not yet run: no `experiments/analyses/probe-*.json` (`python experiments/probe.py RUN ...`).", ""]
    L = ["## Task differentiation (MTL-LoRA Table 6, Figure 1)", ""]
    for f in files:
        res = json.loads(f.read_text())
        L += [f"`{res['command']}`{ran_with(res)} ({res['per_task']} test examples per task, seed {res['seed']}): "
              "a linear probe (logistic regression on standardised features) fitted on a stratified 40 % and "
              "scored on the other 60 %, macro-F1 over the tasks; chance is 1 / (number of tasks).", "",
              "| run | method | module | low-rank (dim) | full-rank (dim) |", "|---|---|---|---:|---:|"]
        for name, r in res["runs"].items():
            L.append(f"| `{name}` | {r['method']} | `{r['module']}` | {r['low']['macro_f1']:.3f} ({r['low']['dim']}) | "
                     f"{r['full']['macro_f1']:.3f} ({r['full']['dim']}) |")
        L.append("")
        by = {r["method"]: r for r in res["runs"].values()}
        if "lora" in by and "mtl-lora" in by:
            for space, what in (("low", "low-rank"), ("full", "full-rank")):
                d = by["mtl-lora"][space]["macro_f1"] - by["lora"][space]["macro_f1"]
                finding(f"MTL-LoRA (Table 6): MTL-LoRA's {what} features tell the tasks apart better than LoRA-MT's",
                        f"macro-F1 {by['mtl-lora'][space]['macro_f1']:.3f} against {by['lora'][space]['macro_f1']:.3f} "
                        f"(`{f.name}`)", d > 0, "untested", "Task differentiation (MTL-LoRA Table 6, Figure 1)")
                L.append(f"- MTL-LoRA (Table 6): MTL-LoRA's {what} features tell the tasks apart better than "
                         f"LoRA-MT's. Here {by['mtl-lora'][space]['macro_f1']:.3f} against "
                         f"{by['lora'][space]['macro_f1']:.3f} ({d:+.3f}): {'agrees' if d > 0 else 'does not agree'} "
                         "(one seed, one split of the probe).")
            L.append("")
        fig = tsne_figure(res, figs / f"{f.stem}-tsne.png")
        if fig:
            L += [f"![t-SNE of the features]({rel(fig)})", ""]
    return L


def pca_figure(res: dict, path: Path) -> str | None:
    """MoRE Figure 2c: the task embeddings of the last block's attention modules, PCA to 2-D."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    mods = list(res["modules"].items())
    fig, axes = plt.subplots(1, len(mods), figsize=(3.2 * len(mods), 3.4), squeeze=False)
    for ax, (name, m) in zip(axes[0], mods):
        for k, (t, (x, y)) in enumerate(zip(res["tasks"], m["pca"])):
            ax.scatter([x], [y], color=f"C{k}", s=30)
            ax.annotate(TASK_NAMES.get(t, t), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{'block ' + str(res['block']) + ', all attention' if name == 'all' else short_module(name)}\n"
                     f"PC1 {m['explained'][0]:.0%}, PC2 {m['explained'][1]:.0%} of the variance", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def pair_rank(cos: list[list[float]], tasks: list[str], a: str, b: str) -> tuple[float, int, int]:
    """(cosine of tasks a and b, its rank among all task pairs from the most similar = 1, pairs)."""
    pairs = sorted((cos[i][j] for i in range(len(tasks)) for j in range(i + 1, len(tasks))), reverse=True)
    c = cos[tasks.index(a)][tasks.index(b)]
    return c, pairs.index(c) + 1, len(pairs)


def embeddings_section(analyses: Path, figs: Path, rel) -> list[str]:
    """MoRE Figure 2b/2c from experiments/embeddings.py's JSON files."""
    files = sorted(analyses.glob("embeddings-*.json"))
    L = ["## MoRE's task embeddings and rank experts (Figure 2b, 2c)", ""]
    if not files:
        return L + ["Not yet run: no `experiments/analyses/embeddings-*.json` "
                    "(`python experiments/embeddings.py RUN --out ...`).", ""]
    for f in files:
        res = json.loads(f.read_text())
        tasks, allm = res["tasks"], res["modules"]["all"]
        cos = allm["cosine"]
        mean_off = sum(cos[i][j] for i in range(len(tasks)) for j in range(len(tasks)) if i != j) / (
            len(tasks) * (len(tasks) - 1))
        L += [f"`{res['command']}`{ran_with(res)}: the task embeddings e_t of block {res['block']}'s attention modules "
              f"({', '.join(f'`{n}`' for n in res['modules'] if n != 'all')}), PCA of each and of the four side by "
              f"side ({allm['dim']} numbers per task). PC1 + PC2 explain {allm['explained'][0]:.3f} + "
              f"{allm['explained'][1]:.3f} of the variance of the side-by-side embeddings; {len(tasks)} points "
              f"spread evenly over their {len(tasks) - 1} dimensions would give {1 / (len(tasks) - 1):.3f} each.", "",
              "Cosine similarity of the side-by-side embeddings (two independent random directions of this size: "
              f"0 ± {1 / allm['dim'] ** 0.5:.3f}; the mean over the pairs here is {mean_off:+.3f}, and "
              f"{len(tasks)} directions as far apart as they can be, a regular simplex, give "
              f"{-1 / (len(tasks) - 1):+.3f}):", "",
              "| | " + " | ".join(TASK_NAMES.get(t, t) for t in tasks) + " | nearest |",
              "|---|" + "---:|" * len(tasks) + "---|"]
        for i, t in enumerate(tasks):
            near = max((j for j in range(len(tasks)) if j != i), key=lambda j: cos[i][j])
            L.append(f"| {TASK_NAMES.get(t, t)} | " + " | ".join(f"{c:+.3f}" if j != i else "–"
                                                                for j, c in enumerate(cos[i]))
                     + f" | {TASK_NAMES.get(tasks[near], tasks[near])} |")
        L.append("")
        if {"mrpc", "qnli", "stsb", "cola"} <= set(tasks):
            c1, r1, n = pair_rank(cos, tasks, "mrpc", "qnli")
            c2, r2, _ = pair_rank(cos, tasks, "stsb", "cola")
            where = "MoRE's task embeddings and rank experts (Figure 2b, 2c)"
            finding("MoRE (Figure 2c): MRPC and QNLI cluster", f"their cosine ranks {r1} of {n} pairs (`{f.name}`)",
                    r1 <= n // 4, "untested", where)
            finding("MoRE (Figure 2c): STS-B and CoLA lie far apart", f"their cosine ranks {r2} of {n} pairs "
                    f"(`{f.name}`)", r2 > n - n // 4, "untested", where)
            L += [f"- MoRE (Figure 2c): MRPC and QNLI cluster. Here their cosine is {c1:+.3f}, rank {r1} of {n} "
                  f"pairs (1 = most similar): {'agrees' if r1 <= n // 4 else 'does not agree'} (our rule: "
                  "in the most similar quarter of the pairs).",
                  f"- MoRE (Figure 2c): STS-B and CoLA lie far apart. Here their cosine is {c2:+.3f}, rank {r2} of "
                  f"{n}: {'agrees' if r2 > n - n // 4 else 'does not agree'} (our rule: in the least similar "
                  "quarter).", ""]
        fig = pca_figure(res, figs / f"{f.stem}-pca.png")
        if fig:
            L += [f"![PCA of the task embeddings]({rel(fig)})", ""]
        names = sorted(res["scaled_rank_maps"])
        if not names:
            L += ["Figure 2b: not drawn for this run: in the official code's mode the rank table is fixed at the "
                  "first forward, so no trained p_t chooses a rank.", ""]
            continue
        moved = sum(a != b for n in names for a, b in zip(res["rank_maps"][n], res["scaled_rank_maps"][n]))
        total = sum(len(res["rank_maps"][n]) for n in names)
        L += [f"Figure 2b, our reading of \"scaled down the influence of experts 1-3\" (the paper gives no "
              f"factor): each task's rank re-chosen with p_t of experts 1-3 multiplied by {res['scale_down']:g}. "
              f"{moved} of {total} (task, module) choices change."]
        if importlib.util.find_spec("matplotlib") is not None:
            m = [[res["scaled_rank_maps"][n][t] for n in names] for t in range(len(tasks))]
            fig = heat_map(m, tasks, names, f"MoRE: rank per task and module with experts 1-3 scaled by "
                           f"{res['scale_down']:g}", figs / f"{f.stem}-scaled-ranks.png")
            L += ["", f"![MoRE ranks with experts 1-3 scaled down]({rel(fig)})"]
        L.append("")
    return L


def plan_section(records: list[dict]) -> list[str]:
    """Every grid file's cells: how many have results, and what the rest needs (the grid file's
    minutes per cell, measured on this project's 2-core CPU machine)."""
    L = ["## The grids and what is left of them", "",
         "| grid | cells | finished | left | planned minutes per cell (1 / 2 threads) | measured (finished cells, 1 thread) "
         "| left, 2 cores, 2 cells at a time (planned) |",
         "|---|---:|---:|---:|---|---|---:|"]
    done = {(r["grid"], r["variant"], r["seed"]) for r in records}
    for path in sorted((ROOT / "experiments" / "grids").glob("*.json")):
        grid = G.load_grid(path)
        cells = G.cells(grid)
        left = [c for c in cells if (c.grid, c.variant, c.seed) not in done]
        one, two = G.planned_minutes(grid, 1), G.planned_minutes(grid, 2)
        walls = [r["wall_s"] / 60 for r in records if r["grid"] == grid["name"] and r["threads"] == 1]
        measured = f"{min(walls):.1f}–{max(walls):.1f} min, mean {sum(walls) / len(walls):.1f}" if walls else "–"
        L.append(f"| `{grid['name']}` | {len(cells)} | {len(cells) - len(left)} | {len(left)} | {one:g} / {two:g} | "
                 f"{measured} | {G.fmt_minutes(60 * one * -(-len(left) // 2))} |")
    L += ["", "On a GPU the whole of it is one command per grid, e.g. `python experiments/run.py "
          "experiments/grids/main.json --device cuda --jobs 4` (then `fewshot.json`, which starts from the main "
          "grid's seed-0 runs).", "",
          "Not built yet: bootstrap intervals over test examples (the comparisons below are paired t-tests "
          "over seeds).", ""]
    return L


def write(results: Path, out: Path, bench_path: Path, analyses: Path | None = None) -> str:
    analyses = analyses or Path(results).parent / "analyses"
    records = G.load_results(results)
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
    FOUND.clear()
    MORE_SEEDS.clear()
    AT_CONSTANT.clear()
    at = len(L)                                        # the summary goes here, once every section has run
    for name, rs in grids.items():
        path = ROOT / "experiments" / "grids" / f"{name}.json"
        spec = json.loads(path.read_text()) if path.is_file() else {"variants": sorted({r["variant"] for r in rs})}
        L += [f"## Grid `{name}`", "", spec.get("about", ""), "",
              f"{len(rs)} cells; {sum(r['wall_s'] for r in rs) / 3600:.2f} h wall summed; {machines_line(rs)}. "
              f"Split: {rs[0]['metrics'].get('split')}; steps per cell: "
              f"{', '.join(sorted({json.dumps(r['metrics'].get('steps')) for r in rs}))}"
              f"{' (LoRA-ST: per task)' if any(isinstance(r['metrics'].get('steps'), dict) for r in rs) else ''}. "
              "Papers' metrics: MCC for CoLA, Pearson for "
              "STS-B, accuracy otherwise; mean ± sample standard deviation over seeds.", ""]
        base = spec.get("baseline")                    # "grid/variant": another grid's cells, the first row
        if base:
            rs = [dict(r, variant=base) for r in records if f"{r['grid']}/{r['variant']}" == base] + rs
        summary = G.summarise(rs)
        order = [v for v in [base, *spec["variants"]] if v in summary]
        # A grid may split its variants into tables (the main grid: one per shared lr); each table's
        # variants are BENCH_NAME's names plus the table's suffix, compared within the table.
        tables = spec.get("tables") or [{"variants": order, "claims": name == "main"}]
        few_ref = lambda v: v.replace("more-", "lora-mt-", 1).removesuffix("-t1")  # noqa: E731 (-t1: |T| = 1)
        for tab in tables:
            vs, suffix = [v for v in tab["variants"] if v in summary], tab.get("suffix", "")
            if not vs:
                continue
            ref = "lora-mt" + suffix if "lora-mt" + suffix in summary else None
            ref = (base or vs[0]) if ref is None and name.startswith("ablation") else ref
            ref = few_ref if name == "fewshot" else ref   # MoRE against LoRA-MT at the same task and k
            L += table_section(summary, rs, vs, bench, ref, tab, name, figs, rel, consts)
        L += across_tables(summary, tables)
        if name in PAPER_ABLATIONS and base in summary:
            L += ablation_section(summary, name, base, records)
        if name == "fewshot":
            pairs = [(v, few_ref(v)) for v in order if v.startswith("more-") and not v.endswith("-t1")
                     and few_ref(v) in summary]
            if pairs:
                L += ["### What agrees with MoRE's Table 4 and what does not", ""]
                for v, r_ in pairs:
                    d, said, how = verdict(summary, v, r_)
                    L.append(f"- MoRE (Table 4): MoRE above LoRA-MT after few-shot transfer. `{v}` − `{r_}` = "
                             f"{d:+.4f}: {said}.")
                    if how:
                        finding("MoRE (Table 4): MoRE above LoRA-MT after few-shot transfer", here(summary, v, r_, d),
                                d > 0, how, f"Grid `{name}`")
                L += [""] + caveats(summary, order, [(v, r_, "") for v, r_ in pairs])
            other = [(v, v.removesuffix("-t1")) for v in order if v.endswith("-t1") and v.removesuffix("-t1") in summary]
            if other:
                L += ["Which |T| a transfer puts in Eq. 6 (the `-t1` cells: |T| = 1, the new run's own task count, "
                      "so the new task starts with ΔY times the GLUE run's |T|; the others keep the GLUE run's |T|):",
                      ""]
                L += [f"- `{v}` − `{k}`: {compare(summary, v, k)}." for v, k in other]
                L.append("")
        more = "more" + next((t.get("suffix", "") for t in tables if t.get("claims")), "")
        f = rank_figure(rs, figs / f"{name}-more-ranks.png", more if more in summary else "more")
        if f:
            L += [f"![MoRE rank allocation]({rel(f)})", "",
                  "MoRE's Figure 2a here: the rank r_t each task's gate chose in every adapted module "
                  "(argmax of p_t, from the run's adapter_config.json).", ""]
    L += probe_section(Path(analyses), figs, rel)
    L += embeddings_section(Path(analyses), figs, rel)
    rows = sum(len(need) for _, need in MORE_SEEDS)
    minutes = sum(2 * len(need) * G.planned_minutes(G.load_grid(ROOT / "experiments" / "grids" / f"{g}.json"), 1)
                  for g, need in MORE_SEEDS)
    more = [f"Beyond the grid files' seeds, {rows} ablation row(s) within the seed spread still need seeds 1 and 2 "
            f"({2 * rows} cells, {G.fmt_minutes(60 * minutes / 2)} planned on 2 cores, 2 cells at a time): "
            + "; ".join(f"`python experiments/run.py experiments/grids/{g}.json --variants {','.join(need)} "
                        "--seeds 1,2 --jobs 2`" for g, need in MORE_SEEDS) + ".", ""] if MORE_SEEDS else []
    L[at:at] = more + findings_section()
    if importlib.util.find_spec("matplotlib") is None:
        L += ["Figures: not drawn, matplotlib is not importable (`pip install -e \".[analysis]\"`).", ""]
    text = "\n".join(L).rstrip() + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(ROOT / "experiments" / "results"))
    p.add_argument("--out", default=str(ROOT / "docs" / "REPLICATION.md"))
    p.add_argument("--bench", default=str(ROOT / "docs" / "bench" / "minilm-cpu.json"),
                   help="bench.py JSON whose step times go in the tables")
    p.add_argument("--analyses", default=None, help="experiments/probe.py JSON files (default: beside --results)")
    args = p.parse_args(argv)
    write(Path(args.results), Path(args.out), Path(args.bench), Path(args.analyses) if args.analyses else None)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The document's tables: each variant's mean ± std over its seeds per task, its trainable share and
step time, its comparison with a reference (the paired t-test over the seeds both ran), the best
constant predictor under them, one table's variants against another's, and the grids' plan."""
from __future__ import annotations

import json

from experiments import ROOT
from experiments.grid import cells as grid_cells
from experiments.grid import fmt_minutes, load_grid, planned_minutes
from experiments.replication.names import BENCH_NAME, TASK_NAMES
from experiments.stats import mean_std, paired_t
from experiments.summary import data_key

DIRTY = "‡"                     # a row with a cell run from a dirty tree (its result file's git.dirty)


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
        plain = v.split(" [")[0]                       # without split_inits' init tag
        name = BENCH_NAME.get(plain.removesuffix(suffix) if suffix else plain)
        if bench and name in bench["training"]:
            step = f"{bench['training'][name]['vs_lora']['median']:.2f}"
        seeds = str(s["n"]) + (f" ({len(s['collapsed'])} collapsed: " + ", ".join(f"s{k}" for k in s["collapsed"])
                               + ")" if s["collapsed"] else "")
        cells = [label(summary, v), seeds] + [pm(s["tasks"][t], s["n"]) if t in s["tasks"] else "–" for t in tasks]
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


def label(summary: dict, v: str) -> str:
    """A row's variant as the table names it: with its w_t init's tag where that is not the default
    (MTL-LoRA's "[old init]") and the dirty-tree mark."""
    tags = [t.split(" (")[0] for t in summary[v].get("inits", [])]
    return (v + "".join(f" [{t}]" for t in tags if f"[{t}]" not in v)
            + (f" {DIRTY}" if summary[v].get("dirty") else ""))


def marks_lines(summary: dict, vs: list[str]) -> list[str]:
    """The footnotes of a table's marks: what each init tag means, and the cells run from a dirty
    tree, by variant and seed."""
    L = []
    for full in sorted({t for v in vs for t in summary[v].get("inits", [])}):
        tag, meaning = full.split(" (", 1)
        meaning = meaning[:-1]                         # "w_t ~ N(0, τ²)"
        L += [f"[{tag}]: MTL-LoRA cells whose w_t started as {meaning}, the library's default before "
              "the official code's Kaiming-uniform (their result files have no `metrics.method_options`, or name "
              f"this init); cells of two inits never share a row or a comparison." if tag == "old init" else
              f"[{tag}]: MTL-LoRA cells whose w_t started as {meaning}.", ""]
    marked = [f"`{v}` " + ", ".join(f"s{k}" for k in summary[v]["dirty"]) for v in vs if summary[v].get("dirty")]
    if marked:
        L += [f"{DIRTY} ran from a working tree with uncommitted changes (`git.dirty` in the result file), so the "
              f"commit it names is not all of what ran: {'; '.join(marked)}.", ""]
    return L


def same_init(summary: dict, v: str, w: str) -> tuple[str, str] | None:
    """(v, w), or the init-split rows of the two (split_inits) whose inits agree; None if none do."""
    for a in [v] + [x for x in summary if x.startswith(v + " [")]:
        for b in [w] + [x for x in summary if x.startswith(w + " [")]:
            if a in summary and b in summary and summary[a].get("inits") == summary[b].get("inits"):
                return a, b
    return None


def constant_row(rs: list[dict], vs: list[str], consts: dict | None) -> tuple[dict | None, list[str]]:
    """(the best constant predictor over the test sets the cells of variants vs were scored on:
    {"n": seeds, "tasks": {task: (mean, std, test sets)}, "average": (mean, std) or None,
    "by_seed": {seed: {task: main metric}}}, or None without constant.json; the seeds of the test
    sets constant.json lacks)."""
    if consts is None:
        return None, []
    keys = {data_key(r) for r in rs if r["variant"] in vs}
    missing = sorted({f"seed {json.loads(k)['seed']}" for k in keys if k not in consts})
    sets = [consts[k] for k in sorted(keys) if k in consts]
    if not sets:
        return None, missing
    tasks = {t for c in sets for t in c["tasks"]}
    per_task = {t: (*mean_std([c["tasks"][t]["main"] for c in sets if t in c["tasks"]]),
                    sum(t in c["tasks"] for c in sets)) for t in tasks}
    same = len({tuple(sorted(c["tasks"])) for c in sets}) == 1 and all(c["average"] is not None for c in sets)
    by_seed = {}                                       # seed -> {task: main metric}, for each variant's own seeds
    for k in keys & set(consts):
        by_seed.setdefault(json.loads(k)["seed"], {}).update({t: c["main"] for t, c in consts[k]["tasks"].items()})
    return {"n": len(by_seed), "tasks": per_task, "by_seed": by_seed,
            "average": mean_std([c["average"] for c in sets]) if same else None}, missing


def constant_lines(summary: dict, vs: list[str], const: dict | None,
                   missing: list[str]) -> tuple[list[str], dict[str, set[str]]]:
    """What the best-constant row is, and each task on which a variant's mean does not clear it (the
    constant's mean over that variant's own seeds, whose test sets it was scored on); and those
    tasks per variant: {variant: tasks where its mean is at or below the best constant}."""
    def floor(v: str, t: str) -> float:
        xs = [const["by_seed"][k][t] for k in summary[v]["seeds"] if t in const["by_seed"].get(k, {})]
        return sum(xs) / len(xs) if xs else float("nan")      # nan: never "at or below"

    L, at_constant = [], {}
    if const:
        low = []
        for t in [t for t in TASK_NAMES if t in const["tasks"]] + sorted(set(const["tasks"]) - set(TASK_NAMES)):
            have = [v for v in vs if t in summary[v]["tasks"]]
            under = [v for v in have if summary[v]["tasks"][t][0] <= floor(v, t)]
            for v in under:
                at_constant.setdefault(v, set()).add(t)
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
    return L, at_constant


def compare(summary: dict, v: str, ref: str) -> str:
    if v == ref or ref not in summary:
        return "–"
    t = paired_t(summary[v]["seeds"], summary[ref]["seeds"])
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


def across_tables(summary: dict, tables: list[dict]) -> list[str]:
    """Each variant of the first table against its counterpart (same name, the other table's
    suffix) in every other table: what the one setting that tells the tables apart changes."""
    if len(tables) < 2:
        return []
    first, sfx = tables[0], tables[0].get("suffix", "")
    L = []
    for tab in tables[1:]:
        pairs = [same_init(summary, v, v.removesuffix(sfx) + tab.get("suffix", ""))   # never two w_t inits
                 for v in first["variants"]]
        pairs = [p for p in pairs if p]
        if not pairs:
            continue
        L += [f"### {first.get('label', first.get('title'))} against {tab.get('label', tab.get('title'))}, "
              "variant by variant", "",
              "| variant | average | counterpart | average | difference (paired t over the shared seeds) |",
              "|---|---:|---|---:|---|"]
        L += [f"| {label(summary, v)} | {pm(summary[v]['average'], summary[v]['n'])} | {label(summary, w)} | "
              f"{pm(summary[w]['average'], summary[w]['n'])}"
              f" | {compare(summary, v, w)} |" for v, w in pairs]
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
        grid = load_grid(path)
        cells = grid_cells(grid)
        left = [c for c in cells if (c.grid, c.variant, c.seed) not in done]
        one, two = planned_minutes(grid, 1), planned_minutes(grid, 2)
        walls = [r["wall_s"] / 60 for r in records if r["grid"] == grid["name"] and r["threads"] == 1]
        measured = f"{min(walls):.1f}–{max(walls):.1f} min, mean {sum(walls) / len(walls):.1f}" if walls else "–"
        L.append(f"| `{grid['name']}` | {len(cells)} | {len(cells) - len(left)} | {len(left)} | {one:g} / {two:g} | "
                 f"{measured} | {fmt_minutes(60 * one * -(-len(left) // 2))} |")
    L += ["", "On a GPU the whole of it is one command per grid, e.g. `python experiments/run.py "
          "experiments/grids/main.json --device cuda --jobs 4` (then `fewshot.json`, which starts from the main "
          "grid's seed-0 runs).", "",
          "Not built yet: bootstrap intervals over test examples (the comparisons below are paired t-tests "
          "over seeds).", ""]
    return L

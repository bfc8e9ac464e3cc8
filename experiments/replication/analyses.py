"""The sections of the analyses' JSON files (experiments/analyses/): MTL-LoRA's task
differentiation (Table 6, Figure 1; experiments/probe.py) and MoRE's task embeddings and rank
experts (Figure 2b, 2c; experiments/embeddings.py), each with the claims it checks, what the
paper prints for them, and the protocol line of the runs analysed (their result files, found by
the run directory; an MTL-LoRA run's w_t init from the analysis' options, else its result file)."""
from __future__ import annotations

import json
from pathlib import Path

from experiments.replication.claims import Finding
from experiments.replication.figures import heat_map, pca_figure, pyplot, tsne_figure
from experiments.replication.names import TASK_NAMES
from experiments.replication.papers import EMBEDDING_CLAIMS, PROBE_CLAIMS
from experiments.summary import INIT_LABELS, init_label


def run_sides(protos, runs: list[str]) -> list[tuple[str, list[dict]]]:
    """(variant, its result records) of each analysed run directory, for the protocol line."""
    out = []
    for run in runs:
        cells = protos.cells_of_run(run)
        out.append((cells[0]["variant"] if cells else run, cells))
    return out


def before_svm(res: dict) -> bool:
    """A probe file written before A.4's linear SVM became the probe (it records no classifier):
    a logistic regression, and runs of the old w_t init (the init changed first)."""
    return "classifier" not in res


def run_init(protos, run: str, r: dict, res: dict) -> str | None:
    """An analysed MTL-LoRA run's w_t init label: the analysis' own record of its options, else the
    result file of the cell that wrote the run; None for the default init and other methods. A probe
    file from before A.4's SVM (no "classifier") also predates the w_t init change."""
    if r.get("method") != "mtl-lora":
        return None
    options = r.get("method_options") or r.get("options")
    if options and "weights_init" in options:
        return INIT_LABELS.get(options["weights_init"])
    if before_svm(res):                 # written before the analyses recorded options, i.e. before the
        return INIT_LABELS["normal"]    # w_t default changed: the run it read had the old init, whatever
    cells = protos.cells_of_run(run)    # the cell that now holds its name was re-run with
    return init_label(cells[0]) if cells else "w_t init not recorded"


def ran_with(res: dict) -> str:
    """An analysis' torch threads, where its JSON records them."""
    return f" ({res['threads']} torch thread(s))" if "threads" in res else ""


SPACES = {"low": "low-rank A_t x", "adapter": "adapter output ΔW_t x", "full": "full-rank W x + ΔW_t x"}


def probe_method(res: dict) -> str:
    """How the probe scored, from its JSON (files before the A.4 SVM default record no classifier)."""
    if before_svm(res):
        return "a logistic regression on standardised features"
    k = len((res.get("probe_split") or {}).get("seeds") or [0])
    return ({"svm": "a linear SVM, one-vs-rest", "logreg": "a logistic regression"}.get(res["classifier"],
                                                                                     res["classifier"])
            + f" (C = {res.get('C', 1.0):g}{', standardised features' if res.get('standardized') else ''})"
            + (f", its macro-F1 averaged over {k} split seeds" if k > 1 else ""))


def probe_section(analyses: Path, figs: Path, rel, protos, at_constant: dict[str, set[str]]
                  ) -> tuple[list[str], list[Finding]]:
    """MTL-LoRA Table 6 / Figure 1 from experiments/probe.py's JSON files: per feature space the
    claim of the figure or table that draws it (PROBE_CLAIMS), MTL-LoRA's run labelled by its w_t
    init, and the runs' protocol line."""
    head = "## Task differentiation (MTL-LoRA Table 6, Figure 1)"
    files = sorted(analyses.glob("probe-*.json"))
    if not files:
        return [head, "", "Not yet run: no `experiments/analyses/probe-*.json` (`python experiments/probe.py RUN "
                "...`).", ""], []
    L, found = [head, ""], []
    for f in files:
        res = json.loads(f.read_text())
        first = next(iter(res["runs"].values()))
        spaces = [sp for sp in SPACES if sp in first]
        L += [f"`{res['command']}`{ran_with(res)} ({res['per_task']} test examples per task, seed {res['seed']}): "
              f"{probe_method(res)}, fitted on a stratified 40 % and scored on the other 60 %, macro-F1 over the "
              "tasks; chance is 1 / (number of tasks).", "",
              "| run | method | module | " + " | ".join(f"{SPACES[sp]} (dim)" for sp in spaces) + " | w_t init |",
              "|---|---|---|" + "---:|" * len(spaces) + "---|"]
        inits = {name: run_init(protos, name, r, res) for name, r in res["runs"].items()}
        for name, r in res["runs"].items():
            L.append(f"| `{name}` | {r['method']} | `{r['module']}` | "
                     + " | ".join(f"{r[sp]['macro_f1']:.3f} ({r[sp]['dim']})" for sp in spaces)
                     + f" | {inits[name] or ('–' if r['method'] != 'mtl-lora' else 'Kaiming-uniform')} |")
        L.append("")
        by = {r["method"]: (name, r) for name, r in res["runs"].items()}
        if before_svm(res):
            L += ["This file predates A.4's probe (a logistic regression, not its linear SVM) and MTL-LoRA's w_t "
                  "init change: kept for the record, no claim is drawn from it (the probe on runs of the current "
                  "init is still to run).", ""]
        elif "lora" in by and "mtl-lora" in by:
            line = protos.line("mtl-lora", run_sides(protos, [by["mtl-lora"][0], by["lora"][0]]), at_constant)
            mtl, lora = by["mtl-lora"][1], by["lora"][1]
            init = inits[by["mtl-lora"][0]]
            for space in spaces:
                text, printed = PROBE_CLAIMS[space]
                d = mtl[space]["macro_f1"] - lora[space]["macro_f1"]
                found.append(Finding(text, f"macro-F1 {mtl[space]['macro_f1']:.3f} against "
                                     f"{lora[space]['macro_f1']:.3f} (`{f.name}`{'; MTL-LoRA ' + init if init else ''})",
                                     d > 0, "untested", head.removeprefix("## "), line))
                L += [f"- {text} (the paper: {printed}). Here {mtl[space]['macro_f1']:.3f} against "
                      f"{lora[space]['macro_f1']:.3f} ({d:+.3f}): {'agrees' if d > 0 else 'does not agree'} "
                      "(one seed of each run, no test).", f"  - {line}"]
            L.append("")
        fig = tsne_figure(res, figs / f"{f.stem}-tsne.png")
        if fig:
            L += [f"![t-SNE of the features]({rel(fig)})", ""]
    return L, found


def pair_rank(cos: list[list[float]], tasks: list[str], a: str, b: str) -> tuple[float, int, int]:
    """(cosine of tasks a and b, its rank among all task pairs from the most similar = 1, pairs)."""
    pairs = sorted((cos[i][j] for i in range(len(tasks)) for j in range(i + 1, len(tasks))), reverse=True)
    c = cos[tasks.index(a)][tasks.index(b)]
    return c, pairs.index(c) + 1, len(pairs)


def embeddings_section(analyses: Path, figs: Path, rel, protos, at_constant: dict[str, set[str]]
                       ) -> tuple[list[str], list[Finding]]:
    """MoRE Figure 2b/2c from experiments/embeddings.py's JSON files."""
    files = sorted(analyses.glob("embeddings-*.json"))
    L, found = ["## MoRE's task embeddings and rank experts (Figure 2b, 2c)", ""], []
    if not files:
        return L + ["Not yet run: no `experiments/analyses/embeddings-*.json` "
                    "(`python experiments/embeddings.py RUN --out ...`).", ""], []
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
            line = protos.line("more", run_sides(protos, [res["run"]]) if "run" in res else [], at_constant)
            (near, near_p), (far, far_p) = EMBEDDING_CLAIMS["near"], EMBEDDING_CLAIMS["far"]
            found.append(Finding(near, f"their cosine ranks {r1} of {n} pairs (`{f.name}`)", r1 <= n // 4, "untested",
                                 where, line))
            found.append(Finding(far, f"their cosine ranks {r2} of {n} pairs (`{f.name}`)", r2 > n - n // 4,
                                 "untested", where, line))
            L += [f"- {near} (the paper: {near_p}). Here their cosine is {c1:+.3f}, rank {r1} of {n} "
                  f"pairs (1 = most similar): {'agrees' if r1 <= n // 4 else 'does not agree'} (our rule: "
                  "in the most similar quarter of the pairs).", f"  - {line}",
                  f"- {far} (the paper: {far_p}). Here their cosine is {c2:+.3f}, rank {r2} of "
                  f"{n}: {'agrees' if r2 > n - n // 4 else 'does not agree'} (our rule: in the least similar "
                  "quarter).", f"  - {line}", ""]
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
        if pyplot() is not None:
            m = [[res["scaled_rank_maps"][n][t] for n in names] for t in range(len(tasks))]
            fig = heat_map(m, tasks, names, f"MoRE: rank per task and module with experts 1-3 scaled by "
                           f"{res['scale_down']:g}", figs / f"{f.stem}-scaled-ranks.png")
            L += ["", f"![MoRE ranks with experts 1-3 scaled down]({rel(fig)})"]
        L.append("")
    return L, found

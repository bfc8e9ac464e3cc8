"""The sections of the analyses' JSON files (experiments/analyses/): MTL-LoRA's task
differentiation (Table 6, Figure 1; experiments/probe.py) and MoRE's task embeddings and rank
experts (Figure 2b, 2c; experiments/embeddings.py), each with the claims it checks."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from experiments.replication.claims import Finding
from experiments.replication.figures import heat_map, pca_figure, tsne_figure
from experiments.replication.names import TASK_NAMES


def ran_with(res: dict) -> str:
    """An analysis' torch threads, where its JSON records them."""
    return f" ({res['threads']} torch thread(s))" if "threads" in res else ""


def probe_section(analyses: Path, figs: Path, rel) -> tuple[list[str], list[Finding]]:
    """MTL-LoRA Table 6 / Figure 1 from experiments/probe.py's JSON files."""
    files = sorted(analyses.glob("probe-*.json"))
    if not files:
        return ["## Task differentiation (MTL-LoRA Table 6, Figure 1)", "",
                "Not yet run: no `experiments/analyses/probe-*.json` (`python experiments/probe.py RUN ...`).", ""], []
    L, found = ["## Task differentiation (MTL-LoRA Table 6, Figure 1)", ""], []
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
                found.append(Finding(
                    f"MTL-LoRA (Table 6): MTL-LoRA's {what} features tell the tasks apart better than LoRA-MT's",
                    f"macro-F1 {by['mtl-lora'][space]['macro_f1']:.3f} against {by['lora'][space]['macro_f1']:.3f} "
                    f"(`{f.name}`)", d > 0, "untested", "Task differentiation (MTL-LoRA Table 6, Figure 1)"))
                L.append(f"- MTL-LoRA (Table 6): MTL-LoRA's {what} features tell the tasks apart better than "
                         f"LoRA-MT's. Here {by['mtl-lora'][space]['macro_f1']:.3f} against "
                         f"{by['lora'][space]['macro_f1']:.3f} ({d:+.3f}): {'agrees' if d > 0 else 'does not agree'} "
                         "(one seed, one split of the probe).")
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


def embeddings_section(analyses: Path, figs: Path, rel) -> tuple[list[str], list[Finding]]:
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
            found.append(Finding("MoRE (Figure 2c): MRPC and QNLI cluster",
                                 f"their cosine ranks {r1} of {n} pairs (`{f.name}`)", r1 <= n // 4, "untested", where))
            found.append(Finding("MoRE (Figure 2c): STS-B and CoLA lie far apart",
                                 f"their cosine ranks {r2} of {n} pairs (`{f.name}`)", r2 > n - n // 4, "untested",
                                 where))
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
    return L, found

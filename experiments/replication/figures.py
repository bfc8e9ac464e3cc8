"""The document's figures, drawn with matplotlib (the analysis extra); each function returns the
file it drew, or None where matplotlib is not importable (the document then says so): the averages
per seed, MoRE's ranks per task and module (Figure 2a/2b), the probe's t-SNE, the task embeddings'
PCA (Figure 2c)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from experiments.replication.names import TASK_NAMES


def short_module(n: str) -> str:
    return (n.replace("encoder.layer.", "L").replace("attention.self.", "").replace("attention.output.dense", "ao")
            .replace("intermediate.dense", "ffn_in").replace("output.dense", "ffn_out"))


def pyplot():
    """matplotlib.pyplot drawing to files (the Agg backend), or None without matplotlib (the
    analysis extra): then no figure is drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: Path, dpi: int) -> str:
    """Lay the figure out, write it to `path` (its folder made) and close it; -> the path."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return str(path)


def heat_map(m: list[list[int]], tasks: list[str], names: list[str], title: str, path: Path) -> str:
    """A task × module map of chosen ranks (MoRE Figure 2a/2b); its callers checked pyplot()."""
    fig, ax = pyplot().subplots(figsize=(max(6, 0.22 * len(names)), 0.45 * len(tasks) + 1.6))
    im = ax.imshow(m, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(tasks)), [TASK_NAMES.get(t, t) for t in tasks])
    ax.set_xticks(range(len(names)), [short_module(n) for n in names], rotation=90, fontsize=6)
    fig.colorbar(im, ax=ax, label="chosen rank r_t")
    ax.set_title(title, fontsize=9)
    return save(fig, path, dpi=120)


def rank_figure(records: list[dict], path: Path, variant: str = "more") -> str | None:
    """MoRE Figure 2a: the rank each task chose in each adapted module (the variant's first seed)."""
    r = next((r for r in sorted(records, key=lambda r: r["seed"]) if r.get("rank_maps") and r["variant"] == variant),
             None)
    if r is None or pyplot() is None:
        return None
    names = list(r["rank_maps"])
    tasks = [t for t in r["metrics"]["tasks"] if t != "mnli_mm"]          # mnli_mm uses mnli's id: no row
    m = [[r["rank_maps"][n][t] for n in names] for t in range(len(tasks))]
    return heat_map(m, tasks, names, f"MoRE: rank chosen per task and module ({r['grid']}, seed {r['seed']})", path)


def average_figure(summary: dict, order: list[str], path: Path, title: str = "Main grid") -> str | None:
    plt = pyplot()
    if plt is None or not order:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, v in enumerate(order):
        ys = list(summary[v]["seeds"].values())
        ax.scatter([i] * len(ys), ys, color="C0", s=14)
        ax.errorbar(i, summary[v]["average"][0], yerr=summary[v]["average"][1], color="k", capsize=4, marker="_")
    ax.set_xticks(range(len(order)), order, rotation=30)
    ax.set_ylabel("GLUE average (papers' metrics)")
    ax.set_title(f"{title}: each seed (dots), mean ± std (bars)", fontsize=9)
    return save(fig, path, dpi=120)


def tsne_figure(res: dict, path: Path) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
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
    return save(fig, path, dpi=110)


def pca_figure(res: dict, path: Path) -> str | None:
    """MoRE Figure 2c: the task embeddings of the last block's attention modules, PCA to 2-D."""
    plt = pyplot()
    if plt is None:
        return None
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
    return save(fig, path, dpi=110)

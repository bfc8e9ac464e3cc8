"""MoRE's task embeddings and rank experts after training, as its Figure 2 draws them.

    python experiments/embeddings.py runs/main/more/s0 --out experiments/analyses/embeddings-main-more-s0.json

Figure 2c: the task embeddings e_t (one row per task in every MoRE module, Eq. 2) of the last
block's self-attention, projected to 2-D by PCA. For BERT-style models "self-attention" is the
block's attention.self.{query,key,value} and attention.output.dense; each module gets its own
projection, and "all" is the four modules' embeddings side by side ([T, 4h]). PCA is plain SVD of
the centred [T, h] matrix (numpy), so the coordinates need nothing beyond the core install. The
JSON also holds the cosine similarity of every pair of tasks in the full space, which is what a
reader can check the figure's clusters against (2-D distances of 8 points keep only part of it).

Figure 2b: "we scaled down the influence of experts 1-3" (§5.3) gives no factor; our reading:
each task's rank is re-chosen with p_t[1..3] multiplied by `--scale-down` (default 0: the best
of experts 4..r), from the trained gate and embeddings, for every module (not in the official
code's mode, whose rank table is fixed at the first forward and never reads p_t again). Figure 2a
(the ranks as trained) is in the run's adapter_config.json and its result file already.

experiments/report.py draws both from the JSON.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from mtlref.adapters import adapters_of
from mtlref import load_run


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Rows of x [T, h] -> their first two principal coordinates [T, 2] and the share of the
    variance each explains (SVD of the centred matrix; signs fixed so the largest |loading| is > 0)."""
    c = x - x.mean(axis=0, keepdims=True)
    u, s, vt = np.linalg.svd(c, full_matrices=False)
    sign = np.sign(vt[np.arange(2), np.abs(vt[:2]).argmax(axis=1)])
    xy = (u[:, :2] * s[:2]) * sign
    var = s ** 2
    return xy, (var[:2] / var.sum()).tolist()


def cosine(x: np.ndarray) -> np.ndarray:
    n = x / np.linalg.norm(x, axis=1, keepdims=True)
    return n @ n.T


def scaled_ranks(adapter, scale: float, experts: int = 3) -> list[int]:
    """Figure 2b, our reading: r_t = argmax over k of p_t[k] with p_t[1..experts] multiplied by scale."""
    with torch.no_grad():
        p = adapter.probs().clone()
    p[:, :experts] *= scale
    return (p.argmax(dim=-1) + 1).tolist()


def analyse(run_dir: Path, scale: float) -> dict:
    run = load_run(run_dir)
    cfg, specs, backbone = run.cfg, run.specs, run.backbone
    if cfg["method"] != "more":
        raise SystemExit(f"{run_dir}: method {cfg['method']!r}; this analysis reads MoRE's task embeddings")
    mods = {n: a for n, a in adapters_of(backbone).items() if getattr(a, "task_embedding", None) is not None}
    if not mods:
        raise SystemExit(f"{run_dir}: no MoRE module has task embeddings (task_embedding=False?)")
    last = max(int(n.split(".")[2]) for n in mods if n.split(".")[2].isdigit())
    attn = sorted(n for n in mods if int(n.split(".")[2]) == last and ".attention." in n)
    tasks = [s.name for s in specs]
    out = {"run": str(run_dir), "method": cfg["method"], "options": cfg.get("options", {}), "tasks": tasks,
           "block": last, "modules": {}, "scale_down": scale, "rank_maps": {}, "scaled_rank_maps": {}}
    blocks = []
    for name in attn:
        e = mods[name].task_embedding.detach().float().numpy()            # (T, h)
        blocks.append(e)
        xy, share = pca_2d(e)
        out["modules"][name] = {"dim": int(e.shape[1]), "pca": np.round(xy, 5).tolist(),
                                "explained": [round(v, 4) for v in share],
                                "cosine": np.round(cosine(e), 4).tolist()}
    e = np.concatenate(blocks, axis=1)                                     # (T, 4h): the block's attention
    xy, share = pca_2d(e)
    out["modules"]["all"] = {"dim": int(e.shape[1]), "pca": np.round(xy, 5).tolist(),
                             "explained": [round(v, 4) for v in share], "cosine": np.round(cosine(e), 4).tolist()}
    for name, a in mods.items():
        out["rank_maps"][name] = a.rank_map().tolist()
        if not a.official:        # official mode: the rank table is fixed at init, p_t is never read again
            out["scaled_rank_maps"][name] = scaled_ranks(a, scale)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a MoRE train.py --out directory (e.g. runs/main/more/s0)")
    p.add_argument("--scale-down", type=float, default=0.0, help="Figure 2b: factor on p_t of experts 1-3")
    p.add_argument("--out", required=True, help="the JSON to write (experiments/analyses/embeddings-*.json)")
    args = p.parse_args(argv)
    res = analyse(Path(args.run), args.scale_down)
    res = {"schema": 1, "threads": torch.get_num_threads(),
           "command": "python experiments/embeddings.py " + " ".join(sys.argv[1:] if argv is None else argv),
           **res}
    a = res["modules"]["all"]
    print(f"{args.run}: block {res['block']}, {len(res['modules']) - 1} attention modules; PCA of all: "
          f"{a['explained'][0]:.3f} + {a['explained'][1]:.3f} of the variance", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

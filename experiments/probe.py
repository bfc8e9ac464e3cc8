"""Task differentiation, as MTL-LoRA's Table 6 and Figure 1 draw it: how well the features of the
last block's adapted output projection tell the tasks apart, for runs of different methods.

    python experiments/probe.py runs/main/lora-mt/s0 runs/main/mtl-lora/s0 --out experiments/analyses/probe-main-s0.json

For each run: `--per-task` test examples of every task (seeded), each through the model with its
own task id; at the module (default: the last block's attention output projection) two features
per sample, averaged over its real tokens:
    low-rank    A_t x           (r numbers; the adapter's per-task down-projection as a rank-r LoRA:
                                 A for LoRA-MT, Λ_t A for MTL-LoRA, Adapter.as_lora)
    full-rank   W x + ΔW_t x    (the module's output, out numbers)
A linear probe (logistic regression, scikit-learn) is fitted on a stratified 40 % and scored on
the other 60 % by macro-F1 over the tasks (MTL-LoRA A.4's 40/60 split), and t-SNE maps each
feature set to 2-D for the figure. The JSON holds the scores and the 2-D points;
experiments/report.py draws them. Needs `pip install -e ".[analysis]"`.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from mtlref.adapters import adapters_of
from mtlref.data.collate import eval_batches
from mtlref.heads import family
from mtlref.data.loading import load_data
from mtlref.evaluate import load_run
from mtlref.objective import make_encoder

MODULE = {"bert": "encoder.layer.{last}.attention.output.dense", "llama": "model.layers.{last}.self_attn.o_proj",
          "t5": "encoder.block.{last}.layer.0.SelfAttention.o"}


def features(run_dir: Path, per_task: int, seed: int, module: str | None, data_dir: str | None) -> dict:
    cfg, specs, backbone, model, tok = load_run(run_dir)
    fam = family(backbone)
    names = list(adapters_of(backbone))
    if module is None:                     # block index: the third part of every family's module names
        last = max(int(n.split(".")[2]) for n in names if n.split(".")[2].isdigit())
        module = MODULE[fam].format(last=last)
    adapter = adapters_of(backbone).get(module)
    if adapter is None:
        raise SystemExit(f"{run_dir}: no adapter at {module!r}; adapted modules: {names[:6]} ...")
    slot = backbone.get_submodule(module)
    _, splits = load_data(cfg["bench"], ",".join(cfg["task_names"]), data_dir or cfg["data_dir"], cfg["split"],
                          cfg["seed"], cfg.get("jsonl"), cfg.get("jsonl_dev"), None)
    encoder = make_encoder(tok, backbone, specs, cfg["max_length"], cfg.get("objective", "head"))
    split = "test" if cfg["split"] == "paper" else "validation"
    seen = {}
    hook = slot.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0].detach(), y=out.detach()))
    low, full, labels = [], [], []
    rng = np.random.default_rng(seed)
    try:
        for t, spec in enumerate(specs):
            examples = splits[spec.name][split]
            pick = sorted(rng.choice(len(examples), min(per_task, len(examples)), replace=False).tolist())
            with torch.inference_mode():
                A, _ = adapter.as_lora(t, slot)                        # (r, in): this task's down-projection
                for _, batch in eval_batches(encoder, t, split, [examples[i] for i in pick], 32):
                    model(batch)
                    mask = batch["attention_mask"].unsqueeze(-1).to(seen["y"].dtype)      # (B, T, 1)
                    n = mask.sum(1)
                    low.append(((seen["x"].float() @ A.float().T) * mask).sum(1) / n)     # (B, r)
                    full.append((seen["y"].float() * mask).sum(1) / n)                   # (B, out)
                    labels += [spec.name] * len(batch["task_ids"])
    finally:
        hook.remove()
    return {"run": str(run_dir), "method": cfg["method"], "module": module, "split": split,
            "low": torch.cat(low).numpy(), "full": torch.cat(full).numpy(), "labels": labels}


def probe(x: np.ndarray, labels: list[str], seed: int) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.manifold import TSNE
    from sklearn.metrics import f1_score
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler
    xtr, xte, ytr, yte = train_test_split(x, labels, train_size=0.4, stratify=labels, random_state=seed)
    scale = StandardScaler().fit(xtr)
    clf = LogisticRegression(max_iter=2000).fit(scale.transform(xtr), ytr)
    f1 = f1_score(yte, clf.predict(scale.transform(xte)), average="macro")
    xy = TSNE(n_components=2, random_state=seed, init="pca", perplexity=min(30.0, (len(x) - 1) / 3)).fit_transform(x)
    return {"macro_f1": float(f1), "n_train": len(ytr), "n_test": len(yte), "dim": int(x.shape[1]),
            "tsne": np.round(xy, 3).tolist()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="train.py --out directories (e.g. runs/main/lora-mt/s0)")
    p.add_argument("--per-task", type=int, default=100, help="test examples per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--module", default=None, help="the adapted module (default: the last block's output projection)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True, help="the JSON to write (experiments/analyses/probe-*.json)")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    out = {"schema": 1, "threads": torch.get_num_threads(),
           "command": "python experiments/probe.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "per_task": args.per_task, "seed": args.seed, "runs": {}}
    for run in args.runs:
        f = features(Path(run), args.per_task, args.seed, args.module, args.data_dir)
        out["runs"][run] = {"method": f["method"], "module": f["module"], "split": f["split"], "labels": f["labels"],
                            "low": probe(f["low"], f["labels"], args.seed), "full": probe(f["full"], f["labels"],
                                                                                          args.seed)}
        r = out["runs"][run]
        print(f"{run}: {f['method']} at {f['module']}: macro-F1 low-rank {r['low']['macro_f1']:.3f} "
              f"(dim {r['low']['dim']}), full-rank {r['full']['macro_f1']:.3f} (dim {r['full']['dim']})", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

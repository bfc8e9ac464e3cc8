"""Task differentiation, as MTL-LoRA's Table 6 (Appendix A.4) and Figure 1 measure it: how well
features of the last block's adapted output projection tell the tasks apart, for runs of
different methods.

    python experiments/probe.py runs/main/lora-mt/s0 runs/main/mtl-lora/s0 --out experiments/analyses/probe-main-s0.json

What A.4 says, sentence by sentence, and what this script does with it:
  "We randomly sample 1,000 samples for each task"       --per-task 1000 examples of each task, drawn
        without replacement by --seed from the split the run reports (the paper split's test sets,
        else the dev sets; A.4 does not say which split of its Ads data it drew from). A task with
        fewer gives all it has: the JSON ("per_task_counts", "fewer") and the printed lines say
        which tasks and how many.
  "utilizing the output of different LoRA adapters from the final block ... as input features"
        the last block's attention output projection (A.4 names no module; Figure 1's features
        come from "the O linear layer of the final block"). Each example through the model with
        its own task id; three feature sets per example, each averaged over its real tokens (A.4
        says nothing of how a sequence becomes one vector):
            low       A_t x            the adapter as a rank-r LoRA (Adapter.as_lora): A for
                                       LoRA-MT, Λ_t A for MTL-LoRA (Figure 1's low-rank space)
            adapter   ΔW_t x           the adapter's own output, ΔY (A.4's literal "output of
                                       the LoRA adapters")
            full      W x + ΔW_t x     the module's output (Figure 1's full-rank space)
        A.4 names no preprocessing: the features go in as they are (--standardize scales them
        with the training part's mean and deviation).
  "split into training and test sets in a 4:6 ratio"      40 % to fit, 60 % to score, stratified by
        task (A.4 does not say stratified); Table 6's caption: "averaged over five run with
        different train-test split seed": --splits 5, split seeds --seed .. --seed + 4, the scores
        averaged.
  "the SVM's parameter C set to 1. We refrain from using any kernel functions and employ the
  'one-vs-rest' strategy"                                  scikit-learn's LinearSVC(C=1): a linear SVM,
        one binary classifier per task against the rest (liblinear). A.4 is silent on the loss
        and the intercept: LinearSVC's defaults (squared hinge, a fitted intercept), at most
        20,000 iterations (the JSON's "converged" says whether every fit stopped before that;
        the warning is not printed). --classifier logreg fits a logistic regression instead (the probe's
        earlier default was that on standardised features: --classifier logreg --standardize).
  Table 6 reports F1 per task and their average              per-task F1 on the 60 %, and their mean,
        the macro-F1.
t-SNE maps the low and full feature sets to 2-D for the figure (Figure 1). The JSON holds the
scores and the 2-D points; experiments/report.py draws them. Needs `pip install -e ".[analysis]"`.
"""
import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from mtlref.adapters import adapters_of
from mtlref.adapters.io import recorded_options
from mtlref.data.collate import eval_batches
from mtlref.heads import family
from mtlref.data.loading import load_data
from mtlref import load_run
from mtlref.objective import make_encoder

MODULE = {"bert": "encoder.layer.{last}.attention.output.dense", "llama": "model.layers.{last}.self_attn.o_proj",
          "t5": "encoder.block.{last}.layer.0.SelfAttention.o"}
CLASSIFIERS = {"svm": "linear SVM, one-vs-rest (scikit-learn LinearSVC)",
               "logreg": "logistic regression (scikit-learn LogisticRegression)"}
SPACES = ("low", "adapter", "full")
TRAIN_SHARE = 0.4                           # A.4: "a 4:6 ratio"
MAX_ITER = {"svm": 20000, "logreg": 2000}   # iterations a fit may take (A.4 silent); "converged" records it


def pick(n: int, per_task: int, rng: np.random.Generator) -> list[int]:
    """Indices of min(per_task, n) of a task's n examples, drawn without replacement, in order."""
    return sorted(rng.choice(n, min(per_task, n), replace=False).tolist())


def features(run_dir: Path, per_task: int, seed: int, module: str | None, data_dir: str | None) -> dict:
    run = load_run(run_dir)
    cfg, specs, backbone, model, tok = run.cfg, run.specs, run.backbone, run.model, run.tok
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
    hooks = [slot.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0].detach(), y=out.detach())),
             adapter.register_forward_hook(lambda m, inp, out: seen.update(d=out.detach()))]   # ΔY
    feats, labels, counts = {s: [] for s in SPACES}, [], {}
    rng = np.random.default_rng(seed)
    try:
        for t, spec in enumerate(specs):
            examples = splits[spec.name][split]
            chosen = pick(len(examples), per_task, rng)
            counts[spec.name] = len(chosen)
            with torch.inference_mode():
                A, _ = adapter.as_lora(t, slot)                        # (r, in): this task's down-projection
                for _, batch in eval_batches(encoder, t, split, [examples[i] for i in chosen], 32):
                    model(batch)
                    mask = batch["attention_mask"].unsqueeze(-1).to(seen["y"].dtype)      # (B, T, 1)
                    n = mask.sum(1)
                    feats["low"].append(((seen["x"].float() @ A.float().T) * mask).sum(1) / n)   # (B, r)
                    feats["adapter"].append((seen["d"].float() * mask).sum(1) / n)             # (B, out)
                    feats["full"].append((seen["y"].float() * mask).sum(1) / n)                # (B, out)
                    labels += [spec.name] * len(batch["task_ids"])
    finally:
        for h in hooks:
            h.remove()
    return {"run": str(run_dir), "method": cfg["method"], "module": module, "split": split, "labels": labels,
            "counts": counts, "options": recorded_options(cfg, run_dir / "adapter_config.json"), **{s: torch.cat(v).numpy() for s, v in feats.items()}}


def make_classifier(name: str, C: float, seed: int):
    if name == "svm":
        from sklearn.svm import LinearSVC
        return LinearSVC(C=C, max_iter=MAX_ITER[name], random_state=seed)      # liblinear: one-vs-rest
    if name == "logreg":
        from sklearn.linear_model import LogisticRegression
        return LogisticRegression(C=C, max_iter=MAX_ITER[name])
    raise ValueError(f"classifier must be one of {sorted(CLASSIFIERS)}, not {name!r}")


def probe(x: np.ndarray, labels: list[str], seed: int, classifier: str = "svm", C: float = 1.0, splits: int = 5,
          standardize: bool = False, tsne: bool = True) -> dict:
    """The classifier fitted on a stratified 40 % and scored on the other 60 %, once per split
    seed (seed, seed + 1, ...): macro-F1 (the mean of the tasks' F1) averaged over the splits,
    each split's, each task's F1 averaged over the splits, and whether every fit converged within
    MAX_ITER iterations (unscaled features can need many; a fit that did not is still scored)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import f1_score
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler
    tasks = list(dict.fromkeys(labels))
    per_split, per_task, converged = [], [], True
    for k in range(splits):
        xtr, xte, ytr, yte = train_test_split(x, labels, train_size=TRAIN_SHARE, stratify=labels,
                                              random_state=seed + k)
        if standardize:
            scale = StandardScaler().fit(xtr)
            xtr, xte = scale.transform(xtr), scale.transform(xte)
        with warnings.catch_warnings():                   # recorded in "converged" instead
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = make_classifier(classifier, C, seed + k).fit(xtr, ytr)
        converged &= bool(np.max(clf.n_iter_) < MAX_ITER[classifier])
        pred = clf.predict(xte)
        f1 = f1_score(yte, pred, labels=tasks, average=None, zero_division=0.0)
        per_split.append(float(np.mean(f1)))
        per_task.append(f1)
    out = {"macro_f1": float(np.mean(per_split)), "macro_f1_splits": per_split,
           "per_task_f1": dict(zip(tasks, np.mean(per_task, axis=0).tolist())),
           "n_train": len(ytr), "n_test": len(yte), "dim": int(x.shape[1]), "converged": converged}
    if tsne:
        from sklearn.manifold import TSNE
        xy = TSNE(n_components=2, random_state=seed, init="pca", perplexity=min(30.0, (len(x) - 1) / 3))
        out["tsne"] = np.round(xy.fit_transform(x), 3).tolist()
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="train.py --out directories (e.g. runs/main/lora-mt/s0)")
    p.add_argument("--per-task", type=int, default=1000,
                   help="examples per task (A.4: 1,000); a task with fewer gives all it has")
    p.add_argument("--classifier", choices=sorted(CLASSIFIERS), default="svm",
                   help="svm: A.4's linear SVM, one-vs-rest; logreg: logistic regression")
    p.add_argument("--C", type=float, default=1.0, help="the classifier's inverse regularisation (A.4: 1)")
    p.add_argument("--splits", type=int, default=5,
                   help="40/60 splits averaged over (Table 6: five split seeds)")
    p.add_argument("--standardize", action="store_true", help="scale each feature (A.4 names no preprocessing)")
    p.add_argument("--seed", type=int, default=0, help="draws the examples; the splits use seed .. seed+splits-1")
    p.add_argument("--module", default=None, help="the adapted module (default: the last block's output projection)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True, help="the JSON to write (experiments/analyses/probe-*.json)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    torch.manual_seed(args.seed)
    out = {"schema": 2, "threads": torch.get_num_threads(),
           "command": "python experiments/probe.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "per_task": args.per_task, "seed": args.seed,
           "classifier": args.classifier, "classifier_about": CLASSIFIERS[args.classifier], "C": args.C,
           "standardized": args.standardize,
           "probe_split": {"train": TRAIN_SHARE, "test": round(1 - TRAIN_SHARE, 2), "stratified": True,
                           "seeds": list(range(args.seed, args.seed + args.splits))},
           "runs": {}}
    for run in args.runs:
        f = features(Path(run), args.per_task, args.seed, args.module, args.data_dir)
        fewer = {t: n for t, n in f["counts"].items() if n < args.per_task}
        r = out["runs"][run] = {"method": f["method"], "module": f["module"], "split": f["split"],
                                "labels": f["labels"], "per_task_counts": f["counts"], "fewer": fewer,
                                "method_options": f["options"]}       # every option's value (MTL-LoRA's w_t init)
        for space in SPACES:
            r[space] = probe(f[space], f["labels"], args.seed, args.classifier, args.C, args.splits,
                             args.standardize, tsne=space != "adapter")
        short = "; fewer: " + ", ".join(f"{t} {n}" for t, n in fewer.items()) if fewer else ""
        print(f"{run}: {f['method']} at {f['module']}, {len(f['labels'])} examples ({args.per_task} per task{short})"
              f", {CLASSIFIERS[args.classifier]}, C {args.C:g}, {args.splits} split(s) 40/60: macro-F1 "
              + ", ".join(f"{s} {r[s]['macro_f1']:.3f} (dim {r[s]['dim']}"
                          f"{'' if r[s]['converged'] else ', a fit did not converge'})" for s in SPACES), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

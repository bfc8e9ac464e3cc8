"""A benchmark's tasks and splits, as a run reads them: the task specs in id order and
{task: {"train", "validation", "test"}} under the split protocol (mtlref/data/splits.py), the
user's jsonl tasks, the k-shot training subsets of a transfer run, one task's splits for LoRA-ST."""
from __future__ import annotations

import zlib

import numpy as np

from mtlref.data.splits import hold_out, make_splits
from mtlref.data.tasks import SUPERGLUE_TASKS, get_spec, load_jsonl_tasks, load_task, load_tasks
from mtlref.metrics import COMMONSENSE_TASKS, GLUE_TASKS

# A bench's default tasks are those with a training set (3 commonsense sets ship their evaluation
# files only; SuperGLUE BoolQ trains on one half of its validation file, data/tasks.py);
# --tasks may still name the others, and training then says why not.
# Commonsense: the questions of each task held out of its training set to select the step on.
# Ours: LLM-Adapters' commands hold out 120 of the merged training set (val_set_size, about 15 a
# task) and keep the lowest validation loss; here the selection reads each task's accuracy, so
# each task gets its own 120.
VAL_SIZE = 120
BENCHES = {"glue": list(GLUE_TASKS),
           "superglue": [n for n in SUPERGLUE_TASKS if "train" in get_spec(n).files],
           "commonsense": [n for n in COMMONSENSE_TASKS if "train" in get_spec(n).files]}


def load_data(bench: str, tasks: str | None, data_dir, split: str, seed: int, jsonl=None, jsonl_dev=None,
              max_eval_examples: int | None = None, val_size: int = VAL_SIZE) -> tuple[list, dict]:
    """-> (task specs in id order, {task: {"train", "validation", "test"}}). max_eval_examples
    keeps the first N of each validation and test set (quick runs; off by default). val_size:
    commonsense only, the questions of each task's training set held out (seeded) as its
    validation set, never trained on; 0: none (then nothing can be selected on)."""
    specs, splits = _load_data(bench, tasks, data_dir, split, seed, jsonl, jsonl_dev, val_size)
    if max_eval_examples:
        for sp in splits.values():
            for part in ("validation", "test"):
                if sp.get(part) is not None:
                    sp[part] = sp[part][:max_eval_examples]
    return specs, splits


def _load_data(bench, tasks, data_dir, split, seed, jsonl, jsonl_dev, val_size):
    if bench == "jsonl":
        if not jsonl:
            raise ValueError("--bench jsonl needs --jsonl FILE (lines of task, text, text_pair, label)")
        train = load_jsonl_tasks(jsonl)
        if tasks:
            unknown = [t for t in tasks.split(",") if t not in train]
            if unknown:
                raise ValueError(f"{jsonl}: no task {unknown} (the file has {sorted(train)})")
            train = {t: train[t] for t in tasks.split(",")}
        specs = [s for s, _ in train.values()]
        if jsonl_dev:
            dev = load_jsonl_tasks(jsonl_dev, specs={t: s for t, (s, _) in train.items()})
            missing = [t for t in train if t not in dev]
            if missing:
                raise ValueError(f"{jsonl_dev}: no examples of task(s) {missing}, which {jsonl} trains; "
                                 "give every task dev rows")
            return specs, {t: {"train": ex, "validation": dev[t][1], "test": dev[t][1]} for t, (_, ex) in train.items()}
        splits = {}                                   # no dev file: 10 % of each task is held out, never trained on
        for t, (_, ex) in train.items():
            held, rest = hold_out(ex, t, seed)
            splits[t] = {"train": rest, "validation": held, "test": held}
        return specs, splits
    names = tasks.split(",") if tasks else BENCHES[bench]
    specs = [get_spec(n) for n in names]
    if bench == "commonsense":                        # LLM-Adapters: train on train.json, score test.json
        out = {}
        for n in names:                               # validation: a seeded slice of train (its val_set_size)
            train, test = load_task(n, data_dir, "train"), load_task(n, data_dir, "test")
            if val_size >= len(train):
                raise ValueError(f"{n}: --val-size {val_size} holds out all {len(train)} training questions; "
                                 "pass a smaller --val-size (0: no validation set)")
            validation, train = hold_out(train, n, seed, count=val_size) if val_size else ([], train)
            out[n] = {"train": train, "validation": validation, "test": test}
        return specs, out
    splits = make_splits(load_tasks(names, data_dir), split, seed)
    if "mnli" in names:                               # MNLI mismatched, reported beside matched
        splits["mnli_mm"] = {"test": load_task("mnli_mm", data_dir, "dev")}
        if split == "dev":
            splits["mnli_mm"]["validation"] = splits["mnli_mm"]["test"]
    return specs, splits


def k_shot(splits: dict, k: int, seed: int) -> dict:
    """Each task's training set cut to k examples drawn with `seed` (uniformly, without
    replacement; MoRE Table 4 says only "k-shot, 5 seeds"), in file order; the others unchanged."""
    out = {}
    for t, sp in splits.items():
        train = sp.get("train")
        if train is not None and len(train) > k:
            pick = np.random.default_rng([seed, zlib.crc32(t.encode())]).choice(len(train), k, replace=False)
            sp = {**sp, "train": [train[i] for i in sorted(pick.tolist())]}
        out[t] = sp
    return out


def task_splits(splits: dict, name: str) -> dict:
    """One task's splits, with mnli_mm beside mnli (LoRA-ST trains and reports each task alone)."""
    return {t: sp for t, sp in splits.items() if t == name or (name == "mnli" and t == "mnli_mm")}

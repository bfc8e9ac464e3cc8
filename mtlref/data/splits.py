"""Train / validation / test splits under two protocols.

"dev":   train = train; validation = test = the dev set (or the test file where a task has no
         dev, as the commonsense sets). Validation and test are the same examples: the dev
         sets are the figures users compare with published GLUE numbers, so model selection
         on them is optimistic and said so.
"paper": MoRE Appendix A, following Zhang et al. (2021), "Revisiting few-sample BERT
         fine-tuning": for RTE, MRPC, STS-B and CoLA the dev set is split in half into a
         validation and a test set; for SST-2, QQP, MNLI and QNLI 1,000 training examples are
         held out as validation and the dev set is the test set. mnli_mm (no train) is a test
         set only. The protocol is defined for the GLUE tasks; other tasks are an error.
Both are deterministic under `seed`: the shuffle of each task is drawn from a generator seeded
by (seed, crc32(task name)), independent of the other tasks and of dict order. Each part keeps
the file order of its examples.
"""
from __future__ import annotations

import zlib

import numpy as np

from mtlref.data.readers import Example

PROTOCOLS = ("dev", "paper")
DEV_HALVED = ("cola", "mrpc", "stsb", "rte")        # fewer than 10,000 training examples
TRAIN_HELD_OUT = ("sst2", "qqp", "mnli", "qnli")
HELD_OUT = 1000


def _rng(seed: int, task: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(task.encode())])


def _split_off(examples: list[Example], k: int, rng: np.random.Generator) -> tuple[list, list]:
    """A seeded choice of k examples, and the rest; both in file order."""
    chosen = np.zeros(len(examples), dtype=bool)
    chosen[rng.permutation(len(examples))[:k]] = True
    return ([e for e, c in zip(examples, chosen) if c], [e for e, c in zip(examples, chosen) if not c])


def hold_out(examples: list[Example], task: str, seed: int, fraction: float = 0.1,
             count: int | None = None) -> tuple[list, list]:
    """(held out, rest): a seeded fraction (at least one) of a task's examples, or exactly
    `count` of them, e.g. a dev set for users' tasks given without one; both in file order."""
    k = max(1, int(fraction * len(examples))) if count is None else count
    return _split_off(examples, k, _rng(seed, task))


def make_splits(task_examples: dict[str, dict[str, list[Example]]], protocol: str = "dev",
                seed: int = 0) -> dict[str, dict[str, list[Example]]]:
    """{task: {split: examples}} as load_tasks returns it -> {task: {"train", "validation", "test"}}."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown split protocol {protocol!r}; choose one of {PROTOCOLS}")
    out = {}
    for task, splits in task_examples.items():
        train = list(splits.get("train", []))
        held = splits.get("dev", splits.get("test"))
        if held is None:
            raise ValueError(f"{task}: no dev or test split to evaluate on (has {sorted(splits)})")
        held = list(held)
        if protocol == "dev":
            out[task] = {"train": train, "validation": held, "test": held}
        elif task in DEV_HALVED:
            validation, test = _split_off(held, len(held) // 2, _rng(seed, task))
            out[task] = {"train": train, "validation": validation, "test": test}
        elif task in TRAIN_HELD_OUT:
            if len(train) <= HELD_OUT:
                raise ValueError(f"{task}: {len(train)} training examples; the paper protocol holds "
                                 f"{HELD_OUT} of them out as validation and needs more")
            validation, train = _split_off(train, HELD_OUT, _rng(seed, task))
            out[task] = {"train": train, "validation": validation, "test": held}
        elif task == "mnli_mm":
            out[task] = {"train": [], "validation": [], "test": held}
        else:
            raise ValueError(f"{task}: the paper protocol (MoRE Appendix A) defines splits for the GLUE "
                             f"tasks {DEV_HALVED + TRAIN_HELD_OUT} only; use protocol 'dev' for {task}")
    return out

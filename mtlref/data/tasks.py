"""What each task is (TaskSpec) and how its files become Examples (load_task).

`data_dir` is the root holding glue/, superglue/ and commonsense/ (the repo's data/, which
scripts/setup.sh links to ../shared/data). Task names:
    GLUE         cola sst2 mrpc stsb qqp mnli qnli rte, plus mnli_mm: MNLI's mismatched dev,
                 evaluated with MNLI's task id and head (TaskSpec.parent), reported, not averaged
    SuperGLUE    cb (train/dev/test; test is unlabelled), superglue_boolq (BoolQ as yes/no
                 classification of (question, passage)). The "superglue_" prefix keeps it apart
                 from the commonsense `boolq`, which is the same questions as generation.
                 Only BoolQ's validation file exists offline, so superglue_boolq's "train" and
                 "dev" are its two seeded halves (TaskSpec.halves: disjoint, fixed, 1,635 each):
                 a pool for few-shot training and a test set, both with passages. The other
                 training source here, commonsense/boolq/train.json (BoolQ's 9,427 training
                 questions), carries no passages, so it would train a different task.
    commonsense  boolq piqa social_i_qa winogrande arc_easy arc_challenge openbookqa
                 (LLM-Adapters json, answered by generating "the correct answer is ...")
Splits: "train", "dev" (GLUE dev.tsv / dev_matched.tsv, SuperGLUE val.jsonl), "test" where a
test file exists, and "dev_mismatched" for mnli.
Labels: classification -> int id into TaskSpec.labels; regression -> float; generation -> the
answer string (LLM-Adapters `answer`); a row of an unlabelled test file -> None.
Users' own tasks come from one jsonl file: load_jsonl_tasks.
The readers that parse each kind of file, and Example, are in mtlref/data/readers.py.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtlref.data.readers import READERS, Example, parse_label, read_jsonl_rows
from mtlref.metrics import COMMONSENSE_TASKS, GLUE_TASKS, TASK_METRICS


@dataclass(frozen=True)
class Fields:
    """Where a file keeps its text, text pair and label. TSV columns are found by header name
    (MNLI train has 12 columns, its dev 16); a header-less file (CoLA) names them in `header`."""
    text: str
    text_pair: str | None
    label: str
    raw_labels: tuple = ()                        # labels as written in the file, in id order
    score_range: tuple[float, float] | None = None  # regression: the valid score interval
    header: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TaskSpec:
    """name; benchmark (glue | superglue | commonsense | user: which reader); kind
    (classification | regression | generation); labels: class names in id order (generation:
    the answer strings); answer_words: the word per label whose embedding initialises a decoder
    head (MTL-LoRA); files: split -> path under data_dir; metrics: the first is the main one;
    parent: the task whose id and head serve this one (mnli for mnli_mm, else itself)."""
    name: str
    benchmark: str
    kind: str
    labels: tuple[str, ...]
    answer_words: tuple[str, ...]
    files: dict[str, str]
    fields: Fields | None = None
    unlabelled: tuple[str, ...] = ()              # splits whose file carries no labels
    metrics: tuple[str, ...] = ()
    parent: str = ""
    halves: tuple[str, str] = ()                  # (split A, split B): the two seeded halves of one file

    def __post_init__(self):
        if not self.metrics:
            object.__setattr__(self, "metrics", TASK_METRICS[self.name])
        if not self.parent:
            object.__setattr__(self, "parent", self.name)

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == "regression" else len(self.labels)


# ----------------------------------------------------------------------------- the registry
# Label names and orders are GLUE's / SuperGLUE's own (the ids of the `glue` dataset and the
# words T5 is trained to emit). Answer words follow MTL-LoRA's head initialisation: "Yes" for the
# label that answers its Table 9 question positively, "No" otherwise, "Maybe" for neutral.
# STS-B has no answer words: its head is one regression output (a 0-5 score has no single word).
def _glue(name: str, folder: str, fields: Fields, labels: tuple, words: tuple, **files: str) -> TaskSpec:
    kind = "regression" if fields.score_range else "classification"
    files = {"train": f"glue/{folder}/train.tsv", "dev": f"glue/{folder}/dev.tsv", **files}
    return TaskSpec(name, "glue", kind, labels, words, files, fields)


_BIN = ("0", "1")
_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")
_MNLI = Fields("sentence1", "sentence2", "gold_label", _NLI3)
_GLUE = [
    _glue("cola", "CoLA", Fields("sentence", None, "label", _BIN, header=("source", "label", "mark", "sentence")),
          ("unacceptable", "acceptable"), ("No", "Yes")),
    _glue("sst2", "SST-2", Fields("sentence", None, "label", _BIN), ("negative", "positive"), ("No", "Yes")),
    _glue("mrpc", "MRPC", Fields("#1 String", "#2 String", "Quality", _BIN),
          ("not_equivalent", "equivalent"), ("No", "Yes")),
    _glue("stsb", "STS-B", Fields("sentence1", "sentence2", "score", score_range=(0.0, 5.0)), (), ()),
    _glue("qqp", "QQP", Fields("question1", "question2", "is_duplicate", _BIN),
          ("not_duplicate", "duplicate"), ("No", "Yes")),
    _glue("mnli", "MNLI", _MNLI, _NLI3, ("Yes", "Maybe", "No"),
          dev="glue/MNLI/dev_matched.tsv", dev_mismatched="glue/MNLI/dev_mismatched.tsv"),
    _glue("qnli", "QNLI", Fields("question", "sentence", "label", _NLI2), _NLI2, ("Yes", "No")),
    _glue("rte", "RTE", Fields("sentence1", "sentence2", "label", _NLI2), _NLI2, ("Yes", "No")),
]
_MNLI_MM = TaskSpec("mnli_mm", "glue", "classification", _NLI3, ("Yes", "Maybe", "No"),
                    {"dev": "glue/MNLI/dev_mismatched.tsv"}, _MNLI, parent="mnli")
_CB = ("entailment", "contradiction", "neutral")            # SuperGLUE's CB label order
_SUPERGLUE = [
    TaskSpec("cb", "superglue", "classification", _CB, ("Yes", "No", "Maybe"),
             {"train": "superglue/CB/train.jsonl", "dev": "superglue/CB/val.jsonl",
              "test": "superglue/CB/test.jsonl"},
             Fields("premise", "hypothesis", "label", _CB), unlabelled=("test",)),
    TaskSpec("superglue_boolq", "superglue", "classification", ("False", "True"), ("No", "Yes"),
             {"train": "superglue/BoolQ/val.jsonl", "dev": "superglue/BoolQ/val.jsonl"},
             Fields("question", "passage", "label", (False, True)), halves=("train", "dev")),
]
_COMMONSENSE_DIRS = {"boolq": "boolq", "piqa": "piqa", "social_i_qa": "social_i_qa", "winogrande": "winogrande",
                     "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "openbookqa": "openbookqa"}
_COMMONSENSE_ANSWERS = {"boolq": ("true", "false"), "piqa": ("solution1", "solution2"),
                        "social_i_qa": ("answer1", "answer2", "answer3"), "winogrande": ("option1", "option2"),
                        "arc_easy": tuple(f"answer{i}" for i in range(1, 6)),
                        "arc_challenge": tuple(f"answer{i}" for i in range(1, 6)),
                        "openbookqa": tuple(f"answer{i}" for i in range(1, 5))}
_COMMONSENSE_TRAIN = ("boolq", "arc_easy", "arc_challenge", "openbookqa")   # the others ship test.json only
_COMMONSENSE = [
    TaskSpec(t, "commonsense", "generation", _COMMONSENSE_ANSWERS[t], (),
             {**({"train": f"commonsense/{_COMMONSENSE_DIRS[t]}/train.json"} if t in _COMMONSENSE_TRAIN else {}),
              "test": f"commonsense/{_COMMONSENSE_DIRS[t]}/test.json"})
    for t in COMMONSENSE_TASKS
]
TASKS: dict[str, TaskSpec] = {s.name: s for s in [*_GLUE, _MNLI_MM, *_SUPERGLUE, *_COMMONSENSE]}
SUPERGLUE_TASKS = ("cb", "superglue_boolq")
assert tuple(s.name for s in _GLUE) == GLUE_TASKS

# LLM-Adapters' answer extraction (commonsense_evaluate.py): the first match of the task
# family's pattern in the stripped generation, case-sensitive; "" (always wrong) when none.
# As there, social_i_qa shares the answer1-answer5 pattern of ARC and OpenBookQA.
ANSWER_PATTERNS = {"boolq": r"true|false", "piqa": r"solution1|solution2", "winogrande": r"option1|option2",
                   **{t: r"answer1|answer2|answer3|answer4|answer5"
                      for t in ("social_i_qa", "arc_easy", "arc_challenge", "openbookqa")}}

WHERE_TO_GET = {
    "glue": "GLUE is not bundled: download it from https://gluebenchmark.com/tasks and place the TSVs as "
            "data/glue/<TASK>/{train,dev}.tsv (MNLI: dev_matched.tsv and dev_mismatched.tsv)",
    "superglue": "SuperGLUE is not bundled: download it from https://super.gluebenchmark.com/tasks and place "
                 "the files as data/superglue/CB/{train,val,test}.jsonl and data/superglue/BoolQ/val.jsonl",
    "commonsense": "the commonsense sets are LLM-Adapters' (github.com/AGI-Edgerunners/LLM-Adapters, "
                   "dataset/<name>/test.json, ...); place them as data/commonsense/<name>/{train,test}.json",
}


def get_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(TASKS)} "
                       "(users' own tasks: load_jsonl_tasks)")
    return TASKS[name]


def extract_answer(task: str, generated: str) -> str:
    if task not in ANSWER_PATTERNS:
        raise KeyError(f"{task!r} is not a generation task; answer patterns exist for {sorted(ANSWER_PATTERNS)}")
    match = re.search(ANSWER_PATTERNS[task], generated.strip())
    return match.group(0) if match else ""


# ----------------------------------------------------------------------------- loading
def load_task(name: str, data_dir: str | Path, split: str) -> list[Example]:
    spec = get_spec(name)
    if split not in spec.files:
        raise ValueError(f"{name} has no split {split!r}; available: {list(spec.files)}")
    data_dir = Path(data_dir)
    path = data_dir / spec.files[split]
    if not path.is_file():
        what = f"{data_dir}: no such data directory" if not data_dir.is_dir() else f"{path}: not found"
        raise FileNotFoundError(f"{what} ({name} {split}). {WHERE_TO_GET[spec.benchmark]}; "
                                "on this project's machines scripts/setup.sh links ../shared/data into data/")
    examples = READERS[spec.benchmark](spec, path, split)
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty or holds only a header) for {name} {split}")
    if split in spec.halves:
        return _half(examples, name, spec.halves.index(split))
    return examples


def _half(examples: list[Example], task: str, which: int) -> list[Example]:
    """Half `which` (0 or 1) of a file's examples under a permutation fixed by the task's name
    (never by a run's seed: the halves must stay disjoint across runs), each in file order."""
    order = np.random.default_rng(zlib.crc32(f"halves:{task}".encode())).permutation(len(examples))
    first = set(order[: len(examples) // 2].tolist())
    return [e for i, e in enumerate(examples) if (i in first) == (which == 0)]


def load_tasks(names, data_dir: str | Path) -> dict[str, dict[str, list[Example]]]:
    """Every split each task has: {task: {split: examples}} (the input of splits.make_splits)."""
    return {n: {s: load_task(n, data_dir, s) for s in get_spec(n).files} for n in names}


# ----------------------------------------------------------------------------- users' own tasks
def _infer_spec(task: str, raws: list, path: Path) -> TaskSpec:
    """int, bool or str labels -> classification over the sorted distinct values; any float
    among numbers -> regression (so 1.0 makes a task regression: write 1 for a class)."""
    kinds = {"bool" if isinstance(v, bool) else "number" if isinstance(v, (int, float)) else
             "str" if isinstance(v, str) else type(v).__name__ for v in raws}
    if len(kinds) != 1 or not kinds <= {"bool", "number", "str"}:
        raise ValueError(f"{path}: the labels of task {task!r} are of types {sorted(kinds)}; "
                         "use one of int/str (classification), bool, or float (regression)")
    if kinds == {"number"} and any(isinstance(v, float) for v in raws):
        return TaskSpec(task, "user", "regression", (), (), {}, Fields("text", "text_pair", "label"),
                        metrics=("pearson", "spearman"))
    values = tuple(sorted(set(raws)))
    names = tuple(str(v) for v in values)
    return TaskSpec(task, "user", "classification", names, names, {},
                    Fields("text", "text_pair", "label", values), metrics=("accuracy",))


def load_jsonl_tasks(path: str | Path, specs: dict[str, TaskSpec] | None = None
                     ) -> dict[str, tuple[TaskSpec, list[Example]]]:
    """Users' own tasks from one jsonl file, one object per line:
    {"task": str, "text": str, "text_pair": str or null (optional), "label": int | str | bool | float}.
    Returns {task: (spec, examples)}. Pass the training file's specs ({task: spec}) when reading
    its dev/test files, so that label ids agree across files."""
    path = Path(path)
    rows = read_jsonl_rows(path)
    out = {}
    for task, task_rows in rows.items():
        spec = (specs or {}).get(task) or _infer_spec(task, [r["label"] for r, _ in task_rows], path)
        out[task] = (spec, [Example(task, r["text"], r.get("text_pair"), parse_label(spec, r["label"], where), where)
                            for r, where in task_rows])
    return out

"""A trained run on new rows: load_run(checkpoint) -> Run, and Run.predict(rows) -> one dict per
row, in input order (the Python API); predict_file streams a jsonl file through it (predict.py).
eval.py reloads a run with the same load_run and scores it with the same model, encoder and
answer functions (mtlref/evaluate.py), so a row's prediction is the one eval.py scores.

    run = load_run("runs/glue-more")
    run.predict([{"task": "sst2", "text": "a fine film"}, {"task": "rte", "text": "...", "text_pair": "..."}])
    -> [{"task": "sst2", "label": "positive"}, {"task": "rte", "label": "not_entailment"}]

A row: {"task", "text", "text_pair" (pair tasks), "id" (optional, passed through)}. What comes back:
    per-task heads    "label" (the class name) or "score" (regression); scores=True adds "scores",
                      {class name: probability}
    T5 text-to-text   "answer" (the generated text) and the "label" / "score" parsed from it (None if none)
    commonsense (lm)  "answer" and "label": the first match of the task's answer pattern (eval.py's)
Tasks are mixed in a batch (one forward, each row routed by its task id). merged=True runs each
task's rows through a copy of the base with that task's ΔW folded in (merge_adapters): the rows
of a call are grouped by task, so a call merges each of its tasks once, and the run keeps the
max_merged most recently used copies (default 1: one more base in memory, whatever the number of
tasks; a 7B base is 13 GB in bf16) for the next call.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from mtlref.adapters import CONFIG_FILE, adapters_of, load_adapters, merge_adapters
from mtlref.data.collate import Encoder
from mtlref.data.readers import Example
from mtlref.data.tasks import ANSWER_PATTERNS, TASKS, extract_answer, get_spec, load_jsonl_tasks
from mtlref.data.templates import t5_label
from mtlref.files import write_atomic
from mtlref.heads import UNPARSED, generate_answers
from mtlref.objective import build_model, compile_backbone, make_encoder
from mtlref.pretrained import load_model
from mtlref.tokenizer import load_tokenizer
from mtlref.train import autocast, to_device

CHUNK_BATCHES = 16          # predict_file reads, predicts and writes this many batches of rows at a time


def read_config(checkpoint) -> dict:
    """A train.py --out directory's adapter_config.json; "objective" filled in for runs that
    recorded none (the bench's: lm for commonsense, else heads)."""
    path = Path(checkpoint) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint}: no {CONFIG_FILE}; pass a train.py --out directory")
    cfg = json.loads(path.read_text())
    cfg.setdefault("objective", "lm" if cfg.get("bench") == "commonsense" else "head")
    return cfg


def pair_rule(spec, has_pair: list[bool] | None = None) -> bool | None:
    """True: the task reads a sentence pair; False: one text; None: either (commonsense's optional
    input; a user's task whose training rows mix both, or whose rows were not read: has_pair)."""
    if has_pair is not None:
        return True if all(has_pair) else False if not any(has_pair) else None
    return None if spec.fields is None or spec.benchmark == "user" else spec.fields.text_pair is not None


@dataclass
class Run:
    """A run loaded by load_run: its config, task specs, the base model with the run's adapters
    (backbone), the objective's model around it (per-task heads, T5 text-to-text or the LM),
    tokenizer and encoder (None where the config records no max_length: a run written by hand, which
    exports but does not predict); pairs: task -> pair_rule."""
    cfg: dict
    specs: list
    backbone: nn.Module
    model: nn.Module
    tok: object
    encoder: Encoder | None
    pairs: dict
    merged: dict = field(default_factory=dict)     # task id -> the objective's model over the merged base,
    max_merged: int = 1                            # the most recently used first out when full
    merges: int = 0                                # merged copies made so far

    @property
    def objective(self) -> str:
        return self.cfg["objective"]

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def task_id(self, task) -> int | None:
        """The run's id of a task; a commonsense run answers the other commonsense sets with id 0, as eval.py does."""
        names = [s.name for s in self.specs]
        if task in names:
            return names.index(task)
        generative = isinstance(task, str) and task in TASKS and TASKS[task].kind == "generation"
        return 0 if self.objective == "lm" and generative else None

    def example(self, row, where: str) -> Example:
        """A row -> Example, or ValueError naming `where` (file:line, or row i) and the fix."""
        names = [s.name for s in self.specs]
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object such as {{\"task\": \"{names[0]}\", "
                             f"\"text\": \"...\"}}, got {type(row).__name__}")
        task, text, pair = row.get("task"), row.get("text"), row.get("text_pair")
        if self.task_id(task) is None:
            raise ValueError(f"{where}: unknown task {task!r}; this run predicts {names}: set \"task\" to one of them")
        if not isinstance(text, str):
            raise ValueError(f"{where}: {'no' if text is None else 'a non-string'} \"text\" for {task}; give the "
                             "input as a string, \"text\": \"...\"")
        if pair is not None and not isinstance(pair, str):
            raise ValueError(f"{where}: \"text_pair\" of {task} is a {type(pair).__name__}; make it a string")
        rule = self.pairs.get(task)
        if rule is False and pair is not None:
            raise ValueError(f"{where}: {task} reads one sentence, but the row has a \"text_pair\"; drop it")
        if rule is True and pair is None:
            raise ValueError(f"{where}: {task} reads a sentence pair; add the second sentence as "
                             "\"text_pair\": \"...\"")
        return Example(task, text, pair, None, where)

    def check(self, scores: bool, merged: bool) -> None:
        if scores and self.objective != "head":
            raise ValueError(f"--scores: class probabilities come from per-task heads; this run ({self.objective} "
                             "objective) answers in text; drop --scores")
        stuck = sorted({a.method for a in adapters_of(self.backbone).values() if not a.mergeable})
        if merged and stuck:
            raise ValueError(f"--merged: {self.cfg['method']} adapters cannot be folded into the base weights "
                             f"({', '.join(stuck)}: ΔW depends on the input, not on the task alone); predict "
                             "without --merged")

    def predict(self, rows: list[dict], batch_size: int = 32, precision: str = "auto", scores: bool = False,
                merged: bool = False, max_new_tokens: int = 32) -> list[dict]:
        """One dict per row, in the rows' order (the module docstring says what each holds)."""
        examples = [self.example(row, f"row {i}") for i, row in enumerate(rows, 1)]
        outs = self.predict_examples(examples, batch_size, precision, scores, merged, max_new_tokens)
        return [with_id(row, out) for row, out in zip(rows, outs)]

    def predict_examples(self, examples: list[Example], batch_size: int = 32, precision: str = "auto",
                         scores: bool = False, merged: bool = False, max_new_tokens: int = 32) -> list[dict]:
        """Batches of rows sorted by length (less padding): mixed tasks, or one task each when merged."""
        self.check(scores, merged)
        if self.encoder is None:
            raise ValueError("this run's adapter_config.json records no max_length (train.py writes it); add it")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        items = [(self.task_id(ex.task), ("predict", i), ex) for i, ex in enumerate(examples)]
        groups: dict = {}
        for i in sorted(range(len(items)), key=lambda i: len(self.encoder.get(items[i][:2], items[i][2])[0])):
            groups.setdefault(items[i][0] if merged else None, []).append(i)
        outs = [None] * len(items)
        for group in groups.values():
            for s in range(0, len(group), batch_size):
                idx = group[s: s + batch_size]
                for i, out in zip(idx, self.answer([items[i] for i in idx], merged, precision, scores, max_new_tokens)):
                    outs[i] = {"task": items[i][2].task, **out}
        self.encoder.cache.clear()                   # the memo would grow with every row streamed through
        return outs

    def answer(self, items: list[tuple], merged: bool, precision: str, scores: bool, max_new_tokens: int) -> list[dict]:
        """One batch of (task id, memo key, example) -> what each row's dict holds beside "task"."""
        model = self.merged_model(items[0][0]) if merged else self.model
        task_ids, examples = [t for t, _, _ in items], [ex for _, _, ex in items]
        with torch.no_grad(), autocast(self.device, precision):
            if self.objective == "lm":
                answers = generate_answers(model.backbone, self.tok, examples, task_ids, max_new_tokens)
                return [{"answer": a, "label": extracted(ex.task, a)} for a, ex in zip(answers, examples)]
            batch = to_device(self.encoder.collate(items), self.device)
            if self.objective == "gen":
                return [parsed(self.specs[t], a) for t, a in zip(task_ids, model.generate_answers(batch))]
            out = model(batch).float()                              # (B, C_max): -inf past a task's classes
            preds = model.predict(out, batch).tolist()
        rows = []
        for b, spec in enumerate(self.specs[t] for t in task_ids):
            if spec.kind == "regression":
                rows.append({"score": preds[b]})
                continue
            rows.append({"label": spec.labels[int(preds[b])]})
            if scores:
                rows[-1]["scores"] = dict(zip(spec.labels, out[b, : len(spec.labels)].softmax(-1).tolist()))
        return rows

    def merged_model(self, task_id: int) -> nn.Module:
        """The objective's model over a copy of the base with task `task_id`'s ΔW folded in (made
        when asked, kept among the max_merged most recently used); per-task heads are the run's own."""
        if task_id in self.merged:
            self.merged[task_id] = self.merged.pop(task_id)             # most recently used last
        else:
            while self.merged and len(self.merged) >= self.max_merged:
                del self.merged[next(iter(self.merged))]               # the least recently used
            with torch.random.fork_rng(devices=[]):           # fresh heads draw from the RNG; the run's replace them
                model = build_model(merge_adapters(self.backbone, task_id), self.tok, self.specs, self.objective,
                                    self.cfg.get("pooling", "mean"))
            if self.objective == "head":
                model.heads = self.model.heads
            self.merged[task_id] = model.eval()
            self.merges += 1
        return self.merged[task_id]


def parsed(spec, answer: str) -> dict:
    """T5's answer and what it parses to (templates.t5_label): a class name, a score, or None."""
    value = t5_label(spec.name, answer, spec)
    if spec.kind == "regression":
        return {"answer": answer, "score": None if value == UNPARSED else value}
    return {"answer": answer, "label": None if value == UNPARSED else spec.labels[value]}


def extracted(task: str, answer: str) -> str | None:
    """A commonsense answer's label: the first match of its task's pattern (eval.py's), or None."""
    return (extract_answer(task, answer) if task in ANSWER_PATTERNS else "") or None


def with_id(row: dict, out: dict) -> dict:
    return {"id": row["id"], **out} if "id" in row else out


def load_run(checkpoint, model_dir=None, device="cpu", specs=None, compile: bool = False) -> Run:
    """A train.py --out directory -> Run: the base model (model_dir: default the run's) with the
    run's adapters and heads, in eval mode. specs: the run's tasks when the caller has read them
    (else from the registry, or the run's jsonl file, whose rows also say which tasks are pairs).
    compile: torch.compile the backbone (objective.compile_backbone; --merged copies stay eager)."""
    cfg = read_config(checkpoint)
    has_pair = {}
    if specs is None and cfg.get("bench") == "jsonl":
        tasks = load_jsonl_tasks(cfg["jsonl"])
        specs = [s for s, _ in tasks.values()]
        has_pair = {t: [ex.text_pair is not None for ex in exs] for t, (_, exs) in tasks.items()}
    elif specs is None:
        specs = [get_spec(n) for n in cfg["task_names"]]
    model_dir = Path(model_dir or cfg["model_dir"])
    backbone = load_model(model_dir, device=device)
    tok = load_tokenizer(model_dir)
    objective = cfg["objective"]
    model = build_model(backbone, tok, specs, objective, cfg.get("pooling", "mean")).to(device)
    load_adapters(backbone, checkpoint, extra_modules={"heads": model.heads} if objective == "head" else None)
    model.eval()
    if compile:
        compile_backbone(model)
    encoder = make_encoder(tok, backbone, specs, cfg["max_length"], objective) if "max_length" in cfg else None
    return Run(cfg, specs, backbone, model, tok, encoder, {s.name: pair_rule(s, has_pair.get(s.name)) for s in specs})


# ----------------------------------------------------------------------------- predict.py: a jsonl stream
def check_paths(path, out, skip_bad: bool) -> None:
    """predict.py's files, checked before the model loads."""
    if path != "-" and not Path(path).is_file():
        raise FileNotFoundError(f"{path}: not found; --input takes a jsonl file of {{task, text, text_pair}} rows "
                                "(- reads stdin)")
    if skip_bad and out is None:
        raise ValueError("--skip-bad writes the bad rows to <out>.rejected.jsonl: give --out")


def predict_file(run: Run, path, out=None, batch_size: int = 32, skip_bad: bool = False, **options) -> dict:
    """The rows of a jsonl file (path "-": stdin) -> one json line each, in input order, to `out`
    (None: stdout), CHUNK_BATCHES batches read, predicted and written at a time (constant memory);
    a progress line on stderr when the input is a file. A bad row raises naming file:line and the
    fix, or with skip_bad goes with its reason to <out>.rejected.jsonl. Files are written to a
    temporary file beside them and renamed at the end, so an error leaves none. options:
    Run.predict_examples's. Returns {"rows", "rejected", "seconds"}."""
    check_paths(path, out, skip_bad)
    run.check(options.get("scores", False), options.get("merged", False))
    name = "<stdin>" if path == "-" else str(path)
    size = None if path == "-" else Path(path).stat().st_size
    counts = {}
    with contextlib.nullcontext(sys.stdin.buffer) if path == "-" else open(path, "rb") as source:
        def into(tmp, rejected_tmp=None):
            with open(tmp, "w", encoding="utf-8") as f, \
                    open(rejected_tmp, "w", encoding="utf-8") if rejected_tmp else contextlib.nullcontext() as r:
                counts.update(stream(run, source, name, size, f, r, batch_size, options))
        if out is None:
            counts.update(stream(run, source, name, size, sys.stdout, None, batch_size, options))
        elif skip_bad:
            rejected = Path(f"{out}.rejected.jsonl")
            write_atomic(Path(out), lambda tmp: write_atomic(rejected, lambda rejected_tmp: into(tmp, rejected_tmp)))
        else:
            write_atomic(Path(out), into)
    return counts


def stream(run: Run, source, name: str, size, out, rejected, batch_size: int, options: dict) -> dict:
    pending, rows, bad, start, shown = [], 0, 0, time.time(), time.time()
    eg = f'{{"task": "{run.specs[0].name}", "text": "..."}}'
    for n, raw in enumerate(source, 1):
        if not raw.strip():
            continue
        where = f"{name}:{n}"
        try:
            row = parse_line(raw, where, eg)
            pending.append((row, run.example(row, where)))
        except ValueError as e:
            if rejected is None:
                raise
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            rejected.write(json.dumps({"line": n, "reason": str(e), "row": text}, ensure_ascii=False) + "\n")
            bad += 1
        if len(pending) == batch_size * CHUNK_BATCHES:
            rows += write_chunk(run, pending, out, batch_size, options)
            pending = []
            if size and time.time() - shown >= 1:
                shown = time.time()
                progress(rows, shown - start, source.tell() / max(size, 1), name)
    if rows + len(pending) + bad == 0:
        raise ValueError(f"{name}: empty file; write one JSON object a line, e.g. {eg}")
    rows += write_chunk(run, pending, out, batch_size, options)
    if size:
        progress(rows, time.time() - start, 1.0, name)
    return {"rows": rows, "rejected": bad, "seconds": time.time() - start}


def parse_line(raw: bytes, where: str, eg: str):
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{where}: not UTF-8 text; save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); write one JSON object a line, "
                         f"e.g. {eg}") from None


def write_chunk(run: Run, pending: list, out, batch_size: int, options: dict) -> int:
    outs = run.predict_examples([ex for _, ex in pending], batch_size, **options) if pending else []
    for (row, _), o in zip(pending, outs):
        out.write(json.dumps(with_id(row, o), ensure_ascii=False) + "\n")
    out.flush()
    return len(pending)


def progress(rows: int, seconds: float, done: float, name: str) -> None:
    eta = seconds / done * (1 - done) if done > 0 else 0.0
    print(f"predict: {rows:,} rows, {rows / max(seconds, 1e-9):,.0f} rows/s, {done:.0%} of {name}, "
          f"ETA {int(eta // 60)}m{int(eta % 60):02d}s", file=sys.stderr, flush=True)

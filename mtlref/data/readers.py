"""The file readers: each turns one task file into Examples, and an error names the file, the
row (file:line; in a JSON list, file[i]) and what is wrong with it.
    GLUE         tab-separated, columns found by header name (_read_tsv)
    SuperGLUE    one JSON object per line (_read_jsonl)
    commonsense  LLM-Adapters' JSON list of {instruction, input, output, answer} (_read_llm_adapters)
    users' jsonl one JSON object per line with its task (read_jsonl_rows)
READERS maps a TaskSpec's benchmark to its reader; which file a task reads, and how, is in its
TaskSpec (mtlref/data/tasks.py), the `spec` every reader takes (this module imports no task table).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Example:
    """One input of one task. text_pair is None for single-sentence tasks; source is "file:line"
    (json lists: "file[i]") for error messages; target is the response a generator is trained
    on (LLM-Adapters `output`), None for classification and regression."""
    task: str
    text: str
    text_pair: str | None
    label: int | float | str | None
    source: str
    target: str | None = None


def parse_label(spec, raw, where: str) -> int | float:
    """A label as the file writes it -> a class id into spec.labels, or a score (regression);
    `where` names the row in the error."""
    f = spec.fields
    if spec.kind == "regression":
        try:
            value = float(raw) if not isinstance(raw, bool) else None
        except (TypeError, ValueError):
            value = None
        lo, hi = f.score_range or (float("-inf"), float("inf"))
        if value is None or not lo <= value <= hi:
            raise ValueError(f"{where}: label {raw!r} is not a score in [{lo}, {hi}] for {spec.name}")
        return value
    if f.raw_labels and type(raw) is type(f.raw_labels[0]) and raw in f.raw_labels:
        return f.raw_labels.index(raw)
    raise ValueError(f"{where}: label {raw!r} is not one of {list(f.raw_labels)} for {spec.name}")


def _read_tsv(spec, path: Path, split: str) -> list[Example]:
    # Lines are split on tabs by hand, with no CSV quoting: MRPC and others hold bare quotes.
    # utf-8-sig drops MRPC's byte-order mark from its header.
    lines = path.read_text(encoding="utf-8-sig").split("\n")
    if lines[-1] == "":
        lines.pop()
    rows = [(n, line.rstrip("\r").split("\t")) for n, line in enumerate(lines, 1)]
    f = spec.fields
    if f.header is None:
        if not rows:
            raise ValueError(f"{path}: empty file; expected a header line and rows for {spec.name}")
        header = rows.pop(0)[1]
    else:
        header = list(f.header)
    for col in (f.text, f.text_pair, f.label):
        if col is not None and col not in header:
            raise ValueError(f"{path}:1: the header {header} lacks column {col!r} for {spec.name}")
    text, label = header.index(f.text), header.index(f.label)
    pair = header.index(f.text_pair) if f.text_pair else None
    out = []
    for n, cols in rows:
        if len(cols) != len(header):
            raise ValueError(f"{path}:{n}: expected {len(header)} tab-separated columns for {spec.name}, "
                             f"got {len(cols)}")
        where = f"{path}:{n}"
        out.append(Example(spec.name, cols[text], cols[pair] if pair is not None else None,
                           parse_label(spec, cols[label], where), where))
    return out


def _json_object(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
    return row


def _require(row: dict, keys, where: str, task: str) -> None:
    missing = [k for k in keys if k is not None and k not in row]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing} for {task}; the row has {sorted(row)}")


def _read_jsonl(spec, path: Path, split: str) -> list[Example]:
    f, out = spec.fields, []
    labelled = split not in spec.unlabelled
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        row = _json_object(line, where)
        _require(row, (f.text, f.text_pair, f.label if labelled else None), where, spec.name)
        out.append(Example(spec.name, row[f.text], row[f.text_pair] if f.text_pair else None,
                           parse_label(spec, row[f.label], where) if labelled else None, where))
    return out


def _read_llm_adapters(spec, path: Path, split: str) -> list[Example]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8") or "[]")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); an LLM-Adapters file is one JSON list") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of {{instruction, input, output, answer}}, "
                         f"got {type(rows).__name__}")
    out = []
    for i, row in enumerate(rows):
        where = f"{path}[{i}]"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        _require(row, ("instruction", "input", "output", "answer"), where, spec.name)
        if row["answer"] not in spec.labels:
            raise ValueError(f"{where}: label {row['answer']!r} is not one of {list(spec.labels)} for {spec.name}")
        out.append(Example(spec.name, row["instruction"], row["input"] or None, row["answer"], where,
                           target=row["output"]))
    return out


READERS = {"glue": _read_tsv, "superglue": _read_jsonl, "commonsense": _read_llm_adapters}


def read_jsonl_rows(path: str | Path) -> dict[str, list[tuple[dict, str]]]:
    """The rows of a users' jsonl file (one object per line: {"task": str, "text": str,
    "text_pair": str or null (optional), "label": ...}) by task: {task: [(row, "file:line"), ...]},
    in file order; a row that is not such an object raises with its file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (a jsonl file of {{task, text, text_pair, label}} objects)")
    rows: dict[str, list[tuple[dict, str]]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        row = _json_object(line, where)
        _require(row, ("task", "text", "label"), where, "a jsonl task")
        if not all(isinstance(v, str) for v in (row["task"], row["text"], row.get("text_pair") or "")):
            raise ValueError(f"{where}: task, text and text_pair must be strings (text_pair may be null or absent)")
        rows.setdefault(row["task"], []).append((row, where))
    if not rows:
        raise ValueError(f"{path}: empty file; expected one JSON object per line")
    return rows

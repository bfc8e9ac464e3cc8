"""Task readers on every shared data file, split protocols, and prompt templates."""
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from conftest import DATA, SHARED, need
from mtlref.data import (TASKS, Example, extract_answer, get_spec, load_jsonl_tasks, load_task, load_tasks,
                         make_splits, render, t5_input, t5_label, t5_target)
from mtlref.data.templates import PROMPTS

# Row counts from ../shared/README.md.
ROWS = {
    ("cola", "train"): 8551, ("cola", "dev"): 1043, ("sst2", "train"): 67349, ("sst2", "dev"): 872,
    ("mrpc", "train"): 3668, ("mrpc", "dev"): 408, ("stsb", "train"): 5749, ("stsb", "dev"): 1500,
    ("rte", "train"): 2490, ("rte", "dev"): 277, ("qnli", "train"): 8999, ("qnli", "dev"): 5463,
    ("qqp", "train"): 8999, ("qqp", "dev"): 1000, ("mnli", "train"): 8999, ("mnli", "dev"): 1000,
    ("mnli", "dev_mismatched"): 1000, ("mnli_mm", "dev"): 1000,
    ("cb", "train"): 250, ("cb", "dev"): 56, ("cb", "test"): 250,
    ("superglue_boolq", "dev"): 1635, ("superglue_boolq", "train"): 1635,
    ("boolq", "test"): 3270, ("piqa", "test"): 1838, ("social_i_qa", "test"): 1954, ("winogrande", "test"): 1267,
    ("arc_easy", "test"): 2376, ("arc_challenge", "test"): 1172, ("openbookqa", "test"): 500,
    ("boolq", "train"): 9427, ("arc_easy", "train"): 2251, ("arc_challenge", "train"): 1119,
    ("openbookqa", "train"): 4957,
}


@pytest.fixture(scope="module")
def data():
    return need(DATA)


def raw_column(path: Path, index: int, header: bool = True) -> list[str]:
    """One column of a TSV, read independently of the library."""
    lines = [line for line in path.read_text(encoding="utf-8").split("\n") if line]
    return [line.split("\t")[index] for line in lines[1 if header else 0:]]


# ----------------------------------------------------------------------------- every file
def test_every_shared_file_belongs_to_a_task(data):
    on_disk = {p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file()}
    known = {f for spec in TASKS.values() for f in spec.files.values()}
    assert on_disk and on_disk <= known, sorted(on_disk - known)
    assert set(ROWS) == {(t, s) for t, spec in TASKS.items() for s in spec.files}      # every file is counted


@pytest.mark.parametrize("task,split", sorted(ROWS))
def test_row_counts_match_readme(data, task, split):
    examples = load_task(task, data, split)
    assert len(examples) == ROWS[task, split]
    spec = get_spec(task)
    for e in examples:
        assert e.task == task and isinstance(e.text, str) and e.text
        if spec.kind == "classification" and split not in spec.unlabelled:
            assert isinstance(e.label, int) and 0 <= e.label < len(spec.labels)
        elif spec.kind == "regression":
            assert isinstance(e.label, float) and 0.0 <= e.label <= 5.0
        elif spec.kind == "generation":
            assert e.label in spec.labels and e.target == f"the correct answer is {e.label}"


def test_label_mapping_matches_raw_files(data):
    glue = data / "glue"
    cases = [("cola", "dev", glue / "CoLA/dev.tsv", 1, False), ("mrpc", "train", glue / "MRPC/train.tsv", 0, True),
             ("mnli", "dev", glue / "MNLI/dev_matched.tsv", -1, True),
             ("mnli", "train", glue / "MNLI/train.tsv", -1, True),
             ("qnli", "dev", glue / "QNLI/dev.tsv", -1, True), ("qqp", "dev", glue / "QQP/dev.tsv", -1, True),
             ("rte", "train", glue / "RTE/train.tsv", -1, True), ("sst2", "dev", glue / "SST-2/dev.tsv", -1, True)]
    for task, split, path, col, header in cases:
        names = get_spec(task).labels
        raw = Counter(raw_column(path, col, header))
        got = Counter(names[e.label] for e in load_task(task, data, split))
        raw_as_names = Counter({(names[int(k)] if k.isdigit() else k): v for k, v in raw.items()})
        assert got == raw_as_names, task


def test_tricky_rows(data):
    mrpc = load_task("mrpc", data, "dev")[0]                      # BOM header, bare quotes kept
    assert mrpc.text.startswith("He said the foodservice") and mrpc.text_pair.startswith('"The foodservice')
    assert mrpc.label == 1 and mrpc.source.endswith("MRPC/dev.tsv:2")
    stsb = load_task("stsb", data, "dev")[1]
    assert stsb.label == 4.75 and stsb.text == "A young child is riding a horse."
    qqp = load_task("qqp", data, "dev")[0]                        # empty qid columns
    assert qqp.text == "Who is the stupidest character in Game of Thrones?" and qqp.label == 0
    mm = load_task("mnli", data, "dev_mismatched")[0]
    assert mm.text.startswith("You ca n't take it") and get_spec("mnli").labels[mm.label] == "entailment"
    assert load_task("mnli_mm", data, "dev")[0].text == mm.text and get_spec("mnli_mm").parent == "mnli"
    cola = load_task("cola", data, "dev")
    assert cola[-1].source.endswith(":1043")                      # last line has no newline
    assert all(e.label is None for e in load_task("cb", data, "test"))
    boolq = load_task("superglue_boolq", data, "dev")
    pool = load_task("superglue_boolq", data, "train")
    assert len(boolq) == len(pool) == 1635 and all(e.text_pair for e in pool)     # val.jsonl's 3,270, halved
    assert not {e.source for e in boolq} & {e.source for e in pool}               # disjoint, every row used once
    assert Counter(e.label for e in boolq) + Counter(e.label for e in pool) == {1: 2033, 0: 1237}
    assert [e.source for e in load_task("superglue_boolq", data, "train")] == [e.source for e in pool]  # fixed


def test_specs():
    assert get_spec("cola").labels == ("unacceptable", "acceptable")
    assert get_spec("cola").answer_words == ("No", "Yes")
    assert get_spec("mnli").answer_words == ("Yes", "Maybe", "No")
    assert get_spec("rte").answer_words == ("Yes", "No")          # label 0 is entailment
    assert get_spec("stsb").kind == "regression" and get_spec("stsb").answer_words == ()
    assert get_spec("cola").main_metric == "mcc" and get_spec("stsb").main_metric == "pearson"
    assert get_spec("qqp").metrics == ("accuracy", "f1")
    assert get_spec("boolq").kind == "generation"
    with pytest.raises(KeyError, match="unknown task 'colaa'"):
        get_spec("colaa")


# ----------------------------------------------------------------------------- errors
def write(tmp_path: Path, rel: str, text: str) -> Path:
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_malformed_rows_name_file_and_line(tmp_path):
    path = write(tmp_path, "glue/CoLA/train.tsv", "gj04\t1\t\tGood.\ngj04\t0\t*\tBad.\ngj04\t1\tno label column\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: expected 4 tab-separated columns for cola, got 3")):
        load_task("cola", tmp_path, "train")
    path = write(tmp_path, "glue/RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailed\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: label 'entailed' is not one of "
                                                   "['entailment', 'not_entailment'] for rte")):
        load_task("rte", tmp_path, "train")
    write(tmp_path, "glue/STS-B/train.tsv", "sentence1\tsentence2\tscore\na\tb\t7.5\n")
    with pytest.raises(ValueError, match="label '7.5' is not a score in"):
        load_task("stsb", tmp_path, "train")
    write(tmp_path, "glue/QNLI/train.tsv", "index\tquestion\ttext\tlabel\n")
    with pytest.raises(ValueError, match="lacks column 'sentence' for qnli"):
        load_task("qnli", tmp_path, "train")
    write(tmp_path, "superglue/CB/train.jsonl", '{"premise": "a", "label": "neutral"}\n')
    with pytest.raises(ValueError, match=r"train.jsonl:1: missing key\(s\) \['hypothesis'\] for cb"):
        load_task("cb", tmp_path, "train")


def test_empty_and_missing_files(tmp_path):
    path = write(tmp_path, "glue/SST-2/train.tsv", "")
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: empty file"):
        load_task("sst2", tmp_path, "train")
    write(tmp_path, "glue/SST-2/dev.tsv", "sentence\tlabel\n")
    with pytest.raises(ValueError, match="no examples"):
        load_task("sst2", tmp_path, "dev")
    with pytest.raises(FileNotFoundError, match=r"glue/MRPC/train.tsv: not found.*gluebenchmark.com"):
        load_task("mrpc", tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="no such data directory"):
        load_task("mrpc", tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="no split 'test'"):
        load_task("mrpc", tmp_path, "test")


# ----------------------------------------------------------------------------- answers
def test_extract_answer_follows_llm_adapters():
    assert extract_answer("boolq", "  the correct answer is false. True!") == "false"   # case-sensitive, first match
    assert extract_answer("piqa", "solution2 beats solution1") == "solution2"
    assert extract_answer("social_i_qa", "the correct answer is answer4") == "answer4"  # answer1-5, as LLM-Adapters
    assert extract_answer("winogrande", "Option1") == ""
    assert extract_answer("arc_easy", "I think answer5") == "answer5"
    with pytest.raises(KeyError):
        extract_answer("cola", "yes")


def test_gold_targets_extract_to_gold_answers(data):
    for task in ("boolq", "piqa", "social_i_qa", "winogrande", "arc_easy", "arc_challenge", "openbookqa"):
        for e in load_task(task, data, "test"):
            assert extract_answer(task, e.target) == e.label


# ----------------------------------------------------------------------------- users' tasks
def test_load_jsonl_tasks(tmp_path):
    rows = [{"task": "topic", "text": "a", "label": "sport"}, {"task": "topic", "text": "b", "label": "art"},
            {"task": "stars", "text": "c", "text_pair": "d", "label": 4}, {"task": "stars", "text": "e", "label": 1},
            {"task": "score", "text": "f", "label": 0.5}, {"task": "score", "text": "g", "label": 2}]
    path = write(tmp_path, "mine.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    loaded = load_jsonl_tasks(path)
    specs = {t: spec for t, (spec, _) in loaded.items()}
    examples = {t: ex for t, (_, ex) in loaded.items()}
    assert specs["topic"].kind == "classification" and specs["topic"].labels == ("art", "sport")
    assert [e.label for e in examples["topic"]] == [1, 0]
    assert specs["stars"].labels == ("1", "4") and [e.label for e in examples["stars"]] == [1, 0]
    assert examples["stars"][0].text_pair == "d" and examples["stars"][1].text_pair is None
    assert specs["score"].kind == "regression" and [e.label for e in examples["score"]] == [0.5, 2.0]
    assert specs["score"].main_metric == "pearson" and specs["topic"].main_metric == "accuracy"
    dev = write(tmp_path, "dev.jsonl", json.dumps({"task": "topic", "text": "h", "label": "art"}) + "\n"
                + json.dumps({"task": "topic", "text": "i", "label": "food"}) + "\n")
    with pytest.raises(ValueError, match=r"dev.jsonl:2: label 'food' is not one of \['art', 'sport'\] for topic"):
        load_jsonl_tasks(dev, specs)
    assert load_jsonl_tasks(path, specs)["topic"][0] is specs["topic"]             # given specs are reused
    mixed = write(tmp_path, "mixed.jsonl", json.dumps({"task": "t", "text": "a", "label": "x"}) + "\n"
                  + json.dumps({"task": "t", "text": "b", "label": 1}) + "\n")
    with pytest.raises(ValueError, match="labels of task 't' are of types"):
        load_jsonl_tasks(mixed)


# ----------------------------------------------------------------------------- splits
def fake_task(n_train: int, n_dev: int, task: str):
    return {"train": [Example(task, f"t{i}", None, i % 2, f"train:{i}") for i in range(n_train)],
            "dev": [Example(task, f"d{i}", None, i % 2, f"dev:{i}") for i in range(n_dev)]}


def test_dev_protocol():
    tasks = {"rte": fake_task(20, 7, "rte"), "qnli": fake_task(30, 5, "qnli")}
    out = make_splits(tasks, "dev", seed=0)
    for t in tasks:
        assert out[t]["train"] == tasks[t]["train"]
        assert out[t]["validation"] == out[t]["test"] == tasks[t]["dev"]


def test_paper_protocol():
    tasks = {"rte": fake_task(20, 277, "rte"), "qnli": fake_task(2500, 50, "qnli"),
             "mnli_mm": {"dev": fake_task(0, 9, "mnli_mm")["dev"]}}
    out = make_splits(tasks, "paper", seed=0)
    rte = out["rte"]                                   # dev halved: 138 validation, 139 test
    assert rte["train"] == tasks["rte"]["train"]
    assert (len(rte["validation"]), len(rte["test"])) == (138, 139)
    assert sorted(rte["validation"] + rte["test"], key=lambda e: int(e.text[1:])) == tasks["rte"]["dev"]
    assert not set(rte["validation"]) & set(rte["test"])
    assert rte["validation"] != tasks["rte"]["dev"][:138]   # shuffled, not the first half
    qnli = out["qnli"]                                 # 1,000 train held out, dev is test
    assert len(qnli["validation"]) == 1000 and len(qnli["train"]) == 1500 and qnli["test"] == tasks["qnli"]["dev"]
    assert set(qnli["validation"]) | set(qnli["train"]) == set(tasks["qnli"]["train"])
    assert not set(qnli["validation"]) & set(qnli["train"])
    for part in ("train", "validation"):               # each part keeps file order
        assert qnli[part] == sorted(qnli[part], key=lambda e: int(e.text[1:]))
    assert out["mnli_mm"] == {"train": [], "validation": [], "test": tasks["mnli_mm"]["dev"]}
    assert make_splits(tasks, "paper", seed=0) == out
    assert make_splits(tasks, "paper", seed=1)["rte"]["validation"] != rte["validation"]
    # a task's split does not depend on which other tasks are present
    assert make_splits({"rte": tasks["rte"]}, "paper", seed=0)["rte"] == rte
    with pytest.raises(ValueError, match="GLUE"):
        make_splits({"boolq": fake_task(10, 4, "boolq")}, "paper", seed=0)
    with pytest.raises(ValueError, match="unknown split protocol"):
        make_splits(tasks, "random", seed=0)


def test_paper_protocol_on_real_glue(data):
    out = make_splits(load_tasks(["mrpc", "sst2"], data), "paper", seed=0)
    assert (len(out["mrpc"]["validation"]), len(out["mrpc"]["test"])) == (204, 204)
    assert len(out["sst2"]["validation"]) == 1000 and len(out["sst2"]["train"]) == 67349 - 1000


# ----------------------------------------------------------------------------- templates
def test_prompts_are_table9_verbatim():
    paper = need(SHARED / "papers" / "mtl-lora.txt")
    table = paper.read_text(encoding="utf-8").split("Table 9: Prompt templates for the GLUE benchmark.")[-1]
    table = table.split("Table 10")[0]
    printed = dict(re.findall(r"^(CoLA|SST2|MRPC|STSB|QQP|MNLI|QNLI|RTE):\n(.+)$", table, flags=re.M))
    assert len(printed) == 8
    for name, template in printed.items():
        assert PROMPTS[name.lower()] == template


def test_render():
    assert render("cola", "It rains.") == 'Is the following sentence "It rains." grammatically acceptable? Answer:'
    assert render("rte", "T", "H") == 'Dose the text "T" entail the statement "H"? Answer:'
    assert render("qnli", "Q?", "S.") == ('Based on the statement: "S." dose the following sentence "Q?" '
                                          'have a definitive answer? Answer:')
    assert render("mnli_mm", "P", "H") == render("mnli", "P", "H")
    assert render("mnli", "P", "H") == 'Dose the statement "P" imply that "H" ? Answer:'
    assert render("piqa", "Pick one.") == ("Below is an instruction that describes a task. Write a response that "
                                           "appropriately completes the request.\n\n### Instruction:\nPick one."
                                           "\n\n### Response:\n")
    assert render("cola", "{braces} stay").startswith('Is the following sentence "{braces} stay"')
    with pytest.raises(ValueError, match="sentence pair"):
        render("mrpc", "only one")
    with pytest.raises(KeyError, match="no decoder prompt"):
        render("mine", "x")


def test_users_task_templates(tmp_path, monkeypatch):
    monkeypatch.setitem(PROMPTS, "topic", 'Is "{}" about sport? Answer:')
    assert render("topic", "a match") == 'Is "a match" about sport? Answer:'
    path = write(tmp_path, "mine.jsonl", json.dumps({"task": "topic", "text": "a", "label": "sport"}) + "\n"
                 + json.dumps({"task": "topic", "text": "b", "label": "art"}) + "\n")
    spec = load_jsonl_tasks(path)["topic"][0]
    assert t5_target("topic", 1, spec) == "sport" and t5_label("topic", "art", spec) == 0


def test_t5_inputs_and_targets():
    assert t5_input("cola", "S.") == "cola sentence: S."
    assert t5_input("mrpc", "A", "B") == "mrpc sentence1: A sentence2: B"
    assert t5_input("stsb", "A", "B") == "stsb sentence1: A sentence2: B"
    assert t5_input("mnli", "P", "H") == "mnli hypothesis: H premise: P"
    assert t5_input("qnli", "Q", "S") == "qnli question: Q sentence: S"
    assert t5_input("qqp", "A", "B") == "qqp question1: A question2: B"
    assert t5_input("rte", "A", "B") == "rte sentence1: A sentence2: B"
    assert t5_input("sst2", "S") == "sst2 sentence: S"
    assert t5_target("cola", 1) == "acceptable" and t5_target("qnli", 1) == "not_entailment"
    assert [t5_target("stsb", s) for s in (3.8, 4.75, 0.0, 2.33)] == ["3.8", "4.8", "0.0", "2.4"]
    for task in ("cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte", "cb"):
        for i in range(len(get_spec(task).labels)):
            assert t5_label(task, " " + t5_target(task, i) + " ") == i
    assert t5_label("rte", "maybe") == -1 and t5_label("stsb", "3.4") == 3.4 and t5_label("stsb", "nan") == -1.0

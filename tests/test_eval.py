"""Evaluation: the set that is scored is the one named, the metrics of a known set are the known
values, and eval.py --checkpoint reprints exactly what train.py reported.

- make_evaluator maps each prediction back to its example (batches are sorted by length) and
  reports each task's metrics and the mean of the main ones, by value.
- --split paper (MoRE Appendix A): RTE's dev rows are halved into validation and test by the
  seeded shuffle the protocol documents; a data set whose halves give different known
  accuracies shows that the best step is chosen on validation and reported on test, never on
  the training set, and that eval.py --split validation / test score what they say.
- A head-objective BERT run on jsonl tasks: eval.py reprints the numbers, and they are what the
  saved adapters and heads predict on the dev file, counted here.
"""
import json
import zlib

import numpy as np
import pytest
import torch

from mtlref import load_adapters, load_model, load_tokenizer
from mtlref.data.collate import Encoder
from mtlref.data.tasks import Example, get_spec, load_jsonl_tasks
from mtlref.heads import MultiTaskModel
from mtlref.evaluate import make_evaluator
from mtlref.commands import eval_main, train_main



# ----------------------------------------------------------------------------- known predictions
class LookupModel(torch.nn.Module):
    """Predicts a fixed value per example, looked up by the id its batch carries; checks that
    each example arrives with the task id of its head (`task_of`: source -> id)."""

    def __init__(self, table: dict[str, float], task_of: dict[str, int]):
        super().__init__()
        self.table, self.task_of = table, task_of
        self.names = sorted(table)

    def predict_batch(self, batch):
        names = [self.names[i] for i in batch["ids"].tolist()]
        assert batch["task_ids"].tolist() == [self.task_of[n] for n in names], names
        return torch.tensor([self.table[n] for n in names])


class LookupEncoder:
    """Each example's "token ids" have a length set by its source, so that eval_batches' length
    sort permutes the examples; the batch carries the examples' ids for LookupModel."""

    def __init__(self, names):
        self.names = sorted(names)

    def get(self, key, ex):
        return [1] * (1 + (7 * self.names.index(ex.source)) % 5), None

    def collate(self, items):
        n = len(items)
        return {"input_ids": torch.ones(n, 1, dtype=torch.long), "attention_mask": torch.ones(n, 1, dtype=torch.long),
                "task_ids": torch.tensor([t for t, _, _ in items]),
                "ids": torch.tensor([self.names.index(ex.source) for _, _, ex in items])}


def test_metrics_of_a_known_set_by_value():
    """MRPC accuracy/F1, CoLA MCC, STS-B Pearson/Spearman of fixed predictions (worked out by
    hand below) and the average of the main metrics; every prediction reaches its own example
    although batches are sorted by length; mnli_mm is scored with MNLI's id, not averaged."""
    gold = {"mrpc": [1, 1, 0, 0, 1], "cola": [1, 0, 1, 0], "stsb": [0.0, 1.0, 2.0, 3.0], "mnli": [0, 1, 2],
            "mnli_mm": [2, 2, 0, 1]}
    preds = {"mrpc": [1, 0, 0, 1, 1], "cola": [1, 0, 0, 0], "stsb": [0.0, 2.0, 1.0, 3.0], "mnli": [0, 1, 1],
             "mnli_mm": [2, 0, 0, 1]}
    ids = {"mrpc": 0, "cola": 1, "stsb": 2, "mnli": 3, "mnli_mm": 3}            # mnli_mm: MNLI's head
    splits, table, task_of = {}, {}, {}
    for task, labels in gold.items():
        exs = [Example(task, f"{task} {i}", None, y, f"{task}:{i}") for i, y in enumerate(labels)]
        splits[task] = {"test": exs}
        table.update({ex.source: float(p) for ex, p in zip(exs, preds[task])})
        task_of.update({ex.source: ids[task] for ex in exs})
    specs = [get_spec(t) for t in ("mrpc", "cola", "stsb", "mnli")]
    res = make_evaluator(LookupModel(table, task_of), LookupEncoder(table), specs, splits, "test", 2, "cpu")()
    m = res["tasks"]
    # MRPC: 3 of 5 right; TP 2, FP 1, FN 1 -> F1 = 4 / 6
    assert m["mrpc"] == pytest.approx({"accuracy": 0.6, "f1": 4 / 6})
    # CoLA: TP 1, TN 2, FP 0, FN 1 -> MCC = (1*2 - 0*1) / sqrt(1 * 2 * 2 * 3)
    assert m["cola"] == pytest.approx({"mcc": 2 / 12 ** 0.5, "accuracy": 0.75})
    # STS-B: deviations (-1.5, .5, -.5, 1.5) and (-1.5, -.5, .5, 1.5): r = 4 / 5; the ranks are the values
    assert m["stsb"] == pytest.approx({"pearson": 0.8, "spearman": 0.8})
    assert m["mnli"] == pytest.approx({"accuracy": 2 / 3}) and m["mnli_mm"] == pytest.approx({"accuracy": 0.75})
    assert res["average"] == pytest.approx((0.6 + 2 / 12 ** 0.5 + 0.8 + 2 / 3) / 4)


# ----------------------------------------------------------------------------- --split paper, by value
HEADER = "index\tsentence1\tsentence2\tlabel\n"
N_DEV = 9


def validation_rows(seed: int, task: str, n: int) -> set[int]:
    """MoRE Appendix A as mtlref/data/splits.py documents it: half (n // 2) of the dev rows,
    drawn by a permutation from numpy's generator seeded by (seed, crc32(task)), are validation."""
    return set(np.random.default_rng([seed, zlib.crc32(task.encode())]).permutation(n)[: n // 2].tolist())


@pytest.fixture(scope="module")
def rte_dir(tmp_path_factory):
    """A GLUE data dir with RTE only. Every dev row is the same sentence pair, so a model gives
    every dev row the same prediction p. Labels: the validation half (4 rows) is all
    not_entailment; the test half (5 rows) 3 entailment + 2 not_entailment; train is 50/50 on
    other text. So accuracy is 0 or 1 on validation, 0.6 or 0.4 on test (0.6 iff validation
    gives 0), 1/3 or 2/3 on all of dev, and scoring train would give 0.5."""
    root = tmp_path_factory.mktemp("glue-data")
    d = root / "glue" / "RTE"
    d.mkdir(parents=True)
    train = [f"{i}\tthe cat sat on the mat {i % 3}\tthe cat sat\t{['entailment', 'not_entailment'][i % 2]}\n"
             for i in range(16)]
    (d / "train.tsv").write_text(HEADER + "".join(train))
    val = validation_rows(0, "rte", N_DEV)
    assert len(val) == 4
    test_labels = iter(["entailment", "entailment", "not_entailment", "entailment", "not_entailment"])
    labels = ["not_entailment" if i in val else next(test_labels) for i in range(N_DEV)]
    (d / "dev.tsv").write_text(HEADER + "".join(f"{i}\ta dog ran in the park\ta dog ran\t{y}\n"
                                                for i, y in enumerate(labels)))
    return root


def glue_run(tiny_bert, data, out, *flags):
    return train_main(["--bench", "glue", "--tasks", "rte", "--data-dir", str(data), "--model", str(tiny_bert),
                           "--max-steps", "4", "--eval-every", "1", "--batch-size", "4", "--max-length", "32",
                           "--lr", "5e-3", "--seed", "0", "--out", str(out), *flags])


def eval_run(out, *flags):
    return eval_main(["--checkpoint", str(out), *flags])


@pytest.mark.slow
def test_split_paper_reports_the_test_half_and_eval_scores_the_split_named(tiny_bert, rte_dir, tmp_path):
    """--split paper: the log's validation accuracy is the validation half's (0 or 1), the
    reported one the test half's (0.6 if validation gave 0, else 0.4), never train's 0.5;
    eval.py reprints it by default and with --split test, and gives the validation value of the
    reported step with --split validation. --split dev scores all 9 dev rows: (1 + that) / 3."""
    out = tmp_path / "paper"
    m = glue_run(tiny_bert, rte_dir, out, "--split", "paper")
    assert m["split"] == "test" and m["settings"]["split"] == "paper"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    val = {r["step"]: r["eval"]["tasks"]["rte"]["accuracy"] for r in log if "eval" in r}
    assert sorted(val) == [1, 2, 3, 4] and set(val.values()) <= {0.0, 1.0}
    best = m["best_step"]
    assert best == min(s for s in val if val[s] == max(val.values()))        # the first best validation step
    test_acc = {0.0: 0.6, 1.0: 0.4}[val[best]]
    assert m["tasks"]["rte"]["accuracy"] == pytest.approx(test_acc)
    assert eval_run(out)["tasks"] == m["tasks"]
    assert eval_run(out, "--split", "test")["tasks"] == m["tasks"]
    assert eval_run(out, "--split", "validation")["tasks"]["rte"]["accuracy"] == val[best]
    assert json.loads((out / "eval-validation.json").read_text())["tasks"]["rte"]["accuracy"] == val[best]

    dev = glue_run(tiny_bert, rte_dir, tmp_path / "dev", "--split", "dev")
    assert dev["split"] == "dev"
    # the same training, so the same prediction per step: all of dev gives (1 + validation) / 3
    assert dev["tasks"]["rte"]["accuracy"] == pytest.approx((1 + val[best]) / 3)
    assert eval_run(tmp_path / "dev")["tasks"] == dev["tasks"]


# ----------------------------------------------------------------------------- BERT, jsonl
@pytest.fixture(scope="module")
def dev_jsonl(tmp_path_factory):
    """A dev file for conftest's tiny_tasks (other sentences, both tasks, 10 rows)."""
    rows = []
    for k in range(5):
        good = k % 2
        text = ("great good film" if good else "awful bad movie") + " " + "dog cat mat a the".split()[k]
        rows.append({"task": "sentiment", "text": text, "label": good})
        rows.append({"task": "pair", "text": text, "text_pair": "the dog sat", "label": ["no", "yes"][good]})
    path = tmp_path_factory.mktemp("dev") / "dev.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.slow
def test_eval_reprints_a_bert_jsonl_run_and_the_numbers_are_the_adapters(tiny_bert, tiny_tasks, dev_jsonl,
                                                                         tmp_path):
    """A head-objective BERT run with a dev file: eval.py prints exactly train.py's numbers (the
    best step's adapters and heads), and they are the accuracy that those saved adapters and
    heads, loaded onto a fresh base, give on the dev file, counted here."""
    out = tmp_path / "run"
    m = train_main(["--bench", "jsonl", "--jsonl", str(tiny_tasks), "--jsonl-dev", str(dev_jsonl),
                        "--model", str(tiny_bert), "--method", "mtl-lora", "--max-steps", "6", "--eval-every", "2",
                        "--batch-size", "4", "--max-length", "16", "--lr", "5e-3", "--out", str(out)])
    assert m["objective"] == "head" and m["split"] == "dev" and set(m["tasks"]) == {"sentiment", "pair"}
    again = eval_run(out)
    assert again["tasks"] == m["tasks"] and again["average"] == m["average"]
    assert eval_run(out, "--split", "test")["tasks"] == m["tasks"]          # jsonl: validation = test = dev

    train = load_jsonl_tasks(tiny_tasks)
    dev = load_jsonl_tasks(dev_jsonl, specs={t: s for t, (s, _) in train.items()})
    specs = [s for s, _ in train.values()]
    backbone = load_model(tiny_bert)
    tok = load_tokenizer(tiny_bert)
    model = MultiTaskModel(backbone, specs, tok)
    load_adapters(backbone, out, extra_modules={"heads": model.heads})
    model.eval()
    enc = Encoder(tok, "bert", 16)
    for tid, (task, (_, exs)) in enumerate(dev.items()):
        batch = enc.collate([(tid, ("dev", i), ex) for i, ex in enumerate(exs)])
        with torch.no_grad():
            logits = model(batch)
        pred = logits.float().argmax(-1).tolist()
        right = sum(int(p == ex.label) for p, ex in zip(pred, exs))
        assert m["tasks"][task]["accuracy"] == pytest.approx(right / len(exs)), task


def test_users_tasks_without_a_dev_file_are_scored_on_held_out_rows(tiny_tasks):
    """--bench jsonl without --jsonl-dev: a seeded 10 % of each task (at least one row) is the
    dev set, and no scored row is trained on."""
    from mtlref.data.loading import load_data
    specs, splits = load_data("jsonl", None, "data", "dev", 3, str(tiny_tasks))
    for spec in specs:
        sp = splits[spec.name]
        assert len(sp["validation"]) == 2 and len(sp["train"]) == 22 and sp["test"] is sp["validation"]
        assert not {e.source for e in sp["validation"]} & {e.source for e in sp["train"]}
    again = load_data("jsonl", None, "data", "dev", 3, str(tiny_tasks))[1]
    other = load_data("jsonl", None, "data", "dev", 4, str(tiny_tasks))[1]
    assert [e.source for e in again["pair"]["validation"]] == [e.source for e in splits["pair"]["validation"]]
    assert any([e.source for e in other[t]["validation"]] != [e.source for e in splits[t]["validation"]]
               for t in splits)

"""Commonsense runs score whole test sets and choose their best step on questions held out of
the training set, never on the test set: a run on the real babyllama-1m, over a copy of two of
the real LLM-Adapters files cut short (so the test set is whole and small), with every call of
the generation scorer recorded."""
import json

import pytest

import mtlref.run
from conftest import DATA, SHARED, need
from mtlref.commands import train_main
from mtlref.data.loading import load_data

TASKS = {"boolq": "boolq", "arc_easy": "ARC-Easy"}
N_TRAIN, N_TEST, VAL = 40, 7, 5


def cut_data(tmp_path):
    """data/commonsense/<dir>/{train,test}.json with the first N_TRAIN / N_TEST questions."""
    for name, d in TASKS.items():
        (tmp_path / "commonsense" / d).mkdir(parents=True)
        for split, n in (("train", N_TRAIN), ("test", N_TEST)):
            rows = json.loads((need(DATA) / "commonsense" / d / f"{split}.json").read_text())[:n]
            (tmp_path / "commonsense" / d / f"{split}.json").write_text(json.dumps(rows))
    return tmp_path


def test_validation_is_a_seeded_slice_of_train_never_trained_on(tmp_path):
    data = cut_data(tmp_path)
    _, splits = load_data("commonsense", "boolq,arc_easy", data, "dev", seed=3, val_size=VAL)
    _, again = load_data("commonsense", "boolq,arc_easy", data, "dev", seed=3, val_size=VAL)
    for t in TASKS:
        sp = splits[t]
        assert (len(sp["validation"]), len(sp["train"]), len(sp["test"])) == (VAL, N_TRAIN - VAL, N_TEST)
        assert not {id(e) for e in sp["validation"]} & {id(e) for e in sp["train"]}
        assert [e.text for e in sp["validation"]] == [e.text for e in again[t]["validation"]]   # seeded
        test_texts = {e.text for e in sp["test"]}
        assert not any(e.text in test_texts for e in sp["validation"])
    with pytest.raises(ValueError, match="--val-size"):
        load_data("commonsense", "boolq", data, "dev", seed=0, val_size=N_TRAIN)


def test_selection_reads_validation_only_and_metrics_say_how_many_were_scored(tmp_path, monkeypatch):
    """eval_every 5 over 10 steps: two selections, each on the held-out validation questions;
    the test set (all N_TEST questions, no --eval-limit) is scored only for a step that won on
    validation, and metrics.json's best step is the validation argmax and records N_TEST."""
    model_dir = need(SHARED / "weights" / "babyllama-1m")
    data = cut_data(tmp_path)
    _, splits = load_data("commonsense", "boolq,arc_easy", data, "dev", seed=0, val_size=VAL)
    test_texts = {t: [e.text for e in splits[t]["test"]] for t in TASKS}
    calls = []
    real = mtlref.run.score_generation

    def spy(backbone, tok, sets, batch_size, *a, **k):
        calls.append({t: [e.text for e in ex] for t, (ex, _) in sets.items()})
        return real(backbone, tok, sets, batch_size, *a, **k)

    monkeypatch.setattr(mtlref.run, "score_generation", spy)
    out = tmp_path / "run"
    train_main(["--bench", "commonsense", "--tasks", "boolq,arc_easy", "--data-dir", str(data),
                "--model", str(model_dir), "--method", "lora", "--max-steps", "10", "--lr", "3e-3",
                "--batch-size", "4", "--max-length", "64", "--eval-every", "5", "--val-size", str(VAL),
                "--eval-batch-size", "8", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    evals = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "eval" in r]
    assert [r["step"] for r in evals] == [5, 10]
    assert metrics["scored"] == {t: N_TEST for t in TASKS} and metrics["split"] == "test"
    best = max(evals, key=lambda r: r["eval"]["average"])           # the first of equals wins, as in fit
    assert metrics["best_step"] == best["step"]
    selections = [c for c in calls if c != test_texts]
    assert len(selections) == 2 and all(len(c[t]) == VAL and not set(c[t]) & set(test_texts[t])
                                        for c in selections for t in TASKS)
    assert calls[0] in selections                                    # the first call selects; none reads test
    assert sum(c == test_texts for c in calls) in (1, 2)             # test only after a validation win
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["val_size"], config["eval_limit"]) == (VAL, None)


def test_val_size_zero_with_eval_every_is_refused(tmp_path):
    data = cut_data(tmp_path)
    with pytest.raises(ValueError, match="never the test set"):
        train_main(["--debug", "--bench", "commonsense", "--tasks", "boolq", "--data-dir", str(data),
                    "--model", str(need(SHARED / "weights" / "babyllama-1m")), "--method", "lora",
                    "--max-steps", "2", "--eval-every", "1", "--val-size", "0", "--out", str(tmp_path / "r")])

"""predict.py and mtlref.load_run(...).predict(rows) on runs trained here (tiny models, seconds):

- each dev row's prediction is the one eval.py scores (evaluate.predict_set, row by row), and the
  metrics of the predictions are eval.py's: per-task heads (classification + STS-B regression on
  bert-tiny), T5 text-to-text (the real T5 vocabulary), a decoder's generated answers (babyllama-1m);
- a batch that mixes tasks gives each row what a batch of its task alone gives; --merged gives
  what the adapters give (≤ 1e-4); a method that cannot merge is refused by name;
- predict.py writes the API's outputs in input order (ids passed through), reads stdin, --scores
  gives probabilities that sum to 1; every bad row is one line naming file:line and the fix, exit
  code 2, and leaves no output (nor temporary) file; --skip-bad writes the rejected file.
"""
import io
import json
import random
import subprocess
import sys

import pytest

from conftest import DATA, ROOT, SHARED, need
from mtlref import load_model, load_run, load_tokenizer
from mtlref.commands import eval_main, predict_main, train_main
from mtlref.data.loading import load_data
from mtlref.data.collate import Encoder
from mtlref.data.readers import Example
from mtlref.data.tasks import get_spec, load_task
from mtlref.evaluate import generation_accuracy, predict_set
from mtlref.heads import UNPARSED, Seq2SeqLM, generate_answers
from mtlref.metrics import task_metrics
from mtlref.predict import CHUNK_BATCHES

TASKS = "sst2,rte,stsb"                     # one sentence, a pair, a regression


def train(out, model, *flags):
    train_main(["--bench", "glue", "--tasks", TASKS, "--data-dir", str(need(DATA)), "--model", str(model),
                "--batch-size", "8", "--max-length", "64", "--max-eval-examples", "12", "--eval-batch-size", "8",
                "--out", str(out), *flags])
    return out


@pytest.fixture(scope="module")
def bert_run(tiny_bert, tmp_path_factory):
    return train(tmp_path_factory.mktemp("bert") / "run", tiny_bert, "--method", "more", "--max-steps", "6",
                 "--lr", "5e-3")


@pytest.fixture(scope="module")
def t5_run(t5_real_vocab, tmp_path_factory):
    return train(tmp_path_factory.mktemp("t5") / "run", t5_real_vocab, "--method", "mtl-lora", "--max-steps", "30",
                 "--lr", "1e-2")


def dev_rows(run_dir):
    """The rows eval.py scores ({task: examples}) and the same rows as predict.py reads them, the
    tasks interleaved and shuffled (seeded)."""
    cfg = json.loads((run_dir / "adapter_config.json").read_text())
    _, splits = load_data("glue", TASKS, DATA, "dev", cfg["seed"], max_eval_examples=12)
    sets = {t: splits[t]["validation"] for t in TASKS.split(",")}
    rows = [{"id": f"{t}-{i}", "task": t, "text": ex.text, **({"text_pair": ex.text_pair} if ex.text_pair else {})}
            for t, exs in sets.items() for i, ex in enumerate(exs)]
    random.Random(0).shuffle(rows)
    return sets, rows


def as_eval_value(run, out) -> float:
    """A predicted row as eval.py's number: class id or score, UNPARSED where T5's answer is none."""
    spec = run.specs[run.task_id(out["task"])]
    if spec.kind == "regression":
        return UNPARSED if out["score"] is None else out["score"]
    return UNPARSED if out["label"] is None else float(spec.labels.index(out["label"]))


# ----------------------------------------------------------------------------- = eval.py, row by row
@pytest.mark.parametrize("which", ["bert_run", "t5_run"])
def test_predictions_are_what_eval_scores_row_by_row(which, request, tmp_path, capsys):
    run_dir = request.getfixturevalue(which)
    run = load_run(run_dir)
    sets, rows = dev_rows(run_dir)
    outs = run.predict(rows, batch_size=5)
    assert [o["id"] for o in outs] == [r["id"] for r in rows] and [o["task"] for o in outs] == [r["task"] for r in rows]
    by_id = {o["id"]: o for o in outs}
    reprinted = eval_main(["--checkpoint", str(run_dir)])["tasks"]
    for tid, (task, examples) in enumerate(sets.items()):
        want = predict_set(run.model, run.encoder, tid, "validation", examples, 8, "cpu")
        got = [as_eval_value(run, by_id[f"{task}-{i}"]) for i in range(len(examples))]
        assert got == pytest.approx(want, abs=1e-5), task
        metrics = task_metrics(task, got, [float(ex.label) for ex in examples], run.specs[tid].metrics)
        assert metrics == pytest.approx({k: v for k, v in reprinted[task].items() if k != "unparsed"}, abs=1e-5)
    if which == "bert_run":
        assert {type(o.get("label", o.get("score"))) for o in outs} == {str, float}
    else:
        assert all(isinstance(o["answer"], str) for o in outs)

    src, dst = tmp_path / "rows.jsonl", tmp_path / "preds.jsonl"             # 2 rows a batch: chunks of 32 rows
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert predict_main(["--checkpoint", str(run_dir), "--input", str(src), "--out", str(dst),
                         "--batch-size", "2"])["rows"] == len(rows) > 2 * CHUNK_BATCHES
    progress = capsys.readouterr().err.splitlines()[-1]
    assert progress.startswith(f"predict: {len(rows)} rows, ") and f"rows/s, 100% of {src}, ETA 0m00s" in progress
    written = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [o["id"] for o in written] == [r["id"] for r in rows]
    assert [as_eval_value(run, o) for o in written] == pytest.approx([as_eval_value(run, o) for o in outs], abs=1e-5)


def test_a_decoders_answers_are_what_eval_scores(tmp_path):
    """Commonsense on babyllama-1m (MTL-LoRA: the task id matters): each answer is the one eval.py
    generates (single-task batches, the untrained piqa with task id 0 as eval.py gives it), its
    extracted labels give eval.py's accuracy, and a mixed batch answers as one task at a time."""
    out = tmp_path / "lm"
    train_main(["--bench", "commonsense", "--tasks", "boolq,arc_easy", "--data-dir", str(need(DATA)),
                "--model", str(need(SHARED / "weights" / "babyllama-1m")), "--method", "mtl-lora", "--max-steps", "6",
                "--lr", "1e-2", "--batch-size", "4", "--max-length", "64", "--eval-limit", "2", "--val-size", "0",
                "--out", str(out)])
    run = load_run(out)
    sets = {t: load_task(t, DATA, "test")[:3] for t in ("boolq", "arc_easy", "piqa")}
    rows = [{"task": t, "text": ex.text, **({"text_pair": ex.text_pair} if ex.text_pair else {})}
            for t, exs in sets.items() for ex in exs]
    mixed = run.predict(rows, batch_size=4)
    alone = [o for t in sets for o in run.predict([r for r in rows if r["task"] == t], batch_size=3)]
    assert mixed == alone
    for task, examples in sets.items():
        tid = {"boolq": 0, "arc_easy": 1, "piqa": 0}[task]
        got = [o for o in mixed if o["task"] == task]
        assert [o["answer"] for o in got] == generate_answers(run.backbone, run.tok, examples, [tid] * 3), task
        right = sum((o["label"] or "") == ex.label for o, ex in zip(got, examples)) / len(examples)
        assert generation_accuracy(run.backbone, run.tok, task, examples, tid, 3) == {"accuracy": right}
    other = generate_answers(run.backbone, run.tok, sets["arc_easy"], [0] * 3)
    assert other != [o["answer"] for o in mixed if o["task"] == "arc_easy"]     # so the task id shows


# ----------------------------------------------------------------------------- mixed, merged, scores
def test_mixed_task_batches_give_what_one_task_at_a_time_gives(bert_run, t5_run):
    for run_dir in (bert_run, t5_run):
        run = load_run(run_dir)
        _, rows = dev_rows(run_dir)
        scores = run.objective == "head"
        mixed = run.predict(rows, batch_size=7, scores=scores)
        alone = {o["id"]: o for t in TASKS.split(",")
                 for o in run.predict([r for r in rows if r["task"] == t], batch_size=1, scores=scores)}
        for m in mixed:
            a = alone[m["id"]]
            assert m.keys() == a.keys() and m.get("label") == a.get("label") and m.get("answer") == a.get("answer")
            assert m.get("score") == pytest.approx(a.get("score"), abs=1e-5)
            assert m.get("scores") == pytest.approx(a.get("scores"), abs=1e-5)


def test_merged_equals_the_adapters(bert_run, t5_run):
    for run_dir in (bert_run, t5_run):
        run = load_run(run_dir)
        _, rows = dev_rows(run_dir)
        scores = run.objective == "head"
        plain, merged = run.predict(rows, scores=scores), run.predict(rows, scores=scores, merged=True)
        assert run.merges == 3 and len(run.merged) == 1          # each task merged once, one copy kept
        assert [m.get("label") for m in merged] == [p.get("label") for p in plain]
        assert [m.get("answer") for m in merged] == [p.get("answer") for p in plain]
        for m, p in zip(merged, plain):
            assert m.get("score") == pytest.approx(p.get("score"), abs=1e-4)
            assert m.get("scores") == pytest.approx(p.get("scores"), abs=1e-4)


def test_merged_copies_kept_are_the_most_recently_used(bert_run):
    """max_merged bounds the merged copies in memory; the least recently used goes first, and a
    task whose copy is kept is not merged again."""
    run = load_run(bert_run)
    _, rows = dev_rows(bert_run)
    by_task = {t: [r for r in rows if r["task"] == t][:2] for t in TASKS.split(",")}
    first, second, third = by_task
    run.max_merged = 2
    run.predict(by_task[first], merged=True)
    run.predict(by_task[second], merged=True)
    run.predict(by_task[first], merged=True)                   # kept: no new merge, now the most recent
    assert run.merges == 2 and list(run.merged) == [run.task_id(second), run.task_id(first)]
    run.predict(by_task[third], merged=True)                   # evicts `second`, the least recently used
    assert run.merges == 3 and list(run.merged) == [run.task_id(first), run.task_id(third)]


def test_a_text_to_text_batch_that_mixes_tasks_cuts_each_answer_at_its_tasks_limit(t5_real_vocab):
    """An untrained T5 seldom says EOS, so its answers run to their task's limit (its longest
    target): a batch mixing tasks generates to the longest limit and cuts each row at its own,
    so each row's answer is the one a batch of its task alone gives (unlabelled rows: no targets)."""
    tok = load_tokenizer(t5_real_vocab)
    lm = Seq2SeqLM(load_model(t5_real_vocab), [get_spec("sst2"), get_spec("rte")], tok).eval()
    enc = Encoder(tok, "t5", 64, text_to_text=True)
    exs = [Example("sst2", "a fine film", None, None, "x:1"), Example("rte", "A cat sat.", "A cat sits.", None, "x:2")]
    batch = enc.collate([(t, ("mixed", t), ex) for t, ex in enumerate(exs)])
    assert "decoder_input_ids" not in batch and batch["labels"].isnan().all()
    mixed = lm.generate_answers(batch)
    alone = [lm.generate_answers(enc.collate([(t, ("alone", t), ex)]))[0] for t, ex in enumerate(exs)]
    assert mixed == alone
    assert lm.max_new_tokens[0] < lm.max_new_tokens[1]
    longer = lm.generate_answers(enc.collate([(1, ("longer", 0), exs[0])]))[0]     # no adapters: rte's limit only
    assert longer != mixed[0]                                                        # so the cut shows


def test_a_method_that_cannot_merge_is_refused_by_name(tiny_bert, tiny_tasks, tmp_path, capsys):
    out = tmp_path / "hydra"
    train_main(["--bench", "jsonl", "--jsonl", str(tiny_tasks), "--model", str(tiny_bert), "--method", "hydralora",
                "--max-steps", "1", "--batch-size", "4", "--max-length", "16", "--out", str(out)])
    rows = [{"task": "sentiment", "text": "a good film"}]
    assert load_run(out).predict(rows)[0]["label"] in ("0", "1")
    with pytest.raises(ValueError, match="--merged: hydralora adapters cannot be folded.*without --merged"):
        load_run(out).predict(rows, merged=True)
    src = tmp_path / "rows.jsonl"
    src.write_text(json.dumps(rows[0]) + "\n")
    line = fails(capsys, "--checkpoint", str(out), "--input", str(src), "--out", str(tmp_path / "p.jsonl"), "--merged")
    assert "hydralora" in line and "without --merged" in line


def test_scores_are_probabilities_and_their_argmax_is_the_label(bert_run):
    run = load_run(bert_run)
    _, rows = dev_rows(bert_run)
    outs = run.predict(rows, scores=True)
    classified = [o for o in outs if o["task"] != "stsb"]
    assert classified and all("scores" not in o for o in outs if o["task"] == "stsb")
    for o in classified:
        assert list(o["scores"]) == list(run.specs[run.task_id(o["task"])].labels)
        assert sum(o["scores"].values()) == pytest.approx(1.0, abs=1e-6)
        assert o["label"] == max(o["scores"], key=o["scores"].get)


def test_scores_of_a_text_to_text_run_are_refused(t5_run):
    with pytest.raises(ValueError, match="--scores: class probabilities come from per-task heads"):
        load_run(t5_run).predict([{"task": "sst2", "text": "a fine film"}], scores=True)


# ----------------------------------------------------------------------------- the command line
def fails(capsys, *argv: str) -> str:
    """predict.py's main exits with code 2 after one stderr line (no traceback); returns it."""
    with pytest.raises(SystemExit) as exit_:
        predict_main(list(argv))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("predict: ")]   # progress
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


GOOD = '{"task": "sst2", "text": "a fine film"}'
BAD_ROWS = {     # case -> (the bad line, what the message says)
    "unknown task": ('{"task": "nope", "text": "x"}', ["unknown task 'nope'", "sst2", 'set "task" to one of them']),
    "no text": ('{"task": "sst2", "txt": "x"}', ['no "text" for sst2', '"text": "..."']),
    "a pair on a one-sentence task": ('{"task": "sst2", "text": "x", "text_pair": "y"}',
                                      ['sst2 reads one sentence', '"text_pair"', "drop it"]),
    "no pair on a pair task": ('{"task": "rte", "text": "x"}', ["rte reads a sentence pair", "add the second"]),
    "invalid JSON": ('{"task": "sst2", "text": ', ["not valid JSON", "one JSON object a line"]),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_bad_row_is_one_line_naming_file_row_and_fix_and_writes_nothing(case, bert_run, tmp_path, capsys):
    bad, says = BAD_ROWS[case]
    src = tmp_path / "in" / "rows.jsonl"
    src.parent.mkdir()
    src.write_text(GOOD + "\n\n" + bad + "\n" + GOOD + "\n")            # the bad row is line 3
    out = tmp_path / "out"
    out.mkdir()
    line = fails(capsys, "--checkpoint", str(bert_run), "--input", str(src), "--out", str(out / "preds.jsonl"))
    assert line.startswith(f"error: {src}:3: ") and all(s in line for s in says), line
    assert list(out.iterdir()) == []                                     # no output, no temporary file

    skipped = predict_main(["--checkpoint", str(bert_run), "--input", str(src), "--out", str(out / "preds.jsonl"),
                            "--skip-bad"])
    assert skipped["rows"] == 2 and skipped["rejected"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["preds.jsonl", "preds.jsonl.rejected.jsonl"]
    assert [json.loads(x)["task"] for x in (out / "preds.jsonl").read_text().splitlines()] == ["sst2", "sst2"]
    rejected = [json.loads(x) for x in (out / "preds.jsonl.rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["row"]) for r in rejected] == [(3, bad)] and says[0] in rejected[0]["reason"]


def test_an_empty_file_and_a_missing_one(bert_run, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    line = fails(capsys, "--checkpoint", str(bert_run), "--input", str(empty), "--out", str(tmp_path / "p.jsonl"))
    assert line.startswith(f"error: {empty}: empty file") and "one JSON object a line" in line
    line = fails(capsys, "--checkpoint", str(bert_run), "--input", str(tmp_path / "none.jsonl"))
    assert "none.jsonl: not found" in line and "- reads stdin" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]


def test_stdin_to_stdout(bert_run, monkeypatch, capsys):
    rows = [{"task": "rte", "text": "a b", "text_pair": "c", "id": 1}, json.loads(GOOD)]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    predict_main(["--checkpoint", str(bert_run), "--input", "-", "--scores"])
    captured = capsys.readouterr()
    assert [json.loads(x) for x in captured.out.splitlines()] == load_run(bert_run).predict(rows, scores=True)
    assert captured.err == ""                                  # no progress line for stdin


@pytest.mark.slow
def test_train_predict_export_as_a_user_runs_them(tiny_bert, tiny_tasks, tmp_path):
    """README's three steps as processes: train.py, predict.py on two rows of one's own, export.py."""
    run, rows, exports = tmp_path / "run", tmp_path / "rows.jsonl", tmp_path / "exports"
    rows.write_text('{"task": "sentiment", "text": "a good film", "id": "r1"}\n'
                    '{"task": "pair", "text": "the cat sat", "text_pair": "a cat sat", "id": "r2"}\n')
    commands = [["train.py", "--bench", "jsonl", "--jsonl", str(tiny_tasks), "--model", str(tiny_bert),
                 "--method", "mtl-lora", "--max-steps", "4", "--batch-size", "4", "--max-length", "16",
                 "--out", str(run)],
                ["predict.py", "--checkpoint", str(run), "--input", str(rows), "--out", str(tmp_path / "preds.jsonl")],
                ["export.py", "--checkpoint", str(run), "--task", "all", "--out", str(exports)]]
    for argv in commands:
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    preds = [json.loads(x) for x in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [(p["id"], p["task"]) for p in preds] == [("r1", "sentiment"), ("r2", "pair")]
    assert preds[0]["label"] in ("0", "1") and preds[1]["label"] in ("no", "yes")
    assert all((exports / t / "adapter_config.json").is_file() for t in ("sentiment", "pair"))

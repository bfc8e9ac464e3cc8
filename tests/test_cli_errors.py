"""Every user-facing failure of train.py is one actionable line on stderr and a non-zero exit
(2 for usage and input errors), with no traceback unless --debug.

Most cases call train.main in-process (fast); one runs a real process to check that nothing
else reaches stderr.
"""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, ROOT, Spec, need
from mtlref import attach_adapters, load_adapters, load_model, save_adapters
from mtlref.heads import MultiTaskModel
from mtlref.train import LoopConfig, predict, train_step
from mtlref.commands import train_main



def fails(capsys, *argv: str, code: int = 2) -> str:
    """Run train.py's main; assert it exits with `code` after exactly one stderr line; return it."""
    with pytest.raises(SystemExit) as exit_:
        train_main(list(argv))
    assert exit_.value.code == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def run(tiny_bert, tiny_tasks, tmp_path):
    """The flags of a small valid run; a test changes one thing."""
    return ["--bench", "jsonl", "--jsonl", str(tiny_tasks), "--model", str(tiny_bert), "--max-steps", "2",
            "--batch-size", "4", "--max-length", "16", "--out", str(tmp_path / "out")]


HEADER = "index\tsentence1\tsentence2\tlabel\n"


def glue_dir(tmp_path, rte_train: str):
    """A data dir holding only RTE, with the given train.tsv text (dev.tsv valid)."""
    d = tmp_path / "data" / "glue" / "RTE"
    d.mkdir(parents=True)
    (d / "train.tsv").write_text(rte_train)
    (d / "dev.tsv").write_text(HEADER + "0\ta\tb\tentailment\n")
    return str(tmp_path / "data")


# ----------------------------------------------------------------------------- method, bench, task
def test_unknown_method(capsys, run):
    line = fails(capsys, *run, "--method", "nope")
    assert "unknown method 'nope'" in line and "mtl-lora" in line


def test_unknown_bench(capsys):
    line = fails(capsys, "--bench", "nope")
    assert "invalid choice: 'nope'" in line and "glue" in line


def test_unknown_task(capsys):
    line = fails(capsys, "--bench", "glue", "--tasks", "rte,nope")
    assert line.startswith("error: unknown task 'nope'") and "rte" in line


# ----------------------------------------------------------------------------- data files
def test_missing_data_dir(capsys, tmp_path):
    line = fails(capsys, "--bench", "glue", "--tasks", "rte", "--data-dir", str(tmp_path / "absent"))
    assert "absent: no such data directory" in line and "gluebenchmark.com" in line


def test_missing_task_file(capsys, tmp_path):
    (tmp_path / "glue").mkdir()
    line = fails(capsys, "--bench", "glue", "--tasks", "rte", "--data-dir", str(tmp_path))
    assert "glue/RTE/train.tsv: not found" in line


def test_missing_jsonl_file(capsys, run, tmp_path):
    line = fails(capsys, *run, "--jsonl", str(tmp_path / "none.jsonl"))
    assert "none.jsonl: not found" in line


def test_malformed_tsv_row(capsys, tmp_path):
    data = glue_dir(tmp_path, HEADER + "0\ta\tb\tentailment\n1\tonly two\n")
    line = fails(capsys, "--bench", "glue", "--tasks", "rte", "--data-dir", data)
    assert "RTE/train.tsv:3: expected 4 tab-separated columns for rte, got 2" in line


def test_malformed_json_row(capsys, run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "t", "text": "a", "label": 1}\n{"task": "t", "text": \n')
    line = fails(capsys, *run, "--jsonl", str(bad))
    assert "bad.jsonl:2: not valid JSON" in line


def test_label_outside_the_label_set(capsys, tmp_path):
    data = glue_dir(tmp_path, HEADER + "0\ta\tb\tmaybe\n")
    line = fails(capsys, "--bench", "glue", "--tasks", "rte", "--data-dir", data)
    assert "train.tsv:2: label 'maybe' is not one of ['entailment', 'not_entailment'] for rte" in line


def test_dev_label_unseen_in_training(capsys, run, tmp_path):
    dev = tmp_path / "dev.jsonl"
    dev.write_text('{"task": "sentiment", "text": "x", "label": 7}\n')
    line = fails(capsys, *run, "--jsonl-dev", str(dev))
    assert "dev.jsonl:1: label 7 is not one of [0, 1] for sentiment" in line


def test_empty_dataset(capsys, run, tmp_path):
    data = glue_dir(tmp_path, HEADER)
    line = fails(capsys, "--bench", "glue", "--tasks", "rte", "--data-dir", data)
    assert "RTE/train.tsv: no examples" in line
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "empty.jsonl: empty file" in fails(capsys, *run, "--jsonl", str(empty))


# ----------------------------------------------------------------------------- model, lengths
def test_model_dir_without_config(capsys, run, tmp_path):
    line = fails(capsys, *run, "--model", str(tmp_path))
    assert f"{tmp_path}: no config.json" in line


def test_truncated_safetensors(capsys, run, tiny_bert, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    line = fails(capsys, *run, "--model", str(broken))
    assert "model.safetensors" in line and "truncated or corrupt" in line


def test_max_length_beyond_the_model(capsys, run):
    limit = json.loads((FIXTURES / "bert-tiny" / "config.json").read_text())["max_position_embeddings"]
    line = fails(capsys, *run, "--max-length", str(limit + 1))
    assert f"--max-length {limit + 1} is more than" in line and f"max_position_embeddings {limit}" in line


def test_fsdp_needs_torchrun(capsys, run):
    assert "launch with torchrun" in fails(capsys, *run, "--fsdp")


def test_a_diverged_run_exits_1_naming_the_step_and_the_last_good_checkpoint(capsys, run, tmp_path):
    line = fails(capsys, *run, "--max-steps", "20", "--lr", "1e30", "--save-every", "1", "--eval-every", "1", code=1)
    out = tmp_path / "out"
    assert line.startswith("error: step 2: the ") and "the run diverged and stopped" in line
    assert f"the last good checkpoint is {out / 'checkpoint' / 'state.safetensors'} (step 1)" in line
    assert "the best adapters (step 1) are untouched" in line
    assert not (out / "adapter.safetensors").exists()
    best = load_file(str(out / "best" / "adapter.safetensors"))
    assert all(torch.isfinite(t).all() for t in best.values())


# ----------------------------------------------------------------------------- resume, adapters
def test_resume_without_a_checkpoint(capsys, run):
    line = fails(capsys, *run, "--resume")
    assert "checkpoint/state.safetensors: no checkpoint to resume from" in line


@pytest.mark.slow
def test_resume_a_checkpoint_of_another_method_or_a_damaged_one(capsys, run, tmp_path):
    train_main([*run, "--method", "lora", "--save-every", "2"])
    capsys.readouterr()
    line = fails(capsys, *run, "--method", "more", "--save-every", "2", "--resume")
    assert "written by a run with other settings" in line and "'extra.method': ('lora', 'more')" in line
    state = tmp_path / "out" / "checkpoint" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    line = fails(capsys, *run, "--method", "lora", "--save-every", "2", "--resume")
    assert "state.safetensors: cannot be read as safetensors" in line


def test_adapters_of_another_base_model_or_method_are_refused(tmp_path):
    torch.manual_seed(0)
    base = load_model(need(FIXTURES / "bert-tiny"))
    attach_adapters(base, "lora", ["query"], num_tasks=2)
    save_adapters(base, tmp_path)
    other = load_model(need(FIXTURES / "bert-tiny"))
    other.base_identity = {**other.base_identity, "name": "other", "config_sha256": "0" * 16}
    with pytest.raises(ValueError, match="trained on 'bert-tiny'.*but the model is 'other'"):
        load_adapters(other, tmp_path)
    fresh = load_model(need(FIXTURES / "bert-tiny"))
    attach_adapters(fresh, "more", ["query"], num_tasks=2)
    with pytest.raises(ValueError, match="method: model 'more' vs saved 'lora'"):
        load_adapters(fresh, tmp_path)




def test_task_id_out_of_range():
    base = load_model(need(FIXTURES / "bert-tiny"))
    attach_adapters(base, "lora", ["query"], num_tasks=2)
    model = MultiTaskModel(base, [Spec("a"), Spec("b")])
    ids = torch.randint(3, 300, (2, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "task_ids": torch.tensor([0, 2]),
             "labels": torch.zeros(2)}
    expected = r"task id 2 is out of range: the model has 2 task heads \['a', 'b'\] with ids 0..1"
    with pytest.raises(ValueError, match=expected):
        train_step(model, batch, LoopConfig(max_steps=1))
    with pytest.raises(ValueError, match=expected):
        predict(model, [([0, 1], batch)], "cpu")


# ----------------------------------------------------------------------------- a real process
@pytest.mark.slow
def test_a_real_process_prints_one_line_and_debug_shows_the_traceback(run, tmp_path):
    argv = [sys.executable, "train.py", *run, "--model", str(tmp_path)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"error: {tmp_path}: no config.json. A model directory holds config.json "
                                        "and model.safetensors (or model.safetensors.index.json with its shards), "
                                        "as downloaded from the model hub"]
    debug = subprocess.run(argv + ["--debug"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "CheckpointError" in debug.stderr

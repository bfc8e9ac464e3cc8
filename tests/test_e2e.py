"""Successful end-to-end runs of train.py on each bench, a few steps each, checking what the run
wrote: metrics.json (steps, split, tasks, metric ranges, the average, parameter counts), the
adapter files (every trained tensor and head, the run's config), and log.jsonl (steps, the
learning rate of the warm-up + linear decay schedule, the evaluations).

glue, superglue and jsonl train conftest's tiny_bert (real GLUE / SuperGLUE files from
../shared/data); commonsense trains the real babyllama-1m with its SentencePiece tokenizer.
"""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, SHARED, need
from mtlref import generate, load_adapters, load_model, load_tokenizer
from mtlref.data.tasks import extract_answer, load_task
from mtlref.data.templates import render
from mtlref.commands import eval_main, train_main


METRICS_KEYS = {"tasks", "average", "best_step", "split", "method", "model", "objective", "trainable_params",
                "trainable_percent", "head_params", "steps", "wall_s", "settings"}


def lr_after(k: int, base: float, warmup: int, total: int) -> float:
    """The learning rate after k optimizer steps: linear warm-up from base / warmup to base over
    the first `warmup` steps, then linear decay to 0 at `total`."""
    return base * ((k + 1) / warmup if k < warmup else (total - k) / (total - warmup))


def outputs(out):
    """(metrics.json, adapter tensors, adapter_config.json, log.jsonl records) of a run."""
    metrics = json.loads((out / "metrics.json").read_text())
    tensors = load_file(str(out / "adapter.safetensors"))
    config = json.loads((out / "adapter_config.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return metrics, tensors, config, log


def check_files(m, tensors, config, log, tasks, steps, method, bench):
    """What every run writes, and how its parts agree with each other."""
    assert METRICS_KEYS <= set(m) and list(m["tasks"]) == tasks and config["task_names"] == tasks
    assert (m["steps"], m["method"], config["method"], config["bench"]) == (steps, method, method, bench)
    assert config["num_tasks"] == len(tasks)
    adapters = {k: v for k, v in tensors.items() if not k.startswith("heads.")}
    assert m["trainable_params"] == sum(v.numel() for v in adapters.values())
    assert m["head_params"] == sum(v.numel() for k, v in tensors.items() if k.startswith("heads."))
    bs = [v for k, v in adapters.items() if k.endswith("lora_B")]
    assert bs and all(bool(b.abs().sum() > 0) for b in bs), "every lora_B trained off its zero start"
    assert [r["step"] for r in log if "loss" in r][-1] == steps
    assert all(np.isfinite(sum(r["loss"].values())) for r in log if "loss" in r)
    best = [r for r in log if "eval" in r and r["step"] == m["best_step"]]
    assert len(best) == 1
    return best[0]["eval"]


def is_fraction_of(value: float, n: int) -> bool:
    """An accuracy over n examples: k / n for an integer k in 0..n."""
    return 0.0 <= value <= 1.0 and abs(value * n - round(value * n)) < 1e-9


@pytest.mark.slow
def test_glue_run_on_real_glue(tiny_bert, tmp_path):
    """MoRE on RTE + STS-B (real GLUE files, 16 dev examples each): 30 steps with 10 of warm-up,
    evaluations at 15 and 30 on the dev sets, the best one reported; lr after 25 steps is
    base x (30 - 25) / (30 - 10); eval.py reprints the numbers."""
    out = tmp_path / "glue"
    m = train_main(["--bench", "glue", "--tasks", "rte,stsb", "--data-dir", str(need(DATA)),
                        "--model", str(tiny_bert), "--method", "more", "--max-steps", "30", "--warmup-steps", "10",
                        "--eval-every", "15", "--lr", "2e-3", "--batch-size", "8", "--max-length", "64",
                        "--max-eval-examples", "16", "--eval-batch-size", "16", "--out", str(out)])
    metrics, tensors, config, log = outputs(out)
    assert metrics == json.loads(json.dumps(m, default=str))
    reported = check_files(metrics, tensors, config, log, ["rte", "stsb"], 30, "more", "glue")
    assert (metrics["split"], metrics["objective"], config["max_eval_examples"]) == ("dev", "head", 16)
    assert metrics["tasks"] == reported["tasks"]                          # dev: validation = test
    assert [r["step"] for r in log if "eval" in r] == [15, 30] and metrics["best_step"] in (15, 30)
    rte, stsb = metrics["tasks"]["rte"], metrics["tasks"]["stsb"]
    assert set(rte) == {"accuracy"} and is_fraction_of(rte["accuracy"], 16)
    assert set(stsb) == {"pearson", "spearman"} and all(-1.0 <= v <= 1.0 for v in stsb.values())
    assert metrics["average"] == pytest.approx((rte["accuracy"] + stsb["pearson"]) / 2)
    lrs = {r["step"]: r["lr"] for r in log if "loss" in r}
    assert lrs[25] == pytest.approx(lr_after(25, 2e-3, 10, 30)) and lrs[25] == pytest.approx(5e-4)
    assert lrs[30] == 0.0
    assert all("more_contrastive" in r["loss"] for r in log if "loss" in r)  # MoRE Eq. 10's L_con
    assert tensors["heads.0.weight"].shape[0] == 2 and tensors["heads.1.weight"].shape[0] == 1
    assert any(k.endswith("task_embedding") for k in tensors)
    again = eval_main(["--checkpoint", str(out)])
    assert again["tasks"] == metrics["tasks"] and again["average"] == metrics["average"]


@pytest.mark.slow
def test_superglue_run_with_the_default_tasks(tiny_bert, tmp_path):
    """--bench superglue with no --tasks trains both SuperGLUE tasks (CB; BoolQ on one seeded half
    of its validation file, scored on the other half) and scores their dev sets."""
    out = tmp_path / "superglue"
    need(DATA / "superglue")
    train_main(["--bench", "superglue", "--data-dir", str(DATA),
                    "--model", str(tiny_bert), "--method", "lora", "--max-steps", "6", "--lr", "2e-3",
                    "--batch-size", "8", "--max-length", "64", "--max-eval-examples", "16", "--out", str(out)])
    metrics, tensors, config, log = outputs(out)
    check_files(metrics, tensors, config, log, ["cb", "superglue_boolq"], 6, "lora", "superglue")
    assert metrics["split"] == "dev" and metrics["best_step"] == 6
    cb, boolq = metrics["tasks"]["cb"]["accuracy"], metrics["tasks"]["superglue_boolq"]["accuracy"]
    assert is_fraction_of(cb, 16) and is_fraction_of(boolq, 16)
    assert metrics["average"] == pytest.approx((cb + boolq) / 2)
    assert tensors["heads.0.weight"].shape[0] == 3                         # entailment, contradiction, neutral
    assert tensors["heads.1.weight"].shape[0] == 2                         # False, True
    assert [r["lr"] for r in log if "loss" in r] == [0.0]


@pytest.mark.slow
def test_jsonl_run_on_users_tasks(tiny_bert, tiny_tasks, tmp_path):
    """MTL-LoRA on conftest's two jsonl tasks: 30 steps with 28 of warm-up (lr after 25 steps is
    base x 26 / 28), one evaluation at the end, MTL-LoRA's task tensors and one 2-way head per
    task in the adapter file."""
    out = tmp_path / "jsonl"
    train_main(["--bench", "jsonl", "--jsonl", str(tiny_tasks), "--model", str(tiny_bert),
                    "--method", "mtl-lora", "--max-steps", "30", "--warmup-steps", "28", "--lr", "1e-3",
                    "--batch-size", "4", "--max-length", "16", "--out", str(out)])
    metrics, tensors, config, log = outputs(out)
    check_files(metrics, tensors, config, log, ["sentiment", "pair"], 30, "mtl-lora", "jsonl")
    assert metrics["best_step"] == 30 and [r["step"] for r in log if "eval" in r] == [30]
    assert all(is_fraction_of(metrics["tasks"][t]["accuracy"], 2) for t in ("sentiment", "pair"))   # 2 held out
    lrs = {r["step"]: r["lr"] for r in log if "loss" in r}
    assert sorted(lrs) == [25, 30] and lrs[25] == pytest.approx(lr_after(25, 1e-3, 28, 30))
    assert lrs[25] == pytest.approx(1e-3 * 26 / 28)
    assert any(k.endswith("task_weights") for k in tensors) and any(k.endswith("task_lambda") for k in tensors)
    assert [tuple(tensors[f"heads.{i}.weight"].shape) for i in range(2)] == [(2, 64), (2, 64)]
    assert config["objective"] == "head" and config["jsonl"] == str(tiny_tasks)


@pytest.mark.slow
def test_commonsense_run_on_babyllama(tmp_path):
    """LoRA on the real babyllama-1m, BoolQ + ARC-Easy (LLM-Adapters prompts, loss on the
    response), 20 steps, 8 training questions per task held out for selection; evaluation
    generates answers to the first 2 test questions of each task (--eval-limit 2, recorded in
    "scored"): the accuracies are those of greedy answers generated here from the saved adapters
    and read with LLM-Adapters' extraction; no heads; eval.py --limit 2 reprints them."""
    model_dir = need(SHARED / "weights" / "babyllama-1m")
    out = tmp_path / "commonsense"
    train_main(["--bench", "commonsense", "--tasks", "boolq,arc_easy", "--data-dir", str(need(DATA)),
                    "--model", str(model_dir), "--method", "lora", "--max-steps", "20", "--lr", "3e-3",
                    "--batch-size", "4", "--max-length", "64", "--eval-limit", "2", "--eval-batch-size", "4",
                    "--val-size", "8", "--out", str(out)])
    metrics, tensors, config, log = outputs(out)
    check_files(metrics, tensors, config, log, ["boolq", "arc_easy"], 20, "lora", "commonsense")
    assert (metrics["objective"], metrics["model"], metrics["head_params"]) == ("lm", "babyllama-1m", 0)
    assert metrics["split"] == "test"                       # LLM-Adapters' test.json files are what is scored
    assert metrics["scored"] == {"boolq": 2, "arc_easy": 2}
    assert not any(k.startswith("heads.") for k in tensors)
    assert {k.split(".")[-3] for k in tensors} == set(config["targets"])
    assert all(set(r) == {"accuracy"} and is_fraction_of(r["accuracy"], 2) for r in metrics["tasks"].values())
    assert metrics["average"] == pytest.approx(np.mean([r["accuracy"] for r in metrics["tasks"].values()]))

    backbone = load_model(model_dir)
    load_adapters(backbone, out)
    backbone.eval()
    tok = load_tokenizer(model_dir)
    keep = backbone.max_positions - 32 - 1                  # room for BOS and 32 new tokens
    for tid, task in enumerate(["boolq", "arc_easy"]):
        questions = load_task(task, DATA, "test")[:2]
        right = 0
        for ex in questions:
            prompt = [tok.bos_id] + tok.encode(render(task, ex.text, ex.text_pair))[-keep:]
            new = generate(backbone, tok, prompt, max_new_tokens=32, task_ids=torch.tensor([tid]))
            right += extract_answer(task, tok.decode(new)) == ex.label
        assert metrics["tasks"][task]["accuracy"] == right / 2, task
    again = eval_main(["--checkpoint", str(out), "--limit", "2", "--batch-size", "4"])
    assert {t: r["accuracy"] for t, r in again["tasks"].items()} == \
        {t: r["accuracy"] for t, r in metrics["tasks"].items()}

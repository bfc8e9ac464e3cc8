"""Few-shot transfer (MoRE §5.1, Table 4): adapters started from a saved run, each new task's
per-task tensors taken from the saved task it resembles (init_adapters_from), and k-shot training
sets (data.loading.k_shot); end to end through train.py --init-from / --task-init / --train-examples."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, ROOT, need
from mtlref import attach_adapters, load_model
from mtlref.adapters import adapters_of, init_adapters_from, save_adapters, transfer_options
from mtlref.layers import ForwardContext
from mtlref.data.loading import k_shot

PER_TASK = {"more": {"task_embedding"}, "mtl-lora": {"task_lambda", "task_weights"}, "moelora": {"task_embedding"},
            "lora": set(), "multilora": set()}


def saved_run(tmp_path, method, num_tasks=3, **options):
    model = load_model(need(FIXTURES / "bert-tiny"))
    attach_adapters(model, method, ["query", "value"], num_tasks=num_tasks, **options)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in adapters_of(model).values():
            for p in a.parameters():
                p.copy_(torch.randn(p.shape, generator=g))            # every tensor distinct and nonzero
    save_adapters(model, tmp_path / method, extra_config={"task_names": ["a", "b", "c"][:num_tasks]})
    return model


@pytest.mark.parametrize("method", list(PER_TASK))
def test_new_tasks_start_from_the_saved_tasks_they_name(tmp_path, method):
    src = saved_run(tmp_path, method)
    new = load_model(need(FIXTURES / "bert-tiny"))
    attach_adapters(new, method, ["query", "value"], num_tasks=2)
    init_adapters_from(new, tmp_path / method, [2, 0])                 # new task 0 <- saved c, new 1 <- saved a
    for name, a in adapters_of(new).items():
        b = adapters_of(src)[name]
        assert set(a.task_tensors) & set(a.state_dict()) == PER_TASK[method]
        for key, t in a.state_dict().items():
            s = b.state_dict()[key]
            if key in a.task_tensors:
                assert t.shape[0] == 2 and torch.equal(t[0], s[2]) and torch.equal(t[1], s[0]), (name, key)
            else:
                assert torch.equal(t, s), (name, key)                  # shared tensors copied whole


@pytest.mark.parametrize("method,options", [(m, {}) for m in PER_TASK] + [("more", {"selection": "soft"}),
                                                                       ("more", {"selection": "subset"})])
def test_a_new_task_starts_as_the_function_of_the_saved_task(tmp_path, method, options):
    """ΔY of a 1-task run started from saved task c equals the 3-task run's ΔY for task c, module by
    module: for MoRE only with the saved |T| in Eq. 6 (transfer_options); with |T| = 1 it is 3× larger."""
    src = saved_run(tmp_path, method, **options)
    cfg = json.loads((tmp_path / method / "adapter_config.json").read_text())
    x = torch.randn(4, 5, src.config.hidden_size, generator=torch.Generator().manual_seed(1))
    readings = [(transfer_options(method, options, cfg), True)]
    if method == "more":
        assert readings[0][0]["scale_tasks"] == 3
        readings.append((options, False))                               # |T| = this run's 1 task
    for opts, same in readings:
        new = load_model(need(FIXTURES / "bert-tiny"))
        attach_adapters(new, method, ["query", "value"], num_tasks=1, **opts)
        init_adapters_from(new, tmp_path / method, [2])
        for m in (src, new):
            m.eval()
        for name, a in adapters_of(new).items():
            slots = [m.get_submodule(name) for m in (src, new)]
            ys = [s.adapter(x, torch.nn.functional.linear(x, s.weight, s.bias),
                            ForwardContext(task_ids=torch.full((4,), t)), s) for s, t in zip(slots, (2, 0))]
            assert ys[1].abs().max() > 0
            err = ((ys[0] - ys[1]).abs().max() / ys[0].abs().max()).item()
            assert (err < 1e-5) == same, (name, opts, err)


def test_transfer_refuses_other_adapters_and_bad_maps(tmp_path):
    saved_run(tmp_path, "more")
    other = load_model(need(FIXTURES / "bert-tiny"))
    attach_adapters(other, "more", ["query", "value"], num_tasks=2, rank=4)
    with pytest.raises(ValueError, match="rank: saved 8 vs this run 4"):
        init_adapters_from(other, tmp_path / "more", [0, 1])
    same = load_model(need(FIXTURES / "bert-tiny"))
    attach_adapters(same, "more", ["query", "value"], num_tasks=2)
    for bad in ([0], [0, 3]):
        with pytest.raises(ValueError, match="task map"):
            init_adapters_from(same, tmp_path / "more", bad)
    with pytest.raises(FileNotFoundError, match="--init-from takes a train.py --out directory"):
        init_adapters_from(same, tmp_path / "nothing", [0, 1])


def test_k_shot_draws_k_per_task_with_the_seed():
    splits = {"x": {"train": list(range(100)), "test": [1, 2]}, "y": {"train": list(range(3)), "test": [0]},
              "z": {"test": [5]}}
    a, b, c = k_shot(splits, 4, 0), k_shot(splits, 4, 0), k_shot(splits, 4, 1)
    assert len(a["x"]["train"]) == 4 and a["x"]["train"] == sorted(a["x"]["train"])
    assert set(a["x"]["train"]) <= set(range(100)) and a == b and a["x"]["train"] != c["x"]["train"]
    assert a["y"]["train"] == [0, 1, 2] and a["x"]["test"] == [1, 2] and a["z"] == {"test": [5]}
    assert len(splits["x"]["train"]) == 100                            # the input is not changed


def test_train_py_transfers_and_trains_k_shot(tiny_bert, tiny_tasks, tmp_path):
    """A MoRE run on two tasks, then a k-shot run on `pair` alone started from it with the
    embedding of `sentiment`: with lr 0 the saved adapter equals the source's mapped rows, and
    the k-shot training set has k examples."""
    base = [sys.executable, "train.py", "--bench", "jsonl", "--jsonl", str(tiny_tasks), "--model", str(tiny_bert),
            "--method", "more", "--batch-size", "4", "--max-length", "16"]
    src = tmp_path / "src"
    done = subprocess.run(base + ["--max-steps", "6", "--lr", "5e-2", "--out", str(src)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "few"
    done = subprocess.run(base + ["--tasks", "pair", "--init-from", str(src), "--task-init", "pair=sentiment",
                                  "--train-examples", "4", "--max-steps", "2", "--lr", "0", "--head-lr", "0",
                                  "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pair <- saved task 0" in done.stdout and "{'pair': 4}" in done.stdout
    assert "|T| of MoRE's Eq. 6: 2" in done.stdout                    # the source's two tasks
    a, b = load_file(str(out / "adapter.safetensors")), load_file(str(src / "adapter.safetensors"))
    emb = [k for k in a if k.endswith("task_embedding")]
    assert emb and all(torch.equal(a[k][0], b[k][0]) for k in emb)           # sentiment's row, task 0 in src
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("heads.") and k not in emb)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["init_from"] == str(src) and cfg["task_init"] == "pair=sentiment" and cfg["train_examples"] == 4
    assert cfg["options"]["scale_tasks"] == 2 and cfg["num_tasks"] == 1
    bad = subprocess.run(base + ["--tasks", "pair", "--init-from", str(src), "--task-init", "pair=nope",
                                 "--max-steps", "1", "--out", str(tmp_path / "bad")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "no saved task 'nope'" in bad.stdout + bad.stderr
    gone = subprocess.run(base + ["--tasks", "pair", "--init-from", str(tmp_path / "nothing"), "--max-steps", "1",
                                  "--out", str(tmp_path / "bad")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert gone.returncode == 2 and "adapter_config.json: missing; --init-from takes a train.py --out directory" in (
        gone.stdout + gone.stderr), gone.stderr[-2000:]

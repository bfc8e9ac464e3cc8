"""bench.py: the --quick run writes the JSON schema that CI relies on (never its timings), and
the timing helpers do what experiments/bench/ says (the floor's backward, shared base weights,
round-robin order, paired ratios)."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.bench.models import build, head_for, make_batch, matmul_params, random_base, run_model, task_loss
from experiments.bench.inference import BASE, predict_examples, predict_fn, predict_run, time_inference
from experiments.bench.settings import FLOOR, METHODS, PAPER_VS_LORA, TARGETS, BenchConfig
from experiments.bench.timing import ratio, round_robin, summary
from mtlref.adapters import REGISTRY
from mtlref.pretrained import load_model
from mtlref.layers import ForwardContext
from conftest import FIXTURES, need

ROOT = Path(__file__).resolve().parents[1]
BERT_TINY = ROOT.parent / "shared" / "weights" / "fixtures" / "bert-tiny"
STATS = {"median", "q1", "q3", "min", "max", "n"}


def need_fixture() -> Path:
    need(BERT_TINY / "config.json")
    return BERT_TINY


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `python bench.py --quick --out x.json` run, as CI runs it: (JSON, stdout)."""
    need_fixture()
    out = tmp_path_factory.mktemp("bench") / "x.json"
    r = subprocess.run([sys.executable, "bench.py", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def check_stats(s: dict, positive=True):
    assert set(s) == STATS and s["n"] >= 1
    for k in STATS - {"n"}:
        assert isinstance(s[k], float) and math.isfinite(s[k]) and (s[k] > 0 or not positive), (k, s)
    assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]


def test_quick_run_json_schema(quick):
    res, _ = quick
    assert res["schema"] == 2 and res["command"].startswith("python bench.py --quick")
    m = res["machine"]
    for k in ("platform", "cpu", "cores", "torch_threads", "torch", "device", "loadavg_start", "loadavg_end"):
        assert k in m, k
    assert m["torch"] == torch.__version__ and m["device"] == "cpu" and m["torch_threads"] >= 1
    cfg = res["config"]
    assert cfg["batch_size"] >= 1 and cfg["seq_len"] >= 1 and Path(cfg["model"]).name == "bert-tiny"
    assert set(res["methods"]) == set(REGISTRY)

    train = res["training"]
    peer = {"peer-lora"} if res["peer"] is not None else set()
    assert set(train) == {FLOOR, *REGISTRY} | peer           # every method, and the floor
    for name, row in train.items():
        check_stats(row["seconds"])
        check_stats(row["vs_floor"])
        check_stats(row["vs_lora"])
        assert len(row["samples"]) == cfg["repeats"] == row["seconds"]["n"]
        assert row["tokens_per_s"] > 0
        if name not in peer:
            assert isinstance(row["trainable_params"], int) and row["trainable_params"] > 0
        if name in TARGETS:
            t = row["target"]
            ref = "vs_floor" if t["reference"] == FLOOR else "vs_lora"
            assert t["ratio"] == row[ref]["median"] and t["met"] == (t["ratio"] <= t["max_ratio"])
        assert row["paper_vs_lora"] == PAPER_VS_LORA.get(name)
    # a method against itself is exactly 1 in every round (the ratios are paired per round)
    assert train["lora"]["vs_lora"]["min"] == train["lora"]["vs_lora"]["max"] == 1.0
    assert train["floor"]["vs_floor"]["median"] == 1.0 and train["floor"]["trainable_params"] == 1

    inf = res["inference"]["variants"]
    merged = {f"{n}-merged" for n, a in REGISTRY.items() if a.mergeable and n != "lora"}   # merged LoRA is the base
    assert set(inf) == {BASE, *REGISTRY} | merged           # the bert-tiny fixture has no tokenizer: no predict rows
    assert "no tokenizer" in res["inference"]["predict"]
    for name, rows in inf.items():
        assert list(rows) == [str(b) for b in cfg["infer_batch_sizes"]]
        for row in rows.values():
            check_stats(row["seconds"])
            check_stats(row["vs_base"])
            check_stats(row["vs_lora"])
            assert row["tokens_per_s"] > 0 and len(row["samples"]) == cfg["infer_repeats"]
    assert all(r["vs_base"]["min"] == r["vs_base"]["max"] == 1.0 for r in inf[BASE].values())
    t = res["inference"]["targets"]
    assert set(t["merged_within_noise"]) == merged and set(t["unmerged_vs_lora"]) == {"mtl-lora", "more"}

    assert set(res["memory"]) == {FLOOR, *REGISTRY}
    for row in res["memory"].values():
        assert row["peak_mb"] > 0 and row["before_mb"] > 0 and row["peak_mb"] >= row["delta_mb"]
        assert row["method"] == res["memory_how"]


def test_quick_run_peer_plot_and_table(quick):
    res, stdout = quick
    have_peer = all(importlib.util.find_spec(m) is not None for m in ("transformers", "peft"))
    if have_peer:
        check_stats(res["peer"]["vs_lora"])
    else:
        assert res["peer"] is None and "not importable" in res["peer_reason"]
    if importlib.util.find_spec("matplotlib") is None:
        assert res["plot"] is None and "matplotlib" in res["plot_note"]
    else:
        assert Path(res["plot"]).is_file()
    for name in [FLOOR, *REGISTRY, *res["inference"]["variants"]]:
        assert f"| {name} |" in stdout, name


def test_floor_backward_reaches_the_activations_but_no_weight():
    base = load_model(need_fixture())
    cfg = BenchConfig(model=str(BERT_TINY), batch_size=2, seq_len=8)
    floor = build(base, FLOOR, cfg)
    assert [n for n, p in floor.named_parameters() if p.requires_grad] == ["floor_scalar"]
    batch = make_batch(base, 2, 8, cfg.num_tasks, "cpu")
    grads = []

    def keep_grad(module, inputs, out):
        if out.requires_grad:
            out.register_hook(grads.append)
    floor.encoder.layer[-1].output.dense.register_forward_hook(keep_grad)      # the top layer's FFN output
    floor.encoder.layer[0].attention.self.query.register_forward_hook(keep_grad)   # the bottom layer's query
    out = run_model(floor, batch, ForwardContext(task_ids=batch["task_ids"]))
    task_loss(out, batch, "bert", head_for(base, cfg)).backward()
    assert len(grads) == 2 and all(g.abs().sum() > 0 for g in grads)    # top and bottom layers both ran backward
    assert floor.floor_scalar.grad is not None and floor.floor_scalar.grad != 0
    assert all(p.grad is None for n, p in floor.named_parameters() if n != "floor_scalar")
    with torch.no_grad():                                        # the scalar is 0: the floor computes the base
        assert torch.equal(run_model(floor, batch, ForwardContext()),
                           run_model(base, batch, ForwardContext()))


def test_methods_share_the_one_copy_of_the_base_weights():
    base = load_model(need_fixture())
    cfg = BenchConfig(model=str(BERT_TINY))
    assert set(METHODS) == set(REGISTRY)
    for name in ("lora", "mixlora"):
        m = build(base, name, cfg)
        assert m.encoder.layer[0].attention.self.query.weight is base.encoder.layer[0].attention.self.query.weight
        assert any(p.requires_grad for p in m.parameters())
    assert not any(p.requires_grad for p in base.parameters())   # attaching froze the shared base, nothing more
    assert getattr(base, "adapter_config", None) is None


def test_round_robin_rotates_the_order_and_ratios_are_paired():
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    times = round_robin(fns, repeats=3, warmup=1, device="cpu")
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert all(len(v) == 3 for v in times.values())
    r = ratio({"x": [2.0, 4.0, 9.0], "y": [1.0, 2.0, 3.0]}, "x", "y")
    assert r["median"] == 2.0 and r["min"] == 2.0 and r["max"] == 3.0 and r["n"] == 3
    s = summary([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s["median"], s["q1"], s["q3"], s["min"], s["max"]) == (3.0, 2.0, 4.0, 1.0, 5.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: scripts/gpu_check.sh would run for minutes")
def test_the_gpu_check_says_in_one_line_that_there_is_no_gpu(tmp_path):
    """scripts/gpu_check.sh on a machine without CUDA: one line, exit code 3, nothing written."""
    done = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 3 and done.stdout.strip().count("\n") == 0 and "no CUDA device" in done.stdout
    assert not (tmp_path / "out").exists()


def test_random_weights_of_a_config_shape():
    """random_base builds config.json's model on the device in the asked dtype: every
    matrix N(0, 0.02), norms 1; and matmul_params counts the matrices a token multiplies."""
    model = random_base(FIXTURES / "llama-tiny" / "config.json", torch.bfloat16, "cpu")
    cfg = json.loads((FIXTURES / "llama-tiny" / "config.json").read_text())
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in model.parameters())
    w = model.model.layers[0].self_attn.q_proj.weight.float()
    assert abs(w.std().item() - 0.02) < 0.004 and model.model.norm.weight.eq(1).all()
    C, F_, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = C // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    assert matmul_params(model) == L * (2 * C * C + 2 * C * kv + 3 * C * F_) + V * C


def test_report_regenerates_the_printed_tables_from_the_json(quick, tmp_path):
    """`bench.py --report FILE` prints, from the saved JSON alone, what the timed run printed
    (docs/BENCHMARKS.md's tables come from it)."""
    res, stdout = quick
    path = tmp_path / "x.json"
    path.write_text(json.dumps(res))
    png = tmp_path / "again.png"
    r = subprocess.run([sys.executable, "bench.py", "--report", str(path), "--plot", str(png)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() and r.stdout == stdout                  # every line the timed run printed
    assert png.is_file() == (importlib.util.find_spec("matplotlib") is not None)


def test_identical_computations_give_the_noise_floor():
    """The base and the merged copies run the same GEMMs: their medians' spread around the pooled
    median is the run's noise floor (predict-merged and unmerged variants are not among them)."""
    from experiments.bench.report import identical_spread

    def rows(*ms):
        return {str(b): {"seconds": {"median": m}} for b, m in zip((1, 64), ms)}
    v = {"base": rows(1.0, 2.0), "lora": rows(9.0, 9.0), "a-merged": rows(1.1, 1.6), "b-merged": rows(0.9, 2.4),
         "predict-merged": rows(5.0, 5.0)}
    got = identical_spread(v)
    assert got["1"] == pytest.approx((0.9, 1.1, 3)) and got["64"] == pytest.approx((0.8, 1.2, 3))


def test_ab_pools_the_paired_per_round_ratios_of_several_runs(tmp_path):
    """experiments.bench.ab: each round's method / LoRA, pooled over the runs of one version."""
    from experiments.bench.ab import pooled_ratios, table
    runs = []
    for i, (lora, more) in enumerate([([1.0, 2.0], [1.5, 2.2]), ([4.0], [4.4])]):
        f = tmp_path / f"run{i}.json"
        f.write_text(json.dumps({"training": {"lora": {"samples": lora}, "more": {"samples": more}}}))
        runs.append(f)
    got = pooled_ratios(runs)
    assert got["lora"] == [1.0, 1.0, 1.0] and got["more"] == pytest.approx([1.5, 1.1, 1.1])
    rows = table(got, pooled_ratios(runs[1:]), ("before", "after"))
    assert rows[0].startswith("| method | before × LoRA") and "| more | 1.10 (1.10–1.30) | 1.10 (1.10–1.10) | 3 / 1 |" in rows


def test_inference_times_predict_py_paths_on_rows_of_seq_len_tokens(tiny_bert):
    """With a tokenizer, the inference table adds predict.py's two paths on MTL-LoRA (mixed rows;
    --merged), on rows that encode to exactly seq_len tokens, and the merged path really groups
    the rows by task (the run keeps one merged copy per task it met)."""
    base = load_model(tiny_bert)
    cfg = BenchConfig(model=str(tiny_bert), seq_len=16, infer_batch_sizes=[1, 5], infer_repeats=2)
    res = time_inference(cfg, base, tiny_bert)
    assert res["predict"] == "timed"
    for name in ("predict", "predict-merged"):
        assert list(res["variants"][name]) == ["1", "5"]
        check_stats(res["variants"][name]["5"]["vs_base"])
    run, why = predict_run(build(base, "mtl-lora", cfg).eval(), cfg, tiny_bert)
    examples = predict_examples(run, 5, cfg.seq_len)
    assert [ex.task for ex in examples] == ["cola", "sst2", "mrpc", "stsb", "qqp"]
    assert all(len(run.encoder.encode(ex)[0]) == cfg.seq_len for ex in examples)
    predict_fn(run, examples, merged=False)()
    assert run.merges == 0
    predict_fn(run, examples, merged=True)()
    assert run.merges == 5                                      # each task of the batch merged once
    assert predict_run(base, BenchConfig(model="x", num_tasks=9), tiny_bert)[0] is None    # more tasks than GLUE


def test_skip_training_times_inference_only(tmp_path):
    """--skip-training: no training table and no peer, the inference table as usual."""
    need_fixture()
    out = tmp_path / "inf.json"
    r = subprocess.run([sys.executable, "bench.py", "--quick", "--skip-training", "--skip-memory", "--infer-batch-sizes",
                        "2", "--infer-repeats", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["training"] is None and res["peer"] is None and "--skip-training" in res["peer_reason"]
    assert list(res["inference"]["variants"]["base"]) == ["2"] and "Training: not timed" in r.stdout

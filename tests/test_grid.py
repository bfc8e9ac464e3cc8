"""experiments/run.py and experiments/report.py on a tiny grid (the bert-tiny fixture, two jsonl
tasks, a few steps): cells run two at a time and leave their result files, a second call runs
nothing, a killed grid resumes its cell and ends with the uninterrupted metrics, a stored command
re-runs its cell to the same metrics, and the report's numbers are the result files' numbers.
The real grids (experiments/grids/) are never run here."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, need, need_extra, need_minilm
from experiments import embeddings, probe, tuning
from experiments import grid as G
from experiments.constant import best_constant
from experiments.replication.claims import caveats, here
from experiments.stats import T975, holm, mean_std, paired_t, t_two_sided_p
from experiments.summary import collapsed, data_key, load_results, main_value, summarise
from mtlref.data.readers import Example
from mtlref.data.splits import hold_out
from mtlref.data.tasks import get_spec


def tiny_grid(path: Path, model: Path, tasks: Path, steps: int = 6, seeds=(0, 1), variants=None) -> Path:
    grid = {"name": path.stem, "about": "a test grid",
            "common": ["--bench", "jsonl", "--jsonl", str(tasks), "--model", str(model), "--max-length", "16",
                       "--eval-batch-size", "8", "--batch-size", "4", "--max-steps", str(steps), "--lr", "5e-3"],
            "variants": variants or {"lora-mt": ["--method", "lora"], "more": ["--method", "more"]},
            "seeds": list(seeds), "minutes_per_cell": {"1": 0.1}}
    path.write_text(json.dumps(grid))
    return path


def run_grid(grid: Path, tmp: Path, *flags, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "experiments/run.py", str(grid), "--runs", str(tmp / "runs"),
                           "--results", str(tmp / "results"), *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, **kw)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_grid_files_are_checked_and_cells_run_seed_major(tmp_path):
    path = tmp_path / "g.json"
    path.write_text(json.dumps({"name": "g", "variants": {"a": ["--method", "lora"], "b": []}, "seeds": [0, 1]}))
    cells = G.cells(G.load_grid(path))
    assert [c.name for c in cells] == ["g/a/s0", "g/b/s0", "g/a/s1", "g/b/s1"]
    assert cells[0].argv == ("train.py", "--method", "lora", "--seed", "0")
    assert [c.name for c in G.cells(G.load_grid(path), ["b"], [1])] == ["g/b/s1"]
    with pytest.raises(SystemExit, match="no variant"):
        G.cells(G.load_grid(path), ["c"])
    for bad, message in [({"name": "g", "variants": {"a": ["--seed", "3"]}, "seeds": [0]}, "set by the runner"),
                         ({"name": "g", "variants": {"a/b": []}, "seeds": [0]}, "file name"),
                         ({"name": "g", "variants": {"a": "--method lora"}, "seeds": [0]}, "list of train.py flags"),
                         ({"variants": {}, "seeds": [0]}, "needs \"name\""),
                         ({"name": "g", "variants": {"a": []}, "seeds": [0], "tables": [{"variants": ["a", "z"]}]},
                          r"table 1 names variants the grid does not have: \['z'\]"),
                         ({"name": "g", "variants": {"a": []}, "seeds": [0], "tables": [{"title": "t"}]},
                          "table 1 needs \"variants\""),
                         ({"name": "g", "variants": {"a": []}, "seeds": [0], "baseline": "more"},
                          "\"baseline\" must be \"grid/variant\"")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(SystemExit, match=message):
            G.load_grid(path)
    path.write_text("{not json")
    with pytest.raises(SystemExit, match=r"g.json: not valid JSON \(line 1"):
        G.load_grid(path)
    assert G.threads_per_cell(2, cores=2) == 1 and G.threads_per_cell(1, cores=2) == 2 and G.threads_per_cell(4, 2) == 1
    assert G.planned_minutes({"minutes_per_cell": {"2": 12, "1": 21}}, 1) == 21
    assert G.planned_minutes({"minutes_per_cell": 7}, 3) == 7


def test_paired_t_over_seeds():
    need_extra("scipy")                                  # the t distribution: the analysis extra
    a, b = {0: 0.70, 1: 0.72, 2: 0.71}, {0: 0.60, 1: 0.63, 2: 0.61}
    t = paired_t(a, b)                       # differences 0.10, 0.09, 0.10: mean 0.09667, sd 0.005774
    assert t["n"] == 3 and t["mean_diff"] == pytest.approx(0.096667, abs=1e-6)
    assert t["t"] == pytest.approx(0.096667 / (0.0057735 / math.sqrt(3)), rel=1e-4) and t["significant"]
    noisy = paired_t({0: 0.70, 1: 0.60, 2: 0.71}, {0: 0.65, 1: 0.66, 2: 0.64})   # +0.05, -0.06, +0.07
    assert noisy["critical"] == 4.303 and not noisy["significant"]
    assert paired_t({0: 0.7}, {0: 0.6}) is None and paired_t({0: 0.7, 1: 0.7}, {2: 0.6, 3: 0.6}) is None
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0) and mean_std([5.0]) == (5.0, 0.0)


def test_t_p_values_match_the_critical_values_and_holm_keeps_the_family_wise_level():
    need_extra("scipy")                                  # the t distribution: the analysis extra
    for df, crit in T975.items():                     # each tabled two-sided 95 % value has p = 0.05
        assert t_two_sided_p(crit, df) == pytest.approx(0.05, abs=1e-4), df
    assert t_two_sided_p(1.0, 1) == pytest.approx(0.5)                 # Cauchy: P(|T| > 1) = 1/2
    assert t_two_sided_p(2.0, 2) == pytest.approx(1 - 2 / math.sqrt(6))   # df 2: 1 - t / sqrt(2 + t^2)
    assert t_two_sided_p(0.0, 5) == 1.0 and t_two_sided_p(math.inf, 2) == 0.0
    assert t_two_sided_p(-3.0, 4) == t_two_sided_p(3.0, 4)
    assert paired_t({0: 0.70, 1: 0.72, 2: 0.71}, {0: 0.60, 1: 0.63, 2: 0.61})["p"] < 0.05
    # Holm over 4: 0.01 < 0.05/4 rejected; 0.02 >= 0.05/3 stops, so 0.03 is kept although 0.03 < 0.05/2
    assert holm([0.03, 0.01, 0.02, 0.5]) == [False, True, False, False]
    assert holm([0.001, 0.012, 0.02]) == [True, True, True] and holm([]) == []
    from scipy import stats                              # the printed critical values are scipy's, to 3 decimals
    assert all(round(float(stats.t.ppf(0.975, df)), 3) == crit for df, crit in T975.items())


def test_a_cell_whose_sts_b_pearson_is_near_zero_is_flagged_collapsed():
    def rec(seed, pearson):
        tasks = {"sst2": {"accuracy": 0.51}} | ({"stsb": {"pearson": pearson, "spearman": 0.0}} if pearson is not None
                                                else {})
        return {"variant": "v", "seed": seed, "metrics": {"tasks": tasks, "average": 0.5}, "wall_s": 1.0,
                "threads": 1, "machine": {"cpu": "c"}}
    assert collapsed(rec(0, 0.007)["metrics"]) and not collapsed(rec(0, 0.86)["metrics"])
    assert not collapsed(rec(0, None)["metrics"])                          # no STS-B: nothing to tell by
    assert summarise([rec(0, 0.86), rec(1, 0.003), rec(2, 0.19)])["v"]["collapsed"] == [1, 2]


def test_a_tiny_grid_runs_two_at_a_time_skips_finished_cells_and_reports(tiny_bert, tiny_tasks, tmp_path):
    grid = tiny_grid(tmp_path / "tiny.json", tiny_bert, tiny_tasks)
    first = run_grid(grid, tmp_path, "--jobs", "2")
    assert first.stdout.count("start tiny/") == 4 and first.stdout.count("done tiny/") == 4
    assert "ETA this cell" in first.stdout and "the grid's" in first.stdout
    files = sorted((tmp_path / "results" / "tiny").glob("*.json"))
    assert [f.name for f in files] == ["lora-mt__s0.json", "lora-mt__s1.json", "more__s0.json", "more__s1.json"]
    rec = json.loads(files[2].read_text())
    assert rec["command"].startswith("OMP_NUM_THREADS=1 python train.py --bench jsonl") and "--seed 0" in rec["command"]
    assert rec["threads"] == 1 and rec["machine"]["torch"] and rec["git"]["commit"] and rec["wall_s"] > 0
    assert rec["metrics"]["method"] == "more" and rec["trainable_params"] > 0 and not rec["resumed"]
    assert rec["rank_maps"] and all(len(v) == 2 for v in rec["rank_maps"].values())   # MoRE: a rank per task
    assert json.loads(files[0].read_text())["rank_maps"] is None
    before = [f.read_text() for f in files]

    again = run_grid(grid, tmp_path, "--jobs", "2")
    assert "4 of 4 cells already have results; not run again" in again.stdout and "start" not in again.stdout
    assert [f.read_text() for f in files] == before

    need_extra("scipy")                                   # the report's paired t-tests: the analysis extra
    out = tmp_path / "doc" / "REPLICATION.md"
    done = subprocess.run([sys.executable, "experiments/report.py", "--results", str(tmp_path / "results"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    recs = [json.loads(f.read_text()) for f in files]
    for variant in ("lora-mt", "more"):
        avg = mean_std([r["metrics"]["average"] for r in recs if r["variant"] == variant])
        assert f"**{avg[0]:.4f} ± {avg[1]:.4f}**" in text, variant
    assert "**Cells finished: 4**" in text and "## Grid `tiny`" in text and "paired t-test" in text
    mark = " ‡" if any(r["git"]["dirty"] for r in recs if r["variant"] == "more") else ""   # a dirty tree's cells
    row = next(line for line in text.splitlines() if line.startswith(f"| more{mark} | 2 |"))
    for task in ("sentiment", "pair"):                    # each task's mean ± std over the two seeds
        ms = mean_std([main_value(task, r["metrics"]["tasks"][task]) for r in recs if r["variant"] == "more"])
        assert f"{ms[0]:.4f} ± {ms[1]:.4f}" in row, task
    assert "| variant | seeds | pair | sentiment | average |" in text            # tasks outside GLUE: sorted
    assert "best constant" not in text                                    # no constant.json yet

    # the best constant predictor of each cell's test set: the held-out 10 % of each task, drawn by the
    # seed (mtlref.data.splits.hold_out), counted here from the jsonl file itself
    done = subprocess.run([sys.executable, "experiments/constant.py", "--results", str(tmp_path / "results"),
                           "--out", str(tmp_path / "analyses" / "constant.json")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sets = json.loads((tmp_path / "analyses" / "constant.json").read_text())["test_sets"]
    assert len(sets) == 2                                                 # one test set per seed, shared by both variants
    rows = [json.loads(line) for line in tiny_tasks.read_text().splitlines()]
    want = {}
    for seed in (0, 1):
        for task in ("sentiment", "pair"):
            mine = [Example(task, r["text"], r.get("text_pair"), r["label"], "") for r in rows if r["task"] == task]
            labels = [e.label for e in hold_out(mine, task, seed)[0]]
            want[task, seed] = max(labels.count(v) for v in set(labels)) / len(labels)
    for key, c in sets.items():
        seed = json.loads(key)["seed"]
        for task in ("sentiment", "pair"):
            assert c["tasks"][task]["main"] == pytest.approx(want[task, seed]), (task, seed)
        assert c["average"] == pytest.approx((want["sentiment", seed] + want["pair", seed]) / 2)
    done = subprocess.run([sys.executable, "experiments/report.py", "--results", str(tmp_path / "results"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| best constant | 2 |"))
    for task in ("pair", "sentiment"):
        ms = mean_std([want[task, 0], want[task, 1]])
        assert f"| {ms[0]:.4f} ± {ms[1]:.4f} |" in row, (task, row)


def test_a_stored_command_reruns_its_cell_to_the_same_metrics(tiny_bert, tiny_tasks, tmp_path):
    grid = tiny_grid(tmp_path / "one.json", tiny_bert, tiny_tasks, seeds=(3,), variants={"mtl": ["--method",
                                                                                                 "mtl-lora"]})
    run_grid(grid, tmp_path)
    rec = json.loads((tmp_path / "results" / "one" / "mtl__s3.json").read_text())
    argv = list(rec["argv"])
    argv[argv.index("--out") + 1] = str(tmp_path / "again")
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, env={**os.environ, **rec["env"]}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert metrics["tasks"] == rec["metrics"]["tasks"] and metrics["average"] == rec["metrics"]["average"]


def test_a_killed_grid_resumes_its_cell(tiny_bert, tiny_tasks, tmp_path):
    """SIGKILL to the whole runner once the cell has a checkpoint; the same command then resumes the
    cell (train.py --resume) and records the uninterrupted cell's metrics."""
    variants = {"more": ["--method", "more", "--eval-every", "20"]}
    whole = tiny_grid(tmp_path / "g.json", tiny_bert, tiny_tasks, steps=80, seeds=(0,), variants=variants)
    run_grid(whole, tmp_path / "whole", "--save-every", "10")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "experiments/run.py", str(whole), "--runs", str(killed / "runs"),
                             "--results", str(killed / "results"), "--save-every", "10"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = killed / "runs" / "g" / "more" / "s0" / "checkpoint" / "state.safetensors"
    deadline = time.monotonic() + 300
    while not checkpoint.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "results" / "g" / "more__s0.json").exists(), "the cell ended before it could be killed"
    resumed = run_grid(whole, killed, "--save-every", "10")
    assert "start g/more/s0 (resuming)" in resumed.stdout
    assert "resumed from" in (killed / "runs" / "g" / "more" / "s0.log").read_text()   # train.py --resume ran
    a = json.loads((killed / "results" / "g" / "more__s0.json").read_text())
    b = json.loads((tmp_path / "whole" / "results" / "g" / "more__s0.json").read_text())
    assert a["resumed"] and not b["resumed"]
    assert a["metrics"]["tasks"] == b["metrics"]["tasks"] and a["metrics"]["best_step"] == b["metrics"]["best_step"]
    ta = load_file(killed / "runs" / "g" / "more" / "s0" / "adapter.safetensors")
    tb = load_file(tmp_path / "whole" / "runs" / "g" / "more" / "s0" / "adapter.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)     # bit for bit


def test_a_resumed_cell_records_the_wall_time_of_all_its_processes(tmp_path):
    """G.record: the runner's wall for this process + train.py's wall_s_before_resume (the killed
    processes' time up to the checkpoint), so the grid's summed time counts a resumed cell whole."""
    cell = G.Cell("g", "v", 0, ("train.py", "--method", "lora"))
    out = cell.out(tmp_path)
    out.mkdir(parents=True)
    for before, resumed in ((0.0, False), (600.0, True)):
        (out / "metrics.json").write_text(json.dumps({"wall_s": 110.0 + before, "wall_s_before_resume": before,
                                                      "threads": 1, "average": 0.5, "tasks": {}}))
        rec = G.record(cell, ["train.py"], {"OMP_NUM_THREADS": "1"}, tmp_path, 112.0, resumed, "cpu")
        assert rec["wall_s"] == 112.0 + before and rec["resumed"] is resumed


def report(results: Path, analyses: Path, doc: Path) -> str:
    """experiments/report.py on these result files and analyses: the document's text."""
    done = subprocess.run([sys.executable, "experiments/report.py", "--results", str(results), "--analyses",
                           str(analyses), "--out", str(doc)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return doc.read_text()


def report_from_analyses(tmp_path: Path) -> str:
    """experiments/report.py with no result files and tmp_path/analyses: the document's text."""
    return report(tmp_path / "none", tmp_path / "analyses", tmp_path / "doc" / "REPLICATION.md")


def test_the_probe_reads_the_last_output_projection_of_each_run(tiny_bert, tiny_tasks, tmp_path, capsys):
    """experiments/probe.py on two tiny runs (LoRA-MT, MTL-LoRA): the features are A_t x (rank r),
    the adapter's output ΔY and the module's output (hidden size) averaged over real tokens, for
    every test example it picked; LoRA-MT's A is shared, so its low-rank features do not depend on
    the task id, while MTL-LoRA's Λ_t A x does; the probe (A.4's linear SVM by default) gives
    macro-F1, per-task F1 and t-SNE points for each, and says how many examples of each task it had."""
    need_extra("sklearn")
    runs = {}
    for method in ("lora", "mtl-lora"):
        runs[method] = tmp_path / method
        done = subprocess.run([sys.executable, "train.py", "--bench", "jsonl", "--jsonl", str(tiny_tasks), "--jsonl-dev",
                               str(tiny_tasks), "--model", str(tiny_bert), "--method", method, "--max-steps", "6", "--batch-size", "4",
                               "--max-length", "16", "--lr", "5e-2", "--out", str(runs[method])], cwd=ROOT,
                              capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
    cfg = json.loads((runs["lora"] / "adapter_config.json").read_text())
    hidden = json.loads((tiny_bert / "config.json").read_text())["hidden_size"]
    feats = {m: probe.features(runs[m], per_task=3, seed=0, module=None, data_dir=None) for m in runs}
    for m, f in feats.items():
        assert f["module"] == "encoder.layer.1.attention.output.dense"      # bert-tiny: 2 blocks
        assert f["low"].shape == (6, cfg["rank"]) and f["full"].shape == (6, hidden) and len(f["labels"]) == 6
        assert f["adapter"].shape == (6, hidden) and f["counts"] == {"sentiment": 3, "pair": 3}
        assert f["labels"] == ["sentiment"] * 3 + ["pair"] * 3
    # the same examples read as the other task: LoRA-MT's A x is unchanged, MTL-LoRA's Λ_t A x is not;
    # the adapter's output ΔY averaged over tokens is B_t (A_t x averaged): the low features mapped up
    for m, same in (("lora", True), ("mtl-lora", False)):
        backbone = probe.load_run(runs[m]).backbone
        adapter = probe.adapters_of(backbone)[feats[m]["module"]]
        slot = backbone.get_submodule(feats[m]["module"])
        (A0, B0), (A1, _) = (adapter.as_lora(t, slot) for t in (0, 1))
        assert torch.equal(A0, A1) == same, m
        up = torch.from_numpy(feats[m]["low"][:3]) @ B0.detach().float().T
        assert torch.allclose(torch.from_numpy(feats[m]["adapter"][:3]), up, atol=1e-5), m
    out = tmp_path / "analyses" / "probe-tiny.json"
    assert probe.main([str(runs["lora"]), str(runs["mtl-lora"]), "--per-task", "10", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["threads"] == torch.get_num_threads()
    # MTL-LoRA A.4's probe by default: a linear SVM, C = 1, one-vs-rest, 40/60, five split seeds
    assert (res["classifier"], res["C"], res["standardized"]) == ("svm", 1.0, False)
    assert res["probe_split"] == {"train": 0.4, "test": 0.6, "stratified": True, "seeds": [0, 1, 2, 3, 4]}
    for run_name, run in res["runs"].items():
        assert run["per_task_counts"] == {"sentiment": 10, "pair": 10} and run["fewer"] == {}
        saved = json.loads((Path(run_name) / "adapter_config.json").read_text())["options"]
        assert run["method_options"] == saved                        # MTL-LoRA's w_t init among them
        for space, dim in (("low", cfg["rank"]), ("adapter", hidden), ("full", hidden)):
            r = run[space]
            assert 0.0 <= r["macro_f1"] <= 1.0 and r["dim"] == dim and len(r["macro_f1_splits"]) == 5
            assert r["macro_f1"] == pytest.approx(sum(r["macro_f1_splits"]) / 5)
            assert set(r["per_task_f1"]) == {"sentiment", "pair"} and isinstance(r["converged"], bool)
            assert r["n_train"] == 8 and r["n_test"] == 12                 # 40 / 60 of 20 examples
            assert len(r["tsne"]) == 20 if space != "adapter" else "tsne" not in r
    # more than a task has: all of it, and the JSON and the printed line say which tasks and how many
    few = tmp_path / "probe-few.json"
    assert probe.main([str(runs["lora"]), "--per-task", "1000", "--splits", "1", "--out", str(few)]) == 0
    run = json.loads(few.read_text())["runs"][str(runs["lora"])]
    assert run["per_task_counts"] == run["fewer"] == {"sentiment": 24, "pair": 24}
    assert "(1000 per task; fewer: sentiment 24, pair 24)" in capsys.readouterr().out
    text = report_from_analyses(tmp_path)
    assert f"`{res['command']}` ({res['threads']} torch thread(s))" in text
    for name, run in res["runs"].items():
        assert f"| `{name}` | {run['method']} |" in text and f"{run['low']['macro_f1']:.3f} ({cfg['rank']})" in text
    assert "![t-SNE of the features](replication/probe-tiny-tsne.png)" in text
    assert (tmp_path / "doc" / "replication" / "probe-tiny-tsne.png").stat().st_size > 1000


def test_pca_keeps_the_distances_of_points_in_a_plane():
    """experiments/embeddings.py's PCA: points that lie in a 2-D plane of a 40-D space keep every
    pairwise distance in their 2 coordinates, and the two shares of the variance sum to 1; a third
    direction with variance takes its share."""
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(40, 2, generator=g, dtype=torch.float64))
    plane = torch.randn(7, 2, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0], dtype=torch.float64)
    x = (plane @ basis.T + 5.0).numpy()                                   # offset: PCA must centre
    xy, share = embeddings.pca_2d(x)
    d = lambda a: ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1) ** 0.5  # noqa: E731
    assert abs(d(xy) - d(x)).max() < 1e-9
    assert abs(sum(share) - 1.0) < 1e-12 and share[0] > share[1]
    third = torch.linalg.qr(torch.randn(40, 3, generator=g, dtype=torch.float64))[0][:, 2]
    x3 = x + (torch.randn(7, 1, generator=g, dtype=torch.float64) * 0.5 * third).numpy()
    assert sum(embeddings.pca_2d(x3)[1]) < 1.0 - 1e-3


def test_the_embedding_analysis_reads_mores_task_embeddings_and_rescales_experts(tiny_bert, tiny_tasks, tmp_path):
    """experiments/embeddings.py on a tiny MoRE run: the last block's attention modules, one 2-D
    point per task, the cosines of the stored e_t; Figure 2b's re-chosen ranks avoid experts 1-3
    at scale 0 and are the trained map at scale 1; the report draws both figures."""
    run = tmp_path / "more"
    done = subprocess.run([sys.executable, "train.py", "--bench", "jsonl", "--jsonl", str(tiny_tasks), "--jsonl-dev",
                           str(tiny_tasks), "--model", str(tiny_bert), "--method", "more", "--max-steps", "6",
                           "--batch-size", "4", "--max-length", "16", "--lr", "5e-2", "--out", str(run)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    res = embeddings.analyse(run, 0.0)
    loaded = embeddings.load_run(run)
    specs, backbone = loaded.specs, loaded.backbone
    ads = embeddings.adapters_of(backbone)
    attn = sorted(n for n in ads if n.startswith("encoder.layer.1.") and ".attention." in n)
    assert attn and list(res["modules"]) == attn + ["all"] and res["tasks"] == [s.name for s in specs]
    for n in attn:
        e = ads[n].task_embedding.detach().double()
        cos = torch.nn.functional.cosine_similarity(e[:, None, :], e[None, :, :], dim=-1)
        assert torch.allclose(torch.tensor(res["modules"][n]["cosine"], dtype=torch.float64), cos, atol=1e-4)
        assert len(res["modules"][n]["pca"]) == len(specs)
    assert res["modules"]["all"]["dim"] == sum(ads[n].task_embedding.shape[1] for n in attn)
    assert set(res["scaled_rank_maps"]) == set(ads) and min(min(v) for v in res["scaled_rank_maps"].values()) > 3
    assert embeddings.analyse(run, 1.0)["scaled_rank_maps"] == {n: a.rank_map().tolist() for n, a in ads.items()}
    official = tmp_path / "official"                                    # rank table fixed at init: no Figure 2b
    done = subprocess.run([*done.args[:-2], "--option", "official=true", "--out", str(official)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    res_o = embeddings.analyse(official, 0.0)
    assert res_o["scaled_rank_maps"] == {} and len(res_o["modules"]["all"]["pca"]) == len(specs)
    need_extra("matplotlib")
    out = tmp_path / "analyses" / "embeddings-tiny.json"
    assert embeddings.main([str(run), "--out", str(out)]) == 0
    text = report_from_analyses(tmp_path)
    saved = json.loads(out.read_text())
    moved = sum(a != b for n in saved["rank_maps"] for a, b in zip(saved["rank_maps"][n], saved["scaled_rank_maps"][n]))
    assert f"{moved} of {sum(len(v) for v in saved['rank_maps'].values())} (task, module) choices change" in text
    for fig in ("pca", "scaled-ranks"):
        assert (tmp_path / "doc" / "replication" / f"embeddings-tiny-{fig}.png").stat().st_size > 1000


def test_the_best_constant_gives_every_example_the_answer_that_scores_highest():
    """experiments/constant.py's best_constant, with train.py's metric code: the most frequent
    label's accuracy, CoLA's majority label (every constant's MCC is 0: accuracy breaks the tie),
    and STS-B's mean, whose Pearson is 0 (a constant has no correlation)."""
    cola = best_constant(get_spec("cola"), [1.0] * 7 + [0.0] * 3)
    assert cola["answer"] == 1.0 and cola["main"] == 0.0 and cola["metrics"]["accuracy"] == pytest.approx(0.7)
    mnli = best_constant(get_spec("mnli"), [0.0, 0.0, 1.0, 2.0, 2.0, 2.0])
    assert mnli["answer"] == 2.0 and mnli["main"] == pytest.approx(0.5) and mnli["n"] == 6
    stsb = best_constant(get_spec("stsb"), [0.0, 1.0, 2.0, 5.0])
    assert stsb["answer"] == pytest.approx(2.0) and stsb["main"] == 0.0


def test_the_best_constant_row_names_the_tasks_a_variant_does_not_clear(tmp_path):
    """A constant.json for the cells' test sets (synthetic): the table gets its row, mean ± std
    over the seeds' test sets, and the line under it names the variants at or below it per task;
    a test set the file lacks is named with the command that writes it."""
    def rec(variant, seed, sst2, cola):
        return {"grid": "g", "variant": variant, "seed": seed, "wall_s": 60.0, "threads": 1,
                "argv": ["train.py", "--bench", "glue", "--tasks", "cola,sst2", "--seed", str(seed)],
                "machine": {"cpu": "c", "cores": 2, "torch": "t"}, "trainable_percent": 1.0, "rank_maps": None,
                "metrics": {"tasks": {"cola": {"mcc": cola, "accuracy": 0.7}, "sst2": {"accuracy": sst2}},
                            "average": (sst2 + cola) / 2, "split": "test", "steps": 10, "settings": {"split": "paper"}}}
    cells = [rec("a", 0, 0.80, 0.01), rec("a", 1, 0.82, -0.03), rec("b", 0, 0.50, 0.20), rec("b", 1, 0.52, 0.30),
             rec("c", 1, 0.525, 0.10)]       # seed 1 only: at or below seed 1's constant 0.53, not the two seeds' 0.52
    for r in cells:
        (tmp_path / "results" / "g").mkdir(parents=True, exist_ok=True)
        (tmp_path / "results" / "g" / f"{r['variant']}__s{r['seed']}.json").write_text(json.dumps(r))
    const = {data_key(cells[0]): {"tasks": {"cola": {"main": 0.0}, "sst2": {"main": 0.51}}, "average": 0.255},
             data_key(cells[1]): {"tasks": {"cola": {"main": 0.0}, "sst2": {"main": 0.53}}, "average": 0.265}}
    assert len(const) == 2                           # the seed picks the test set
    (tmp_path / "analyses").mkdir()
    (tmp_path / "analyses" / "constant.json").write_text(json.dumps({"test_sets": const}))
    text = report(tmp_path / "results", tmp_path / "analyses", tmp_path / "REPLICATION.md")
    assert "| best constant | 2 | 0.0000 ± 0.0000 | 0.5200 ± 0.0141 | 0.2600 ± 0.0071 | – | – |" in text
    assert "(nothing the test can see was learned there): CoLA: `a`; SST-2: `b`, `c`." in text   # -0.01 <= 0; 0.51 <= 0.52
    del const[data_key(cells[1])]
    (tmp_path / "analyses" / "constant.json").write_text(json.dumps({"test_sets": const}))
    text = report(tmp_path / "results", tmp_path / "analyses", tmp_path / "REPLICATION.md")
    assert "| best constant | 1 | 0.0000 | 0.5100 | 0.2550 |" in text
    assert "lacks 1 of these cells' test sets (seed 1): `python experiments/constant.py` writes them." in text


def test_a_claim_between_two_variants_that_learned_nothing_says_so():
    """here(): a claim's figure names the best constant when neither variant clears it on any of
    their tasks (a comparison of two constant-like models), and not when one of them does on one."""
    need_extra("scipy")                                  # the t distribution: the analysis extra
    summary = {v: {"seeds": {0: avg, 1: avg + 0.01}, "tasks": {"cb": (avg, 0.01), "mnli_mm": (0.9, 0.0)}}
               for v, avg in (("more-cb-k4", 0.49), ("lora-mt-cb-k4", 0.48))}
    at_constant = {"more-cb-k4": {"cb"}, "lora-mt-cb-k4": {"cb"}}      # the tables' variants at or below it
    text = here(summary, "more-cb-k4", "lora-mt-cb-k4", 0.01, at_constant)
    assert text.startswith("`more-cb-k4` − `lora-mt-cb-k4` = +0.0100 (2 seeds, p = ")
    assert text.endswith("; both at or below the best constant on CB")          # mnli_mm is not a trained task
    at_constant["lora-mt-cb-k4"] = set()
    assert "constant" not in here(summary, "more-cb-k4", "lora-mt-cb-k4", 0.01, at_constant)


def test_the_committed_report_is_what_the_committed_result_files_give(tmp_path):
    """docs/REPLICATION.md regenerated from the committed result files, analyses and bench run is the
    committed file byte for byte: its p-values and t statistics (scipy.stats since the workbench left
    mtlref/) print as they did when the file was written."""
    need_extra("scipy")
    need_extra("matplotlib")                                # without it the document says "not drawn"
    for bench in ("glue", "superglue"):                     # the training sets' sizes: the epochs per task
        need(ROOT / "data" / bench)
    need_minilm()                                           # its config: MoRE's h, each module's input size
    text = report(ROOT / "experiments" / "results", ROOT / "experiments" / "analyses", tmp_path / "REPLICATION.md")
    assert text == (ROOT / "docs" / "REPLICATION.md").read_text(encoding="utf-8")


def test_the_few_shot_report_pairs_mores_cells_with_lora_mt_and_the_other_t_reading(tmp_path):
    """From the committed few-shot result files (3 variants, CB k = 32): MoRE is compared with
    LoRA-MT at the same k as the paper's claim, the -t1 cells (|T| = 1) with MoRE's kept |T|,
    not as a claim; the numbers are the paired t of the files' averages."""
    need_extra("scipy")                                  # the t distribution: the analysis extra
    src = ROOT / "experiments" / "results" / "fewshot"
    names = ["more-cb-k32", "lora-mt-cb-k32", "more-cb-k32-t1"]
    files = [f for n in names for f in sorted(src.glob(f"{n}__s*.json"))]
    assert len(files) == 3 * 5, files                                   # committed: 5 seeds each
    (tmp_path / "results" / "fewshot").mkdir(parents=True)
    for f in files:
        (tmp_path / "results" / "fewshot" / f.name).write_text(f.read_text())
    text = report(tmp_path / "results", tmp_path / "none", tmp_path / "REPLICATION.md")
    s = summarise(load_results(tmp_path / "results"))
    section = text.split("## Grid `fewshot`")[1]                       # not the summary above it
    claim = [line for line in section.splitlines() if line.startswith("- MoRE (Table 4)")]
    assert len(claim) == 1 and "`more-cb-k32` − `lora-mt-cb-k32`" in claim[0]
    t = paired_t(s["more-cb-k32-t1"]["seeds"], s["more-cb-k32"]["seeds"])
    assert f"- `more-cb-k32-t1` − `more-cb-k32`: {t['mean_diff']:+.4f}, t = {t['t']:.2f} (df {t['n'] - 1}" in text


def test_the_main_grids_tables_compare_within_one_lr_and_over_shared_seeds_only(tmp_path):
    """Records for the real main.json's variants (synthetic numbers): each of its tables compares
    within itself, the papers' claims are checked within each table, and a difference
    on unequal seed sets is taken over the shared seeds, never as a difference of means."""
    need_extra("scipy")                                  # the t distribution: the analysis extra
    def rec(variant, seed, avg, stsb=0.85):
        tasks = {"sst2": {"accuracy": avg}, "stsb": {"pearson": stsb, "spearman": stsb}}
        return {"grid": "main", "variant": variant, "seed": seed, "wall_s": 60.0, "threads": 1,
                "machine": {"cpu": "c", "cores": 2, "torch": "t"}, "trainable_percent": 1.0, "rank_maps": None,
                "metrics": {"tasks": tasks, "average": avg, "split": "test", "steps": 10}}
    cells = [rec("lora-mt-lr5e-4", 0, 0.60), rec("lora-mt-lr5e-4", 1, 0.62), rec("lora-mt-lr5e-4", 2, 0.70),
             rec("more-lr5e-4", 0, 0.65), rec("more-lr5e-4", 1, 0.66),
             rec("lora-mt", 0, 0.61), rec("lora-mt", 1, 0.30, stsb=0.01), dict(rec("more", 0, 0.64), resumed=True),
             dict(rec("no-ste", 0, 0.61), grid="ablation-more"),      # its baseline: main/more-lr5e-4
             dict(rec("no-contrastive", 0, 0.645), grid="ablation-more")]
    cells[0]["resumed"] = True                                        # resumed, its earlier processes counted
    cells[0]["metrics"]["wall_s_before_resume"] = 30.0
    for r in cells:
        (tmp_path / "results" / r["grid"]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "results" / r["grid"] / f"{r['variant']}__s{r['seed']}.json").write_text(json.dumps(r))
    text = report(tmp_path / "results", tmp_path / "none", tmp_path / "REPLICATION.md")
    # a cell resumed before train.py counted its earlier processes is named; the one resumed after is not
    assert "\n1 resumed cell(s) count the wall time of their last process only" in text
    assert text.split("last process only")[1].split("\n")[0].endswith(": `main/more/s0`.")
    five, two = text.split("### Shared lr 5e-4")[1].split("### Shared lr 2e-3")
    claim = next(line for line in five.splitlines() if line.startswith("- MoRE (Table 2): MoRE above LoRA ("))
    # seeds 0 and 1: (0.65 - 0.60 + 0.66 - 0.62) / 2 = +0.0450 (the means' difference would be +0.0150)
    assert "`more-lr5e-4` − `lora-mt-lr5e-4` = +0.0450" in claim, claim
    claim = next(line for line in two.splitlines() if line.startswith("- MoRE (Table 2): MoRE above LoRA ("))
    claims_two = two.split("#### What agrees")[1].split("###")[0]
    assert "`more` − `lora-mt` = +0.0300" in claim and "lr5e-4" not in claims_two
    assert "| more | 1 |" in two and "+0.0300 (seed 0 only: no test)" in two  # 0.64 - 0.61 on seed 0
    assert "Collapsed cells: `lora-mt` s1" in two and "No cell of this table collapsed." in five
    across = text.split("### lr 5e-4 against lr 2e-3, variant by variant")[1].split("##")[0]
    assert "| more-lr5e-4 | 0.6550 ± 0.0071 | more | 0.6400 | +0.0100 (seed 0 only: no test) |" in across
    assert "| lora-mt-lr5e-4 |" in across and "| lora-mt | 0.4550 ± 0.2192 | +0.1550, t = " in across   # seeds 0, 1
    ablation = text.split("## Grid `ablation-more`")[1].split("\n## ")[0]
    rows = [line for line in ablation.splitlines() if line.startswith("| ")][1:]    # below the header
    assert rows[0].startswith("| main/more-lr5e-4 | 2 |") and rows[2].startswith("| no-ste | 1 |")
    assert "vs main/more-lr5e-4" in ablation and rows[2].endswith("| -0.0400 (seed 0 only: no test) |")
    assert "2 cells;" in ablation                                        # its own cells only
    # against MoRE's Table 5: the full method's seeds 0.65, 0.66 give sigma 0.0071, so 2 sqrt 2 sigma = 0.0200
    assert "2√2 σ = 0.0200, σ = 0.0071" in ablation
    assert ("- w/o STE (`no-ste`): the paper 0.864 vs 0.873, a drop of -0.0090; here -0.0400 (seed 0 only: beyond "
            "the spread, |-0.0400| vs 0.0200): agrees, beyond the seed spread." in ablation)
    assert ("- w/o CL optimization (`no-contrastive`): the paper 0.863 vs 0.873, a drop of -0.0100; here -0.0050 (seed "
            "0 only: within the spread, |-0.0050| vs 0.0200): agrees, but within the seed spread." in ablation)
    assert "- w/o task embeddings (`no-task-embedding`): no cell has finished yet." in ablation
    assert ("still to run: `no-contrastive`: `python experiments/run.py experiments/grids/ablation-more.json "
            "--variants no-contrastive --seeds 1,2 --jobs 2`") in ablation
    # the summary: each claim once, in the group of what came out, linked to the section with its numbers
    summary = text.split("## What agrees with the papers and what does not")[1].split("\n## ")[0]
    groups = {g.split("**")[0]: g for g in summary.split("\n**")[1:]}
    assert ("- MoRE (Table 2): MoRE above LoRA: `more-lr5e-4` − `lora-mt-lr5e-4` = +0.0450 (2 seeds, p = "
            in groups["Agrees, within the seed spread"]) and "([Shared lr 5e-4](#shared-lr-5e-4))" in summary
    assert ("- MoRE's Table 5 (GLUE average; its 87.3 is Table 2's T5-base MoRE): w/o STE below the full method "
            "(the paper: -0.0090): `no-ste` − "
            "`main/more-lr5e-4` = -0.0400 (1 seed) ([Grid `ablation-more`](#grid-ablation-more))"
            in groups["Agrees, beyond the seed spread"])
    assert "`more` − `lora-mt` = +0.0300 (1 seed)" in groups["Agrees in direction, untested"]
    assert summary.count("\n- ") == 4            # 2 claims per lr table (MoRE vs LoRA-MT), 2 ablation rows
    assert ("1 ablation row(s) within the seed spread still need seeds 1 and 2 (2 cells, 25m00s planned on 2 cores, "
            "2 cells at a time): "
            "`python experiments/run.py experiments/grids/ablation-more.json --variants no-contrastive --seeds 1,2 "
            "--jobs 2`.") in text.split("## What agrees")[0]


def test_the_claims_are_corrected_for_testing_several_and_a_task_no_variant_learned_is_named():
    """caveats(): Holm-Bonferroni over the claims that have a test, and CoLA named when every
    variant's mean MCC is within 0.1 of 0 (and not when one variant learned it)."""
    need_extra("scipy")                                  # the t distribution: the analysis extra
    def var(seeds, cola):
        return {"seeds": seeds, "tasks": {"cola": (cola, 0.01), "sst2": (0.8, 0.01)}}
    summary = {"a": var({0: 0.70, 1: 0.72, 2: 0.71}, 0.05), "b": var({0: 0.60, 1: 0.63, 2: 0.61}, -0.02),
               "c": var({0: 0.70, 1: 0.60, 2: 0.71}, 0.09), "d": var({0: 0.7}, 0.0)}
    claims = [("a", "b", "p1"), ("c", "b", "p2"), ("d", "b", "p3")]    # d: one seed, no test
    pa = paired_t(summary["a"]["seeds"], summary["b"]["seeds"])["p"]
    text = "\n".join(caveats(summary, list(summary), claims))
    assert "one or more of these 2 tests would still pass with probability 10%" in text
    assert f"keeps: `a` − `b` (p = {pa:.3f})." in text and "`c` − `b`" not in text
    assert "CoLA: every variant's mean MCC lies in [-0.0200, +0.0900]" in text
    summary["c"]["tasks"]["cola"] = (0.25, 0.01)
    assert "CoLA" not in "\n".join(caveats(summary, list(summary), claims))


def test_tuning_table_names_exactly_the_flags_a_run_changed(tmp_path):
    """experiments/tuning.py: `keep` adds the seed, pooling and tasks of adapter_config.json to the
    metrics, and `changes` names only what differs from the default command: a run of the
    default settings shows no change, one with --head-lr, --tasks and --seed shows those three."""
    base = tuning.default_settings()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics = {"tasks": {"cola": {"mcc": 0.125}}, "average": 0.125, "wall_s": 177.0, "threads": 1,
               "method": "more", "settings": base}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "adapter_config.json").write_text(json.dumps(
        {"seed": 0, "pooling": "mean", "task_names": ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"]}))
    default = json.loads(tuning.keep(run_dir, "d", tmp_path / "kept").read_text())
    assert tuning.changes(default) == "–"
    changed = dict(metrics, settings=dict(metrics["settings"], head_lr=0.0005))
    (run_dir / "metrics.json").write_text(json.dumps(changed))
    (run_dir / "adapter_config.json").write_text(json.dumps({"seed": 1, "pooling": "mean", "task_names": ["cola"]}))
    kept = tuning.keep(run_dir, "c", tmp_path / "kept")
    assert tuning.changes(json.loads(kept.read_text())) == "`--head-lr 0.0005` `--tasks cola` `--seed 1`"
    row = tuning.table([kept]).splitlines()[-1]
    assert row == "| c | `--head-lr 0.0005` `--tasks cola` `--seed 1` | 0.1250 | 0.125 | – | – | 177 s (1 thread) |"
    with pytest.raises(SystemExit, match="metrics.json: not found"):
        tuning.keep(tmp_path / "unfinished", "u", tmp_path / "kept")

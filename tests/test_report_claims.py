"""docs/REPLICATION.md's claims (experiments/replication/): each names the paper's table that
makes it and quotes its numbers, our own comparisons stay apart from the papers', each claim's
protocol line comes from its cells' recorded settings (batches, τ, h, w_t init, the epochs each
task saw, replayed with the library's sampler), MTL-LoRA cells of two w_t inits never share a row
or a comparison, a cell run from a dirty tree is marked, and a table with no finished cell says
how to run it. The documents are written from synthetic result files in tmp_path."""
import json
import re
from collections import Counter

import pytest

from conftest import need_extra
from experiments.replication.analyses import run_init
from experiments.replication.document import write
from experiments.replication.papers import OWN_COMPARISONS, PAPER_ABLATIONS, PAPER_CLAIMS, PAPER_PROTOCOL, TABLE4
from experiments.replication.protocol import Protocols
from mtlref.data.samplers import MultiTaskSampler

OLD = "old init (w_t ~ N(0, τ²))"


def rec(variant, seed, avg, method, grid="main", options=None, method_options=None, batches="mixed", dirty=False):
    """A result file as experiments/grid.py writes it (the fields the report reads), two tasks."""
    m = {"tasks": {"sst2": {"accuracy": avg}, "stsb": {"pearson": 0.85, "spearman": 0.85}}, "average": avg,
         "split": "test", "steps": 16, "method": method, "objective": "head", "model": "model",
         "train_sizes": {"sst2": 300, "stsb": 100},
         "settings": {"split": "paper", "sampler": "more", "batches": batches, "batch_size": 8, "grad_accum": 1,
                      "lr": 5e-4, "options": options or {}, "targets": "attention+ffn"}}
    if method_options is not None:
        m["method_options"] = method_options
    return {"grid": grid, "variant": variant, "seed": seed, "wall_s": 60.0, "threads": 1, "method": method,
            "machine": {"cpu": "c", "cores": 2, "torch": "t"}, "trainable_percent": 1.0, "rank_maps": None,
            "git": {"commit": "0" * 40, "dirty": dirty}, "metrics": m,
            "argv": ["train.py", "--method", method, "--seed", str(seed), "--out", f"runs/{grid}/{variant}/s{seed}"]}


def document(tmp_path, cells) -> str:
    need_extra("scipy")                                   # the paired t-tests: the analysis extra
    results = tmp_path / "results"
    for i, r in enumerate(cells):
        (results / r["grid"]).mkdir(parents=True, exist_ok=True)
        (results / r["grid"] / f"{r['variant']}__s{r['seed']}-{i}.json").write_text(json.dumps(r))
    return write(results, tmp_path / "doc" / "REPLICATION.md", tmp_path / "no-bench.json", tmp_path / "none")


def section(text: str, heading: str) -> str:
    return text.split(heading + "\n")[1].split("\n## ")[0].split("\n### ")[0]


def test_every_claim_names_the_table_that_makes_it_and_quotes_its_numbers():
    """Each paper claim's text names its paper and table(s); what it quotes names the same tables
    and prints a number per side; no claim pairs MoRE with MTL-LoRA (neither paper does); the
    ablation drops that MTL-LoRA's Table 5 prints agree with its rows; Table 4 has every cell."""
    for c in PAPER_CLAIMS:
        m = re.match(r"(MoRE|MTL-LoRA) \(Tables? ([\d, ]+)[;)]", c.text)
        assert m and c.paper in PAPER_PROTOCOL, c.text
        for table in m.group(2).split(", "):
            assert f"Table {table}" in c.printed, (c.text, table)
        assert len(re.findall(r"\d+\.\d+", c.printed)) >= 2, c.printed
        assert {c.variant, c.reference} != {"more", "mtl-lora"}
    assert all(c.paper == "" and c.text.startswith("Ours:") for c in OWN_COMPARISONS)
    dora = next(c for c in PAPER_CLAIMS if c.variant == "dora")
    assert "DoRA paper" in dora.text and "80.5 vs LoRA 77.6" in dora.printed
    for ab in PAPER_ABLATIONS.values():
        assert re.search(r"Table 5", ab.name) and 0.8 < ab.full < 0.9
        for label, value, printed in ab.rows.values():
            assert value < ab.full and (printed is None or abs(printed - (value - ab.full)) < 2e-4), label
    assert sorted(TABLE4) == [(t, k) for t in ("boolq", "cb") for k in (4, 16, 32)]
    assert all(more > lora for more, lora in TABLE4.values())              # the paper's direction in every cell


def test_the_epochs_each_task_saw_replay_the_librarys_sampler():
    """Protocols.epochs: mixed batches over whole length pools count exactly what the sampler drew
    (pooling only reorders within a pool); a partial pool of mixed batches is an expectation;
    single-task batches and LoRA-ST are exact; every count is examples over training-set size."""
    protos, sizes = Protocols([]), {"sst2": 300, "stsb": 100, "rte": 50}
    r = rec("more-lr5e-4", 1, 0.6, "more")
    r["metrics"]["train_sizes"] = sizes
    sampler = MultiTaskSampler(sizes, "more", 8, seed=1, mixed=True)
    drawn = Counter(t for _ in range(16) for t, _ in sampler.global_batch())
    epochs, exact = protos.epochs(r)
    assert exact and epochs == {t: drawn[t] / n for t, n in sizes.items()}
    assert protos.epochs(dict(r, argv=r["argv"][:-3] + ["2"] + r["argv"][-2:]))[0] != epochs   # --seed 2 draws others
    r["metrics"]["steps"] = 13                                             # 13 % 8: the last pool is partial
    epochs, exact = protos.epochs(r)
    assert not exact and sum(epochs[t] * n for t, n in sizes.items()) == pytest.approx(13 * 8)
    r["metrics"]["settings"]["batches"] = "single-task"
    epochs, exact = protos.epochs(r)
    counts = {t: epochs[t] * n for t, n in sizes.items()}
    assert exact and sum(counts.values()) == 13 * 8 and all(c % 8 == 0 for c in counts.values())
    r["metrics"]["settings"]["grad_accum"] = 2                             # 2 sampler batches per step
    assert sum(protos.epochs(r)[0][t] * n for t, n in sizes.items()) == 26 * 8
    st = dict(r, metrics=dict(r["metrics"], steps={t: 5 for t in sizes}))  # LoRA-ST: each task alone
    assert protos.epochs(st) == ({t: 5 * 8 * 2 / n for t, n in sizes.items()}, True)


def test_the_protocol_line_reports_batches_tau_h_and_the_init_from_the_recorded_settings():
    protos = Protocols([])
    more, lora = rec("more-lr5e-4", 0, 0.6, "more"), rec("lora-mt-lr5e-4", 0, 0.6, "lora")
    line = protos.line("more", [("more-lr5e-4", [more]), ("lora-mt-lr5e-4", [lora])], {"more-lr5e-4": {"stsb"}})
    assert line.startswith("Protocol: MiniLM with per-task heads, not T5-base with L_gen")
    assert "mixed batches, Eq. 7 sampler (MoRE's Eq. 8 assumes single-task ones)" in line
    assert "MoRE h = each module's input size" in line and "τ = 0.05 (the paper: h = 768, τ = 0.05)" in line
    assert "16 steps of 8, lr 5e-4 (the paper: 5 epochs of 32, lr 3e-4)" in line and "epochs seen per task (exact): SST-2 " in line
    assert line.endswith("at or below the best constant: STS-B (`more-lr5e-4`)")
    tau = rec("more-lr5e-4", 0, 0.6, "more", options={"tau": 0.2, "task_dim": 64}, batches="single-task")
    line = protos.line("more", [("more-lr5e-4", [tau])], {})
    assert "single-task batches, Eq. 7 sampler (as MoRE's Eq. 8 assumes)" in line and "MoRE h = 64, τ = 0.2" in line
    tau["metrics"]["method_options"] = {"tau": 0.3, "task_dim": 64}        # the resolved options win
    assert "τ = 0.3" in protos.line("more", [("more-lr5e-4", [tau])], {})
    old = rec("mtl-lora-lr5e-4", 0, 0.6, "mtl-lora")
    new = rec("mtl-lora-lr5e-4", 0, 0.6, "mtl-lora", method_options={"num_up": 3, "tau": 0.5, "weights_init": "kaiming"})
    assert f"MTL-LoRA τ = 0.5, n = 3, {OLD}" in protos.line("mtl-lora", [("m", [old])], {})
    assert "MTL-LoRA τ = 0.5, n = 3, w_t init kaiming" in protos.line("mtl-lora", [("m", [new])], {})
    dirty = rec("lora-mt-lr5e-4", 2, 0.6, "lora", dirty=True)
    assert protos.line("", [("lora-mt-lr5e-4", [lora, dirty])], {}).endswith("dirty tree ‡: `lora-mt-lr5e-4` s2")


def test_old_init_cells_are_labelled_and_never_compared_with_new_init_cells(tmp_path):
    """A variant with cells of both w_t inits becomes two rows; the claims use the new init's
    cells only; an ablation grid of old-init rows keeps only its baseline's old-init cells; a
    dirty cell is marked in its row and named under the table; our own comparison is listed apart
    from the papers' claims; the single-task table, with no cell, says how to run it."""
    kaiming = {"num_up": 3, "tau": 0.5, "full_lambda": False, "weights_init": "kaiming", "task_lambda": True}
    cells = [rec("lora-mt-lr5e-4", s, a, "lora", dirty=s == 1) for s, a in ((0, 0.60), (1, 0.61), (2, 0.62))]
    cells += [rec("mtl-lora-lr5e-4", s, a, "mtl-lora") for s, a in ((0, 0.50), (1, 0.52), (2, 0.51))]
    cells += [rec("mtl-lora-lr5e-4", s, a, "mtl-lora", method_options=kaiming) for s, a in ((0, 0.70), (1, 0.72),
                                                                                              (2, 0.71))]
    cells += [rec("more-lr5e-4", s, a, "more") for s, a in ((0, 0.65), (1, 0.66), (2, 0.64))]
    cells += [rec("no-tau", 0, 0.49, "mtl-lora", grid="ablation-mtl-lora", options={"tau": 1})]
    text = document(tmp_path, cells)
    five = section(text, "### Shared lr 5e-4")
    assert "| mtl-lora-lr5e-4 | 3 |" in five and "| mtl-lora-lr5e-4 [old init] | 3 |" in five
    assert "| lora-mt-lr5e-4 ‡ | 3 |" in five and "`git.dirty` in the result file" in five
    assert five.split("commit it names is not all of what ran: ")[1].startswith("`lora-mt-lr5e-4` s1.")
    assert "[old init]: MTL-LoRA cells whose w_t started as w_t ~ N(0, τ²)" in five
    claim = next(x for x in five.splitlines() if x.startswith("- MTL-LoRA (Tables 1, 3, 5): MTL-LoRA above LoRA-MT"))
    assert "(the paper: Table 1, GLUE average: LLaMA-2-7B 0.8996 vs 0.8887" in claim
    assert "`mtl-lora-lr5e-4` − `lora-mt-lr5e-4` = +0.1000" in claim       # the new init's cells: 0.71 - 0.61
    protocol = five.split(claim + "\n")[1].splitlines()[0]
    assert protocol.startswith("  - Protocol: MiniLM with per-task heads, not LLaMA-2-7B") and "w_t init kaiming" in protocol
    assert "dirty tree ‡: `lora-mt-lr5e-4` s1" in protocol
    own = five.split("#### Our own comparisons (no paper makes them)")[1]
    assert own.startswith("\n\n- Ours: MoRE above MTL-LoRA (why ours: neither paper compares")
    summary = section(text, "## What agrees with the papers and what does not")
    papers, ours = summary.split("**Our own comparisons, not a claim of either paper** (1):")
    assert "Ours: MoRE above MTL-LoRA" not in papers and "- Ours: MoRE above MTL-LoRA: `more-lr5e-4` − " in ours
    assert "MoRE (Table 2): MoRE above LoRA: `more-lr5e-4` − `lora-mt-lr5e-4`" in papers
    assert "\n  - Protocol: MiniLM with per-task heads, not T5-base with L_gen (+ λ L_con);" in papers
    ablation = text.split("## Grid `ablation-mtl-lora`")[1].split("\n## ")[0]
    assert "`main/mtl-lora-lr5e-4`: 3 of its cells started w_t otherwise than this grid's rows" in ablation
    assert "| main/mtl-lora-lr5e-4 [old init] | 3 |" in ablation and "| no-tau [old init] | 1 |" in ablation
    assert ("- w/o τ (`no-tau`): the paper 0.8895 vs 0.8996, its printed drop -0.0101; here -0.0100 "
            in ablation)                                                   # 0.49 - the old init's seed 0, 0.50
    assert f"MTL-LoRA τ = 1, n = 3, {OLD}; `main/mtl-lora-lr5e-4`: MTL-LoRA τ = 0.5, n = 3, {OLD}" in ablation
    single = text.split("### Single-task batches, lr 5e-4\n")[1].split("\n## ")[0]
    assert ("Not yet run: no cell of this table has finished: `python experiments/run.py experiments/grids/main.json "
            "--variants lora-mt-single-lr5e-4,more-single-lr5e-4`.") in single


def test_the_single_task_table_checks_mores_claim_under_its_own_batches(tmp_path):
    """Once the single-task cells exist, the table checks MoRE above LoRA on them, and its protocol
    line says the batches are single-task, as MoRE's Eq. 8 assumes."""
    cells = [rec("lora-mt-single-lr5e-4", s, 0.60 + s / 100, "lora", batches="single-task") for s in range(3)]
    cells += [rec("more-single-lr5e-4", s, 0.62 + s / 50, "more", batches="single-task") for s in range(3)]
    single = section(document(tmp_path, cells), "### Single-task batches, lr 5e-4")
    lines = single.splitlines()
    i = next(i for i, x in enumerate(lines) if x.startswith("- MoRE (Table 2): MoRE above LoRA (the paper: Table 2"))
    assert "`more-single-lr5e-4` − `lora-mt-single-lr5e-4` = +0.0300" in lines[i]      # (0.02 + 0.03 + 0.04) / 3
    assert "single-task batches, Eq. 7 sampler (as MoRE's Eq. 8 assumes)" in lines[i + 1]
    assert "Not yet run" not in single


def test_an_analysed_mtl_lora_runs_init_comes_from_the_analysis_or_its_cell():
    """The analysis' own record first; a probe file from before A.4's SVM predates the init change
    (old init, whatever the cell of that name holds now); else the cell that wrote the run."""
    old = rec("mtl-lora-lr5e-4", 0, 0.6, "mtl-lora")
    new = rec("mtl-lora-lr5e-4", 0, 0.6, "mtl-lora", method_options={"weights_init": "kaiming"})
    svm = {"classifier": "svm"}
    protos = Protocols([old])
    assert run_init(protos, "runs/main/mtl-lora-lr5e-4/s0", {"method": "mtl-lora"}, svm) == OLD      # its result file
    assert run_init(protos, "runs/elsewhere", {"method": "mtl-lora"}, svm) == "w_t init not recorded"
    assert run_init(protos, "runs/elsewhere", {"method": "mtl-lora", "options": {"weights_init": "kaiming"}},
                    svm) is None
    assert run_init(protos, "runs/main/mtl-lora-lr5e-4/s0", {"method": "lora"}, svm) is None
    assert run_init(Protocols([new]), "runs/main/mtl-lora-lr5e-4/s0", {"method": "mtl-lora"}, svm) is None
    assert run_init(Protocols([new]), "runs/main/mtl-lora-lr5e-4/s0", {"method": "mtl-lora"}, {}) == OLD


def test_an_init_split_row_appears_once_even_when_named():
    """The ablation table names its rows from the summary, old-init rows included: each once."""
    from experiments.replication.document import with_init_rows
    summary = {"no-tau": {}, "no-tau [old init]": {}, "n-1 [old init]": {}}
    assert with_init_rows(["no-tau", "no-tau [old init]", "n-1 [old init]"], summary) == \
        ["no-tau", "no-tau [old init]", "n-1 [old init]"]
    assert with_init_rows(["no-tau", "missing"], summary) == ["no-tau", "no-tau [old init]"]

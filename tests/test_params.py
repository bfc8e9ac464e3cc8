"""The papers' parameter tables from the public config.json files (tests/data), on the meta
device: MTL-LoRA Tables 1 and 2 and MoRE Tables 2 and 6, to the printed precision. Every count
is also checked against a formula written out here; what a paper prints and cannot be
reproduced is named in NOT_REPRODUCED (docs/PROTOCOLS.md says why), and the test checks that it
really is not, so the list stays honest."""
from pathlib import Path

import pytest

from mtlref.params import main, meta_model, table

CONFIGS = Path(__file__).resolve().parent / "data"
LLAMA, MPT, T5 = "llama-2-7b-hf.config.json", "mpt-7b.config.json", "t5-base.config.json"
L, C, FF, T = 32, 4096, 11008, 8          # LLaMA-2-7B and MPT-7B: layers, width; LLaMA FFN width; GLUE tasks


def row(config, preset, method, **kw):
    return table(CONFIGS / config, preset, [method], **kw)[0]


def test_base_sizes_are_the_released_models():
    for config, size in ((LLAMA, 6_738_415_616), (MPT, 6_649_286_656), (T5, 222_903_552)):
        model = meta_model(__import__("json").loads((CONFIGS / config).read_text()))
        assert sum(p.numel() for p in model.parameters()) == size, config


# ----------------------------------------------------------------------------- MTL-LoRA Table 1
# # Trainable (%) of LLaMA2-7B and MPT-7B on GLUE (Q, K, V, O; MPT's Q, K, V are row blocks of Wqkv).
TABLE1 = {"lora-st": 0.12, "lora": 0.24, "multilora": 0.38, "moelora": 0.24, "mtl-lora": 0.24}
QKVO = 4 * 2 * C                          # Σ (in + out) over Q, K, V, O of one layer
FORMULA1 = {"lora-st": T * L * 8 * QKVO,                                   # one rank-8 LoRA per task
            "lora": L * 16 * QKVO,                                         # LoRA-MT: rank 16
            "multilora": L * (3 * 8 * QKVO + 3 * 4 * C),                   # n=3 rank-8 branches + n scale vectors
            "moelora": L * (16 * QKVO + 4 * 64 * (8 + T)),                 # h(E + T) per module
            "mtl-lora": L * (8 * 4 * C + 3 * 8 * 4 * C + 4 * (T * 8 + T * 3))}   # A, n B's, diag Λ_t, w_t


@pytest.mark.parametrize("config", [LLAMA, MPT])
@pytest.mark.parametrize("method", list(TABLE1))
def test_mtl_lora_table_1(config, method):
    r = row(config, "mtl-lora-glue", method, nominal=7e9)
    assert r["trainable"] == FORMULA1[method]
    per_task = r["nominal_percent"] / (T if method == "lora-st" else 1)     # LoRA-ST is printed "0.12 x 8"
    assert round(per_task, 2) == TABLE1[method]


def test_table_1_divides_by_the_nominal_7b():
    """Against the real sizes (6.74B, 6.65B) LoRA-MT would print 0.25 and MultiLoRA 0.40."""
    for config in (LLAMA, MPT):
        assert round(row(config, "mtl-lora-glue", "lora")["percent"], 2) == 0.25
        assert round(row(config, "mtl-lora-glue", "multilora")["percent"], 2) == 0.40


# ----------------------------------------------------------------------------- MTL-LoRA Table 2
TABLE2 = {"lora": 0.83, "dora": 0.43, "multilora": 0.40, "moelora": 0.25, "mtl-lora": 0.25}
QKVUD = 3 * 2 * C + 2 * (C + FF)          # Q, K, V, Up, Down (the DoRA paper's targets)


@pytest.mark.parametrize("method", list(TABLE2))
def test_mtl_lora_table_2_commonsense(method):
    r = row(LLAMA, "mtl-lora-commonsense", method)
    formula = {"lora": L * 32 * QKVUD, "dora": L * (16 * QKVUD + 4 * C + FF),   # + magnitude, one per output
               "multilora": FORMULA1["multilora"], "moelora": FORMULA1["moelora"],
               "mtl-lora": FORMULA1["mtl-lora"]}[method]
    assert r["trainable"] == formula
    assert round(r["percent"], 2) == TABLE2[method]                       # here: % of the real 6.74B


# ----------------------------------------------------------------------------- MoRE Tables 2 and 6
ALL7 = 4 * 2 * C + 3 * (C + FF)           # LLaMA: Q, K, V, O, gate, up, down (MoRE's attention + FFN)


def test_more_table_2_llama_params_per_task():
    """MoRE Table 2 prints params/task = all adapter parameters / 8 tasks (2.5M for LoRA r=8)."""
    lora = row(LLAMA, "more-glue", "lora")
    assert lora["adapter"] == L * 8 * ALL7 and round(lora["per_task"] / 1e6, 1) == 2.5
    moelora = row(LLAMA, "more-glue", "moelora")
    assert moelora["adapter"] == L * (16 * ALL7 + 7 * 64 * (8 + T)) and round(moelora["per_task"] / 1e6) == 5
    # MoRE's 5M needs h = in_features (its official code) and counts the gate: Appendix B's 12Lr(m+d)
    official = row(LLAMA, "more-glue", "more", options=["official=true", "task_dim=none"])
    ins = 6 * C + FF                      # the modules' input widths: h of each task embedding and gate
    assert official["adapter"] == L * (8 * ALL7 + ins * (8 + T) + 7 * 8)
    assert round(official["per_task"] / 1e6) == 5
    assert official["trainable"] == official["adapter"] - L * (ins * 8 + 7 * 8)   # the official gate never trains


# (table, model, method, printed, ours, why) — MoRE Table 2 entries these counts do not give.
NOT_REPRODUCED = [
    ("more-glue", LLAMA, "more", 5.0, "with the paper's h = 768 (§5.4) MoRE has 2.8M/task; 5M needs h = in_features"),
    ("more-glue", LLAMA, "multilora", 10.0, "per-branch scale vectors give 10.7M; Table 6 counts one vector (6Ld)"),
    ("more-glue", LLAMA, "mixlora", 12.2, "8 experts of rank 8 on gate/up/down + attention LoRA give 12.8M"),
    ("more-glue", T5, "lora", 0.39, "the T5-base baselines' counts are the MPT paper's; q,k,v,o,wi,wo give 0.41M"),
    ("more-glue", T5, "more", 0.78, "h = 768 on both stacks gives 0.70M"),
    ("more-glue", T5, "multilora", 1.56, "n = 4 with per-branch scales gives 1.72M"),
    ("more-glue", T5, "moelora", 0.78, "rank 16, 8 experts, h = 64 give 0.84M"),
    ("more-glue", T5, "mixlora", 1.49, "gives 1.71M"),
]


@pytest.mark.parametrize("preset,config,method,printed,why", NOT_REPRODUCED)
def test_more_table_2_entries_that_cannot_be_reproduced(preset, config, method, printed, why):
    ours = row(config, preset, method)["per_task"] / 1e6
    decimals = 0 if printed == int(printed) and printed >= 5 else (1 if printed >= 2 else 2)
    assert round(ours, decimals) != printed, f"{method} on {config} now reproduces {printed}M: update the list"


def t5_modules(targets):
    """(in, out) of every T5-base projection of these kinds, encoder then decoder."""
    d, ff = 768, 3072
    enc = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "wi": (d, ff), "wo": (ff, d)}
    per_layer_enc = [enc[t] for t in targets]
    per_layer_dec = per_layer_enc + [enc[t] for t in targets if t in ("q", "k", "v", "o")]   # + cross-attention
    return 12 * per_layer_enc + 12 * per_layer_dec


def test_more_table_6_formulas_per_module():
    """Table 6, written per module (T5's modules are not all m x d): LoRA Σ r(m+d), MoELoRA
    Σ r(m+d) + h(n+T), MoRE Σ r(m+d) + h(r+T) + r (b_g of Eq. 2, which Table 6 leaves out);
    MultiLoRA Σ n r(m+d) + n·out: one scale vector per BRANCH, Table 6 counts one per module."""
    mods = t5_modules(["q", "k", "v", "o", "wi", "wo"])
    assert row(T5, "more-glue", "lora")["adapter"] == sum(8 * (i + o) for i, o in mods)
    assert row(T5, "more-glue", "moelora")["adapter"] == sum(16 * (i + o) + 64 * (8 + T) for i, o in mods)
    assert row(T5, "more-glue", "more")["adapter"] == sum(8 * (i + o) + 768 * (8 + T) + 8 for i, o in mods)
    multilora = row(T5, "more-glue", "multilora")["adapter"]
    assert multilora == sum(4 * 8 * (i + o) + 4 * o for i, o in mods)
    assert multilora - sum(4 * 8 * (i + o) + o for i, o in mods) == 3 * sum(o for _, o in mods)


def test_appendix_b_more_with_h_d_and_t_r_is_lora_rank_16():
    """'If the hidden dimension is set to be the same as d, the parameter count is 12Lr(m+d),
    exactly LoRA r=16' — on square modules (T5's attention), plus b_g."""
    more = row(T5, "more-glue", "more", targets="attention")
    lora16 = row(T5, "more-glue", "lora", targets="attention", rank=16)
    n_modules = len(t5_modules(["q", "k", "v", "o"]))
    assert more["adapter"] == lora16["adapter"] + 8 * n_modules


def test_the_cli_prints_one_row_per_method(capsys):
    rows = main(["--config", str(CONFIGS / LLAMA), "--preset", "mtl-lora-glue", "--nominal", "7e9"])
    out = capsys.readouterr().out
    assert [r["method"] for r in rows] == ["lora", "lora-st", "multilora", "moelora", "mtl-lora"]
    assert all(f"{r['trainable']:,}" in out for r in rows) and "0.382" in out

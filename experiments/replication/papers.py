"""What the two papers claim, where, and with which numbers: every claim the document checks names
the table (or figure) that makes it and quotes what that table prints for each side; the
comparisons no paper makes are kept apart (OWN_COMPARISONS). The papers' protocols, for the line
that says how ours differs. Sources: MoRE (Zhang et al.) and MTL-LoRA (Yang et al. 2024), as
printed; nothing here is a measurement of ours."""
from __future__ import annotations

from typing import NamedTuple


class Claim(NamedTuple):
    """A pair a paper orders: `variant` above `reference` (our variant names, before a table's
    suffix); `paper`: whose protocol it was made under ("more", "mtl-lora"; "" for our own);
    `text`: the claim with the table that makes it; `printed`: what that table prints per side."""
    variant: str
    reference: str
    paper: str
    text: str
    printed: str


PAPER_CLAIMS = [
    Claim("mtl-lora", "lora-mt", "mtl-lora", "MTL-LoRA (Tables 1, 3, 5): MTL-LoRA above LoRA-MT",
          "Table 1, GLUE average: LLaMA-2-7B 0.8996 vs 0.8887, MPT-7B 0.8950 vs 0.8893; Table 3, Ads AUC-ROC: "
          "LLaMA-2-7B 0.8771 vs 0.8722, MPT-7B 0.8762 vs 0.8650; Table 5 repeats Table 1's LLaMA-2-7B pair"),
    Claim("mtl-lora", "lora-st", "mtl-lora", "MTL-LoRA (Tables 1, 3): MTL-LoRA above LoRA-ST",
          "Table 1, GLUE average: LLaMA-2-7B 0.8996 vs 0.8748, MPT-7B 0.8950 vs 0.8729; Table 3, Ads AUC-ROC: "
          "LLaMA-2-7B 0.8771 vs 0.8714, MPT-7B 0.8762 vs 0.8712"),
    Claim("more", "lora-mt", "more", "MoRE (Table 2): MoRE above LoRA",
          "Table 2, GLUE average: T5-base 87.3 vs LoRA r = 8 85.1 and r = 16 85.6, LLaMA-2-7B 88.8 vs 87.8 (also "
          "Table 3, commonsense, LLaMA-2-7B: 82.7 vs 79.6); the paper does not say whether its LoRA trains the "
          "tasks together; ours is LoRA-MT"),
    Claim("more", "moelora", "more", "MoRE (Table 2): MoRE above MoELoRA",
          "Table 2, GLUE average: T5-base 87.3 vs 86.7, LLaMA-2-7B 88.8 vs 87.3 (Table 3: 82.7 vs 82.0)"),
    Claim("more", "multilora", "more", "MoRE (Table 2): MoRE above MultiLoRA",
          "Table 2, GLUE average: T5-base 87.3 vs 86.0, LLaMA-2-7B 88.8 vs 88.0 (Table 3: 82.7 vs 72.2)"),
    Claim("more", "mixlora", "more", "MoRE (Table 2): MoRE above MixLoRA",
          "Table 2, GLUE average: T5-base 87.3 vs 85.9, LLaMA-2-7B 88.8 vs 88.0 (Table 3: 82.7 vs 81.9)"),
    Claim("dora", "lora-mt", "dora", "MTL-LoRA (Tables 2, 4; the DoRA paper's numbers): DoRA above LoRA",
          "Table 2, commonsense, LLaMA-2-7B, tasks trained jointly: DoRA 80.5 vs LoRA 77.6; Table 4, VL-BART "
          "image-text: 77.4 vs 76.5; both rows marked † there, \"results from the original DoRA paper\" "
          "(Liu et al. 2024), not run by MTL-LoRA's authors; its Table 7 is hyper-parameters"),
]
# Comparisons the tables allow but neither paper makes (MoRE's tables have no MTL-LoRA row and
# MTL-LoRA's none of MoRE): listed apart from the claims, never in the papers' summary.
OWN_COMPARISONS = [
    Claim("more", "mtl-lora", "", "Ours: MoRE above MTL-LoRA",
          "neither paper compares the two (MoRE's tables have no MTL-LoRA row, MTL-LoRA's no MoRE row)"),
]


class Ablation(NamedTuple):
    """A paper's ablation table: its name, backbone, full method's GLUE average, and per ablated
    row (keyed by our variant) its label, its printed average and the drop it prints (None: the
    table prints no drop, only the row); digits: the averages' printed precision, as fractions."""
    paper: str
    name: str
    full: float
    rows: dict
    digits: int


PAPER_ABLATIONS = {
    # MTL-LoRA Table 5, LLaMA-2-7B (its A.3): the drops as printed; w/o Λ_t prints -0.0039 where
    # the rounded rows give -0.0040.
    "ablation-mtl-lora": Ablation("mtl-lora", "MTL-LoRA's Table 5 (LLaMA-2-7B, GLUE average)", 0.8996,
                                  {"no-task-lambda": ("w/o Λ_t", 0.8956, -0.0039),
                                   "no-tau": ("w/o τ", 0.8895, -0.0101),
                                   "n-1": ("n = 1", 0.8886, -0.0110)}, 4),
    # MoRE Table 5 names no backbone; its full row, 87.3, is Table 2's T5-base MoRE.
    "ablation-more": Ablation("more", "MoRE's Table 5 (GLUE average; its 87.3 is Table 2's T5-base MoRE)", 0.873,
                              {"no-linear-scaling": ("w/o linear scaling", 0.870, None),
                               "no-task-embedding": ("w/o task embeddings", 0.861, None),
                               "no-contrastive": ("w/o CL optimization", 0.863, None),
                               "no-ste": ("w/o STE", 0.864, None),
                               "random-sampling": ("w/ random sample", 0.862, None),
                               "subset-experts": ("w/ subset experts", 0.862, None)}, 3),
}
# MTL-LoRA's Ablation Study text, with Table 5's two rows.
N1_BELOW_LORA_MT = ("MTL-LoRA (Table 5 and its text): with n = 1 below LoRA-MT",
                    "Table 5, LLaMA-2-7B GLUE average: n = 1 0.8886 vs LoRA-MT 0.8887")

# MoRE Table 4 (T5-base fine-tuned on GLUE, then k-shot, accuracy averaged over 5 seeds):
# (task, k) -> (MoRE, LoRA). SciTail, its third task, is not in our few-shot grid.
TABLE4 = {("boolq", 4): (64.6, 64.2), ("boolq", 16): (66.2, 66.1), ("boolq", 32): (67.9, 67.4),
          ("cb", 4): (85.7, 84.3), ("cb", 16): (86.4, 85.7), ("cb", 32): (88.6, 87.1)}
FEWSHOT_CLAIM = "MoRE (Table 4): MoRE above LoRA after few-shot transfer"

# The analyses' claims (experiments/probe.py, embeddings.py): (text, what the paper prints).
# Per feature space of experiments/probe.py; Table 6 scores the adapters' own outputs (its A.4: "the
# output of different LoRA adapters from the final block"), Figure 1 draws the low- and full-rank spaces.
PROBE_CLAIMS = {
    "low": ("MTL-LoRA (Figure 1): MTL-LoRA's low-rank features tell the tasks apart better than LoRA-MT's",
            "Figure 1, t-SNE at the last block's O layer, LLaMA-2-7B on commonsense: LoRA blends the tasks in the "
            "low-rank space, MTL-LoRA separates them; no number"),
    "adapter": ("MTL-LoRA (Table 6): MTL-LoRA's adapter outputs tell the tasks apart better than LoRA-MT's",
                "Table 6, linear SVM (C = 1, one-vs-rest, 40/60, five split seeds) on the last block's adapter "
                "outputs, 14 Ads tasks, mean F1: LLaMA-2-7B 0.79 vs 0.39, MPT-7B 0.77 vs 0.39"),
    "full": ("MTL-LoRA (Figure 1): MTL-LoRA's full-rank features tell the tasks apart better than LoRA-MT's",
             "Figure 1, as above: in the full-rank space MTL-LoRA forms distinct task groups; no number (Table 6 "
             "scores the adapters' own outputs, not these)"),
}
EMBEDDING_CLAIMS = {
    "near": ("MoRE (Figure 2c): MRPC and QNLI cluster",
             "Figure 2c, PCA of the last layer's self-attention task embeddings (T5-base): no number"),
    "far": ("MoRE (Figure 2c): STS-B and CoLA lie far apart",
            "Figure 2c, as above: no number"),
}

# Each paper's protocol, for the line under a claim that says how ours differs (MoRE §5.1, Eq. 8-10;
# MTL-LoRA's Experiments section and its A.1-A.3).
PAPER_PROTOCOL = {
    "more": {"backbone": "T5-base with L_gen (+ λ L_con)", "batches": "single-task", "h": "768", "tau": "0.05",
             "budget": "5 epochs of 32, lr 3e-4", "budget_st": "5 epochs of 32, lr 3e-4"},
    "dora": {"backbone": "LLaMA-2-7B generating commonsense answers, VL-BART on image-text (the DoRA paper's "
                         "runs)"},
    "mtl-lora": {"backbone": "LLaMA-2-7B / MPT-7B with per-task heads", "batches": None,
                 "tau": "0.1 (LLaMA-2-7B) / 0.5 (MPT-7B) on GLUE", "n": "3",
                 "budget": "1 epoch of 8, lr 2e-4",
                 "budget_st": "1 epoch of 8, lr 2e-4; LoRA-ST 1 epoch (MRPC 5, RTE 10), lr 4e-4"},
}

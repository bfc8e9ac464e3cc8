"""The papers' hyperparameters, by name, so `--preset` runs a published setting.

A preset holds the settings common to its methods and `methods`: per method ("lora-st" for
`--single-task`) the values that differ, with `by_family` for values that differ per backbone
family. Flags override everything (mtlref/run.py: settings). Every value says where it comes
from: the paper's section, or "official code" where the paper is silent (then the other
reading is a flag away). docs/PROTOCOLS.md lists each experiment's command.

- `mtl-lora-glue`: MTL-LoRA Appendix A.1 (LLaMA2-7B / MPT-7B on GLUE, dev sets).
- `more-glue`: MoRE §5.1 + Appendix A (T5-base / LLaMA2-7B on GLUE, the paper's split).
- `mtl-lora-commonsense`: MTL-LoRA A.2 / Table 7; its LoRA and DoRA rows are the DoRA paper's.
- `cpu`: the default main job: MiniLM on all of GLUE within 15 minutes on 2 CPU cores.
"""
from __future__ import annotations

ATTENTION = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
             "mpt": ["Wqkv.q", "Wqkv.k", "Wqkv.v", "out_proj"],   # Q, K, V as row blocks of the fused Wqkv
             "t5": ["q", "k", "v", "o"], "bert": ["query", "key", "value", "attention.output.dense"]}
FFN = {"llama": ["gate_proj", "up_proj", "down_proj"], "mpt": ["up_proj", "down_proj"],
       "t5": ["wi", "wo"], "bert": ["intermediate.dense", "output.dense"]}
# DoRA's commonsense targets (Q, K, V, Up, Down: the DoRA paper, Table 1 of MTL-LoRA's Table 2 rows)
QKV_UP_DOWN = {"llama": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]}

# MTL-LoRA A.1 (GLUE). The paper gives rank, lr, epochs and the method's own sizes; it is silent
# on α and dropout: α = 2r as in its Table 7 (official code: --lora_alpha is passed per run),
# dropout 0.05 (the official scripts' default --lora_dropout).
_A1_METHODS = {
    "lora": dict(rank=16, alpha=32, lr=2e-4),                                    # LoRA-MT: r 16, lr 2e-4, 1 epoch
    "lora-st": dict(rank=8, alpha=16, lr=4e-4, task_epochs={"rte": 10, "mrpc": 5}),   # 1 epoch for the others
    "multilora": dict(rank=8, alpha=16, lr=2e-4, options=dict(num_loras=3)),
    "moelora": dict(rank=16, alpha=32, lr=2e-4, options=dict(num_experts=8, task_dim=64)),
    "mtl-lora": dict(rank=8, alpha=16, lr=2e-4, options=dict(num_up=3, tau=0.1),   # τ 0.1 for LLaMA2 ...
                     by_family={"mpt": dict(options=dict(tau=0.5))}),             # ... and 0.5 for MPT (A.1)
}
# MTL-LoRA Table 7 (commonsense, Q, K, V, O) for its own re-implementations ...
_TABLE7_METHODS = {
    "multilora": dict(rank=8, alpha=16, options=dict(num_loras=3)),
    "moelora": dict(rank=16, alpha=32, options=dict(num_experts=8, task_dim=64)),
    "mtl-lora": dict(rank=8, alpha=16, options=dict(num_up=3, tau=0.8)),
    # ... and the DoRA paper's LLaMA2-7B runs for LoRA (0.83 %) and DoRA (0.43 %, its half-rank DoRA†),
    # which MTL-LoRA Table 2 copies: Q, K, V, Up, Down; batch 16, 100 warm-up steps, cutoff 256
    # (the DoRA repository's llama2_7B_DoRA.sh; its README's lr per row).
    "lora": dict(rank=32, alpha=64, lr=3e-4, targets=QKV_UP_DOWN["llama"], batch_size=16, warmup_steps=100,
                 max_length=256, betas=(0.9, 0.999)),
    "dora": dict(rank=16, alpha=32, lr=2e-4, targets=QKV_UP_DOWN["llama"], batch_size=16, warmup_steps=100,
                 max_length=256, betas=(0.9, 0.999)),
}
# The methods MoRE Table 2 compares on T5-base, "tuned based on reported settings" (§5.1):
_MORE_METHODS = {
    # MoRE §5.4: h = 768; τ 0.05 and λ 0.1 are the preset's (§5.1)
    "more": dict(rank=8, options=dict(tau=0.05, task_dim=768)),
    "lora": dict(rank=8),                                           # LoRA r=8 (Table 2); --rank 16 for r=16
    "multilora": dict(rank=8, options=dict(num_loras=4)),           # 1.56M = 4 x LoRA r=8's 0.39M (Table 2)
    "moelora": dict(rank=16, options=dict(num_experts=8, task_dim=64)),   # 0.78M = LoRA r=16's; MTL-LoRA A.1's
    "mixlora": dict(rank=8, options=dict(num_experts=8, top_k=2)),  # MixLoRA's README configuration
}

PRESETS = {
    "mtl-lora-glue": dict(batch_size=8, epochs=1, weight_decay=0.0, warmup_ratio=0.0,  # A.1: AdamW, wd 0,
                          targets="attention", dropout=0.05, split="dev",           # linear decay, Q K V O,
                          max_length=256,        # not stated in the paper: long enough for GLUE's prompts
                          methods=_A1_METHODS),  # results "reported for the validation set" (Table 1)
    "more-glue": dict(batch_size=32, epochs=5, lr=3e-4, warmup_steps=500, max_length=128,   # §5.1
                      lambda_con=0.1,                                            # §5.1: λ = 0.1 (Eq. 10)
                      targets="attention+ffn",                                   # q, k, v, o, wi, wo (Appendix B)
                      sampler="more",                                            # Eq. 7
                      batches="single-task",         # Eq. 8: a batch "where all samples belong to the same task"
                      split="paper",                 # Appendix A: the Zhang et al. (2021) splits
                      eval_every=1000,               # official code (eval_steps 1000); best validation average
                      alpha=32, dropout=0.1, weight_decay=0.01,                  # official code (paper silent)
                      methods=_MORE_METHODS),
    "mtl-lora-commonsense": dict(batch_size=8, epochs=3, lr=3e-4, warmup_ratio=0.03, betas=(0.9, 0.95),  # Table 7
                                 weight_decay=0.0, max_length=512, targets="attention",
                                 dropout=0.05,       # LLM-Adapters' and DoRA's scripts (--lora_dropout 0.05)
                                 methods=_TABLE7_METHODS),
    "cpu": dict(batch_size=32, max_steps=1000, lr=2e-3, head_lr=5e-3, warmup_ratio=0.06, max_length=128,
                targets="attention+ffn", sampler="more", methods={}),
}


def resolve_targets(spec: str | list[str], family: str) -> list[str]:
    """'attention' | 'ffn' | 'attention+ffn' | a comma list of slot names."""
    if isinstance(spec, list):
        return spec
    if spec in ("attention", "ffn", "attention+ffn"):
        return (ATTENTION[family] if "attention" in spec else []) + (FFN[family] if "ffn" in spec else [])
    return [s for s in spec.split(",") if s]

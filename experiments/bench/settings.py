"""What the bench measures: its configuration, each method as the papers' comparisons run it,
and the costs the papers report and we aim for."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BenchConfig:
    model: str                                        # a checkpoint directory (load_model), or a
                                                      # config.json: random weights built on the device
    device: str = "cpu"
    dtype: str = "float32"                            # the frozen base's dtype; adapters are fp32
    batch_size: int = 16
    seq_len: int = 128
    targets: str = "attention+ffn"                    # presets.resolve_targets
    num_tasks: int = 8
    repeats: int = 7
    warmup: int = 2
    infer_batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    infer_repeats: int = 7                            # rounds per batch size (after one untimed)
    memory_steps: int = 2                             # steps per memory subprocess (the 1st allocates AdamW state)
    threads: int = 0                                  # torch threads; 0 = torch's default
    seed: int = 0


# Each method as the papers' comparisons run it (presets: MTL-LoRA Appendix A.1 for the
# baselines, MoRE §5.1): rank, alpha and the method's own options.
METHODS = {
    "lora": dict(rank=8, alpha=16),
    "dora": dict(rank=8, alpha=16),
    "multilora": dict(rank=8, alpha=16, num_loras=3),
    "moelora": dict(rank=16, alpha=32, num_experts=8, task_dim=64),
    "mixlora": dict(rank=8, alpha=16, num_experts=8, top_k=2),
    "mtl-lora": dict(rank=8, alpha=16, num_up=3, tau=0.5),
    "more": dict(rank=8, alpha=16, tau=0.05),
    # the methods that came after both papers, at the same rank and their own defaults
    "poly": dict(rank=8, alpha=16, num_skills=4, num_splits=1),
    "hydralora": dict(rank=8, alpha=16, num_heads=4),
    "moslora": dict(rank=8, alpha=16, mixer_init="kaiming"),
}
FLOOR = "floor"
# Training-step time relative to LoRA in MoRE's comparison (MoRE paper).
PAPER_VS_LORA = {"more": 1.6, "multilora": 2.9, "moelora": 3.6, "mixlora": 4.2}
# Our targets: (reference, the most a step may cost relative to it). LoRA ≤ 1.10 × the floor
# (runs before 2026-12-01 were judged against 1.15, docs/bench/minilm-cpu.json among them).
TARGETS = {"lora": (FLOOR, 1.10), "mtl-lora": ("lora", 1.15), "more": ("lora", 1.2),
           "multilora": ("lora", 1.3), "moelora": ("lora", 1.4), "mixlora": ("lora", 2.0)}

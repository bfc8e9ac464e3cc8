"""MultiLoRA (Wang et al. 2023): n parallel LoRAs, each with its own learnable scaling.

    ΔY = s · Σ_i scale_i ⊙ (B_i A_i x),   s = α/r
lora_A [n, r, in], lora_B [n, out, r], lora_scale [n, out]: one learnable per-output scaling
vector per branch, so a module holds n·r·(in+out) + n·out parameters.
Init (MultiLoRA's paper starts the scaling factors at zero; official code: the MultiLoRA
baseline of the MTL-LoRA authors): every A_i AND every B_i Kaiming-uniform(a=√5), i.e.
nn.Linear's default U(-1/√fan_in, 1/√fan_in) with fan_in the last dim (in for A_i, r for
B_i), each drawn independently, and scale_i = 0. ΔW = 0 at init because the scales are zero
(zero_init = lora_scale), not because B is; A and B then receive no gradient at step 0, the
scales do.
Parameter count. MoRE Table 6 prints 6nLr(m+d) + 6Ld, i.e. ONE d-wide scaling vector per
module; per-branch scaling gives n·out per module instead. MTL-LoRA Table 1's 0.38 % is
reproduced with per-branch vectors: LLaMA-2-7B, n = 3, r = 8 on Q,K,V,O (32 layers, 4096 ->
4096): 128 · 3·8·8192 = 25.17M plus 128 · 3·4096 = 1.57M, 26.74M = 0.382 % of 7·10⁹ (one
vector per module would give 25.69M = 0.367 %).
Fast path: each branch's scale is folded into its up-projection, B_i' = s·diag(scale_i)·B_i
(out·r numbers, small), and the n branches run as one concatenated rank-(n·r) product:
[A_1; ...; A_n] is (n·r, in) and [B_1' ... B_n'] is (out, n·r): one GEMM down, one up.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtlref.adapters.base import Adapter, lora_a_init, up_project
from mtlref.layers import AdaptedLinear, ForwardContext


class MultiLoRA(Adapter):
    method = "multilora"
    options = {"num_loras": 3}
    format_1_options = {"num_loras": 3}
    zero_init = ("lora_scale",)

    def __init__(self, base: AdaptedLinear, num_tasks: int, rank: int, alpha: float,
                 dropout: float = 0.0, num_loras: int = 3):
        super().__init__(base, num_tasks, rank, alpha, dropout)
        if num_loras < 1:
            raise ValueError(f"multilora: num_loras must be >= 1, got {num_loras}")
        self.num_loras = n = num_loras
        dev = self.device_of(base)
        self.lora_A = nn.Parameter(lora_a_init(n, rank, self.in_features, device=dev))    # U(±1/√in)
        self.lora_B = nn.Parameter(lora_a_init(n, self.out_features, rank, device=dev))   # U(±1/√r), official code
        self.lora_scale = nn.Parameter(torch.zeros(n, self.out_features, device=dev))    # scale_i = 0

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A_cat (n·r, in) and B'_cat (out, n·r) with B_i' = s·diag(scale_i)·B_i, branch i
        owning rank columns i·r:(i+1)·r."""
        n, r = self.num_loras, self.rank
        A = self.lora_A.reshape(n * r, self.in_features)
        B = self.lora_B * (self.scaling * self.lora_scale)[:, :, None]     # (n, out, r) s·diag(scale_i)·B_i
        return A, B.permute(1, 0, 2).reshape(self.out_features, n * r)

    def forward(self, x: torch.Tensor, y: torch.Tensor, ctx: ForwardContext, base: AdaptedLinear) -> torch.Tensor:
        A, B = self.stacked()
        return up_project(F.linear(self.dropout(x.to(A.dtype)), A), B).to(y.dtype)   # s Σ_i scale_i ⊙ B_i A_i x

    def delta_weight(self, task_id: int, base: AdaptedLinear) -> torch.Tensor:
        self.check_task(task_id)
        A, B = self.stacked()
        return B @ A                                                         # s Σ_i diag(scale_i) B_i A_i  (out, in)

    def as_lora(self, task_id: int, base: AdaptedLinear) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_task(task_id)
        return self.stacked()                                                # rank n·r, s·scale_i in B

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_loras={self.num_loras}"

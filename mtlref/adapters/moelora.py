"""MoE-LoRA (Liu et al. 2023, MOELoRA), as the MTL-LoRA baselines and MoRE Table 6 use it.

E experts of rank r/E and a task-level gate per module:
    g_t = softmax(W_gate e_t)              (E,)  e_t a learned task embedding, no bias
    ΔY  = s · Σ_e g_{t,e} B_e A_e x        s = α/r
task_embedding [T, h] (N(0, 1), nn.Embedding's default), gate = Linear(h -> E, bias=False)
(nn.Linear's default init), lora_A [r, in] and lora_B [out, r] where expert e owns the rank
rows/columns e·r/E:(e+1)·r/E. Init as the official code (MOELoRA-peft): every expert's A
~ N(0, 0.01²) (std 0.01), B = 0, so ΔW = 0 at init.
A module holds r(in+out) + h(E+T) parameters: the 6Lr(m+d) + 6Lh(n+T) of MoRE Table 6 (n = E).
The E experts are one rank-r product whose rank columns are scaled per sample by g_t, each
weight repeated r/E times: no loop over experts.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtlref.adapters.base import Adapter, gather, per_sample, up_project
from mtlref.layers import AdaptedLinear, ForwardContext


class MoELoRA(Adapter):
    method = "moelora"
    options = {"num_experts": 8, "task_dim": 64}
    format_1_options = {"num_experts": 8, "task_dim": 64}
    zero_init = ("lora_B",)
    task_specific = True
    task_tensors = ("task_embedding",)

    def __init__(self, base: AdaptedLinear, num_tasks: int, rank: int, alpha: float,
                 dropout: float = 0.0, num_experts: int = 8, task_dim: int = 64):
        super().__init__(base, num_tasks, rank, alpha, dropout)
        if num_experts < 1 or rank % num_experts:
            raise ValueError(f"moelora: rank {rank} must be a multiple of num_experts {num_experts} "
                             f"(each expert has rank r/E); e.g. rank=16 with num_experts=8")
        self.num_experts, self.task_dim = num_experts, task_dim
        dev = self.device_of(base)
        A = torch.empty(rank, self.in_features, device=dev, dtype=torch.float32)
        self.lora_A = nn.Parameter(A.normal_(0.0, 0.01))                     # official code: N(0, 0.01²)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev))
        self.task_embedding = nn.Parameter(torch.randn(num_tasks, task_dim, device=dev))
        self.gate = nn.Linear(task_dim, num_experts, bias=False, device=dev, dtype=torch.float32)

    def rank_weights(self) -> torch.Tensor:
        """g_t repeated r/E times per expert, for every task: (T, r), fp32."""
        g = torch.softmax(self.gate(self.task_embedding).float(), dim=-1)     # (T, E)
        return g.repeat_interleave(self.rank // self.num_experts, dim=-1)    # (T, r)

    def forward(self, x: torch.Tensor, y: torch.Tensor, ctx: ForwardContext, base: AdaptedLinear) -> torch.Tensor:
        t = self.task_ids(ctx, x)
        z = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)    # (..., r) all experts' A_e x
        z = z * per_sample(self.scaling * gather(self.rank_weights(), t), z)        # scale expert e's columns by s·g_{t,e}
        return up_project(z, self.lora_B).to(y.dtype)                       # (..., out)

    def delta_weight(self, task_id: int, base: AdaptedLinear) -> torch.Tensor:
        t = self.check_task(task_id)
        return self.scaling * (self.lora_B * self.rank_weights()[t]) @ self.lora_A   # (out, in)

    def as_lora(self, task_id: int, base: AdaptedLinear) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.check_task(task_id)
        return self.lora_A, self.lora_B * (self.scaling * self.rank_weights()[t])   # s·g_t folded into B

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_experts={self.num_experts}, task_dim={self.task_dim}"

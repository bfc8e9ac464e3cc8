"""HydraLoRA (Tian et al., NeurIPS 2024, "HydraLoRA: An Asymmetric LoRA Architecture for
Efficient Fine-Tuning"): one shared down-projection A and N up-projections ("heads") B_i,
mixed per token by a router that reads the layer's input:

    π(x) = softmax(W_g x)                   (..., N)   fp32
    h    = W x + s · Σ_i π_i(x) B_i A x,    s = α/r
lora_A [r, in]       A, shared, Kaiming-uniform(a=√5)
lora_B [N, out, r]   B_i, the heads, zero (ΔW = 0 at init)
router [N, in]       W_g, no bias, Kaiming-uniform(a=√5), i.e. U(±1/√in)
A module holds r·in + N·r·out + N·in parameters. No task ids anywhere: the router sees only
the token, so this is the task-agnostic mixture next to the task-conditioned methods.
Settings the paper leaves to its official code, followed here: the router reads x itself (not
the dropped-out x that A reads), its softmax is taken in fp32, and the number of heads is the
official run script's 4 (num_heads; the script says it is chosen per dataset, e.g. by k-means
over the data). The official layer also carries an optional balance term on the router, off
(weight 0) by default there; it is not implemented here.
Not mergeable, and not exportable as a LoRA: the mix of the B_i changes from token to token
(export refuses it, as it refuses MixLoRA's FFN experts).
One GEMM for all heads: Σ_i π_i B_i z = [B_1 … B_N] (π ⊗ z), the N heads as one rank-N·r
up-projection on the per-token columns π_i z; no loop over heads.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtlref.adapters.base import Adapter, lora_a_init, up_project
from mtlref.layers import AdaptedLinear, ForwardContext


class HydraLoRA(Adapter):
    method = "hydralora"
    options = {"num_heads": 4}
    format_1_options = {"num_heads": 4}
    zero_init = ("lora_B",)
    mergeable = False
    export_refusal = ("hydralora mixes its up-projections with weights a router computes for every token, "
                      "which no LoRA can write")

    def __init__(self, base: AdaptedLinear, num_tasks: int, rank: int, alpha: float, dropout: float = 0.0,
                 num_heads: int = 4):
        super().__init__(base, num_tasks, rank, alpha, dropout)
        if num_heads < 1:
            raise ValueError(f"hydralora: num_heads must be >= 1, got {num_heads}")
        self.num_heads = num_heads
        dev = self.device_of(base)
        self.lora_A = nn.Parameter(lora_a_init(rank, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(num_heads, self.out_features, rank, device=dev))
        W = torch.empty(num_heads, self.in_features, device=dev, dtype=torch.float32)
        self.router = nn.Parameter(nn.init.kaiming_uniform_(W, a=math.sqrt(5)))   # official code

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """π(x) = softmax(W_g x) per token: (..., N), fp32."""
        return torch.softmax(F.linear(x.to(self.router.dtype), self.router).float(), dim=-1)

    def forward(self, x: torch.Tensor, y: torch.Tensor, ctx: ForwardContext, base: AdaptedLinear) -> torch.Tensor:
        pi = self.route(x)                                                    # (..., N)
        z = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)     # A x  (..., r)
        # n head, r rank: the per-token columns s π_n z, (..., N·r), against [B_1 … B_N] (out, N·r)
        zz = (self.scaling * pi.unsqueeze(-1) * z.unsqueeze(-2)).flatten(-2)
        heads = self.lora_B.permute(1, 0, 2).reshape(self.out_features, -1)
        return up_project(zz, heads).to(y.dtype)                             # (..., out)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_heads={self.num_heads}"

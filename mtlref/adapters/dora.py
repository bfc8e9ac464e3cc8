"""DoRA (Liu et al. 2024): weight-decomposed low-rank adaptation.

    W' = m ⊙ V / ‖V‖_c,   V = W + s B A,   s = α/r
m [out] is the magnitude, initialised to the row norms ‖W‖_c of the base weight (norm over
the input dim, one per output channel), so W' = W at init; ‖V‖_c is treated as a constant
in the backward (DoRA §4.3: detached), which is what saves its memory. The bias is unchanged.

Dropout, as peft applies it (peft's lora.Linear + DoraLinearLayer): with xd = dropout(x),
ONE mask shared by both terms, the output is y + W' xd - W xd, i.e.
    ΔY = (m/‖V‖ - 1) ⊙ (W xd) + (m/‖V‖) ⊙ s B A xd
which costs one extra F.linear(xd, W) while training with dropout (peft does the same: it
passes base_result=None and recomputes W xd). When dropout is off (p = 0, or eval mode) xd = x and W x = y - b is
already there, so no second full GEMM: ΔY = (m/‖V‖ - 1) ⊙ (y - b) + (m/‖V‖) ⊙ s B A x
(peft reuses the base result the same way).
At init B = 0 and m = ‖W‖_c are computed by the same op, so m/‖V‖ = 1 and ΔY = 0 up to
rounding: we measure max|ΔY| = 0 on CPU fp32 and the tests allow 1e-6 (exact_zero_init=False
because a different reduction order on another device may give ±1 ulp in the norm).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtlref.adapters.base import Adapter, lora_a_init, up_project
from mtlref.layers import AdaptedLinear, ForwardContext


class DoRA(Adapter):
    method = "dora"
    format_1_options = {}
    zero_init = ()
    exact_zero_init = False

    def __init__(self, base: AdaptedLinear, num_tasks: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, num_tasks, rank, alpha, dropout)
        dev = self.device_of(base)
        self.lora_A = nn.Parameter(lora_a_init(rank, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev))
        with torch.no_grad():
            self.magnitude = nn.Parameter(self.column_norm(base))              # (out,) = ‖W‖_c

    def column_norm(self, base: AdaptedLinear) -> torch.Tensor:
        """‖W + s B A‖_c [out], computed once per forward, without gradient (DoRA §4.3)."""
        with torch.no_grad():
            V = base.weight.float() + self.scaling * (self.lora_B @ self.lora_A)   # (out, in)
            return V.norm(dim=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor, ctx: ForwardContext, base: AdaptedLinear) -> torch.Tensor:
        ratio = self.magnitude / self.column_norm(base)                        # (out,) m / ‖V‖
        xd = self.dropout(x.to(self.lora_A.dtype))                             # one mask for both terms
        if self.training and isinstance(self.dropout, nn.Dropout):
            # W xd in the base's dtype (the precision y itself was computed in), as fp32
            wx = F.linear(xd.to(base.weight.dtype), base.weight).float()       # (..., out) W dropout(x)
        else:
            wx = y.float() if base.bias is None else y.float() - base.bias.float()   # (..., out) W x = y - b
        B = self.lora_B * (ratio * self.scaling)[:, None]                      # (m/‖V‖)·s·B  (out, r), small
        bax = up_project(F.linear(xd, self.lora_A), B)                         # (m/‖V‖)·s·B A xd
        return torch.addcmul(bax, wx, ratio - 1).to(y.dtype)                  # + (m/‖V‖ - 1) ⊙ W xd

    def as_lora(self, task_id: int, base: AdaptedLinear) -> tuple[torch.Tensor, torch.Tensor]:
        """A and s·B: with the magnitude m, W' = m ⊙ (W + (sB) A) / ‖W + (sB) A‖_c, as peft's DoRA."""
        self.check_task(task_id)
        return self.lora_A, self.scaling * self.lora_B

    def lora_entry(self, task_id: int, base: AdaptedLinear) -> dict[str, torch.Tensor]:
        """A, s·B and the magnitude m [out] (peft's lora_magnitude_vector)."""
        return {**super().lora_entry(task_id, base), "magnitude": self.magnitude.detach().float().clone()}

    def delta_weight(self, task_id: int, base: AdaptedLinear) -> torch.Tensor:
        self.check_task(task_id)
        V = base.weight.float() + self.scaling * (self.lora_B @ self.lora_A)       # (out, in)
        return (self.magnitude / V.norm(dim=1))[:, None] * V - base.weight.float()  # W' - W

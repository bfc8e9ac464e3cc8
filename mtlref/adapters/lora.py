"""LoRA (Hu et al. 2022; MTL-LoRA Eq. 3): h = W x + (α/r) B A x.

lora_A [r, in] Kaiming-uniform(a=√5), lora_B [out, r] = 0, so ΔW = 0 at init.
per_task=True holds one independent adapter per task, lora_A [T, r, in] and lora_B [T, out, r],
picked per sample by task id: LoRA-ST's adapters, which --single-task trains each alone
(mtlref/run.py) and then stacks into this form, served together on mixed-task batches.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtlref.adapters.base import Adapter, gather, lora_a_init, up_project
from mtlref.layers import AdaptedLinear, ForwardContext


class LoRA(Adapter):
    method = "lora"
    options = {"per_task": False}
    format_1_options = {"per_task": False}
    zero_init = ("lora_B",)

    def __init__(self, base: AdaptedLinear, num_tasks: int, rank: int, alpha: float,
                 dropout: float = 0.0, per_task: bool = False):
        super().__init__(base, num_tasks, rank, alpha, dropout)
        self.per_task = bool(per_task)
        self.task_specific = self.per_task
        self.task_tensors = ("lora_A", "lora_B") if self.per_task else ()
        lead = (num_tasks,) if self.per_task else ()
        dev = self.device_of(base)
        self.lora_A = nn.Parameter(lora_a_init(*lead, rank, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(*lead, self.out_features, rank, device=dev))

    def forward(self, x: torch.Tensor, y: torch.Tensor, ctx: ForwardContext, base: AdaptedLinear) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.dtype))
        if not self.per_task:
            # the scaling is applied to the r-wide A x, not to the out-wide result
            return up_project(F.linear(x, self.lora_A) * self.scaling, self.lora_B).to(y.dtype)   # (..., out)
        t = self.task_ids(ctx, x)
        # b sample, r rank, i in, o out; A[t] (B, r, in), B[t] (B, out, r)
        z = torch.einsum("b...i,bri->b...r", x, gather(self.lora_A, t))
        d = torch.einsum("b...r,bor->b...o", z, gather(self.lora_B, t))
        return (self.scaling * d).to(y.dtype)

    def delta_weight(self, task_id: int, base: AdaptedLinear) -> torch.Tensor:
        t = self.check_task(task_id)
        A, B = (self.lora_A[t], self.lora_B[t]) if self.per_task else (self.lora_A, self.lora_B)
        return self.scaling * (B @ A)                                        # (out, in)

    def as_lora(self, task_id: int, base: AdaptedLinear) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.check_task(task_id)
        A, B = (self.lora_A[t], self.lora_B[t]) if self.per_task else (self.lora_A, self.lora_B)
        return A, self.scaling * B                                           # s folded into B

    def extra_repr(self) -> str:
        return super().extra_repr() + (", per_task=True" if self.per_task else "")

"""MoSLoRA (Wu et al. 2024, "Mixture-of-Subspaces in Low-Rank Adaptation"):

    h = W x + s · B M A x,    s = α/r
lora_A [r, in]      A, the down-projection, Kaiming-uniform(a=√5) (LoRA's)
lora_mixer [r, r]   M, the learnable mixer that fuses the r rank-one subspaces B[:, i] A[i, :]
                    (LoRA is the case M = I, fixed)
lora_B [out, r]     B, the up-projection, zero, so ΔW = 0 at init
A module holds r(in + out) + r² parameters. No task ids: one adapter for every task, like
LoRA-MT, so beside MTL-LoRA (whose Λ_t sits in the same place, A → r×r → B, but per task) it
shows what the task-specific part buys. Mergeable: ΔW = s B M A, exported as the rank-r LoRA
(A' = M A, B' = s B).
Mixer init. The paper is silent in its equations; the official code draws M Kaiming-uniform
(a=√5), i.e. U(±1/√r), the default mixer_init="kaiming". The official code also lists, unused,
orthogonal, Xavier, normal, zero and identity inits; two of them are switches here:
  mixer_init="orthogonal"   M orthogonal (nn.init.orthogonal_): M A spans A's rows at A's scale
  mixer_init="identity"     M = I: exactly LoRA at init, a LoRA whose mixer then learns
(a zero M is not offered: with B = 0 as well, neither receives a gradient, ever).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtlref.adapters.base import Adapter, lora_a_init, up_project
from mtlref.layers import AdaptedLinear, ForwardContext

MIXER_INITS = ("kaiming", "orthogonal", "identity")


class MoSLoRA(Adapter):
    method = "moslora"
    options = {"mixer_init": "kaiming"}
    format_1_options = {"mixer_init": "kaiming"}
    zero_init = ("lora_B",)

    def __init__(self, base: AdaptedLinear, num_tasks: int, rank: int, alpha: float, dropout: float = 0.0,
                 mixer_init: str = "kaiming"):
        super().__init__(base, num_tasks, rank, alpha, dropout)
        if mixer_init not in MIXER_INITS:
            raise ValueError(f"moslora: mixer_init must be one of {MIXER_INITS}, got {mixer_init!r}")
        self.mixer_init = mixer_init
        dev = self.device_of(base)
        self.lora_A = nn.Parameter(lora_a_init(rank, self.in_features, device=dev))
        M = torch.empty(rank, rank, device=dev, dtype=torch.float32)
        if mixer_init == "kaiming":
            nn.init.kaiming_uniform_(M, a=math.sqrt(5))                        # official code: U(±1/√r)
        elif mixer_init == "orthogonal":
            nn.init.orthogonal_(M)
        else:
            nn.init.eye_(M)
        self.lora_mixer = nn.Parameter(M)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev))

    def forward(self, x: torch.Tensor, y: torch.Tensor, ctx: ForwardContext, base: AdaptedLinear) -> torch.Tensor:
        z = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)     # A x     (..., r)
        z = F.linear(z, self.lora_mixer) * self.scaling                      # s M A x (..., r)
        return up_project(z, self.lora_B).to(y.dtype)                        # s B M A x (..., out)

    def delta_weight(self, task_id: int, base: AdaptedLinear) -> torch.Tensor:
        self.check_task(task_id)
        return self.scaling * self.lora_B @ self.lora_mixer @ self.lora_A     # (out, in)

    def as_lora(self, task_id: int, base: AdaptedLinear) -> tuple[torch.Tensor, torch.Tensor]:
        """A' = M A (r, in) and B' = s B (out, r): the mixer folded into the down-projection."""
        self.check_task(task_id)
        return self.lora_mixer @ self.lora_A, self.scaling * self.lora_B

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mixer_init={self.mixer_init}"

"""MoRE (Zhang et al.): mixture of low-rank experts, rank r_t chosen per task.

Per module: lora_A [r, in] and lora_B [out, r] (LoRA init), task_embedding [T, h]
(Kaiming-uniform, §4.1) and gate = Linear(h -> r) with bias (W_g, b_g of Eq. 2).
    p_t   = softmax(W_g e_t + b_g)                      Eq. 2, (T, r), fp32, all tasks at once
    r_t   = argmax p_t + 1                               Eq. 3, rank expert = A[:r_t], B[:, :r_t]
    Ste(p)= p + sg(onehot(p) - p)                       Eq. 4
    ΔY    = Ste(p_t)[r_t] · (r_t/|T|) · s · B_t A_t x   Eq. 5-6, s = α/r (the usual LoRA scaling,
                                                        on top of the paper's linear scaling)
Eq. 4 is written onehot + (p - sg(p)): the same value and gradient, but the forward value
is exactly 1.0 (p + (1 - p) may round to 0.99999994), so ΔY equals the truncated LoRA exactly
while the backward reaches the gate and the task embeddings. The prefix A[:r_t], B[:, :r_t]
is a per-sample mask over the r rank columns (no loop over tasks).
The official code fixes the task -> rank map at the first forward, so its gate never trains;
here p_t is recomputed every forward and `rank_map()` reads the current gate.
Eq. 8 (contrastive, on while training when ctx collects aux losses): h_i = ctx.pooled(x),
the mean of this module's input over the sample's real tokens. It is the representation of
x_i that this module sees, and it lives in the space of e_t when task_dim = in_features, so
sim = cos(h_i, e_k) is defined. The printed Eq. 8 is a mean log-likelihood; we minimise its
negative, L_con = -(1/N) Σ_i log softmax_k(sim(h_i, e_k)/τ)[t_i], as "more_contrastive".
h_i is detached by default (detach_h=True): §4.3 brings in L_con because "there is no
supervised signal for task embedding learning", so it trains e_t (and through e_t the gate),
not the layers that produced x. With detach_h=False the loss also pulls every adapted
module's input towards its task's cluster; on the default GLUE job that reading scored
0.629 vs 0.660 and collapsed at α = 64 (docs/RESULTS.md).
A module holds r(in+out) + h(r+T) + r parameters: Table 6's 6Lr(m+d) + 6Lh(r+T) plus b_g.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtlref.adapters.base import Adapter, lora_a_init, per_sample
from mtlref.layers import AdaptedLinear, ForwardContext


class MoRE(Adapter):
    method = "more"
    options = ("task_dim", "contrastive", "tau", "linear_scaling", "detach_h")
    zero_init = ("lora_B",)
    task_specific = True

    def __init__(self, base: AdaptedLinear, num_tasks: int, rank: int, alpha: float, dropout: float = 0.0,
                 task_dim: int | None = None, contrastive: bool = True, tau: float = 0.05,
                 linear_scaling: bool = True, detach_h: bool = True):
        super().__init__(base, num_tasks, rank, alpha, dropout)
        self.task_dim = self.in_features if task_dim is None else int(task_dim)
        if contrastive and self.task_dim != self.in_features:
            raise ValueError(f"more: the contrastive loss (Eq. 8) compares e_t with the module input, so "
                             f"task_dim ({self.task_dim}) must equal in_features ({self.in_features}); "
                             "leave task_dim unset or pass contrastive=False")
        self.contrastive, self.tau, self.linear_scaling = bool(contrastive), float(tau), bool(linear_scaling)
        self.detach_h = bool(detach_h)
        dev = self.device_of(base)
        self.lora_A = nn.Parameter(lora_a_init(rank, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev))
        self.task_embedding = nn.Parameter(torch.empty(num_tasks, self.task_dim, device=dev))
        nn.init.kaiming_uniform_(self.task_embedding, a=math.sqrt(5))
        self.gate = nn.Linear(self.task_dim, rank, bias=True, device=dev, dtype=torch.float32)

    def probs(self) -> torch.Tensor:
        """p_t for every task (Eq. 2): (T, r), fp32."""
        return torch.softmax(self.gate(self.task_embedding).float(), dim=-1)

    def rank_map(self) -> torch.Tensor:
        """r_t = argmax p_t + 1 for every task, from the current gate: LongTensor[T]."""
        with torch.no_grad():
            return self.probs().argmax(dim=-1) + 1

    def rank_columns(self) -> torch.Tensor:
        """Per task, the weight of each rank column (T, r): Ste(p_t)[r_t] · (r_t/|T|) · s on the
        first r_t columns, 0 on the rest. Its forward value depends on p only through r_t."""
        p = self.probs()                                                     # (T, r)
        k = p.argmax(dim=-1)                                                 # (T,) = r_t - 1
        ste = F.one_hot(k, self.rank).to(p.dtype) + (p - p.detach())         # Eq. 4
        coef = ste.gather(1, k[:, None]).squeeze(1)                          # Ste(p_t)[r_t], value 1.0
        r_t = (k + 1).to(p.dtype)
        scale = coef * (r_t / self.num_tasks if self.linear_scaling else 1.0) * self.scaling   # Eq. 6
        prefix = (torch.arange(self.rank, device=p.device) < r_t[:, None]).to(p.dtype)          # (T, r)
        return prefix * scale[:, None]

    def forward(self, x: torch.Tensor, y: torch.Tensor, ctx: ForwardContext, base: AdaptedLinear) -> torch.Tensor:
        t = self.task_ids(ctx, x)
        xf = x.to(self.lora_A.dtype)
        z = F.linear(self.dropout(xf), self.lora_A)                          # A x  (..., r)
        z = z * per_sample(self.rank_columns()[t], z)                        # keep the first r_t columns
        if self.contrastive and self.training and ctx.aux_losses is not None:
            h = ctx.pooled(xf)
            ctx.add_loss("more_contrastive", self.contrastive_loss(h.detach() if self.detach_h else h, t))
        return F.linear(z, self.lora_B).to(y.dtype)                          # (..., out)

    def contrastive_loss(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Eq. 8, negated: h (N, in) pooled inputs, t (N,) their tasks."""
        sim = F.normalize(h, dim=-1) @ F.normalize(self.task_embedding, dim=-1).T   # (N, T) cosine
        return F.cross_entropy(sim / self.tau, t)

    def delta_weight(self, task_id: int, base: AdaptedLinear) -> torch.Tensor:
        t = self.check_task(task_id)
        cols = self.rank_columns()[t]                                        # (r,)
        return (self.lora_B * cols) @ self.lora_A                            # (out, in)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", task_dim={self.task_dim}, tau={self.tau:g}, "
                                       f"contrastive={self.contrastive}, detach_h={self.detach_h}, "
                                       f"linear_scaling={self.linear_scaling}")

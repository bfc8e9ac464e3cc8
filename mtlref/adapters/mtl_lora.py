"""MTL-LoRA (Yang et al. 2024, Eq. 4):

    h_t = W x + s · Σ_i softmax(w_t / τ)_i B^i Λ_t A x,    s = α/r
lora_A [r, in]       shared down-projection, Kaiming-uniform(a=√5)
task_lambda [T, r]   Λ_t diagonal (default, init ones) or [T, r, r] full (init identity)
lora_B [n, out, r]   n shared up-projections, init zero (so ΔW = 0 at init, §MTL-LoRA)
task_weights [T, n]  w_t, mixed by a softmax with temperature τ (fp32)
Init of w_t: the paper is silent, so the default is the official code's, weights_init="kaiming":
Kaiming-uniform(a=√5) on the [T, n] tensor, i.e. w_t ~ U(-1/√n, 1/√n) (fan_in = n), whatever τ.
The logits w_t/τ then start at a spread of 1/(τ√n): τ = 0.1 starts each task's softmax peaked
on one up-projection, τ = 1 nearly uniform, and τ keeps scaling every later step of w_t (Eq. 4's
"w/o τ" ablation can show a difference). Two other readings are switches:
  weights_init="normal"   w_t ~ N(0, τ²), so w_t/τ ~ N(0, 1) for every τ: softmax(w_t/τ) at
                          init has one distribution whatever τ, and under AdamW (whose steps
                          have a size set by the lr, not by the gradient) τ only rescales the
                          logits' step: τ hardly matters (mtlref's default before this one);
  weights_init="uniform"  w_t = 0: with B = 0 the n up-projections get identical gradients
                          forever and w_t never leaves uniform (the symmetry is never broken;
                          a test shows it).
The ablation switches of MTL-LoRA Table 5:
  "w/o Λ_t"  task_lambda=False: Λ_t fixed to the identity and no task_lambda tensor at all
             (not stored, not counted as trainable); w_t is then the only per-task tensor;
  "w/o τ"    tau=1.0: plain softmax(w_t);
  "n = 1"    num_up=1: one up-projection, softmax of one weight = 1, so ΔW_t = s B Λ_t A.
full_lambda=True makes Λ_t a full r×r matrix (the paper's Λ_t ∈ R^{r×r}), init identity.
The per-task mixed up-projection B̄_t = Σ_i π_{t,i} B^i (T, out, r) is formed once per
forward and gathered per sample, so a batch may mix tasks.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtlref.adapters.base import Adapter, gather, lora_a_init, per_sample, per_sample_up
from mtlref.layers import AdaptedLinear, ForwardContext

WEIGHTS_INITS = ("normal", "uniform", "kaiming")


class MTLLoRA(Adapter):
    method = "mtl-lora"
    options = {"num_up": 3, "tau": 0.5, "full_lambda": False, "weights_init": "kaiming", "task_lambda": True}
    format_1_options = {"num_up": 3, "tau": 0.5, "full_lambda": False, "weights_init": "normal", "task_lambda": True}
    zero_init = ("lora_B",)
    task_specific = True
    task_tensors = ("task_lambda", "task_weights")

    def __init__(self, base: AdaptedLinear, num_tasks: int, rank: int, alpha: float, dropout: float = 0.0,
                 num_up: int = 3, tau: float = 0.5, full_lambda: bool = False, weights_init: str = "kaiming",
                 task_lambda: bool = True):
        super().__init__(base, num_tasks, rank, alpha, dropout)
        if weights_init not in WEIGHTS_INITS:
            raise ValueError(f"mtl-lora: weights_init must be one of {WEIGHTS_INITS}, got {weights_init!r}")
        if num_up < 1 or tau <= 0:
            raise ValueError(f"mtl-lora: need num_up >= 1 and tau > 0, got num_up={num_up}, tau={tau}")
        if full_lambda and not task_lambda:
            raise ValueError("mtl-lora: full_lambda=True needs task_lambda=True (task_lambda=False fixes Λ_t = I)")
        self.num_up, self.tau, self.full_lambda = num_up, float(tau), bool(full_lambda)
        self.has_lambda = bool(task_lambda)
        dev = self.device_of(base)
        self.lora_A = nn.Parameter(lora_a_init(rank, self.in_features, device=dev))
        if not self.has_lambda:
            self.register_parameter("task_lambda", None)                       # "w/o Λ_t": Λ_t = I, not stored
        elif full_lambda:
            self.task_lambda = nn.Parameter(torch.eye(rank, device=dev).repeat(num_tasks, 1, 1))   # Λ_t = I (T, r, r)
        else:
            self.task_lambda = nn.Parameter(torch.ones(num_tasks, rank, device=dev))   # diag(Λ_t) = 1  (T, r)
        self.lora_B = nn.Parameter(torch.zeros(num_up, self.out_features, rank, device=dev))
        w = torch.zeros(num_tasks, num_up, device=dev)
        if weights_init == "kaiming":
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))                        # official code: U(±1/√n)
        elif weights_init == "normal":
            w.normal_(0.0, self.tau)                                           # w_t/τ ~ N(0, 1)
        self.task_weights = nn.Parameter(w)

    def mixed_up(self) -> torch.Tensor:
        """B̄_t = Σ_i softmax(w_t/τ)_i B^i for every task: (T, out, r)."""
        pi = torch.softmax(self.task_weights.float() / self.tau, dim=-1)     # (T, n)
        # t task, n up-projection, o out, r rank
        return torch.einsum("tn,nor->tor", pi, self.lora_B)

    def forward(self, x: torch.Tensor, y: torch.Tensor, ctx: ForwardContext, base: AdaptedLinear) -> torch.Tensor:
        t = self.task_ids(ctx, x)
        z = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)    # A x  (..., r)
        if self.has_lambda:
            lam = gather(self.task_lambda, t)                               # (B, r) or (B, r, r)
            if self.full_lambda:
                # b sample, q/r rank (out/in of Λ_t)
                z = torch.einsum("b...r,bqr->b...q", z, lam)                # Λ_t A x
            else:
                z = z * per_sample(lam, z)
        # s B̄_t^T per task, transposed to (T, r, out) once (T·r·out numbers) and gathered per sample
        up = (self.scaling * self.mixed_up()).transpose(1, 2).contiguous()
        return per_sample_up(z, gather(up, t)).to(y.dtype)                          # s B̄_t Λ_t A x  (..., out)

    def delta_weight(self, task_id: int, base: AdaptedLinear) -> torch.Tensor:
        t = self.check_task(task_id)
        if not self.has_lambda:
            return self.scaling * self.mixed_up()[t] @ self.lora_A          # Λ_t = I  (out, in)
        lam = self.task_lambda[t] if self.full_lambda else torch.diag(self.task_lambda[t])
        return self.scaling * self.mixed_up()[t] @ lam @ self.lora_A         # (out, in)

    def as_lora(self, task_id: int, base: AdaptedLinear) -> tuple[torch.Tensor, torch.Tensor]:
        """A_t = Λ_t A and B_t = s B̄_t (rank r)."""
        t = self.check_task(task_id)
        A = self.lora_A
        if self.has_lambda:
            A = (self.task_lambda[t] if self.full_lambda else torch.diag(self.task_lambda[t])) @ A
        return A, self.scaling * self.mixed_up()[t]

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", num_up={self.num_up}, tau={self.tau:g}, full_lambda={self.full_lambda}"
                                       f", task_lambda={self.has_lambda}")

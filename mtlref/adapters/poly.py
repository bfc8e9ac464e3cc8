"""Poly (Ponti et al. 2023, "Combining Parameter-efficient Modules for Task-level
Generalisation") and MHR (Caccia et al. 2023, "Multi-Head Adapter Routing"), as peft implements
them (peft/tuners/poly: layer.py, router.py, config.py; tests/test_poly.py checks peft 0.22.0).

A module holds S LoRA "skills" (the paper's skill inventory) and each task learns which to mix.
MHR cuts every skill into Q heads ("splits") along in and out, and routes each head apart:
    poly_lora_A   [Q, S, in/Q, r]   skill s's down-projection of input columns q·in/Q:(q+1)·in/Q
    poly_lora_B   [Q, S, r, out/Q]  skill s's up-projection to output columns q·out/Q:(q+1)·out/Q
    module_logits [T, Q·S]          the task's routing logits ℓ (the allocation matrix's logits;
                                    peft: poly_router.module_logits), entry q·S + s
num_splits = 1 is Poly, num_splits > 1 MHR (peft's n_splits; num_skills is its n_skills).
For a sample of task t, with z_{q,s} the routing values of its logits ℓ_{q,s} = module_logits[t, q·S+s]:
    training  z ~ RelaxedBernoulli(τ, logits=ℓ), drawn afresh per sample, per module, per forward
    eval      z = σ(ℓ)
    w_{q,s} = z_{q,s} / (Σ_s' z_{q,s'} + 1e-12)            each head's weights sum to 1 over skills
    A_t = [Σ_s w_{1,s} A_{1,s}; ...; Σ_s w_{Q,s} A_{Q,s}]   (in, r): the heads' rows stacked
    B_t = [Σ_s w_{1,s} B_{1,s}, ..., Σ_s w_{Q,s} B_{Q,s}]   (r, out): the heads' columns side by side
    ΔY  = s · x A_t B_t,   s = α/r
so the Q heads share one rank-r bottleneck (z = Σ_q x_q A_q), as peft's reshape of the per-sample
A (B, Q, in/Q, r) -> (B, in, r) and B (B, Q, r, out/Q) -> (B, r, out) makes them.
Scaling. peft's Poly divides by r and has no α: that is s = α/r at α = 1. mtlref keeps s = α/r as
every other method, so attach with alpha=1 for peft's numbers (the parity test does); another α
multiplies ΔY by α (under AdamW, much as an α-times larger step on B would at the start).
Init as peft's (init_weights=True): each [in/Q, r] slice of A is the transpose of a
Kaiming-uniform(a=√5) [r, in/Q] tensor, U(±1/√(in/Q)) (the split's width is the fan-in); B = 0,
so ΔY = 0 at init; logits U(-1e-3, 1e-3), so every w starts near 1/S.
The relaxed-Bernoulli draw is torch.distributions.RelaxedBernoulli(τ, logits=ℓ).rsample() (peft's
call), written out (relaxed_bernoulli) so that no argument check syncs the GPU; the same one
torch.rand of ℓ's shape from torch's RNG, so a seeded run draws peft's weights (and gradient
checkpointing, which restores the RNG state, draws them again alike). Like torch it passes ℓ
through a clamped σ, so in training logits beyond ±16 saturate. τ is mtlref's option; peft fixes
τ = 1 and has no dropout (mtlref's `dropout` acts on the adapter's input, as LoRA's; 0 = peft).
delta_weight / as_lora (merge, export) use the eval weights, σ and the sum, whatever the mode:
task t is then one plain LoRA of rank r, A_t and s·B_t, equal to the eval forward.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mtlref.adapters.base import Adapter, gather, lora_a_init, per_sample_up
from mtlref.layers import AdaptedLinear, ForwardContext

EPS = 1e-12                               # peft's guard on each head's sum over skills


def relaxed_bernoulli(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """A reparameterised draw of RelaxedBernoulli(τ, logits) in (0, 1), as torch computes it:
    p = clamp(σ(ℓ)), u ~ U(0, 1) clamped to [ε, 1-ε], z = clamp(σ((logit u + logit p) / τ))."""
    fi = torch.finfo(logits.dtype)
    p = torch.sigmoid(logits).clamp(fi.eps, 1.0 - fi.eps)
    u = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device).clamp(fi.eps, 1.0 - fi.eps)
    g = (u.log() - (-u).log1p() + p.log() - (-p).log1p()) / temperature
    return torch.sigmoid(g).clamp(fi.tiny, 1.0 - fi.eps)


class Poly(Adapter):
    method = "poly"
    options = {"num_skills": 4, "num_splits": 1, "temperature": 1.0}
    format_1_options = {"num_skills": 4, "num_splits": 1, "temperature": 1.0}
    zero_init = ("poly_lora_B",)
    task_specific = True
    task_tensors = ("module_logits",)

    def __init__(self, base: AdaptedLinear, num_tasks: int, rank: int, alpha: float, dropout: float = 0.0,
                 num_skills: int = 4, num_splits: int = 1, temperature: float = 1.0):
        super().__init__(base, num_tasks, rank, alpha, dropout)
        if num_skills < 1 or num_splits < 1:
            raise ValueError(f"poly: need num_skills >= 1 and num_splits >= 1, got num_skills={num_skills}, "
                             f"num_splits={num_splits}")
        if self.in_features % num_splits or self.out_features % num_splits:
            raise ValueError(f"poly: num_splits={num_splits} must divide in ({self.in_features}) and out "
                             f"({self.out_features}) of every adapted module (MHR cuts both into heads)")
        if not temperature > 0:
            raise ValueError(f"poly: the relaxed-Bernoulli temperature must be > 0, got {temperature}")
        self.num_skills, self.num_splits, self.temperature = num_skills, num_splits, float(temperature)
        Q, S, dev = num_splits, num_skills, self.device_of(base)
        d, e = self.in_features // Q, self.out_features // Q
        # each [r, in/Q] slice U(±1/√(in/Q)), stored transposed as peft's [in/Q, r]
        A = lora_a_init(Q, S, rank, d, device=dev).transpose(-1, -2).contiguous()
        self.poly_lora_A = nn.Parameter(A)                                           # (Q, S, in/Q, r)
        self.poly_lora_B = nn.Parameter(torch.zeros(Q, S, rank, e, device=dev))     # (Q, S, r, out/Q)
        logits = torch.empty(num_tasks, Q * S, device=dev, dtype=torch.float32)
        self.module_logits = nn.Parameter(logits.uniform_(-1e-3, 1e-3))             # (T, Q·S)

    def mixing(self, logits: torch.Tensor, sample: bool) -> torch.Tensor:
        """Logits (n, Q·S) -> w (n, Q, S): relaxed-Bernoulli draws (sample) or σ, each head
        divided by its sum over skills."""
        lg = logits.float().view(-1, self.num_splits, self.num_skills)
        z = relaxed_bernoulli(lg, self.temperature) if sample else torch.sigmoid(lg)
        return z / (z.sum(dim=-1, keepdim=True) + EPS)

    def combined(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w (n, Q, S) -> A_w (n, in, r) and B_w (n, r, out), the heads joined along in / out."""
        n = w.shape[0]
        # n sample, q split (head), s skill, d in/Q, e out/Q, r rank
        A = torch.einsum("nqs,qsdr->nqdr", w, self.poly_lora_A).reshape(n, self.in_features, self.rank)
        B = torch.einsum("nqs,qsre->nqre", w, self.poly_lora_B)
        return A, B.transpose(1, 2).reshape(n, self.rank, self.out_features)

    def forward(self, x: torch.Tensor, y: torch.Tensor, ctx: ForwardContext, base: AdaptedLinear) -> torch.Tensor:
        t = self.task_ids(ctx, x)
        A, B = self.combined(self.mixing(gather(self.module_logits, t), sample=self.training))
        x = self.dropout(x.to(A.dtype))
        z = per_sample_up(x, A) * self.scaling                                       # s x A_t  (B, ..., r)
        return per_sample_up(z, B).to(y.dtype)                                       # s x A_t B_t  (B, ..., out)

    def task_lora(self, task_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Task t's eval-mode A_t (in, r) and B_t (r, out), unscaled."""
        t = self.check_task(task_id)
        A, B = self.combined(self.mixing(self.module_logits[t:t + 1], sample=False))
        return A[0], B[0]

    def delta_weight(self, task_id: int, base: AdaptedLinear) -> torch.Tensor:
        A, B = self.task_lora(task_id)
        return self.scaling * (A @ B).t()                                            # (out, in)

    def as_lora(self, task_id: int, base: AdaptedLinear) -> tuple[torch.Tensor, torch.Tensor]:
        """A = A_tᵀ (r, in), B = s B_tᵀ (out, r), eval-mode weights."""
        A, B = self.task_lora(task_id)
        return A.t(), self.scaling * B.t()                                           # s folded into B

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", num_skills={self.num_skills}, num_splits={self.num_splits}"
                                       f", temperature={self.temperature:g}")

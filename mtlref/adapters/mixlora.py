"""MixLoRA (Li et al. 2024): token-level top-k mixture of LoRA experts in the FFN.

Expert e is a whole FFN whose targeted projections (gate/up/down; T5 wi/wo or wi_0/wi_1/wo,
BERT intermediate.dense/output.dense) use W + s B_e A_e, s = α/r. Per FFN block, a router
Linear(d_model -> E, no bias) scores every token; its weight starts N(0, 0.02²) (official
code: MixLoRA's "router_init_range": 0.02, the std):
    w = softmax(top-k router logits)          (..., k)   fp32
(the softmax of the k kept logits; equal to the full softmax renormalised over the top k)
    FFN(x) = Σ_k w_k FFN_{e_k}(x)
Attention targets get a plain LoRA (adapters.lora.LoRA); this class plugs into the block's
`layers.FeedForward` slot (slot = "ffn") and returns the whole FFN output, as FeedForward calls
it: forward(x, ctx, ffn), not the projection slots' ΔY. Not mergeable and not exportable as a
LoRA: the experts change per token (export --attention-only leaves them out).
Why it can be fast: the shared base gate/up projections run ONCE per token; each of the k
selected experts only adds its low-rank delta, act is applied per (token, slot), and since
the down projection is linear, the base down runs ONCE on the routing-weighted sum of hidden
states: Σ_k w_k (h_k W_d^T + b_d + s B^d_k A^d_k h_k) = (Σ_k w_k h_k) W_d^T + b_d + Σ_k w_k ΔD_k.
We write Σ_k w_k h_k as h_0 + Σ_k w_k (h_k - h_0), h_0 the base hidden state: the same sum
(Σ_k w_k = 1), but exactly the base FFN when B = 0, so ΔFFN = 0 exactly at init.
Expert low-rank products run for all E experts at once, masked to the selected ones (E·r
extra rank columns, no loop over experts or tokens).
Load balance, in the Mixtral convention (transformers' load_balancing_loss_func):
L = E · Σ_e f_e P_e over the N real tokens (ctx.mask when it matches x),
f_e = (routing slots sent to e, each of a token's k slots counted) / N, NOT divided by k
(Σ_e f_e = k, so L = k when routing is uniform; Switch's top-1 is the case k = 1), and P_e the
mean router probability (softmax over all E logits); emitted as "mixlora_balance" while training.
Per FFN block: E·r·Σ(in+out) over the targeted projections + E·d_model (router).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtlref.adapters.base import ROLES, Adapter, lora_a_init
from mtlref.adapters.lora import LoRA
from mtlref.layers import FeedForward, ForwardContext


class ExpertLoRA(nn.Module):
    """E LoRA experts on one projection: lora_A [E, r, in], lora_B [E, out, r] = 0."""

    def __init__(self, experts: int, rank: int, fin: int, fout: int, device):
        super().__init__()
        self.lora_A = nn.Parameter(lora_a_init(experts, rank, fin, device=device))
        self.lora_B = nn.Parameter(torch.zeros(experts, fout, rank, device=device))

    def down(self, x: torch.Tensor) -> torch.Tensor:
        # e expert, r rank, i in: every expert's A_e x, (..., E, r)
        return torch.einsum("...i,eri->...er", x, self.lora_A)

    def up(self, z: torch.Tensor) -> torch.Tensor:
        # z (..., E, r) zero outside the selected expert; o out: Σ_e B_e z_e, (..., out)
        return torch.einsum("...er,eor->...o", z, self.lora_B)


class MixLoRA(Adapter):
    method = "mixlora"
    options = {"num_experts": 8, "top_k": 2}
    format_1_options = {"num_experts": 8, "top_k": 2}
    zero_init = ("lora_B",)
    exact_zero_init = True
    mergeable = False
    task_specific = False
    slot = "ffn"                                   # attaches to layers.FeedForward, not AdaptedLinear
    other_targets = LoRA                           # what the targets outside the FFN blocks get
    export_refusal = ("mixlora routes every token to its own FFN experts, which no LoRA can write; pass "
                      "--attention-only to export its attention LoRAs without the experts")

    def __init__(self, ffn: FeedForward, roles: tuple[str, ...], num_tasks: int, rank: int, alpha: float,
                 dropout: float = 0.0, num_experts: int = 8, top_k: int = 2):
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"mixlora: need 1 <= top_k <= num_experts, got top_k={top_k}, "
                             f"num_experts={num_experts}")
        gate, up, down, _ = ffn.parts()
        parts = {"gate": gate, "up": up, "down": down}
        if any(r not in ROLES or parts[r] is None for r in roles) or not roles:
            raise ValueError(f"mixlora: targeted FFN roles {roles} must be a non-empty subset of the "
                             f"block's projections {[r for r in ROLES if parts[r] is not None]}")
        super().__init__(ffn, num_tasks, rank, alpha, dropout)
        dev = up.weight.device
        self.num_experts, self.top_k, self.roles = num_experts, top_k, tuple(roles)
        self.router = nn.Linear(up.in_features, num_experts, bias=False, device=dev, dtype=torch.float32)
        nn.init.normal_(self.router.weight, mean=0.0, std=0.02)             # official code: router_init_range
        self.experts = nn.ModuleDict({r: ExpertLoRA(num_experts, rank, parts[r].in_features,
                                                    parts[r].out_features, dev) for r in self.roles})

    @staticmethod
    def features(ffn: FeedForward) -> tuple[int, int]:
        """(d_model, d_model): the FFN block's input and output width."""
        _, up, down, _ = ffn.parts()
        return up.in_features, down.out_features

    def forward(self, x: torch.Tensor, ctx: ForwardContext, ffn: FeedForward) -> torch.Tensor:
        gate, up, down, act = ffn.parts()
        xf = x.to(self.router.weight.dtype)
        logits = self.router(xf)                                             # (..., E)
        top, idx = logits.topk(self.top_k, dim=-1)                           # (..., k)
        w = torch.softmax(top, dim=-1)                                       # (..., k) routing weights
        pick = F.one_hot(idx, self.num_experts).to(xf.dtype)                 # (..., k, E)
        if self.training and ctx.aux_losses is not None:
            ctx.add_loss("mixlora_balance", self.balance_loss(torch.softmax(logits, -1), pick, ctx))

        def lora(role: str, inp: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            # inp (..., d) shared by the k slots, or (..., k, ff) one per slot; returns for each
            # slot the selected expert's s B_e A_e inp times its weight: (..., k, out)
            z = self.experts[role].down(self.dropout(inp.to(xf.dtype)))     # (..., [k,] E, r)
            if inp.dim() == x.dim():
                z = z.unsqueeze(-3)                                          # (..., 1, E, r)
            return self.scaling * self.experts[role].up(z * (pick * weights[..., None])[..., None])

        ones = torch.ones_like(w)
        g0 = F.linear(x, gate.weight, gate.bias) if gate is not None else None   # base, once
        u0 = F.linear(x, up.weight, up.bias)                                 # (..., ff)
        h0 = act(g0) * u0 if gate is not None else act(u0)                   # base hidden state
        uk = u0.unsqueeze(-2)
        if "up" in self.roles:
            uk = uk + lora("up", x, ones).to(x.dtype)                        # (..., k, ff)
        if gate is not None:
            gk = g0.unsqueeze(-2)
            if "gate" in self.roles:
                gk = gk + lora("gate", x, ones).to(x.dtype)
            hk = act(gk) * uk                                                # (..., k, ff) per (token, slot)
        else:
            hk = act(uk)
        hbar = h0 + ((hk - h0.unsqueeze(-2)) * w.to(x.dtype)[..., None]).sum(-2)   # Σ_k w_k h_k
        out = F.linear(hbar, down.weight, down.bias)                         # base down, once
        if "down" in self.roles:
            out = out + lora("down", hk, w).sum(-2).to(x.dtype)             # Σ_k w_k s B^d A^d h_k
        return out

    def balance_loss(self, probs: torch.Tensor, pick: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Mixtral load balance E · Σ_e f_e P_e over real tokens. probs (..., E), pick (..., k, E)."""
        frac = pick.sum(-2)                                                  # (..., E) slots sent to e, 0..k
        m = ctx.mask
        if m is not None and probs.dim() == 3 and m.shape == probs.shape[:2]:
            m = m.to(probs.dtype)[..., None]
            f = (frac * m).sum((0, 1)) / m.sum().clamp_min(1.0)
            P = (probs * m).sum((0, 1)) / m.sum().clamp_min(1.0)
        else:
            f, P = frac.reshape(-1, self.num_experts).mean(0), probs.reshape(-1, self.num_experts).mean(0)
        return self.num_experts * (f * P).sum()

    def extra_repr(self) -> str:
        return (f"roles={self.roles}, rank={self.rank}, scaling={self.scaling:g}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}")

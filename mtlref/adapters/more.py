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
is a per-sample mask over the r rank columns (no loop over tasks): every mode below is a
weight per rank column, (T, r) per task or (B, r) per sample, and one rank-r product.
p_t is recomputed every forward and `rank_map()` reads the current gate.
Eq. 8 (contrastive, on while training when ctx collects aux losses): h_i is the mean of this
module's input over the sample's real tokens (ctx.pooled), projected to h when h != in (see
task_dim), and sim = cos(h_i, e_k). The printed Eq. 8 is a mean log-likelihood; we minimise
its negative, L_con = -(1/N) Σ_i log softmax_k(sim(h_i, e_k)/τ)[t_i], as "more_contrastive".
(Official code: e_t is compared with the un-detached module input at token 0, x[:, 0, :],
with h = in_features; see more_official.py.)
h_i is detached by default (detach_h=True): §4.3 brings in L_con because "there is no
supervised signal for task embedding learning", so it trains e_t (and through e_t the gate),
not the layers that produced x. With detach_h=False the loss also pulls every adapted
module's input towards its task's cluster; on the default GLUE job that reading scored
0.629 vs 0.660 and collapsed at α = 64 (docs/RESULTS.md).
A module holds r(in+out) + h(r+T) + r parameters: Table 6's 6Lr(m+d) + 6Lh(r+T) plus b_g.

Options (defaults give the equations above, bit for bit):
  task_dim=None      h, the task-embedding size; None = in_features. When h != in_features,
                     Eq. 8's h_i is R · pooled(x) with R [h, in] a FIXED random matrix, entries
                     N(0, 1/h) drawn from torch's global RNG at construction; R is a persistent
                     buffer (saved and loaded), not a parameter, so Table 6's count stays exact.
  contrastive=None   Eq. 8 on/off; None = on when there is a task embedding.
  tau=0.05           Eq. 8's temperature.
  linear_scaling=True  Eq. 6's r_t/|T| (False: Table 5 "w/o Linear Scaling", factor 1).
  scale_tasks=None   |T| in Eq. 6 ("the total number of tasks"); None = the tasks this adapter
                     serves (num_tasks). Few-shot transfer (train.py --init-from) sets it to the
                     saved run's |T|, so a new task starts as exactly the ΔY of the task it is
                     initialised from (with num_tasks = 1 instead, B_t A_t x would start |T| times
                     larger). The paper does not say which |T| a transfer uses; `--option
                     scale_tasks=1` is the other reading.
  detach_h=True      detach h_i in Eq. 8 (above).
  selection="ste"    "ste": Eq. 4-6 as above.
                     "soft": Table 5 "w/o STE: soft expert selection": every rank expert
                     k = 1..r weighted by p_t[k], ΔY = Σ_k p_t[k] c(k) s B[:, :k] A[:k] x with
                     c(k) = k/|T| (1 without linear scaling); as column weights
                     w_j = s Σ_{k>=j} p_t[k] c(k) (a reverse cumsum). rank_map(): argmax p_t + 1.
                     "subset": Table 5 "w/ subset experts", our reading (the paper gives no
                     equation): any subset S_t of the rank columns is an expert. q_t =
                     sigmoid(W_g e_t + b_g) ∈ R^r, column j is on iff q_t[j] > 0.5, with a
                     per-column STE m_j = 1[q_j > 0.5] + q_j - sg(q_j) (value exactly 0/1);
                     ΔY = (|S_t|/|T|) s Σ_j m_j B[:, j] A[j] x (factor 1 without linear
                     scaling); an empty S_t gives ΔY = 0. rank_map(): |S_t|, the columns on.
  task_embedding=True  False: Table 5 "w/o task embeddings", our reading: no task_embedding
                     tensor; the gate reads the sample's pooled module input (projected by R
                     when h != in), not detached (the STE's gradient reaches the layers below,
                     as a router's does), so the rank is chosen per sample from the tokens of
                     the current call (in incremental decoding: the new tokens). Eq. 8 needs
                     e_t, so contrastive is off (contrastive=True is an error); task_ids are not
                     needed. There is no per-task ΔW: rank_map() returns an empty LongTensor
                     (what save_adapters/load_adapters store and compare) and delta_weight
                     raises TypeError, so merge_adapters refuses with that message.
  official=False     True: the official code's mode (NLPfreshman0/MoRE): rank map fixed at
                     init, (j/r)² column scaling, token-0 contrastive input, h = in_features,
                     its init, and on T5 the encoder's L_con only; see more_official.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtlref.adapters import more_official
from mtlref.adapters.base import Adapter, gather, lora_a_init, per_sample
from mtlref.layers import AdaptedLinear, ForwardContext

SELECTIONS = ("ste", "soft", "subset")


class MoRE(Adapter):
    method = "more"
    options = {"task_dim": None, "contrastive": None, "tau": 0.05, "linear_scaling": True, "scale_tasks": None,
               "detach_h": True, "selection": "ste", "task_embedding": True, "official": False}
    format_1_options = {"task_dim": None, "contrastive": True, "tau": 0.05, "linear_scaling": True,
                        "detach_h": True, "selection": "ste", "task_embedding": True, "official": False}
    format_2_added = {"scale_tasks": None}                   # format 3; None = |T| of that run, as trained
    zero_init = ("lora_B",)
    task_specific = True
    task_tensors = ("task_embedding", "rank_table")          # rank_table: official mode, once fixed
    transfer_free = ("scale_tasks",)                         # see transfer_options
    records = {"rank_maps": "MoRE rank map"}                 # see saved_values

    def __init__(self, base: AdaptedLinear, num_tasks: int, rank: int, alpha: float, dropout: float = 0.0,
                 task_dim: int | None = None, contrastive: bool | None = None, tau: float = 0.05,
                 linear_scaling: bool = True, scale_tasks: int | None = None, detach_h: bool = True,
                 selection: str = "ste", task_embedding: bool = True, official: bool = False):
        super().__init__(base, num_tasks, rank, alpha, dropout)
        self.task_dim = self.in_features if task_dim is None else int(task_dim)
        if self.task_dim < 1 or selection not in SELECTIONS:
            raise ValueError(f"more: need task_dim >= 1 and selection in {SELECTIONS}, got task_dim="
                             f"{self.task_dim}, selection={selection!r}")
        if contrastive and not task_embedding:
            raise ValueError("more: the contrastive loss (Eq. 8) compares samples with the task embeddings e_t, "
                             "which task_embedding=False removes; drop contrastive=True")
        if official:
            more_official.check_options(self.in_features, selection=selection, task_embedding=task_embedding,
                                        task_dim=self.task_dim, linear_scaling=linear_scaling, detach_h=detach_h)
        self.use_embedding, self.official = bool(task_embedding), bool(official)
        self.contrastive = self.use_embedding if contrastive is None else bool(contrastive)
        self.tau, self.linear_scaling, self.detach_h = float(tau), bool(linear_scaling), bool(detach_h)
        self.scale_tasks = num_tasks if scale_tasks is None else int(scale_tasks)      # |T| of Eq. 6
        if self.scale_tasks < 1:
            raise ValueError(f"more: scale_tasks (|T| of Eq. 6) must be >= 1, got {scale_tasks!r}")
        self.selection = selection
        self.task_specific = self.use_embedding                             # per sample otherwise: no task ids
        self.mergeable = self.use_embedding                                 # (delta_weight raises otherwise)
        dev = self.device_of(base)
        self.lora_A = nn.Parameter(lora_a_init(rank, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev))
        if not self.use_embedding:
            self.register_parameter("task_embedding", None)
        else:
            self.task_embedding = nn.Parameter(torch.empty(num_tasks, self.task_dim, device=dev))
            if self.official:
                more_official.init_task_embedding(self.task_embedding)
            else:
                nn.init.kaiming_uniform_(self.task_embedding, a=math.sqrt(5))   # §4.1
        self.gate = nn.Linear(self.task_dim, rank, bias=True, device=dev, dtype=torch.float32)
        if self.task_dim != self.in_features:                               # R [h, in], entries N(0, 1/h)
            self.register_buffer("proj", torch.randn(self.task_dim, self.in_features, device=dev)
                                 / math.sqrt(self.task_dim))
        else:
            self.register_buffer("proj", None)
        if self.official:                                                   # gate frozen, r_t fixed now
            more_official.fix_rank_map(self)

    def represent(self, v: torch.Tensor) -> torch.Tensor:
        """A pooled module input (N, in) in the space of e_t: (N, h), R v when h != in."""
        return v if self.proj is None else v @ self.proj.T

    def gate_probs(self, u: torch.Tensor) -> torch.Tensor:
        """Gate outputs for gate inputs u (N, h): p = softmax(W_g u + b_g) (Eq. 2), or for
        selection="subset" the per-column q = sigmoid(W_g u + b_g). (N, r), fp32."""
        logits = self.gate(u).float()
        return torch.sigmoid(logits) if self.selection == "subset" else torch.softmax(logits, dim=-1)

    def probs(self) -> torch.Tensor:
        """p_t (q_t for "subset") for every task: (T, r), fp32."""
        if not self.use_embedding:
            raise ValueError("more: task_embedding=False chooses the rank per sample; there is no p_t per task")
        return self.gate_probs(self.task_embedding)

    def rank_map(self) -> torch.Tensor:
        """Per task, LongTensor[T]: r_t = argmax p_t + 1 from the current gate ("ste", "soft"),
        the number of columns on ("subset"), the map fixed at construction (official); an
        empty LongTensor with task_embedding=False (the rank is chosen per sample)."""
        if not self.use_embedding:
            return torch.zeros(0, dtype=torch.long, device=self.lora_A.device)
        if self.official:
            return self.rank_table.clone()
        with torch.no_grad():
            p = self.probs()
            return (p > 0.5).sum(dim=-1) if self.selection == "subset" else p.argmax(dim=-1) + 1

    def column_weights(self, p: torch.Tensor) -> torch.Tensor:
        """The weight of each rank column (N, r) for gate outputs p (N, r), one row per task
        (or per sample without task embeddings)."""
        j = torch.arange(1, self.rank + 1, device=p.device, dtype=p.dtype)  # column j = rank expert k = j
        if self.selection == "soft":                                        # Table 5 "w/o STE"
            c = j / self.scale_tasks if self.linear_scaling else torch.ones_like(j)   # c(k), Eq. 6
            return self.scaling * (p * c).flip(-1).cumsum(-1).flip(-1)     # w_j = s Σ_{k>=j} p_k c(k)
        if self.selection == "subset":                                      # Table 5 "w/ subset experts"
            on = (p > 0.5).to(p.dtype)                                      # S_t
            m = on + (p - p.detach())                                       # per-column STE, value on
            size = on.sum(-1, keepdim=True)                                 # |S_t|
            return m * (size / self.scale_tasks if self.linear_scaling else 1.0) * self.scaling
        k = p.argmax(dim=-1)                                                 # (N,) = r_t - 1
        ste = F.one_hot(k, self.rank).to(p.dtype) + (p - p.detach())         # Eq. 4
        coef = ste.gather(1, k[:, None]).squeeze(1)                          # Ste(p_t)[r_t], value 1.0
        r_t = (k + 1).to(p.dtype)
        scale = coef * (r_t / self.scale_tasks if self.linear_scaling else 1.0) * self.scaling   # Eq. 6
        prefix = (j <= r_t[:, None]).to(p.dtype)                             # first r_t columns
        return prefix * scale[:, None]

    def rank_columns(self) -> torch.Tensor:
        """Per task, the weight of each rank column (T, r)."""
        if self.official:                                                    # s (j/r)² on j <= r_t, no STE
            return more_official.rank_columns(self)
        return self.column_weights(self.probs())

    def forward(self, x: torch.Tensor, y: torch.Tensor, ctx: ForwardContext, base: AdaptedLinear) -> torch.Tensor:
        xf = x.to(self.lora_A.dtype)
        z = F.linear(self.dropout(xf), self.lora_A)                          # A x  (..., r)
        if self.use_embedding:
            t = self.task_ids(ctx, x)
            cols = gather(self.rank_columns(), t)                            # (B, r) per sample's task
        else:                                                                # the gate reads the sample
            cols = self.column_weights(self.gate_probs(self.represent(ctx.pooled(xf))))   # (B, r)
        z = z * per_sample(cols, z)                                          # weight (or drop) each column
        if self.contrastive and self.training and ctx.aux_losses is not None:
            if self.official:                                                # token 0, un-detached
                h = more_official.contrastive_input(xf)
            else:
                h = ctx.pooled(xf)
                h = self.represent(h.detach() if self.detach_h else h)
            ctx.add_loss("more_contrastive", self.contrastive_loss(h, t))
        return F.linear(z, self.lora_B).to(y.dtype)                          # (..., out)

    def contrastive_loss(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Eq. 8, negated: h (N, h) sample representations, t (N,) their tasks."""
        sim = F.normalize(h, dim=-1) @ F.normalize(self.task_embedding, dim=-1).T   # (N, T) cosine
        return F.cross_entropy(sim / self.tau, t)

    def delta_weight(self, task_id: int, base: AdaptedLinear) -> torch.Tensor:
        if not self.use_embedding:
            raise TypeError("more adapters with task_embedding=False choose the rank per sample, so there is no "
                            "per-task ΔW to merge; serve the model with the adapters attached")
        t = self.check_task(task_id)
        cols = self.rank_columns()[t]                                        # (r,)
        return (self.lora_B * cols) @ self.lora_A                            # (out, in)

    def as_lora(self, task_id: int, base: AdaptedLinear) -> tuple[torch.Tensor, torch.Tensor]:
        """Task t's rank expert: the rank columns it uses (the first r_t; a subset with
        selection="subset"), their weights folded into B: A [k, in], B [out, k]."""
        if not self.use_embedding:
            raise TypeError("more adapters with task_embedding=False choose the rank per sample: no LoRA per task")
        cols = self.rank_columns()[self.check_task(task_id)]               # (r,)
        keep = cols != 0
        if not bool(keep.any()):                                             # an empty subset: ΔW = 0
            keep = torch.arange(self.rank, device=cols.device) == 0
        return self.lora_A[keep], (self.lora_B * cols)[:, keep]

    def saved_values(self) -> dict:
        """adapter_config.json records each module's task -> rank map (rank_map())."""
        return {"rank_maps": self.rank_map().tolist()}

    @classmethod
    def transfer_options(cls, options: dict, saved: dict) -> dict:
        """A run started from saved adapters keeps the saved run's |T| in Eq. 6 unless scale_tasks
        is given, so each new task starts as exactly the function of the saved task it is
        initialised from (see scale_tasks)."""
        if options.get("scale_tasks") is not None:
            return dict(options)
        kept = saved["options"].get("scale_tasks")
        return {**options, "scale_tasks": saved["num_tasks"] if kept is None else kept}

    def configure_for(self, family: str, objective: str, name: str) -> None:
        """The official mode on T5 adds the encoder's L_con only (more_official.configure_for)."""
        if self.official:
            more_official.configure_for(self, family, objective, name)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", task_dim={self.task_dim}, tau={self.tau:g}, "
                                       f"contrastive={self.contrastive}, detach_h={self.detach_h}, "
                                       f"linear_scaling={self.linear_scaling}, selection={self.selection}, "
                                       f"task_embedding={self.use_embedding}, official={self.official}")

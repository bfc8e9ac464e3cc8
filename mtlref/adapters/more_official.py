"""MoRE's official-code mode, `MoRE(official=True)` (NLPfreshman0/MoRE,
peft/tuners/lora/layer.py), beside the paper's equations in more.py, to put paper and official
numbers side by side. What it changes:
  - official code: the task -> rank map is fixed at the first forward, before any update; we
    fix it at construction (the same map: nothing has moved yet), r_t = argmax softmax(W_g e_t
    + b_g) + 1, in the persistent buffer rank_table [T] (saved and loaded); the gate never
    trains (requires_grad=False, not counted as trainable);
  - official code: no STE coefficient, and instead of r_t/|T| each rank column j = 1..r_t is
    scaled by (j/r)² (it multiplies A's row j and B's column j each by j/8, r = 8):
    ΔY = s Σ_{j<=r_t} (j/r)² B[:, j] A[j] x;
  - official code: Eq. 8 on the module input at token 0, x[:, 0, :], not detached, not pooled,
    cos with every e_k over τ, cross-entropy with the sample's task; h = in_features;
  - official code init: e_t ~ N(0, 0.01²), gate weight Kaiming-uniform (mode='fan_in',
    nonlinearity='relu'), gate bias nn.Linear's default;
  - on T5 only the encoder's L_con is added (configure_for): the decoder's adapters compute no
    contrastive loss, and their task embeddings, whose only gradient is L_con's, never train.
selection, task_embedding, task_dim, linear_scaling and detach_h are fixed by this mode:
passing another value is an error.
Each function takes the MoRE adapter it serves (more.py calls them where `official` is set).
"""
from __future__ import annotations

import torch
import torch.nn as nn

FIXED = {"selection": "ste", "task_embedding": True, "linear_scaling": True, "detach_h": True}   # and h = in


def check_options(in_features: int, **given) -> None:
    """The options this mode fixes (FIXED, task_dim = in_features), as given: any other value
    is an error naming it."""
    want = {**FIXED, "task_dim": in_features}
    clash = [f"{k}={v!r}" for k, v in given.items() if v != want[k]]
    if clash:
        raise ValueError(f"more: official=True is the official code's mode, which fixes {', '.join(clash)} "
                         "(rank map fixed at init, (j/r)² column scaling, token-0 contrastive input, "
                         "h = in_features); drop those options or official=True")


def init_task_embedding(e: torch.Tensor) -> None:
    nn.init.normal_(e, 0.0, 0.01)                                           # official code


def fix_rank_map(more) -> None:
    """The gate's official init, frozen, and the task -> rank map of the first forward."""
    nn.init.kaiming_uniform_(more.gate.weight, mode="fan_in", nonlinearity="relu")   # official code
    more.gate.requires_grad_(False)                                         # official code: never trains
    if not more.contrastive:                                                # nor e_t then: only L_con moves it
        more.task_embedding.requires_grad_(False)
    with torch.no_grad():                                                   # the map of the first forward
        more.register_buffer("rank_table", more.probs().argmax(dim=-1) + 1)   # (T,) r_t


def rank_columns(more) -> torch.Tensor:
    """Per task, the weight of each rank column (T, r): s (j/r)² on j <= r_t, no STE."""
    j = torch.arange(1, more.rank + 1, device=more.lora_A.device, dtype=more.lora_A.dtype)
    prefix = (j <= more.rank_table[:, None]).to(j.dtype)
    return prefix * ((j / more.rank) ** 2 * more.scaling)


def contrastive_input(xf: torch.Tensor) -> torch.Tensor:
    """Eq. 8's h_i in the official code: the module input at token 0, un-detached (N, in)."""
    return xf.reshape(xf.shape[0], -1, xf.shape[-1])[:, 0]


def configure_for(more, family: str, objective: str, name: str) -> None:
    """MoRE's official code adds λ·L_con of the ENCODER's modules only (its T5 sums
    encoder_outputs.cl_loss twice; the decoder's is computed and never used), so the decoder's
    task embeddings, whose only gradient is L_con's (the gate is frozen), never train."""
    if family == "t5" and name.startswith("decoder."):
        more.contrastive = False
        more.task_embedding.requires_grad_(False)

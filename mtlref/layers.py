"""Building blocks shared by every backbone: the adapter slot (and the fused slot whose row
blocks are slots too), the forward context, the block runner (gradient checkpointing), the
feed-forward slot and the norms. Position encodings (RoPE, ALiBi, T5 relative buckets), attention
masks and the key/value cache are in mtlref/models/attention.py.

Shapes: B batch, T length, C channels.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------- context
@dataclass
class ForwardContext:
    """What an adapter may know about the batch besides its input tensor.

    task_ids:   LongTensor[B], one task per sample (a batch may mix tasks), or None.
    mask:       [B, T] 1 for real tokens of the sequence the current stack reads; adapters
                use it to pool per-sample representations (MoRE Eq. 8) and to skip padding
                (MixLoRA load balance). T5 swaps it between encoder and decoder stacks.
    aux_losses: name -> list of scalar tensors, filled by adapters while training
                (MoRE's contrastive loss, MixLoRA's load-balancing loss). None = do not
                compute them (inference, generation).
    """
    task_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    aux_losses: dict[str, list[torch.Tensor]] | None = None
    checked: dict = field(default_factory=dict, repr=False)   # num_tasks -> task_ids already range-checked

    @staticmethod
    def of(ctx: "ForwardContext | None", task_ids: torch.Tensor | None = None,
           mask: torch.Tensor | None = None) -> "ForwardContext":
        """What a model's forward works with: the caller's context (the training loop passes
        one to collect auxiliary losses), else a new one; task_ids given to the model fill a
        context that has none."""
        if ctx is None:
            return ForwardContext(task_ids=task_ids, mask=mask)
        return ctx if task_ids is None or ctx.task_ids is not None else replace(ctx, task_ids=task_ids)

    def with_mask(self, mask: torch.Tensor | None) -> "ForwardContext":
        # A shallow copy: the aux_losses dict is shared, so losses from every stack meet.
        return replace(self, mask=mask)

    def add_loss(self, name: str, value: torch.Tensor) -> None:
        if self.aux_losses is not None:
            self.aux_losses.setdefault(name, []).append(value)

    def require_task_ids(self, num_tasks: int, batch: int) -> torch.Tensor:
        t = self.task_ids
        if t is None:
            raise ValueError(f"this adapter is task-specific: pass task_ids (LongTensor[{batch}]) to the model")
        if t.shape != (batch,):
            raise ValueError(f"task_ids has shape {tuple(t.shape)}, expected ({batch},): one task id per sample")
        if torch.compiler.is_compiling():                 # --compile: a host check would split the graph; the
            return t                                      # caller checks the ids (train.check_task_ids, Run.task_id)
        if self.checked.get(num_tasks) is not t:          # once per batch: the check syncs a GPU
            lo, hi = (int(t.min()), int(t.max())) if t.numel() else (0, 0)
            if lo < 0 or hi >= num_tasks:
                raise ValueError(f"task id {hi if hi >= num_tasks else lo} is out of range: the adapters were "
                                 f"attached with num_tasks={num_tasks}")
            self.checked[num_tasks] = t
        return t

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of x [B, T, C] over the real tokens of each sample -> [B, C]."""
        if x.dim() == 2:
            return x
        m = self.mask
        if m is None or m.shape != x.shape[:2]:
            return x.mean(dim=1)
        m = m.to(x.dtype).unsqueeze(-1)
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


# ----------------------------------------------------------------------------- block runner
def run_block(block: nn.Module, *args, call=None):
    """Run one transformer block: `call(*args)`, by default `block(*args)` (BERT passes its
    `layer.block`). With `block.grad_checkpoint` set (distributed.set_grad_checkpoint) and grad
    enabled, the block's activations are dropped after forward and recomputed in backward
    (non-reentrant torch.utils.checkpoint: it trains adapters even when the block's input
    needs no grad, e.g. frozen embeddings). The recomputation runs the adapters again, and they
    would append their auxiliary losses to ctx.aux_losses a second time: those copies are dropped
    (the losses recorded by the first pass already reach the recomputed graph)."""
    call = block if call is None else call
    if not (getattr(block, "grad_checkpoint", False) and torch.is_grad_enabled()):
        return call(*args)
    stores = {id(a.aux_losses): a.aux_losses for a in args
              if isinstance(a, ForwardContext) and a.aux_losses is not None}.values()
    passes = []

    def once(*inner):
        if not passes:                                         # the forward pass: record as usual
            passes.append(1)
            return call(*inner)
        before = [{k: len(v) for k, v in d.items()} for d in stores]
        try:                                                   # the recomputation, in backward; it
            return call(*inner)                                # may stop early by raising
        finally:
            for d, sizes in zip(stores, before):
                for k in list(d):
                    if k in sizes:
                        del d[k][sizes[k]:]
                    else:
                        del d[k]
    return checkpoint(once, *args, use_reentrant=False)


# ----------------------------------------------------------------------------- the slot
class AdaptedLinear(nn.Module):
    """A frozen projection y = x W^T + b that may carry one adapter (DESIGN: the slot).

    weight [out, in] and bias [out] keep the Hugging Face names; the adapter, when attached,
    returns only ΔY and lives under `<module>.adapter.*`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.adapter: nn.Module | None = None

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.adapter is not None:
            y = y + self.adapter(x, y, ctx if ctx is not None else ForwardContext(), self)
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class RowBlock(nn.Module):
    """Rows start:stop of a FusedLinear, a slot of its own: it may carry an adapter, which sees
    it as its base (in_features, out_features, weight [out, in], bias [out] or None).

    It has no parameters: `weight` and `bias` are views of the parent's rows, taken on every
    access (so they follow the parent through .to(), load_state_dict(assign=True) and FSDP's
    unsharding), and writing into them (merge_adapters) writes the parent's rows. The parent is
    kept out of nn.Module's registry (object.__setattr__), so the base weight is seen once by
    parameters(), state_dict() and FSDP; copy.deepcopy copies the reference with its parent.
    """

    def __init__(self, parent: "FusedLinear", start: int, stop: int):
        super().__init__()
        object.__setattr__(self, "parent", parent)      # not a submodule: no second path to the weight
        self.start, self.stop = start, stop
        self.in_features, self.out_features = parent.in_features, stop - start
        self.adapter: nn.Module | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.parent.weight[self.start:self.stop]                         # (out, in) view

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.parent.bias
        return None if b is None else b[self.start:self.stop]                 # (out,) view

    def extra_repr(self) -> str:
        return f"rows={self.start}:{self.stop}, in={self.in_features}, out={self.out_features}"


class FusedLinear(AdaptedLinear):
    """A fused projection (MPT's Wqkv: out = 3C, rows [q | k | v]) whose named row blocks are
    slots too. One GEMM computes the base output; then either the whole slot carries an adapter
    (ΔY [..., out], as an AdaptedLinear) or any of its blocks does (ΔY_b [..., out_b] on the
    block's part of the output; attach_adapters refuses both at once):

        y = x W^T + b                                      (..., out), one GEMM
        y = y + ΔY                                         the fused adapter, if any
        y = cat_b(y_b + ΔY_b  if block b has an adapter else y_b)   along out

    `blocks` maps a name to its rows (start, stop); together they must tile 0:out in order.
    The blocks are child modules under their names (`Wqkv.q.adapter.*`); the weight and bias
    keep the fused Hugging Face keys (`Wqkv.weight`).
    """

    def __init__(self, in_features: int, out_features: int, blocks: dict[str, tuple[int, int]],
                 bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        edges = [0] + [stop for _, stop in blocks.values()]
        if [start for start, _ in blocks.values()] != edges[:-1] or edges[-1] != out_features or \
                any(a >= b for a, b in zip(edges, edges[1:])):
            raise ValueError(f"row blocks {blocks} must tile rows 0:{out_features} in order")
        clash = sorted(set(blocks) & {"weight", "bias", "adapter"})
        if clash:
            raise ValueError(f"row block names {clash} clash with the slot's own attributes")
        self.block_names = tuple(blocks)
        for name, (start, stop) in blocks.items():
            self.add_module(name, RowBlock(self, start, stop))

    def row_blocks(self) -> list[RowBlock]:
        return [getattr(self, name) for name in self.block_names]

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        ctx = ctx if ctx is not None else ForwardContext()
        base = F.linear(x, self.weight, self.bias)                             # (..., out)
        y = base if self.adapter is None else base + self.adapter(x, base, ctx, self)
        blocks = self.row_blocks()
        if all(b.adapter is None for b in blocks):
            return y
        # each adapter sees its block's part of the base output (..., out_b); a new tensor, no
        # in-place writes into slices of y (autograd)
        parts = []
        for b in blocks:
            part = y[..., b.start:b.stop]
            if b.adapter is not None:
                part = part + b.adapter(x, base[..., b.start:b.stop], ctx, b)
            parts.append(part)
        return torch.cat(parts, dim=-1)                                        # (..., out)

    def extra_repr(self) -> str:
        rows = ", ".join(f"{n}={getattr(self, n).start}:{getattr(self, n).stop}" for n in self.block_names)
        return super().extra_repr() + f", blocks=({rows})"


class FeedForward(nn.Module):
    """The block's MLP slot. A family's MLP subclasses this and implements `parts()`:
    (gate | None, up, down, act) so that the FFN is  down(act(gate(x)) * up(x))  when gated,
    else  down(act(up(x))).  A whole-FFN method (MixLoRA) sets `self.adapter`, which then
    computes the FFN output itself from these parts (its experts are whole FFNs)."""

    def __init__(self):
        super().__init__()
        # An instance attribute (as in AdaptedLinear): a class attribute would shadow the
        # adapter module that nn.Module registers when one is assigned.
        self.adapter: nn.Module | None = None

    def parts(self) -> tuple[AdaptedLinear | None, AdaptedLinear, AdaptedLinear, callable]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        ctx = ctx if ctx is not None else ForwardContext()
        if self.adapter is not None:
            return self.adapter(x, ctx, self)
        gate, up, down, act = self.parts()
        h = act(gate(x, ctx)) * up(x, ctx) if gate is not None else act(up(x, ctx))
        return down(h, ctx)


# ----------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 as LLaMA and T5 do."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm whose bias is optional (MPT with no_bias=True has none)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)

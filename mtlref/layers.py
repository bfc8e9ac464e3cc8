"""Building blocks shared by every backbone: the adapter slot (and the fused slot whose row
blocks are slots too), the forward context, the block runner (gradient checkpointing), the
feed-forward slot, norms, rotary embeddings (RoPE), ALiBi, T5 relative buckets and a growing
key/value cache.

Shapes: B batch, T query length, S key length, H heads, D head dim, C channels.
"""
from __future__ import annotations

import math
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


# ----------------------------------------------------------------------------- RoPE
def rope_theta(cfg: dict) -> float:
    """RoPE base: new-style `rope_parameters.rope_theta`, old-style top-level `rope_theta`,
    else LLaMA's 10000."""
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def rope_scaling(cfg: dict) -> dict | None:
    """The scaling block (`rope_scaling` old-style, `rope_parameters` new-style) when it is
    not the default, else None."""
    s = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = s.get("rope_type", s.get("type", "default"))
    return None if kind == "default" else dict(s, rope_type=kind)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None,
                  device=None) -> torch.Tensor:
    """Inverse frequencies [D/2]: theta^(-2i/D). LLaMA-3 scaling stretches the long
    wavelengths by `factor`, keeps the short ones, and blends those in between."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if scaling is None:
        return inv
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind != "llama3":
        raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")
    factor, lo, hi = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen > old_len / lo, inv / factor, inv)              # long wavelengths: scaled
    middle = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
    return torch.where(middle, blended, out)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] -> cos, sin [B, 1, T, D] in the Hugging Face layout (the D/2
    frequencies repeated twice, not interleaved)."""
    freqs = positions.float().unsqueeze(-1) * inv_freq           # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)                      # (B, T, D)
    return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]: x*cos + rotate_half(x)*sin, rotate_half(x) = [-x2, x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ----------------------------------------------------------------------------- ALiBi
def alibi_slopes(n_heads: int, bias_max: float = 8.0) -> torch.Tensor:
    """MPT's ALiBi slopes [H]: 2^(-bias_max * k / H') for k = 1..H', H' the next power of
    two; for other head counts, the odd-indexed slopes first, then the even, cut to H."""
    n2 = 2 ** math.ceil(math.log2(n_heads))
    slopes = 2.0 ** (-(torch.arange(1, n2 + 1, dtype=torch.float32) * (bias_max / n2)))
    if n2 != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[0::2]])[:n_heads]
    return slopes


def alibi_bias(n_heads: int, q_pos: torch.Tensor, k_pos: torch.Tensor, bias_max: float = 8.0) -> torch.Tensor:
    """Additive attention bias [H, T, S] = slope_h * (k - q). MPT adds slope*(k - (S-1)),
    which differs by a constant per query row: the same after softmax."""
    rel = (k_pos[None, :] - q_pos[:, None]).float()               # (T, S)
    return alibi_slopes(n_heads, bias_max).to(q_pos.device)[:, None, None] * rel


# ----------------------------------------------------------------------------- T5 buckets
def t5_relative_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Map relative positions (key - query) to T5's buckets: half the buckets per direction
    when bidirectional (encoder), past only otherwise (decoder); within a direction, exact
    buckets for distances below num_buckets/2, then logarithmic bins up to max_distance."""
    bucket = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (rel > 0).long() * num_buckets
        dist = rel.abs()
    else:
        dist = (-rel).clamp_min(0)
    exact = num_buckets // 2
    log_bin = exact + (torch.log(dist.float().clamp_min(1) / exact) / math.log(max_distance / exact)
                       * (num_buckets - exact)).long()
    log_bin = log_bin.clamp_max(num_buckets - 1)
    return bucket + torch.where(dist < exact, dist, log_bin)


# ----------------------------------------------------------------------------- KV cache
@dataclass
class KVCache:
    """Keys and values seen so far, per layer: k, v [B, H_kv, S, D], grown by concatenation.
    `cross` holds T5's cross-attention keys/values, computed once from the encoder output.
    `mask` [B, S] is the attention mask of everything cached (1 = real token)."""
    self_kv: list = field(default_factory=list)
    cross: list = field(default_factory=list)
    mask: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == len(self.self_kv):
            self.self_kv.append((k, v))
        else:
            pk, pv = self.self_kv[layer]
            self.self_kv[layer] = (torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2))
        return self.self_kv[layer]

    def seq_len(self) -> int:
        return self.self_kv[0][0].shape[2] if self.self_kv else 0


def causal_padding_mask(key_mask: torch.Tensor, T: int) -> torch.Tensor:
    """key_mask [B, S] (1 = real token; the last T positions are the queries) -> allowed
    [B, 1, T, S]: a query sees the real keys at or before its own position. A query row that
    sees nothing (a left-pad query) is let see every key so that softmax stays finite; its
    output is padding, and no real query ever attends to it."""
    S = key_mask.shape[1]
    q = torch.arange(S - T, S, device=key_mask.device)
    k = torch.arange(S, device=key_mask.device)
    allowed = (k[None, :] <= q[:, None])[None, None] & key_mask.bool()[:, None, None, :]
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def decoder_key_mask(attention_mask: torch.Tensor | None, cache: KVCache | None,
                     batch: int, T: int, device) -> torch.Tensor:
    """The mask [B, S] of every key a decoder step attends to: the cached ones, then the T new.
    attention_mask may cover all S positions (the Hugging Face convention) or only the T new
    ones (the cache's own mask is then put in front). Records the result in cache.mask."""
    past = cache.seq_len() if cache is not None else 0
    if attention_mask is not None and attention_mask.shape[1] == past + T:
        full = attention_mask
    else:
        if attention_mask is not None and attention_mask.shape[1] != T:
            raise ValueError(f"attention_mask has {attention_mask.shape[1]} columns; expected {past + T} "
                             f"(cached + new tokens) or {T} (new tokens only)")
        new = attention_mask if attention_mask is not None else torch.ones(batch, T, dtype=torch.long, device=device)
        old = cache.mask if cache is not None and cache.mask is not None else \
            torch.ones(batch, past, dtype=new.dtype, device=device)
        full = torch.cat([old.to(new.dtype), new], dim=1)
    if cache is not None:
        cache.mask = full
    return full

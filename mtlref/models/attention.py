"""What a model file's attention reads besides its projections: rotary embeddings (RoPE),
ALiBi, T5 relative buckets, the attention masks of a decoder step and a growing key/value cache.

Shapes: B batch, T query length, S key length, H heads, D head dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


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

"""LLaMA (1, 2, 3 and llama2.c-style small models) in the Hugging Face layout, with every
projection an AdaptedLinear slot.

    ids -> embed_tokens -> N x [x + attn(rmsnorm(x)); x + mlp(rmsnorm(x))] -> norm -> lm_head

Shapes: B batch, T new tokens, S keys (cached + new), H query heads, K key/value heads,
D head dim, C hidden size, I MLP size, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtlref.models.config import check_config_keys
from mtlref.layers import AdaptedLinear, FeedForward, ForwardContext, RMSNorm, run_block
from mtlref.models.attention import (KVCache, apply_rope, causal_padding_mask, decoder_key_mask, rope_cos_sin,
                                     rope_inv_freq, rope_scaling, rope_theta)

# config.json keys read by Config.from_hf (hidden_act and attention_dropout are only checked).
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
READ_KEYS = REQUIRED_KEYS + ("num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                             "rope_parameters", "rope_theta", "rope_scaling", "attention_bias", "mlp_bias",
                             "tie_word_embeddings", "hidden_act", "attention_dropout")
# config.json keys deliberately ignored: none of them changes what the forward pass computes.
IGNORED_KEYS = (
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",  # bookkeeping
    "initializer_range",                    # we load trained weights (init_weights has its own std)
    "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",  # generation settings: see tokenizer
    "pretraining_tp",                       # old transformers split matmuls in tp slices: same result
)


@dataclass
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None      # None = multi-head attention (K = H)
    head_dim: int | None = None                 # None = hidden_size / num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None            # linear | llama3, see attention.rope_inv_freq
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config.json: num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")
        rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)   # fail now on an unknown scaling

    @classmethod
    def from_hf(cls, cfg: dict) -> "Config":
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act={cfg['hidden_act']!r} is not supported; LLaMA uses 'silu'")
        if cfg.get("attention_dropout", 0.0):
            raise ValueError(f"config.json: attention_dropout={cfg['attention_dropout']} is not supported: the "
                             "frozen base runs without dropout (adapters have their own); set it to 0.0")
        check_config_keys(cfg, REQUIRED_KEYS, READ_KEYS, IGNORED_KEYS, "a LLaMA", "llama")
        return cls(**{k: cfg[k] for k in REQUIRED_KEYS},
                   num_key_value_heads=cfg.get("num_key_value_heads"), head_dim=cfg.get("head_dim"),
                   max_position_embeddings=cfg.get("max_position_embeddings", 2048),
                   rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                   rope_theta=rope_theta(cfg), rope_scaling=rope_scaling(cfg),
                   attention_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)),
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))


# Our state_dict keys are the Hugging Face keys. Extras a checkpoint may carry: the rotary
# inv_freq buffer old transformers saved (we compute it in forward). A tied head's stored copy
# is skipped through Model.tied_keys, since only the config knows whether the head is tied.
EXTRA_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_key(name: str) -> str | None:
    return None if name.endswith(EXTRA_SUFFIXES) else name


# ----------------------------------------------------------------------------- modules
class Attention(nn.Module):
    """Grouped-query self-attention with RoPE: H query heads share K key/value heads."""

    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.layer, self.H, self.K, self.D = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = AdaptedLinear(C, self.H * self.D, bias=b)
        self.k_proj = AdaptedLinear(C, self.K * self.D, bias=b)
        self.v_proj = AdaptedLinear(C, self.K * self.D, bias=b)
        self.o_proj = AdaptedLinear(self.H * self.D, C, bias=b)

    def forward(self, x, cos, sin, allowed, ctx: ForwardContext, cache: KVCache | None):
        B, T, _ = x.shape
        q = self.q_proj(x, ctx).view(B, T, self.H, self.D).transpose(1, 2)        # (B, H, T, D)
        k = self.k_proj(x, ctx).view(B, T, self.K, self.D).transpose(1, 2)        # (B, K, T, D)
        v = self.v_proj(x, ctx).view(B, T, self.K, self.D).transpose(1, 2)        # (B, K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                                 # (B, K, S, D)
        # query head h reads key/value head h // (H/K), as Hugging Face's repeat_kv does
        k, v = k.repeat_interleave(self.H // self.K, dim=1), v.repeat_interleave(self.H // self.K, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)            # (B, H, T, D), scale D^-1/2
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.D), ctx)


class MLP(FeedForward):
    """SwiGLU: down(silu(gate(x)) * up(x)), C -> I -> C."""

    def __init__(self, cfg: Config):
        super().__init__()
        C, I, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = AdaptedLinear(C, I, bias=b)
        self.up_proj = AdaptedLinear(C, I, bias=b)
        self.down_proj = AdaptedLinear(I, C, bias=b)

    def parts(self):
        return self.gate_proj, self.up_proj, self.down_proj, F.silu


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, allowed, ctx, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, allowed, ctx, cache)
        return x + self.mlp(self.post_attention_layernorm(x), ctx)


class Decoder(nn.Module):
    """Hugging Face's LlamaModel: the `model.` prefix of every key."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Model(nn.Module):
    block_lists = ("model.layers",)          # the transformer blocks (gradient checkpointing, FSDP)

    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.max_positions = cfg.max_position_embeddings
        self.model = Decoder(cfg)
        # tied: logits = h E^T with the embedding E itself (no lm_head module, no copy)
        self.lm_head = None if cfg.tie_word_embeddings else AdaptedLinear(cfg.hidden_size, cfg.vocab_size)
        self.tied_keys = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random weights for tests and from-scratch runs (a no-op on the meta device, where
        load_model builds the model): N(0, std) matrices, zero biases, unit norms."""
        for m in self.modules():
            if isinstance(m, (AdaptedLinear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, AdaptedLinear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                task_ids: torch.Tensor | None = None, ctx: ForwardContext | None = None,
                cache: KVCache | None = None, position_ids: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] (or final-normed hidden states [B, T, C]).
        attention_mask [B, S] or [B, T]: 1 = real token, 0 = padding (left or right)."""
        B, T = input_ids.shape
        full = decoder_key_mask(attention_mask, cache, B, T, input_ids.device)   # (B, S)
        if full.shape[1] > self.max_positions:
            raise ValueError(f"sequence of {full.shape[1]} tokens is longer than this model's "
                             f"max_position_embeddings={self.max_positions}")
        ctx = ForwardContext.of(ctx, task_ids)
        if ctx.mask is None:
            ctx = ctx.with_mask(full[:, -T:])
        if position_ids is None:       # count real tokens only, so a left-padded prompt starts at 0
            position_ids = (full.cumsum(-1) - 1).clamp_min(0)[:, -T:]          # (B, T)
        x = self.model.embed_tokens(input_ids)                                  # (B, T, C)
        inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta, self.config.rope_scaling, x.device)
        cos, sin = rope_cos_sin(position_ids, inv_freq, x.dtype)               # (B, 1, T, D)
        allowed = causal_padding_mask(full, T)                                 # (B, 1, T, S)
        for block in self.model.layers:
            x = run_block(block, x, cos, sin, allowed, ctx, cache)
        h = self.model.norm(x)
        if return_hidden:
            return h
        return F.linear(h, self.model.embed_tokens.weight) if self.lm_head is None else self.lm_head(h, ctx)

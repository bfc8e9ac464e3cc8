"""T5 encoder-decoder (v1.0: ReLU FFN, tied head; v1.1 / FLAN: gated-GELU FFN, untied head).

Pre-norm blocks with T5's RMS LayerNorm (no mean, no bias), a learned relative-position
bias (one table per stack, in block 0, shared by every layer) and no 1/sqrt(d) attention
scaling. Every projection is an AdaptedLinear slot; each block's FFN is the FeedForward slot.

Shapes: B batch, S encoder length, T decoder length, H heads, D head dim (d_kv), C d_model.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtlref.models.config import check_config_keys
from mtlref.layers import AdaptedLinear, FeedForward, ForwardContext, run_block
from mtlref.models.attention import KVCache, causal_padding_mask, decoder_key_mask, t5_relative_bucket

# feed_forward_proj -> (gated, activation), as transformers' T5Config derives them.
FFN_KINDS = {"relu": (False, "relu"), "gelu": (False, "gelu"),
             "gated-relu": (True, "relu"), "gated-gelu": (True, "gelu_new")}
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": partial(F.gelu, approximate="tanh")}

# config.json keys deliberately ignored: bookkeeping, training-only, or derived again here.
IGNORED_KEYS = (
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "dropout_rate", "classifier_dropout", "initializer_factor",   # training only (we run eval)
    "is_encoder_decoder", "use_cache", "output_past",              # this model always is / caches
    "dense_act_fn", "is_gated_act",      # derived from feed_forward_proj, as transformers does
    "n_positions", "task_specific_params", "gradient_checkpointing", "bos_token_id",
    "id2label", "label2id", "problem_type", "finetuning_task",
)


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_decoder_layers: int | None = None          # None: as many as the encoder
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True               # v1.0 ties the head to `shared`
    scale_decoder_outputs: bool | None = None      # None: as tie_word_embeddings (pre-5.x configs)
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int | None = None      # None: the pad id, as T5 was trained
    is_decoder: bool = False
    gated: bool = field(init=False)
    act: str = field(init=False)

    def __post_init__(self):
        if self.feed_forward_proj not in FFN_KINDS:
            raise ValueError(f"config.json: feed_forward_proj {self.feed_forward_proj!r} is not supported "
                             f"(supported: {sorted(FFN_KINDS)})")
        if self.is_decoder:
            raise ValueError("config.json: is_decoder=true describes a lone T5 decoder stack; "
                             "mtlref's T5 is the encoder-decoder model (set is_decoder to false)")
        self.gated, self.act = FFN_KINDS[self.feed_forward_proj]
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings
        if self.decoder_start_token_id is None:
            self.decoder_start_token_id = self.pad_token_id

    @classmethod
    def from_hf(cls, cfg: dict) -> "Config":
        names = {f.name for f in fields(cls) if f.init}
        check_config_keys(cfg, (), names, IGNORED_KEYS, "a T5", "t5")
        return cls(**{k: cfg[k] for k in names if k in cfg and cfg[k] is not None})


# ----------------------------------------------------------------------------- checkpoint keys
# Our state_dict keys are the Hugging Face keys; these checkpoint keys are aliases of `shared.weight`.
TIED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def hf_key(name: str) -> str | None:
    """Checkpoint key -> our key. `lm_head.weight` of a tied (v1.0) model is skipped through
    Model.tied_keys, since only the config knows whether the head is tied."""
    return None if name in TIED_ALIASES else name


# ----------------------------------------------------------------------------- modules
class T5LayerNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps): no mean subtraction, no bias. The statistic is
    taken in fp32; the result is cast to the weight's dtype when that is half precision."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            h = h.to(self.weight.dtype)
        return self.weight * h


class Attention(nn.Module):
    """Multi-head attention without 1/sqrt(D) scaling; `bias` (B|1, H, T, S) carries the
    relative-position bias and the masks. Block 0's self-attention owns the bias table."""

    def __init__(self, cfg: Config, relative_bias: bool = False, causal: bool = False):
        super().__init__()
        self.n_heads, self.head_dim, self.causal = cfg.num_heads, cfg.d_kv, causal
        inner = cfg.num_heads * cfg.d_kv
        self.q = AdaptedLinear(cfg.d_model, inner)
        self.k = AdaptedLinear(cfg.d_model, inner)
        self.v = AdaptedLinear(cfg.d_model, inner)
        self.o = AdaptedLinear(inner, cfg.d_model)
        if relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
            self.num_buckets = cfg.relative_attention_num_buckets
            self.max_distance = cfg.relative_attention_max_distance

    def position_bias(self, t: int, s: int, past: int) -> torch.Tensor:
        """Bias (1, H, T, S) for queries at positions past..past+T-1 over keys 0..S-1."""
        device = self.relative_attention_bias.weight.device
        q_pos = torch.arange(past, past + t, device=device)
        k_pos = torch.arange(s, device=device)
        buckets = t5_relative_bucket(k_pos[None, :] - q_pos[:, None], not self.causal,
                                     self.num_buckets, self.max_distance)         # (T, S)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)

    def forward(self, x, bias, ctx, cache: KVCache | None = None, layer: int = 0,
                source: torch.Tensor | None = None, source_ctx: ForwardContext | None = None):
        """Self-attention when `source` is None (new k/v appended to the cache), else
        cross-attention over `source` (its k/v computed once and kept in cache.cross)."""
        B, T, _ = x.shape
        q = self.split(self.q(x, ctx))
        if source is None:
            k, v = self.split(self.k(x, ctx)), self.split(self.v(x, ctx))
            if cache is not None:
                k, v = cache.update(layer, k, v)                                  # (B, H, S, D)
        elif cache is not None and layer < len(cache.cross):
            k, v = cache.cross[layer]
        else:
            k, v = self.split(self.k(source, source_ctx)), self.split(self.v(source, source_ctx))
            if cache is not None:
                cache.cross.append((k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)      # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(B, T, -1), ctx)


class DenseReluDense(FeedForward):
    """The FFN slot: v1.0  wo(relu(wi x));  v1.1  wo(gelu_new(wi_0 x) * wi_1 x)."""

    def __init__(self, cfg: Config):
        super().__init__()
        if cfg.gated:
            self.wi_0 = AdaptedLinear(cfg.d_model, cfg.d_ff)
            self.wi_1 = AdaptedLinear(cfg.d_model, cfg.d_ff)
        else:
            self.wi = AdaptedLinear(cfg.d_model, cfg.d_ff)
        self.wo = AdaptedLinear(cfg.d_ff, cfg.d_model)
        self.gated, self.act = cfg.gated, ACTIVATIONS[cfg.act]

    def parts(self):
        if self.gated:
            return self.wi_0, self.wi_1, self.wo, self.act
        return None, self.wi, self.wo, self.act


class SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: Config, relative_bias: bool, causal: bool):
        super().__init__()
        self.SelfAttention = Attention(cfg, relative_bias, causal)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, h, bias, ctx, cache, layer):
        return h + self.SelfAttention(self.layer_norm(h), bias, ctx, cache, layer)


class CrossAttentionLayer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.EncDecAttention = Attention(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, h, bias, ctx, cache, layer, source, source_ctx):
        return h + self.EncDecAttention(self.layer_norm(h), bias, ctx, cache, layer, source, source_ctx)


class FeedForwardLayer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.DenseReluDense = DenseReluDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, h, ctx):
        return h + self.DenseReluDense(self.layer_norm(h), ctx)


class Block(nn.Module):
    """layer[0] self-attention, (decoder: layer[1] cross-attention), layer[-1] FFN; each
    pre-normed with a residual."""

    def __init__(self, cfg: Config, decoder: bool, relative_bias: bool):
        super().__init__()
        layers = [SelfAttentionLayer(cfg, relative_bias, causal=decoder)]
        if decoder:
            layers.append(CrossAttentionLayer(cfg))
        self.layer = nn.ModuleList(layers + [FeedForwardLayer(cfg)])

    def forward(self, h, i, self_bias, ctx, cache=None, cross_bias=None, source=None, source_ctx=None):
        h = self.layer[0](h, self_bias, ctx, cache, i)
        if source is not None:
            h = self.layer[1](h, cross_bias, ctx, cache, i, source, source_ctx)
        return self.layer[-1](h, ctx)


class Stack(nn.Module):
    """The encoder (bidirectional) or decoder (causal, with cross-attention) stack."""

    def __init__(self, cfg: Config, n_layers: int, decoder: bool):
        super().__init__()
        self.decoder = decoder
        self.block = nn.ModuleList(Block(cfg, decoder, relative_bias=(i == 0)) for i in range(n_layers))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, h, mask, ctx, cache: KVCache | None = None,
                source=None, source_mask=None, source_ctx=None) -> torch.Tensor:
        """h (B, T, C); mask [B, T] (or, decoder, [B, cached + T]); source (B, S, C) the
        encoder output with source_mask [B, S]."""
        B, T, _ = h.shape
        past = cache.seq_len() if cache is not None else 0
        if self.decoder:    # causal over the cached and the new tokens
            allowed = causal_padding_mask(decoder_key_mask(mask, cache, B, T, h.device), T)  # (B, 1, T, past+T)
        else:
            allowed = None if mask is None else mask[:, None, None, :] != 0                    # (B, 1, 1, T)
        # Computed once, from block 0's table, and shared by every layer: bias + masks.
        bias = self.block[0].layer[0].SelfAttention.position_bias(T, past + T, past).to(h.dtype)
        if allowed is not None:
            bias = torch.where(allowed, bias, torch.finfo(h.dtype).min)            # (B|1, H, T, past+T)
        cross_bias = None
        if source_mask is not None:
            cross_bias = h.new_zeros(source_mask.shape).masked_fill(
                source_mask == 0, torch.finfo(h.dtype).min)[:, None, None, :]          # (B, 1, 1, S)
        for i, block in enumerate(self.block):
            h = run_block(block, h, i, bias, ctx, cache, cross_bias, source, source_ctx)
        return self.final_layer_norm(h)


# ----------------------------------------------------------------------------- model
class Model(nn.Module):
    is_encoder_decoder = True
    max_positions = None          # relative positions: no length limit of its own
    block_lists = ("encoder.block", "decoder.block")   # gradient checkpointing, FSDP

    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, cfg.num_layers, decoder=False)
        self.decoder = Stack(cfg, cfg.num_decoder_layers, decoder=True)
        # Untied (v1.1) checkpoints carry lm_head.weight; a tied one's copy is the shared table.
        self.lm_head = None if cfg.tie_word_embeddings else AdaptedLinear(cfg.d_model, cfg.vocab_size)
        self.tied_keys = ("lm_head.weight",) if cfg.tie_word_embeddings else ()

    def encode(self, input_ids, attention_mask=None, task_ids=None, ctx=None) -> torch.Tensor:
        """input_ids [B, S] -> final-normed encoder states (B, S, C)."""
        ctx = ForwardContext.of(ctx, task_ids, attention_mask)
        return self.encoder(self.shared(input_ids), attention_mask, ctx.with_mask(attention_mask))

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, task_ids=None,
                ctx=None, encoder_out=None, cache: KVCache | None = None,
                decoder_attention_mask=None, return_hidden: bool = False) -> torch.Tensor:
        """-> logits (B, T, V), or the final-normed decoder states (B, T, C) if return_hidden.
        With `encoder_out` the encoder is skipped. With `cache`, decoder_input_ids are only the
        new tokens, attention_mask is still the encoder's mask, and decoder_attention_mask (if
        any) covers the new tokens or the cached and new ones (attention.decoder_key_mask)."""
        if decoder_input_ids is None:
            raise ValueError("T5 needs decoder_input_ids: the target shifted right, starting with "
                             f"config.decoder_start_token_id ({self.config.decoder_start_token_id})")
        ctx = ForwardContext.of(ctx, task_ids, attention_mask)
        if encoder_out is None:
            if input_ids is None:
                raise ValueError("T5 needs input_ids (or a precomputed encoder_out from model.encode)")
            encoder_out = self.encode(input_ids, attention_mask, ctx=ctx)
        T = decoder_input_ids.shape[1]
        dec_ctx = ctx.with_mask(None if decoder_attention_mask is None else decoder_attention_mask[:, -T:])
        h = self.decoder(self.shared(decoder_input_ids), decoder_attention_mask, dec_ctx, cache,
                         encoder_out, attention_mask, ctx.with_mask(attention_mask))
        if return_hidden:
            return h
        if self.config.scale_decoder_outputs:
            h = h * self.config.d_model ** -0.5          # v1.0: rescale before the tied projection
        if self.lm_head is None:
            return F.linear(h, self.shared.weight)                                 # (B, T, V)
        return self.lm_head(h, dec_ctx)

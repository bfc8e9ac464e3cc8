"""MPT (MosaicML, e.g. MPT-7B) in the Hugging Face layout, with every projection an
AdaptedLinear slot (the fused Wqkv's q, k, v row blocks are slots too). No position
embeddings: ALiBi adds a per-head linear distance penalty to the attention scores.

    ids -> wte -> N x [x + attn(norm_1(x)); x + ffn(norm_2(x))] -> norm_f -> logits = h wte^T

Shapes: B batch, T new tokens, S keys (cached + new), H heads, D head dim, C d_model, V vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtlref.models.config import check_config_keys
from mtlref.layers import AdaptedLinear, FeedForward, ForwardContext, FusedLinear, LayerNorm, run_block
from mtlref.models.attention import KVCache, alibi_bias, causal_padding_mask, decoder_key_mask

# config.json keys read by Config.from_hf (norm_type, ffn_config, tie_word_embeddings and the
# dropouts are only checked).
REQUIRED_KEYS = ("vocab_size", "d_model", "n_heads", "n_layers")
READ_KEYS = REQUIRED_KEYS + ("expansion_ratio", "max_seq_len", "layer_norm_epsilon", "no_bias", "logit_scale",
                             "attn_config", "norm_type", "ffn_config", "tie_word_embeddings", "emb_pdrop",
                             "resid_pdrop")
# config.json keys deliberately ignored: none of them changes what the forward pass computes.
IGNORED_KEYS = (
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "auto_map",  # bookkeeping
    "init_device", "init_config", "initializer_range", "verbose", "tokenizer_name",              # set-up only
    "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",    # generation settings: see tokenizer
    "learned_pos_emb",     # MosaicML's MPTConfig forces it off when alibi is on, and we require alibi
    "embedding_fraction",  # x*f + x.detach()*(1-f): same value, it only scales the embedding's gradient
)
# attn_config keys that matter; transformers also writes its generic config fields (id2label,
# return_dict, ...) into this nested dict, and those are ignored. attn_impl picks a kernel only.
ATTN_UNSUPPORTED = {"qk_ln": False, "clip_qkv": None, "prefix_lm": False, "attn_uses_sequence_id": False,
                    "rope": False, "sliding_window_size": -1, "attn_pdrop": 0}


@dataclass
class Config:
    vocab_size: int
    d_model: int
    n_heads: int
    n_layers: int
    expansion_ratio: int = 4
    max_seq_len: int = 2048
    layer_norm_epsilon: float = 1e-5
    no_bias: bool = True                 # True: no LayerNorm bias and no linear biases
    alibi_bias_max: float = 8.0
    softmax_scale: float | None = None   # None = 1/sqrt(D)
    logit_scale: float | str | None = None   # a number, "inv_sqrt_d_model", or None = 1

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"config.json: d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        self.head_dim = self.d_model // self.n_heads
        self.ffn_hidden = int(self.expansion_ratio * self.d_model)
        self.softmax_scale = self.softmax_scale or 1.0 / math.sqrt(self.head_dim)
        if self.logit_scale == "inv_sqrt_d_model":
            self.logit_scale = 1.0 / math.sqrt(self.d_model)

    @classmethod
    def from_hf(cls, cfg: dict) -> "Config":
        attn = cfg.get("attn_config") or {}
        if not attn.get("alibi", True):
            raise ValueError("config.json: attn_config.alibi=false (learned or no position embeddings) is not "
                             "supported; mtlref's MPT implements the ALiBi models (MPT-7B, MPT-30B)")
        for key, ok in ATTN_UNSUPPORTED.items():
            if attn.get(key) is not None and attn[key] != ok:
                raise ValueError(f"config.json: attn_config.{key}={attn[key]!r} is not supported "
                                 f"(only {ok!r}); the MPT-7B family uses {ok!r}")
        if attn.get("attn_type", "multihead_attention") != "multihead_attention":
            raise ValueError(f"config.json: attn_config.attn_type={attn['attn_type']!r} is not supported "
                             "(only 'multihead_attention')")
        if cfg.get("norm_type", "low_precision_layernorm") not in ("low_precision_layernorm", "layernorm"):
            raise ValueError(f"config.json: norm_type={cfg['norm_type']!r} is not supported (only layernorm)")
        if (cfg.get("ffn_config") or {}).get("ffn_type", "mptmlp") != "mptmlp":
            raise ValueError(f"config.json: ffn_config.ffn_type={cfg['ffn_config']['ffn_type']!r} is not "
                             "supported (only 'mptmlp', the GELU MLP)")
        if not cfg.get("tie_word_embeddings", True):
            raise ValueError("config.json: tie_word_embeddings=false is not supported; MPT ties its head to wte")
        for key in ("emb_pdrop", "resid_pdrop"):
            if cfg.get(key, 0):
                raise ValueError(f"config.json: {key}={cfg[key]} is not supported: the frozen base runs "
                                 "without dropout (adapters have their own); set it to 0")
        check_config_keys(cfg, REQUIRED_KEYS, READ_KEYS, IGNORED_KEYS, "an MPT", "mpt")
        return cls(**{k: cfg[k] for k in REQUIRED_KEYS},
                   expansion_ratio=cfg.get("expansion_ratio", 4), max_seq_len=cfg.get("max_seq_len", 2048),
                   layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5), no_bias=bool(cfg.get("no_bias", True)),
                   alibi_bias_max=float(attn.get("alibi_bias_max", 8)), softmax_scale=attn.get("softmax_scale"),
                   logit_scale=cfg.get("logit_scale"))


# Our state_dict keys are the Hugging Face keys. Hugging Face's MPT always ties its head to
# wte, so a stored lm_head.weight is a copy of it.
def hf_key(name: str) -> str | None:
    return None if name == "lm_head.weight" else name


# ----------------------------------------------------------------------------- modules
class Attention(nn.Module):
    """Multi-head self-attention with ALiBi.

    Wqkv stays ONE fused weight [3C, C], as in the checkpoint: its key loads unchanged and q, k,
    v cost one GEMM. It is a FusedLinear, so it can be adapted two ways:
      - target "Wqkv": one adapter over the whole 3C output (q, k and v together), the module
        peft targets by the same name;
      - targets "q", "k", "v" (or "Wqkv.q", ...): its row blocks [q | k | v], C rows each, each
        with its own adapter under Wqkv.q.adapter.* etc., as LLaMA's separate q/k/v_proj
        (MTL-LoRA Table 1 adapts Q, K, V and O as four modules).
    Targeting "Wqkv" together with one of its blocks is an error: both would adapt the same rows."""

    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.layer, self.H, self.D, self.scale = layer, cfg.n_heads, cfg.head_dim, cfg.softmax_scale
        C = cfg.d_model
        self.Wqkv = FusedLinear(C, 3 * C, {"q": (0, C), "k": (C, 2 * C), "v": (2 * C, 3 * C)},
                                bias=not cfg.no_bias)
        self.out_proj = AdaptedLinear(C, C, bias=not cfg.no_bias)

    def forward(self, x, bias, ctx: ForwardContext, cache: KVCache | None):
        B, T, C = x.shape
        qkv = self.Wqkv(x, ctx).view(B, T, 3, self.H, self.D)                    # [q | k | v] along C
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                                      # each (B, H, T, D)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                                 # (B, H, S, D)
        # softmax(q k^T * scale + ALiBi bias + mask) v; bias (B, H, T, S) holds -inf where masked
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)   # (B, H, T, D)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C), ctx)


class MLP(FeedForward):
    """down(gelu(up(x))), C -> expansion_ratio*C -> C, exact (erf) GELU as MPT uses."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.up_proj = AdaptedLinear(cfg.d_model, cfg.ffn_hidden, bias=not cfg.no_bias)
        self.down_proj = AdaptedLinear(cfg.ffn_hidden, cfg.d_model, bias=not cfg.no_bias)

    def parts(self):
        return None, self.up_proj, self.down_proj, F.gelu


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.norm_1 = LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, bias=not cfg.no_bias)
        self.attn = Attention(cfg, layer)
        self.norm_2 = LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, bias=not cfg.no_bias)
        self.ffn = MLP(cfg)

    def forward(self, x, bias, ctx, cache):
        x = x + self.attn(self.norm_1(x), bias, ctx, cache)
        return x + self.ffn(self.norm_2(x), ctx)


class Transformer(nn.Module):
    """Hugging Face's MptModel: the `transformer.` prefix of every key."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm_f = LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, bias=not cfg.no_bias)


class Model(nn.Module):
    block_lists = ("transformer.blocks",)    # the transformer blocks (gradient checkpointing, FSDP)

    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.max_positions = cfg.max_seq_len
        self.transformer = Transformer(cfg)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random weights for tests and from-scratch runs (a no-op on the meta device, where
        load_model builds the model): N(0, std) matrices, zero biases, unit norms."""
        for m in self.modules():
            if isinstance(m, (AdaptedLinear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, (AdaptedLinear, LayerNorm)) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, LayerNorm):
                nn.init.ones_(m.weight)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                task_ids: torch.Tensor | None = None, ctx: ForwardContext | None = None,
                cache: KVCache | None = None, position_ids: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] (or final-normed hidden states [B, T, C]).
        attention_mask [B, S] or [B, T]: 1 = real token, 0 = padding (left or right).
        position_ids is accepted for a uniform decoder API; ALiBi needs only distances, and the
        distance between two real tokens is the same whether counted over padding or not."""
        B, T = input_ids.shape
        full = decoder_key_mask(attention_mask, cache, B, T, input_ids.device)   # (B, S)
        S = full.shape[1]
        if S > self.max_positions:
            raise ValueError(f"sequence of {S} tokens is longer than this model's max_seq_len={self.max_positions}")
        ctx = ForwardContext.of(ctx, task_ids)
        if ctx.mask is None:
            ctx = ctx.with_mask(full[:, -T:])
        x = self.transformer.wte(input_ids)                                     # (B, T, C)
        pos = torch.arange(S, device=x.device)
        alibi = alibi_bias(self.config.n_heads, pos[S - T:], pos, self.config.alibi_bias_max)   # (H, T, S)
        allowed = causal_padding_mask(full, T)                                  # (B, 1, T, S)
        bias = torch.where(allowed, alibi, float("-inf")).to(x.dtype)           # (B, H, T, S)
        for block in self.transformer.blocks:
            x = run_block(block, x, bias, ctx, cache)
        h = self.transformer.norm_f(x)
        if return_hidden:
            return h
        logits = F.linear(h, self.transformer.wte.weight)                       # tied head: h wte^T
        return logits * self.config.logit_scale if self.config.logit_scale is not None else logits

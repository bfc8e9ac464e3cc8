"""BERT encoder (the MiniLM family: all-MiniLM-L6-v2 is a 6-layer BERT), every projection an
AdaptedLinear slot.

    ids -> word + position + token-type embeddings -> LayerNorm
        -> N x [x = LN(x + attn(x)); x = LN(x + ffn(x))]  (post-LN)  -> last_hidden_state
    pooler: tanh(dense(h[:, 0]))

Shapes: B batch, T tokens, H heads, D head dim, C hidden size, I intermediate size.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtlref.models.config import check_config_keys
from mtlref.layers import AdaptedLinear, FeedForward, ForwardContext, LayerNorm, run_block

ACTIVATIONS = {"gelu": F.gelu, "gelu_new": partial(F.gelu, approximate="tanh"),
               "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"), "relu": F.relu}

# config.json keys deliberately ignored: none changes what the encoder computes at eval.
IGNORED_KEYS = (
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",  # bookkeeping
    "attention_probs_dropout_prob", "hidden_dropout_prob", "classifier_dropout",    # training only
    "initializer_range", "gradient_checkpointing", "use_cache",
    "bos_token_id", "eos_token_id", "tie_word_embeddings",     # the MLM head is not part of BertModel
    "id2label", "label2id", "problem_type", "finetuning_task",   # task heads: mtlref has its own
)


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"                     # exact (erf) GELU
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    is_decoder: bool = False
    add_cross_attention: bool = False
    head_dim: int = field(init=False)

    def __post_init__(self):
        if self.position_embedding_type != "absolute":
            raise ValueError(f"config.json: position_embedding_type {self.position_embedding_type!r} is not "
                             "supported; mtlref's BERT has absolute position embeddings only")
        if self.is_decoder or self.add_cross_attention:
            raise ValueError("config.json: is_decoder / add_cross_attention describe a BERT decoder; "
                             "mtlref's BERT is the bidirectional encoder (set both to false)")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"config.json: hidden_act {self.hidden_act!r} is not supported "
                             f"(supported: {sorted(ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"config.json: hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, cfg: dict) -> "Config":
        names = {f.name for f in fields(cls) if f.init}
        check_config_keys(cfg, (), names, IGNORED_KEYS, "a BERT", "bert")
        return cls(**{k: cfg[k] for k in names if k in cfg and cfg[k] is not None})


# ----------------------------------------------------------------------------- checkpoint keys
# Our state_dict keys are the BertModel keys. BertForXxx checkpoints prefix them with "bert.";
# their task heads (MLM/NSP "cls.*", "classifier.*") and the position_ids buffer are not loaded.
PREFIX = "bert."
SKIPPED = ("embeddings.position_ids", "embeddings.token_type_ids")
HEAD_PREFIXES = ("cls.", "classifier.")
RENAMES = ((".LayerNorm.gamma", ".LayerNorm.weight"), (".LayerNorm.beta", ".LayerNorm.bias"))  # TF-era names


def hf_key(name: str) -> str | None:
    if name.startswith(HEAD_PREFIXES):
        return None
    name = name.removeprefix(PREFIX)
    if name in SKIPPED:
        return None
    for old, new in RENAMES:
        if name.endswith(old):
            name = name[: -len(old)] + new
    return name


# ----------------------------------------------------------------------------- modules
class Embeddings(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, input_ids, token_type_ids=None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)   # no buffer: computed here
        h = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(h + self.position_embeddings(positions))           # (B, T, C)


class SelfAttention(nn.Module):
    """q, k, v projections (HF `attention.self`)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.query = AdaptedLinear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.key = AdaptedLinear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.value = AdaptedLinear(cfg.hidden_size, cfg.hidden_size, bias=True)


class DenseNorm(nn.Module):
    """A dense projection and the LayerNorm applied to (its output + the residual)."""

    def __init__(self, cfg: Config, in_features: int):
        super().__init__()
        self.dense = AdaptedLinear(in_features, cfg.hidden_size, bias=True)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)


class Intermediate(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.dense = AdaptedLinear(cfg.hidden_size, cfg.intermediate_size, bias=True)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.self = SelfAttention(cfg)         # "self" is the Hugging Face name of this child
        self.output = DenseNorm(cfg, cfg.hidden_size)

    def forward(self, x, bias, ctx) -> torch.Tensor:
        """x (B, T, C), bias (B, 1, 1, T) additive padding mask -> LN(x + o(softmax(qk^T/sqrt(D)) v))."""
        B, T, C = x.shape

        def heads(y):                                                               # (B, H, T, D)
            return y.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        q = heads(self.self.query(x, ctx))
        k = heads(self.self.key(x, ctx))
        v = heads(self.self.value(x, ctx))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)                 # scale 1/sqrt(D)
        y = self.output.dense(y.transpose(1, 2).reshape(B, T, C), ctx)
        return self.output.LayerNorm(y + x)


class Layer(FeedForward):
    """One post-LN BERT layer. It is also the block's FFN slot (FeedForward): calling it runs
    only the FFN, output.dense(act(intermediate.dense(x))); `block()` runs the whole layer,
    with the residual and output.LayerNorm around the FFN."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = DenseNorm(cfg, cfg.intermediate_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def parts(self):
        return None, self.intermediate.dense, self.output.dense, self.act

    def block(self, x, bias, ctx) -> torch.Tensor:
        h = self.attention(x, bias, ctx)
        return self.output.LayerNorm(self(h, ctx) + h)                                # (B, T, C)


class Encoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, h, bias, ctx) -> torch.Tensor:
        for layer in self.layer:
            h = run_block(layer, h, bias, ctx, call=layer.block)
        return h


class Pooler(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.dense = AdaptedLinear(cfg.hidden_size, cfg.hidden_size, bias=True)


# ----------------------------------------------------------------------------- model
class Model(nn.Module):
    is_encoder_decoder = False
    block_lists = ("encoder.layer",)         # the transformer blocks (gradient checkpointing, FSDP)

    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.max_positions = cfg.max_position_embeddings
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.pooler = Pooler(cfg)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, task_ids=None,
                ctx: ForwardContext | None = None) -> torch.Tensor:
        """input_ids [B, T] -> last_hidden_state (B, T, C)."""
        T = input_ids.shape[1]
        if T > self.max_positions:
            raise ValueError(f"input has {T} tokens but this BERT has max_position_embeddings="
                             f"{self.max_positions}; truncate the input to {self.max_positions} tokens")
        ctx = ForwardContext.of(ctx, task_ids)
        ctx = ctx.with_mask(attention_mask)
        h = self.embeddings(input_ids, token_type_ids)
        bias = None
        if attention_mask is not None:   # 0 for real keys, the dtype's min for padding  (B, 1, 1, T)
            bias = h.new_zeros(attention_mask.shape).masked_fill(
                attention_mask == 0, torch.finfo(h.dtype).min)[:, None, None, :]
        return self.encoder(h, bias, ctx)

    def pool(self, hidden: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        """last_hidden_state (B, T, C) -> pooler_output (B, C) = tanh(dense(h[:, 0]))."""
        return torch.tanh(self.pooler.dense(hidden[:, 0], ctx))

"""What the bench runs: a random mixed-task batch, the loss, the floor and each method's model on
one shared copy of the frozen base, and one training step or inference forward as a closure.

Shapes: B batch, T tokens, C hidden, V vocabulary.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from experiments.bench.settings import FLOOR, METHODS, BenchConfig
from mtlref.adapters import attach_adapters
from mtlref.pretrained import load_model
from mtlref.heads import family
from mtlref.layers import ForwardContext
from mtlref.losses import total_loss
from mtlref.presets import resolve_targets
from mtlref.train import autocast

# The module whose output is the input embedding (the floor's trainable scalar goes there).
INPUT_EMBEDDING = {"llama": "model.embed_tokens", "mpt": "transformer.wte", "t5": "shared", "bert": "embeddings"}


# ----------------------------------------------------------------------------- batches, loss
def make_batch(model: nn.Module, batch_size: int, seq_len: int, num_tasks: int, device: str,
               task_ids: torch.Tensor | None = None, seed: int = 0) -> dict:
    """Random token ids (no padding) and a mixed-task batch: task_ids = 0, 1, ..., T-1, 0, ..."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "task_ids": torch.arange(batch_size) % num_tasks if task_ids is None else task_ids,
             "labels": torch.randint(0, 2, (batch_size,), generator=g)}
    if family(model) == "t5":
        batch["decoder_input_ids"] = torch.randint(5, vocab, (batch_size, seq_len), generator=g)
    return {k: v.to(device) for k, v in batch.items()}


def run_model(model: nn.Module, batch: dict, ctx: ForwardContext) -> torch.Tensor:
    """Logits (B, T, V) for decoders and T5, hidden states (B, T, C) for BERT."""
    if family(model) == "t5":
        return model(batch["input_ids"], attention_mask=batch["attention_mask"],
                     decoder_input_ids=batch["decoder_input_ids"], ctx=ctx)
    return model(batch["input_ids"], attention_mask=batch["attention_mask"], ctx=ctx)


def task_loss(out: torch.Tensor, batch: dict, fam: str, head: torch.Tensor) -> torch.Tensor:
    """Decoders: next-token cross-entropy; T5: cross-entropy on decoder_input_ids as targets;
    BERT: a 2-way classifier (fixed random head [C, 2]) on the mean-pooled hidden states."""
    out = out.float()
    if fam in ("llama", "mpt"):
        return F.cross_entropy(out[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())
    if fam == "t5":
        return F.cross_entropy(out.flatten(0, 1), batch["decoder_input_ids"].flatten())
    return F.cross_entropy(out.mean(1) @ head, batch["labels"])


def head_for(model: nn.Module, cfg: BenchConfig) -> torch.Tensor:
    """BERT's fixed classifier [C, 2] (unused by the other families)."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    c = getattr(model.config, "hidden_size", 1)
    return torch.randn(c, 2, generator=g).to(cfg.device)


# ----------------------------------------------------------------------------- models
def share_base(base: nn.Module) -> nn.Module:
    """A copy of `base` whose parameters and buffers ARE the base's (one copy in memory)."""
    memo = {id(t): t for t in list(base.parameters()) + list(base.buffers())}
    return copy.deepcopy(base, memo)


def add_floor_scalar(model: nn.Module) -> nn.Parameter:
    """Freeze `model` and add a trainable scalar (0) to its input embedding's output, so that
    the backward runs through every activation while no weight gradient is computed."""
    for p in model.parameters():
        p.requires_grad_(False)
    zero = nn.Parameter(torch.zeros((), device=next(model.parameters()).device))
    model.floor_scalar = zero
    model.get_submodule(INPUT_EMBEDDING[family(model)]).register_forward_hook(lambda m, i, out: out + zero)
    return zero


def build(base: nn.Module, name: str, cfg: BenchConfig) -> nn.Module:
    """The floor or a method's model on a shared copy of the frozen base, in train mode."""
    model = share_base(base)
    if name == FLOOR:
        add_floor_scalar(model)
    else:
        opts = dict(METHODS[name])
        rank, alpha = opts.pop("rank"), opts.pop("alpha")
        attach_adapters(model, name, resolve_targets(cfg.targets, family(model)), num_tasks=cfg.num_tasks,
                        rank=rank, alpha=alpha, **opts)
    return model.train()


def train_step(model: nn.Module, batch: dict, head: torch.Tensor, device: str) -> Callable[[], None]:
    """One training step as a closure: forward, total loss, backward, AdamW on the trainables."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    fam = family(model)

    def step() -> None:
        ctx = ForwardContext(task_ids=batch["task_ids"], mask=batch["attention_mask"], aux_losses={})
        with autocast(device):
            out = run_model(model, batch, ctx)
        loss, _ = total_loss(task_loss(out, batch, fam, head), ctx.aux_losses)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def forward_fn(model: nn.Module, batch: dict, device: str) -> Callable[[], None]:
    """One inference forward as a closure (no autograd, bf16 autocast on CUDA)."""
    def f() -> None:
        with torch.inference_mode(), autocast(device):
            run_model(model, batch, ForwardContext(task_ids=batch["task_ids"]))
    return f


# ----------------------------------------------------------------------------- the base
def load_base(cfg: BenchConfig) -> nn.Module:
    torch.manual_seed(cfg.seed)
    if Path(cfg.model).is_file():
        return random_base(cfg.model, getattr(torch, cfg.dtype), cfg.device)
    return load_model(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device)


def random_base(config_json, dtype, device) -> nn.Module:
    """A model of config.json's shape (e.g. the public Llama-2-7b-hf config) with random weights
    made directly on the device in `dtype` (no download, no second copy): matrices and
    embeddings N(0, 0.02), norms 1, biases 0. Speed does not depend on the values."""
    from mtlref.pretrained import family_module
    cfg = json.loads(Path(config_json).read_text())
    fam = family_module(cfg, Path(config_json).parent)
    with torch.device("meta"):
        model = fam.Model(fam.Config.from_hf(cfg)).to(dtype)
    model = model.to_empty(device=device)                                   # allocated once, in dtype
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)                                                 # norm weights
            else:
                p.normal_(0.0, 0.02)
    model.base_identity = {"model_type": cfg["model_type"], "name": Path(config_json).name, "random": True}
    return model.eval()


def matmul_params(model: nn.Module) -> int:
    """Numbers in the weight matrices a token multiplies (projections and the LM head; not the
    embedding lookups): the N of model FLOPs = 2·N per token forward."""
    from mtlref.layers import AdaptedLinear
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, AdaptedLinear))
    if family(model) != "bert" and getattr(model, "lm_head", None) is None:      # a head tied to the embedding
        c = model.config
        n += c.vocab_size * (getattr(c, "hidden_size", None) or c.d_model)
    return n

"""Attaching adapters to a model's slots, finding them again, counting and merging.

    attach_adapters(model, method, targets, num_tasks=1, rank=8, alpha=16, dropout=0.0, **options)
    detach_adapters(model) / adapters_of(model) -> {module path: adapter}
    count_parameters(model) -> (trainable, total, percent)
    merge_adapters(model, task_id) -> a copy with ΔW_t folded into the base weights

`targets` match a module path's suffix at a dot boundary, as peft does: "q_proj" matches
`model.layers.3.self_attn.q_proj`, "output.dense" matches BERT's FFN output and
`attention.output.dense`; "proj" matches neither. The row blocks of a fused projection are
slots too (layers.FusedLinear: MPT's Wqkv has blocks q, k, v, so "q" or "Wqkv.q" adapts the
query rows only); a fused slot and one of its blocks cannot both be targeted.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from mtlref.adapters.base import ROLES
from mtlref.adapters.registry import REGISTRY
from mtlref.layers import AdaptedLinear, FeedForward, RowBlock

FORMAT = 3                                             # of adapter_config.json (adapters/io.py)


def matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


SLOT_TYPES = (AdaptedLinear, RowBlock)                 # what a projection adapter attaches to


def slots_of(model: nn.Module) -> dict[str, AdaptedLinear | RowBlock]:
    """Module path -> projection slot: every AdaptedLinear and every row block of a FusedLinear
    (`...attn.Wqkv.q`)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SLOT_TYPES)}


def slot_suffix(name: str, slot: nn.Module) -> str:
    """The name a user targets a slot by: its last component, with its parent's for a row block
    ("Wqkv.q"), for error messages."""
    return ".".join(name.split(".")[-2:]) if isinstance(slot, RowBlock) else name.rsplit(".", 1)[-1]


def check_no_overlap(chosen: dict[str, nn.Module], targets: list[str]) -> None:
    """A fused slot and one of its row blocks, both chosen, would adapt the same rows twice."""
    path = {id(s): n for n, s in chosen.items()}
    for name, s in chosen.items():
        if isinstance(s, RowBlock) and id(s.parent) in path:
            fused = path[id(s.parent)]
            t_fused = next(t for t in targets if matches(fused, t))
            t_block = next(t for t in targets if matches(name, t))
            raise ValueError(f"targets {t_fused!r} and {t_block!r} both adapt rows {s.start}:{s.stop} of {fused} "
                             f"(the fused slot and its row block {name}); target either the fused slot "
                             f"or its blocks, not both")


def attach_adapters(model: nn.Module, method: str, targets, num_tasks: int = 1, rank: int = 8,
                    alpha: float = 16, dropout: float = 0.0, within: str | None = None, meta_ok: bool = False,
                    rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None,
                    **options) -> nn.Module:
    """Freeze every base parameter and attach `method` to every slot whose path ends with a
    target. MixLoRA puts its experts on the targeted FFN projections and a plain LoRA on the
    other targets. within: only slots under this module path (T5 with encoder heads: "encoder",
    where the gradient reaches). meta_ok: a base on the meta device (no weights) is accepted,
    for counting parameters only (mtlref/params.py); otherwise it is an error.
    rank_pattern / alpha_pattern: {slot path: rank / alpha} for slots that differ from `rank` /
    `alpha` (peft's names; adapters imported from peft, mtlref/export.py)."""
    if method not in REGISTRY:
        raise ValueError(f"unknown adapter method {method!r}; mtlref knows {sorted(REGISTRY)}")
    cls = REGISTRY[method]
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise ValueError(f"{method}: unknown option(s) {unknown}; it accepts {list(cls.options)}")
    slots = slots_of(model)
    if getattr(model, "adapter_config", None) is not None or any(s.adapter is not None for s in slots.values()):
        raise ValueError("this model already has adapters; load a fresh base model (or use merge_adapters "
                         "to fold them in) before attaching again")
    if within is not None:
        slots = {n: s for n, s in slots.items() if n.startswith(within + ".")}
    if not meta_ok and any(s.weight.is_meta for s in slots.values()):
        raise ValueError("attach adapters after the weights are loaded (the base weight is on the meta device)")
    if not slots or not targets:
        raise ValueError(f"nothing to adapt: {len(slots)} AdaptedLinear slots in the model, targets={targets}")
    for t in targets:
        if not any(matches(name, t) for name in slots):
            suffixes = sorted({slot_suffix(n, s) for n, s in slots.items()})
            raise ValueError(f"target {t!r} matches no projection of this model; slot names end with "
                             f"{suffixes} (dotted suffixes such as 'output.dense' also work)")
    chosen = {n: s for n, s in slots.items() if any(matches(n, t) for t in targets)}
    check_no_overlap(chosen, targets)
    new: list[tuple[nn.Module, nn.Module]] = []          # (slot or FFN block, adapter), built before any change
    slot_cls, slot_options = cls, options
    if cls.slot == "ffn":
        new, chosen = ffn_adapters(model, cls, chosen, num_tasks, rank, alpha, dropout, options)
        slot_cls, slot_options = cls.other_targets, {}     # MixLoRA: plain LoRA on the other targets
    patterns = {**(rank_pattern or {}), **(alpha_pattern or {})}
    stray = sorted(set(patterns) - set(chosen))
    if stray:
        raise ValueError(f"rank_pattern/alpha_pattern name slots that are not adapted: {stray[:3]}; "
                         f"the adapted slots are {sorted(chosen)[:3]} ...")
    new += [(s, slot_cls(s, num_tasks, (rank_pattern or {}).get(n, rank), (alpha_pattern or {}).get(n, alpha),
                         dropout, **slot_options)) for n, s in chosen.items()]
    for p in model.parameters():
        p.requires_grad_(False)
    for module, adapter in new:
        module.adapter = adapter.train(module.training)
    model.adapter_config = {"format": FORMAT, "method": method, "targets": targets, "num_tasks": num_tasks,
                            "rank": rank, "alpha": alpha, "dropout": dropout,
                            "options": {**cls.options, **options},      # every option's value, defaults too
                            "within": within, "rank_pattern": dict(rank_pattern or {}),
                            "alpha_pattern": dict(alpha_pattern or {})}
    return model


def detach_adapters(model: nn.Module) -> nn.Module:
    """Remove every adapter (the base stays frozen): the model as load_model gave it, ready for
    attach_adapters again (LoRA-ST trains one task's adapter after the other on one base)."""
    for m in model.modules():
        if isinstance(m, (*SLOT_TYPES, FeedForward)):
            m.adapter = None
    if hasattr(model, "adapter_config"):
        del model.adapter_config
    return model


def ffn_adapters(model, cls, chosen, num_tasks, rank, alpha, dropout, options):
    """`cls` for every FeedForward block with a targeted projection: ([(block, adapter)], the
    chosen slots that are not such FFN projections)."""
    path = {id(s): n for n, s in chosen.items()}
    new, taken = [], set()
    for ffn in model.modules():
        if not isinstance(ffn, FeedForward):
            continue
        parts = list(ffn.parts()[:3])
        roles = tuple(r for r, p in zip(ROLES, parts) if p is not None and id(p) in path)
        if roles:
            new.append((ffn, cls(ffn, roles, num_tasks, rank, alpha, dropout, **options)))
            taken.update(path[id(p)] for p in parts if p is not None and id(p) in path)
    if not taken:
        raise ValueError(f"{cls.method}: none of the targets is a projection of a layers.FeedForward block; "
                         "add the FFN projections (e.g. gate_proj/up_proj/down_proj, wi/wo, "
                         "intermediate.dense/output.dense) to targets")
    return new, {n: s for n, s in chosen.items() if n not in taken}


def adapters_of(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> attached adapter, for projection slots (row blocks included) and FFN blocks."""
    return {name: m.adapter for name, m in model.named_modules()
            if isinstance(m, (*SLOT_TYPES, FeedForward)) and m.adapter is not None}


def require_config(model: nn.Module) -> dict:
    cfg = getattr(model, "adapter_config", None)
    if cfg is None:
        raise ValueError("this model has no adapters; call attach_adapters or load_adapters first")
    return cfg


# ----------------------------------------------------------------------------- count, merge
def count_parameters(model: nn.Module) -> tuple[int, int, float]:
    """(trainable, total, 100 * trainable / total); shared tensors counted once."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return trainable, total, 100.0 * trainable / max(total, 1)


def merge_adapters(model: nn.Module, task_id: int) -> nn.Module:
    """A deep copy of `model` with W + ΔW_t in every adapted slot and no adapters: the plain
    base architecture that serves task `task_id` at the base model's cost. A row block's
    weight is a view of its fused parent's rows (in the copy: the copy's parent), so copying
    into it folds ΔW_t into those rows."""
    cfg = require_config(model)
    if not REGISTRY[cfg["method"]].mergeable:
        raise ValueError(f"{cfg['method']} adapters cannot be merged into the base weights (its experts are "
                         "chosen per token); serve the model with the adapters attached")
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for slot in slots_of(merged).values():
            if slot.adapter is not None:
                dw = slot.adapter.delta_weight(task_id, slot)                 # (out, in) fp32
                slot.weight.copy_((slot.weight.float() + dw).to(slot.weight.dtype))
                slot.adapter = None
    del merged.adapter_config
    return merged


"""Serve what you train: each task's adapter as one plain LoRA in peft's format, a task's merged
Hugging Face checkpoint, and peft LoRA / DoRA adapters read into mtlref's LoRA slots.

For a fixed task t every task-conditioned method is one LoRA, ΔW_t = B_t A_t (each adapter's
`as_lora`), with every scaling folded into B_t:
    LoRA, LoRA-ST   A, s·B (LoRA-ST: task t's slice)                        rank r
    DoRA            A, s·B, and the magnitude m (peft's lora_magnitude_vector)   rank r
    MultiLoRA       [A_1; ...; A_n], [s·diag(c_1) B_1, ..., s·diag(c_n) B_n]       rank n·r
    MoELoRA         A, s·B·diag(g_t, each expert's weight on its rank columns)     rank r
    MTL-LoRA        Λ_t A, s·Σ_i softmax(w_t/τ)_i B^i                              rank r
    MoRE            the rank columns task t uses, A[S_t] and (B·weights)[:, S_t]  rank r_t
    Poly / MHR      A_tᵀ, s·B_tᵀ: task t's skills mixed by its eval weights (σ, normalised)  rank r
    MoSLoRA         M A, s·B (the mixer folded into A; the same LoRA for every task)        rank r
Because the scales are in B, every module's lora_alpha equals its rank (peft's scaling α/r is
1): exact, and the simplest config. Where ranks differ between modules (MoRE: r_t per module)
the config carries rank_pattern = alpha_pattern; uniform_rank=True instead pads every module
with zero rank columns to the largest rank (the same ΔW) for servers that read one r.
MPT's row blocks (Wqkv.q/k/v, each with its own adapter) are not modules peft can target: they
become one Wqkv LoRA with A = [A_q; A_k; A_v] and B block-diagonal, the same ΔW exactly.
MixLoRA routes every token to its own experts, which no LoRA can write; attention_only=True
exports its attention LoRAs and leaves the FFN experts out (and says so). HydraLoRA mixes its
up-projections per token everywhere it sits, so nothing of it can be exported (an error says so).

Keys: base_model.model.<module path>.lora_A.weight [k, in], .lora_B.weight [out, k] and, for
DoRA, .lora_magnitude_vector [out]: mtlref's module paths are the Hugging Face ones
(model.layers.{i}.self_attn.q_proj, encoder.block.{i}.layer.0.SelfAttention.q,
transformer.blocks.{i}.attn.Wqkv, encoder.layer.{i}.attention.self.query for BertModel;
prefix="bert." for the BertFor... classes).
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mtlref.adapters import adapters_of, attach_adapters, merge_adapters, require_config, slots_of
from mtlref.files import write_atomic
from mtlref.heads import family
from mtlref.layers import RowBlock

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
TASK_TYPES = {"llama": "CAUSAL_LM", "mpt": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": "FEATURE_EXTRACTION"}
TOKENIZER_FILES = ("tokenizer.model", "spiece.model", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")


# ----------------------------------------------------------------------------- task t as LoRAs
def task_loras(model, task_id: int, attention_only: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"A" [k, in], "B" [out, k], ("magnitude" [out])}}: task t's adapter as one
    plain LoRA per adapted module, ΔW = B A (fp32, detached; each adapter's lora_entry). Row blocks
    join their fused module. An adapter no LoRA can write (its export_refusal: MixLoRA's FFN
    experts) is an error naming it, or left out with attention_only."""
    require_config(model)
    slots, out, blocks = slots_of(model), {}, {}
    for name, adapter in adapters_of(model).items():
        if adapter.export_refusal is not None:
            if attention_only:
                continue
            raise ValueError(f"{name}: {adapter.export_refusal}")
        slot = slots[name]
        entry = adapter.lora_entry(task_id, slot)
        if isinstance(slot, RowBlock):
            blocks.setdefault(name.rsplit(".", 1)[0], []).append((slot, entry))
        else:
            out[name] = entry
    for fused, parts in blocks.items():
        out[fused] = join_row_blocks(fused, slots[fused], parts)
    if not out:
        raise ValueError("nothing to export: no adapted module can be written as a LoRA")
    return dict(sorted(out.items()))


def join_row_blocks(name: str, fused, parts) -> dict[str, torch.Tensor]:
    """Block adapters on rows start:stop of one fused weight -> one LoRA of the fused module:
    A = [A_1; A_2; ...], B block-diagonal (block b's B in its rows and its rank columns).
    Rows of blocks without an adapter get zeros (and, with DoRA, their own ‖W‖ as magnitude,
    so m/‖V‖ = 1 there)."""
    A = torch.cat([e["A"] for _, e in parts])                                  # (Σk, in)
    B = torch.zeros(fused.out_features, A.shape[0])                            # (out, Σk)
    col = 0
    for block, e in parts:
        k = e["A"].shape[0]
        B[block.start:block.stop, col:col + k] = e["B"]
        col += k
    entry = {"A": A, "B": B}
    if "magnitude" in parts[0][1]:
        m = fused.weight.detach().float().norm(dim=1)
        for block, e in parts:
            m[block.start:block.stop] = e["magnitude"]
        entry["magnitude"] = m
    return entry


def pad_rank(entry: dict, k: int) -> dict:
    """The same ΔW with rank k: zero rows of A and zero columns of B appended."""
    A, B = entry["A"], entry["B"]
    extra = k - A.shape[0]
    return {**entry, "A": torch.cat([A, A.new_zeros(extra, A.shape[1])]),
            "B": torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1)}


# ----------------------------------------------------------------------------- peft's format
def peft_adapter(model, task_id: int, base_model_name_or_path: str = "", prefix: str = "",
                 attention_only: bool = False, uniform_rank: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, adapter_model.safetensors tensors) of task t in peft's LoRA layout."""
    loras = task_loras(model, task_id, attention_only)
    if uniform_rank:
        top = max(e["A"].shape[0] for e in loras.values())
        loras = {n: pad_rank(e, top) for n, e in loras.items()}
    ranks = {prefix + n: e["A"].shape[0] for n, e in loras.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)             # the most common rank
    pattern = {n: k for n, k in ranks.items() if k != r}
    config = {"peft_type": "LORA", "task_type": TASK_TYPES[family(model)], "base_model_name_or_path":
              base_model_name_or_path, "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": pattern,
              "target_modules": sorted(ranks), "use_dora": any("magnitude" in e for e in loras.values()),
              "use_rslora": False, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
              "layers_to_transform": None, "layers_pattern": None, "revision": None}
    tensors = {}
    for n, e in loras.items():
        key = PEFT_PREFIX + prefix + n
        tensors[f"{key}.lora_A.weight"] = e["A"].contiguous()
        tensors[f"{key}.lora_B.weight"] = e["B"].contiguous()
        if "magnitude" in e:
            tensors[f"{key}.lora_magnitude_vector"] = e["magnitude"].contiguous()
    return config, tensors


def export_peft(model, task_id: int, out, **kw) -> Path:
    """Write task t's adapter as out/adapter_config.json + out/adapter_model.safetensors."""
    config, tensors = peft_adapter(model, task_id, **kw)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / PEFT_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True)
    write_atomic(out / PEFT_CONFIG, lambda tmp: Path(tmp).write_text(text))
    return out


def export_merged(model, task_id: int, out, model_dir, max_shard_bytes: int = 5 * 2 ** 30) -> Path:
    """Task t's ΔW folded into the base (merge_adapters), written as a complete Hugging Face
    checkpoint: the base's config.json and tokenizer files, model.safetensors (Hugging Face key
    names), sharded with model.safetensors.index.json above max_shard_bytes."""
    merged = merge_adapters(model, task_id)
    state = {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}
    out, model_dir = Path(out), Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards, size = [[]], 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    written = {"model.safetensors"} if len(shards) == 1 else {"model.safetensors.index.json"}
    if len(shards) == 1:
        write_atomic(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    else:
        weight_map = {}
        for i, keys in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            part = {k: state[k] for k in keys}
            write_atomic(out / name, lambda tmp, part=part: save_file(part, tmp, metadata={"format": "pt"}))
            weight_map.update({k: name for k in keys})
            written.add(name)
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": weight_map}
        text = json.dumps(index, indent=2)
        write_atomic(out / "model.safetensors.index.json", lambda tmp: Path(tmp).write_text(text))
    # the weights of an earlier export into `out` go once the new ones are complete: a loader that
    # prefers model.safetensors to the index (Hugging Face) would otherwise read the old task
    for old in [out / "model.safetensors", out / "model.safetensors.index.json", *out.glob("model-*-of-*.safetensors")]:
        if old.name not in written and old.is_file():
            old.unlink()
    for name in ("config.json", *TOKENIZER_FILES):
        if (model_dir / name).is_file():
            write_atomic(out / name, lambda tmp, name=name: shutil.copyfile(model_dir / name, tmp))
    return out


# ----------------------------------------------------------------------------- import
def load_peft_adapter(model, path, prefix: str | None = None):
    """Read a peft LoRA or DoRA adapter (adapter_config.json + adapter_model.safetensors) into
    mtlref LoRA / DoRA slots of `model`: per-module ranks and alphas (rank_pattern,
    alpha_pattern), rsLoRA's α/√r scaling. prefix: the part of peft's module paths that mtlref's
    do not have (e.g. "bert."); None finds it. Returns the peft config."""
    path = Path(path)
    cfg_file, weights = path / PEFT_CONFIG, path / PEFT_WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{path}: not a peft adapter directory (it needs {PEFT_CONFIG} and {PEFT_WEIGHTS}; "
                                "an adapter_model.bin must be converted to safetensors first)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}; mtlref reads LORA adapters (with or "
                         "without use_dora) only")
    for key, ok in (("bias", "none"), ("fan_in_fan_out", False)):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"{cfg_file}: {key}={cfg[key]!r} is not supported (only {ok!r})")
    tensors = load_file(str(weights))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector"
                         r"(?:\.weight)?)", key)
        if m is None:
            raise ValueError(f"{weights}: key {key!r} is not a LoRA tensor (expected <module>.lora_A.weight, "
                             ".lora_B.weight or .lora_magnitude_vector); modules_to_save are not supported")
        modules.setdefault(m.group(1), {})[m.group(2).split(".")[0]] = t
    slots = slots_of(model)
    prefix = find_prefix(list(modules), slots, weights, family(model)) if prefix is None else prefix
    dora = bool(cfg.get("use_dora"))
    ranks, alphas = {}, {}
    for name, parts in modules.items():
        ours = name[len(prefix):]
        if set(parts) != ({"lora_A", "lora_B", "lora_magnitude_vector"} if dora else {"lora_A", "lora_B"}):
            raise ValueError(f"{weights}: module {name} has {sorted(parts)}; a {'DoRA' if dora else 'LoRA'} module "
                             "needs lora_A and lora_B" + (" and lora_magnitude_vector" if dora else ""))
        A, B, slot = parts["lora_A"], parts["lora_B"], slots[ours]
        k = A.shape[0]
        if tuple(A.shape) != (k, slot.in_features) or tuple(B.shape) != (slot.out_features, k):
            raise ValueError(f"{weights}: {name} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, but this "
                             f"model's module is {slot.out_features} x {slot.in_features}: the adapter was trained "
                             "on another base model; load it onto its own")
        r = pattern_value(cfg.get("rank_pattern") or {}, name, cfg["r"])
        if r != k:
            raise ValueError(f"{cfg_file}: rank {r} for {name} (r / rank_pattern), but its lora_A has {k} rows; "
                             "the config does not belong to these weights")
        alpha = pattern_value(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", 8))
        ranks[ours] = k
        alphas[ours] = alpha * math.sqrt(k) if cfg.get("use_rslora") else alpha   # mtlref's scaling is α/r
    names = sorted(ranks)
    attach_adapters(model, "dora" if dora else "lora", names, num_tasks=1, rank=ranks[names[0]],
                    alpha=alphas[names[0]], rank_pattern=ranks, alpha_pattern=alphas)
    adapters = adapters_of(model)
    with torch.no_grad():
        for name, parts in modules.items():
            a = adapters[name[len(prefix):]]
            a.lora_A.copy_(parts["lora_A"])
            a.lora_B.copy_(parts["lora_B"])
            if dora:
                a.magnitude.copy_(parts["lora_magnitude_vector"])
    return cfg


def find_prefix(paths: list[str], slots: dict, where, fam: str) -> str:
    """"" when peft's module paths are mtlref's; else the first path component they all share
    that mtlref's lack ("bert." for BertFor... classes)."""
    if all(p in slots for p in paths):
        return ""
    head = paths[0].split(".", 1)[0] + "."
    if all(p.startswith(head) and p[len(head):] in slots for p in paths):
        return head
    bad = next(p for p in paths if p not in slots and p.removeprefix(head) not in slots)
    raise ValueError(f"{where}: module {bad!r} is not a projection of this {fam} model; expected paths such as "
                     f"{sorted(slots)[:2]}: load the adapter onto its own base model")


def pattern_value(pattern: dict, name: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key that matches the end of the
    module path at a dot boundary."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


# ----------------------------------------------------------------------------- the heads
HEAD_WEIGHTS, HEAD_CONFIG = "head.safetensors", "head_config.json"


def export_head(model, task_id: int, out, pooling: str = "mean") -> Path:
    """Task t's MT-DNN head beside its adapter, in mtlref's own format (it is no Hugging Face
    class): head.safetensors (weight [C, H], bias [C] where it has one) + head_config.json
    saying how it reads the backbone (decoders: the last real token; encoders: `pooling`)."""
    head, spec = model.heads[task_id], model.tasks[task_id]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    write_atomic(out / HEAD_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    info = {"task": spec.name, "kind": spec.kind, "labels": list(spec.labels), "num_outputs": spec.num_labels,
            "family": model.family, "reads": "last real token" if model.family in ("llama", "mpt")
            else f"{pooling} pooling of the encoder output", "format": "mtlref head 1"}
    text = json.dumps(info, indent=2)
    write_atomic(out / HEAD_CONFIG, lambda tmp: Path(tmp).write_text(text))
    return out

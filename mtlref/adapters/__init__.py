"""The adapter methods behind one interface, and the functions that attach, count, merge,
save and load them.

    attach_adapters(model, method, targets, num_tasks=1, rank=8, alpha=16, dropout=0.0, **options)
    count_parameters(model) -> (trainable, total, percent)
    merge_adapters(model, task_id) -> a copy with ΔW_t folded into the base weights
    save_adapters(model, path, extra_modules=None, extra_config=None)
    load_adapters(model, path, extra_modules=None) -> config dict

`targets` match a module path's suffix at a dot boundary, as peft does: "q_proj" matches
`model.layers.3.self_attn.q_proj`, "output.dense" matches BERT's FFN output and
`attention.output.dense`; "proj" matches neither. The row blocks of a fused projection are
slots too (layers.FusedLinear: MPT's Wqkv has blocks q, k, v, so "q" or "Wqkv.q" adapts the
query rows only); a fused slot and one of its blocks cannot both be targeted.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import re
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtlref.adapters.dora import DoRA
from mtlref.adapters.lora import LoRA
from mtlref.adapters.mixlora import ROLES, MixLoRA
from mtlref.adapters.moelora import MoELoRA
from mtlref.adapters.more import MoRE
from mtlref.adapters.mtl_lora import MTLLoRA
from mtlref.adapters.multilora import MultiLoRA
from mtlref.layers import AdaptedLinear, FeedForward, RowBlock

REGISTRY: dict[str, type[nn.Module]] = {
    "lora": LoRA, "dora": DoRA, "multilora": MultiLoRA, "moelora": MoELoRA,
    "mixlora": MixLoRA, "mtl-lora": MTLLoRA, "more": MoRE,
}
CONFIG_KEYS = ("method", "targets", "num_tasks", "rank", "alpha", "dropout", "options")
WEIGHTS_FILE, CONFIG_FILE = "adapter.safetensors", "adapter_config.json"
# adapter_config.json records the value of EVERY method option, defaults included (since format 2),
# so a later change of a default never loads old adapters differently. Format 3 added MoRE's
# scale_tasks; a format-2 file gets the value that reproduces what it was trained with (FORMAT_2_ADDED).
# Format 1 (no "format" key) recorded only the options given; its missing values are the defaults
# mtlref had then:
FORMAT = 3
FORMAT_2_ADDED = {"more": {"scale_tasks": None}}
FORMAT_1_DEFAULTS = {
    "lora": {"per_task": False}, "dora": {}, "multilora": {"num_loras": 3},
    "moelora": {"num_experts": 8, "task_dim": 64}, "mixlora": {"num_experts": 8, "top_k": 2},
    "mtl-lora": {"num_up": 3, "tau": 0.5, "full_lambda": False, "weights_init": "normal", "task_lambda": True},
    "more": {"task_dim": None, "contrastive": True, "tau": 0.05, "linear_scaling": True, "detach_h": True,
             "selection": "ste", "task_embedding": True, "official": False},
}


# ----------------------------------------------------------------------------- attach
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
    if getattr(cls, "slot", "linear") == "ffn":
        new, chosen = ffn_adapters(model, cls, chosen, num_tasks, rank, alpha, dropout, options)
        slot_cls, slot_options = LoRA, {}                  # MixLoRA: plain LoRA on the other targets
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


# ----------------------------------------------------------------------------- save, load
def adapter_state(model: nn.Module, extra_modules: dict[str, nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors under their module paths, plus `<name>.*` for extra modules."""
    state = {k: v for k, v in model.state_dict().items() if ".adapter." in "." + k}
    for name, mod in (extra_modules or {}).items():
        state.update({f"{name}.{k}": v for k, v in mod.state_dict().items()})
    return state


def copy_strictly(dst: dict[str, torch.Tensor], src: dict[str, torch.Tensor], where, fix: str,
                  error: type[Exception] = ValueError) -> None:
    """Copy saved tensors into the model's (name -> tensor): the same names and the same shapes,
    else `error` naming the file (`where`), the keys or the shapes, and the fix."""
    missing, unexpected = sorted(set(dst) - set(src)), sorted(set(src) - set(dst))
    if missing or unexpected:
        raise error(f"{where}: missing keys {missing[:8]} ({len(missing)} in all), unexpected keys "
                    f"{unexpected[:8]} ({len(unexpected)} in all); {fix}")
    with torch.no_grad():
        for k, t in dst.items():
            if t.shape != src[k].shape:
                raise error(f"{where}: {k!r} has shape {tuple(src[k].shape)}, the model expects {tuple(t.shape)}")
            t.copy_(src[k])


class WriteError(OSError):
    """A file could not be written (disk full, no permission, an I/O error); the message names the
    file, the cause, what was kept and the fix. train.py, eval.py and export.py print it as one
    line and exit with code 1."""


def write_error(path, e: BaseException, kept: str) -> WriteError:
    """WriteError for `path` from the writer's exception `e`. safetensors reports an OSError as
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")."""
    n = getattr(e, "errno", None)
    m = None if n else re.search(r"\(os error (\d+)\)", str(e))
    n = int(m.group(1)) if m else n
    cause = f"[Errno {n}] {getattr(e, 'strerror', None) or os.strerror(n)}" if n else f"{type(e).__name__}: {e}"
    fix = ("free space on that disk or choose another output directory (--out)" if n in (errno.ENOSPC, errno.EDQUOT)
           else "raise the file-size limit (ulimit -f) or choose another output directory" if n == errno.EFBIG
           else "make it writable or choose another output directory (--out)" if n in (errno.EACCES, errno.EPERM,
                                                                                       errno.EROFS)
           else "check that disk or choose another output directory (--out)")
    err = WriteError(f"could not write {path}: {cause}; {kept}; {fix}")
    err.errno = n
    return err


def write_atomic(path: Path, write, kept_note: str = "") -> None:
    """write(tmp) into a temporary file beside `path`, then os.replace it over `path`: a failure at
    any point leaves the previous file (or none), never a torn one, and no temporary file; it
    raises WriteError naming `path` and the cause (kept_note follows "the previous ... is intact").
    The file gets the mode a plain open() would give (mkstemp's is 0600)."""
    path = Path(path)
    existed, tmp = path.exists(), None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name)
        os.close(fd)
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        if isinstance(e, WriteError):
            raise
        kept = f"the previous {path.name} is intact{kept_note}" if existed else "no partial file was left"
        raise write_error(path, e, kept) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.remove(tmp)


def append_line(path: Path, text: str) -> None:
    """Append `text` to `path` whole or not at all: a failed write cuts the file back to its
    earlier lines (no torn line for a reader or a later append) and raises WriteError."""
    try:
        with open(path, "ab", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            try:
                data = memoryview(text.encode())
                while data:
                    data = data[f.write(data):]
            except BaseException:
                os.ftruncate(f.fileno(), size)
                raise
    except OSError as e:
        raise write_error(path, e, "its earlier lines are intact") from e


def save_adapters(model: nn.Module, path, extra_modules: dict[str, nn.Module] | None = None,
                  extra_config: dict | None = None) -> None:
    """Write path/adapter.safetensors (adapter tensors only) and path/adapter_config.json."""
    cfg = dict(require_config(model))
    rank_maps = {n: a.rank_map().tolist() for n, a in adapters_of(model).items() if isinstance(a, MoRE)}
    if rank_maps:
        cfg["rank_maps"] = rank_maps
    if getattr(model, "base_identity", None) is not None:
        cfg["base_identity"] = dict(model.base_identity)
    clash = sorted(set(extra_config or {}) & (set(cfg) | {"rank_maps", "base_identity"}))
    if clash:
        raise ValueError(f"extra_config keys {clash} clash with the adapter config's own keys; rename them")
    cfg.update(extra_config or {})
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in adapter_state(model, extra_modules).items()}
    write_atomic(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(cfg, indent=2, sort_keys=True)
    write_atomic(path / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))


def recorded_options(cfg: dict, where) -> dict:
    """Every option value of a saved config: format 3 records them all; format 2 gets the options
    added since from FORMAT_2_ADDED, format 1 the values it did not record from FORMAT_1_DEFAULTS too."""
    method, given = cfg["method"], dict(cfg["options"])
    if method not in REGISTRY:
        raise ValueError(f"{where}: unknown adapter method {method!r}; mtlref knows {sorted(REGISTRY)}")
    fmt = cfg.get("format", 1)
    if fmt == 1:
        return {**FORMAT_1_DEFAULTS[method], **FORMAT_2_ADDED.get(method, {}), **given}
    if fmt == 2:
        given = {**FORMAT_2_ADDED.get(method, {}), **given}
    lacking = sorted(set(REGISTRY[method].options) - set(given))
    if lacking:
        raise ValueError(f"{where}: options {lacking} of {method} are missing, but format {cfg['format']} records "
                         "every option: the file was edited or damaged; write their values into \"options\"")
    return given


TRANSFER_FREE = ("scale_tasks",)    # options a transfer may set apart from the saved run's (MoRE's |T|)


def transfer_options(method: str, options: dict, saved: dict) -> dict:
    """The options of a run that starts from a saved run's adapters (its adapter_config `saved`):
    MoRE keeps the saved run's |T| in Eq. 6 unless scale_tasks is given, so each new task starts
    as exactly the function of the saved task it is initialised from (see MoRE's scale_tasks)."""
    if method != "more" or options.get("scale_tasks") is not None:
        return dict(options)
    kept = recorded_options(saved, "the saved run").get("scale_tasks")
    return {**options, "scale_tasks": saved["num_tasks"] if kept is None else kept}


def init_adapters_from(model: nn.Module, path, task_map: list[int]) -> dict:
    """Start the adapters attached to `model` from a saved run's (few-shot transfer, MoRE §5.1:
    "initialized with the best checkpoint from GLUE task training, sharing task embeddings for
    similar tasks"). Every shared tensor is copied; every per-task tensor (Adapter.task_tensors,
    dim 0 = task) is taken row by row, new task t from saved task task_map[t], so a new task starts
    as the saved task it resembles. Heads are not read (a new task has its own labels). The saved
    adapters must be of the same method, targets, rank, α and options (but TRANSFER_FREE: attach
    with transfer_options for the saved run's |T|); returns the saved config."""
    path = Path(path)
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; --init-from takes a train.py --out directory")
    cfg = json.loads(cfg_file.read_text())
    cfg["options"] = recorded_options(cfg, cfg_file)
    have = model.adapter_config

    def compared(c: dict, k: str):       # as JSON holds it (tuples as lists), TRANSFER_FREE options left out
        v = {o: x for o, x in c[k].items() if o not in TRANSFER_FREE} if k == "options" else c[k]
        return json.loads(json.dumps(v))
    diff = [k for k in ("method", "targets", "rank", "alpha", "options") if compared(have, k) != compared(cfg, k)]
    if diff:
        raise ValueError(f"{cfg_file}: these adapters differ from the run's (" + ", ".join(
            f"{k}: saved {cfg[k]!r} vs this run {have[k]!r}" for k in diff) + "); pass the same method and settings")
    bad = [t for t in task_map if not 0 <= t < cfg["num_tasks"]]
    if len(task_map) != have["num_tasks"] or bad:
        raise ValueError(f"{cfg_file}: task map {task_map} must give one saved task (0..{cfg['num_tasks'] - 1}) "
                         f"for each of this run's {have['num_tasks']} tasks")
    saved = {k: v for k, v in load_file(str(weights)).items() if not k.startswith("heads.")}
    expected = adapter_state(model)
    per_task = {f"{name}.adapter.{t}" for name, a in adapters_of(model).items() for t in a.task_tensors}
    index = torch.tensor(task_map, dtype=torch.long)
    rows = {k: v.index_select(0, index) if k in per_task else v for k, v in saved.items()}
    copy_strictly(expected, rows, weights, "the saved adapters are not those this run attaches")
    return cfg


def load_adapters(model: nn.Module, path, extra_modules: dict[str, nn.Module] | None = None) -> dict:
    """Attach (if needed) and load adapters saved by save_adapters; returns the saved config."""
    path = Path(path)
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE} "
                                    "written by save_adapters")
    cfg = json.loads(cfg_file.read_text())
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"{cfg_file}: missing keys {missing}")
    cfg["options"] = recorded_options(cfg, cfg_file)
    theirs, ours = cfg.get("base_identity"), getattr(model, "base_identity", None)
    if theirs and ours and theirs.get("config_sha256") != ours.get("config_sha256"):
        raise ValueError(f"{cfg_file}: these adapters were trained on {theirs.get('name')!r} "
                         f"(config_sha256 {theirs.get('config_sha256')}), but the model is {ours.get('name')!r} "
                         f"(config_sha256 {ours.get('config_sha256')}); load them onto the matching base model")
    have = getattr(model, "adapter_config", None)
    if have is None:
        attach_adapters(model, cfg["method"], cfg["targets"], cfg["num_tasks"], cfg["rank"], cfg["alpha"],
                        cfg["dropout"], within=cfg.get("within"), rank_pattern=cfg.get("rank_pattern"),
                        alpha_pattern=cfg.get("alpha_pattern"), **cfg["options"])
    else:
        keys = ("method", "targets", "num_tasks", "rank", "alpha", "options")
        diff = [k for k in keys if json.loads(json.dumps(have[k])) != cfg[k]]
        if diff:
            raise ValueError(f"{cfg_file}: the model already has different adapters ("
                             + ", ".join(f"{k}: model {have[k]!r} vs saved {cfg[k]!r}" for k in diff)
                             + "); load onto a fresh base model")
    expected = adapter_state(model, extra_modules)
    saved = load_file(str(weights))
    copy_strictly(expected, saved, weights, "the file does not match the adapters attached to this model "
                  "(or the extra_modules passed)")
    for name, ranks in cfg.get("rank_maps", {}).items():
        now = adapters_of(model)[name].rank_map().tolist()
        if now != ranks:
            raise ValueError(f"{cfg_file}: MoRE rank map of {name} is {now} after loading, saved {ranks}")
    return cfg

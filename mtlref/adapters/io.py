"""Saving and loading adapters, reading older adapter_config.json formats, and starting a run's
adapters from a saved run's (transfer).

    save_adapters(model, path, extra_modules=None, extra_config=None)
    load_adapters(model, path, extra_modules=None) -> config dict
    init_adapters_from(model, path, task_map) -> the saved config
    transfer_options(method, options, saved) -> the options of a run started from `saved`

What a method records or migrates is its own (Adapter hooks: saved_values / records,
format_1_options / format_2_added, transfer_options / transfer_free); nothing here asks which
class an adapter is.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from mtlref.adapters.attach import adapters_of, attach_adapters, require_config
from mtlref.adapters.registry import REGISTRY
from mtlref.files import write_atomic

CONFIG_KEYS = ("method", "targets", "num_tasks", "rank", "alpha", "dropout", "options")
WEIGHTS_FILE, CONFIG_FILE = "adapter.safetensors", "adapter_config.json"
# adapter_config.json records the value of EVERY method option, defaults included (since format 2),
# so a later change of a default never loads old adapters differently. Format 3 (FORMAT) added MoRE's
# scale_tasks; a format-2 file gets the value that reproduces what it was trained with (each class's
# format_2_added). Format 1 (no "format" key) recorded only the options given; its missing values
# are the defaults mtlref had then (each class's format_1_options).
RECORDS = {key: what for cls in REGISTRY.values() for key, what in cls.records.items()}   # per-module keys
TRANSFER_FREE = tuple(o for cls in REGISTRY.values() for o in cls.transfer_free)   # may differ in a transfer


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


def save_adapters(model: nn.Module, path, extra_modules: dict[str, nn.Module] | None = None,
                  extra_config: dict | None = None) -> None:
    """Write path/adapter.safetensors (adapter tensors only) and path/adapter_config.json."""
    cfg = dict(require_config(model))
    recorded: dict[str, dict] = {}                     # key -> {module path: value} (MoRE: rank_maps)
    for name, adapter in adapters_of(model).items():
        for key, value in adapter.saved_values().items():
            recorded.setdefault(key, {})[name] = value
    cfg.update(recorded)
    if getattr(model, "base_identity", None) is not None:
        cfg["base_identity"] = dict(model.base_identity)
    clash = sorted(set(extra_config or {}) & (set(cfg) | set(RECORDS) | {"base_identity"}))
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
    added since from the class's format_2_added, format 1 the values it did not record from its
    format_1_options too."""
    method, given = cfg["method"], dict(cfg["options"])
    if method not in REGISTRY:
        raise ValueError(f"{where}: unknown adapter method {method!r}; mtlref knows {sorted(REGISTRY)}")
    cls, fmt = REGISTRY[method], cfg.get("format", 1)
    if fmt == 1:
        return {**cls.format_1_options, **cls.format_2_added, **given}
    if fmt == 2:
        given = {**cls.format_2_added, **given}
    lacking = sorted(set(cls.options) - set(given))
    if lacking:
        raise ValueError(f"{where}: options {lacking} of {method} are missing, but format {cfg['format']} records "
                         "every option: the file was edited or damaged; write their values into \"options\"")
    return given


def transfer_options(method: str, options: dict, saved: dict) -> dict:
    """The options of a run that starts from a saved run's adapters (its adapter_config `saved`):
    the method's transfer_options hook, given the saved run's every option value, where an option
    it may take from the saved run (transfer_free) is not given (MoRE: scale_tasks, the saved
    run's |T| in Eq. 6); else the options as given."""
    cls = REGISTRY.get(method)
    if cls is None or all(options.get(o) is not None for o in cls.transfer_free):
        return dict(options)
    return cls.transfer_options(options, {**saved, "options": recorded_options(saved, "the saved run")})


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
    for key, what in RECORDS.items():                                   # MoRE: its rank maps
        for name, saved_value in cfg.get(key, {}).items():
            now = adapters_of(model)[name].saved_values()[key]
            if now != saved_value:
                raise ValueError(f"{cfg_file}: {what} of {name} is {now} after loading, saved {saved_value}")
    return cfg

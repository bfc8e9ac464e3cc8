"""Crash-safe training checkpoints: one file that holds everything a run needs to continue
exactly where it stopped, replaced atomically.

<out>/checkpoint/state.safetensors
    tensors   model.<name>               the trainable tensors (adapters, heads) and the adapters' buffers
              optim.<i>.<key>            the optimizer's per-parameter state (AdamW: step, exp_avg, exp_avg_sq)
              rng.<rank>.torch           each rank's torch CPU generator state
              rng.<rank>.cuda.<device>   and its CUDA generator states, when CUDA is in use
    metadata  "mtlref": JSON with the step, the optimizer's param_groups, the scheduler's state,
              each rank's Python and NumPy generator states, the loop's best-so-far, the
              caller's own state (the sampler's position, the reported metrics) and the
              run's settings, which a resume must match.
The file is written next to the old one and os.replace'd over it, so a crash at any moment
leaves the previous checkpoint or the new one, never a torn file; a failed write (a full disk)
raises files.WriteError naming the file, and --resume continues from the previous one. It
is read with safetensors alone: no pickle, no torch.load.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from mtlref.adapters import copy_strictly
from mtlref.files import write_atomic
from mtlref.pretrained import CheckpointError, open_safetensors

CHECKPOINT_FILE = "state.safetensors"


def checkpoint_path(directory) -> Path:
    return Path(directory) / CHECKPOINT_FILE


def plain(value):
    """JSON-normalised (tuples -> lists), for comparing saved and current settings."""
    return json.loads(json.dumps(value))


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}, so that a settings mismatch names the very key."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


# ----------------------------------------------------------------------------- what is saved
def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors training changes: trainable parameters and adapter buffers, by state_dict name."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if k in names or ".adapter." in "." + k}


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """This process's generator states: (Python and NumPy as JSON, torch CPU and CUDA as tensors)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return {"python": [version, list(mt), gauss],
            "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}, tensors


def set_rng_state(state: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------- save, load
def save_checkpoint(directory, model: torch.nn.Module, opt: torch.optim.Optimizer, sched, step: int,
                    rngs: list[tuple[dict, dict]], meta: dict) -> Path:
    """Write <directory>/state.safetensors atomically; rngs: every rank's rng_state(), in rank
    order; meta: JSON-serialisable (best-so-far, caller state, settings)."""
    tensors = {f"model.{k}": v.detach() for k, v in trainable_state(model).items()}
    opt_state = opt.state_dict()
    other: dict[str, dict] = {}
    for i, state in opt_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{i}.{key}"] = value.detach()
            else:
                other.setdefault(str(i), {})[key] = value
    rng_json = []
    for r, (state, rng_tensors) in enumerate(rngs):
        rng_json.append(state)
        tensors.update({f"rng.{r}.{k}": v for k, v in rng_tensors.items()})
    info = {"step": step, "param_groups": opt_state["param_groups"], "optim_other": other,
            "scheduler": sched.state_dict(), "rng": rng_json, **meta}
    tensors = {k: v.cpu().clone().contiguous() for k, v in tensors.items()}
    metadata = {"format": "pt", "mtlref": json.dumps(info)}
    path = checkpoint_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata),
                 kept_note=" (--resume continues from it)")
    return path


def read_checkpoint(directory) -> tuple[dict, dict[str, torch.Tensor]]:
    """(info, tensors) of <directory>/state.safetensors, with errors that name the file."""
    path = checkpoint_path(directory)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from; run without --resume "
                                "(--save-every N writes one every N steps)")
    f = open_safetensors(path)
    try:
        info = json.loads((f.metadata() or {})["mtlref"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not an mtlref training checkpoint (metadata: {e}); "
                              "delete it to start afresh") from None
    except Exception as e:  # the safetensors library raises its own error type
        raise CheckpointError(f"{path}: cannot be read ({e}); the file is damaged, delete it") from None
    return info, tensors


def load_checkpoint(directory, model: torch.nn.Module, opt: torch.optim.Optimizer, sched, rank: int = 0,
                    settings: dict | None = None) -> dict:
    """Restore the model's trainable tensors, the optimizer, the scheduler and this rank's
    generators from <directory>; returns the saved info (step, best-so-far, caller state).
    `settings` must equal the saved ones: a checkpoint resumes only the run that wrote it."""
    path = checkpoint_path(directory)
    info, tensors = read_checkpoint(directory)
    if settings is not None:
        saved, now = flatten(info.get("settings", {})), flatten(plain(settings))
        differ = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
        if differ:
            raise ValueError(f"{path}: written by a run with other settings {{key: (saved, now)}}: {differ}; "
                             "resume with the flags of the run that wrote it, or use another --out")
    ours = trainable_state(model)
    theirs = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    copy_strictly(ours, theirs, path, "the checkpoint is from a model with other adapters or tasks",
                  CheckpointError)
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, key = k.split(".", 2)
            state.setdefault(int(i), {})[key] = v
    for i, extra in info.get("optim_other", {}).items():
        state.setdefault(int(i), {}).update(extra)
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    sched.load_state_dict(info["scheduler"])
    if rank >= len(info["rng"]):
        raise ValueError(f"{path}: written by {len(info['rng'])} processes; resume with as many")
    prefix = f"rng.{rank}."
    set_rng_state(info["rng"][rank], {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return info

"""The training loop: one step = batch -> forward -> losses -> backward -> optimizer step.

It knows nothing of GLUE or of any method: it gets a model with `forward(batch, ctx)`,
`loss(out, batch)` (MultiTaskModel), an iterator of batches, and optional callbacks to
evaluate and to save. Auxiliary adapter losses arrive through the ForwardContext and are
weighed by losses.total_loss (MoRE Eq. 10). Under torchrun the same loop runs data-parallel
(distributed.py: DDP, or FSDP2 over a frozen base); it writes and resumes crash-safe
checkpoints (checkpointing.py), and a non-finite loss or gradient stops it before the
optimizer step, so no diverged state is ever saved.
"""
from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from mtlref import distributed
from mtlref.checkpointing import checkpoint_path, load_checkpoint, plain, rng_state, save_checkpoint
from mtlref.files import append_line
from mtlref.layers import ForwardContext
from mtlref.losses import total_loss


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class LoopConfig:
    max_steps: int
    lr: float = 1e-3
    head_lr: float | None = None          # None: same as lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    grad_accum: int = 1
    clip: float = 1.0                     # max global grad norm; 0 = off
    eval_every: int = 0                   # 0: evaluate once, at the end
    log_every: int = 25
    device: str = "cpu"
    precision: str = "auto"               # "auto": bf16 autocast on CUDA, fp32 elsewhere; "fp32"; "bf16"
    aux_weights: dict[str, float] | None = None
    fsdp: bool = False                    # the model was sharded by distributed.shard_frozen_base
    save_every: int = 0                   # write a checkpoint every N steps to checkpoint_dir; 0 = never
    checkpoint_dir: str | None = None
    resume: bool = False                  # continue from the checkpoint in checkpoint_dir
    extra: dict = field(default_factory=dict)   # the caller's run settings, checked on resume


def linear_warmup_decay(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier: 0 -> 1 over `warmup` steps, then linearly to 0 at `total`."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def make_optimizer(model: torch.nn.Module, cfg: LoopConfig) -> torch.optim.AdamW:
    """AdamW over the trainable tensors: adapters, and heads (optionally at their own lr)."""
    adapters = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("heads.")]
    heads = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("heads.")]
    groups = [{"params": adapters, "lr": cfg.lr}]
    if heads:
        groups.append({"params": heads, "lr": cfg.lr if cfg.head_lr is None else cfg.head_lr})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


PRECISIONS = ("auto", "fp32", "bf16")


def autocast(device, precision: str = "auto"):
    """bf16 autocast on CUDA unless precision is "fp32"; on CPU fp32 unless precision is "bf16"
    (CPUs with native bf16, e.g. AVX512-BF16: MoRE's MiniLM step 1.34x faster on this project's
    machine, docs/BENCHMARKS.md; not the CPU default, see docs/RESULTS.md). Weights stay fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    on = precision == "bf16" or (kind == "cuda" and precision == "auto")
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=on)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def check_task_ids(model, batch: dict) -> None:
    """A task id must name one of the model's heads (ids follow the order of the run's tasks)."""
    heads = getattr(model, "heads", None)
    t = batch["task_ids"]
    if heads is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= len(heads)):
        bad = int(t.max()) if int(t.max()) >= len(heads) else int(t.min())
        raise ValueError(f"task id {bad} is out of range: the model has {len(heads)} task heads "
                         f"{getattr(model, 'task_names', '')} with ids 0..{len(heads) - 1}")


def train_step(model, batch: dict, cfg: LoopConfig) -> tuple[torch.Tensor, dict]:
    """Forward + loss for one micro-batch; returns the (unscaled) total loss and its parts."""
    check_task_ids(model, batch)
    ctx = ForwardContext(task_ids=batch["task_ids"], mask=batch["attention_mask"], aux_losses={})
    with autocast(cfg.device, cfg.precision):
        out = model(batch, ctx)
    task = model.loss(out.float(), batch)
    return total_loss(task, ctx.aux_losses, cfg.aux_weights)


class LossModule(torch.nn.Module):
    """The model and all its losses as one module, forward(batch) -> (loss, parts): DDP wraps
    this, so the auxiliary losses emitted inside the backbone are in the output it traces."""

    def __init__(self, model: torch.nn.Module, cfg: LoopConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        return train_step(self.model, batch, self.cfg)


class DivergenceError(FloatingPointError):
    """A non-finite loss, gradient or parameter; nothing was saved from the diverged state."""


# Settings that change the arithmetic of a run: a checkpoint resumes only a run with the same ones.
RESUME_KEYS = ("max_steps", "lr", "head_lr", "weight_decay", "betas", "warmup_steps", "grad_accum", "clip", "precision",
               "aux_weights", "fsdp", "extra")


def fit(model, batches: Iterator[dict], cfg: LoopConfig,
        evaluate: Callable[[], dict] | None = None,
        on_best: Callable[[int, dict], None] | None = None,
        log_path: str | Path | None = None,
        get_state: Callable[[], dict] | None = None,
        set_state: Callable[[dict], None] | None = None) -> dict:
    """Train for cfg.max_steps optimizer steps; evaluate every cfg.eval_every steps (and at
    the end); call on_best(step, results) when the validation average improves.
    Under torchrun every rank calls fit (distributed.py: DDP, or FSDP2 when cfg.fsdp); only
    rank 0 prints and logs; evaluate and on_best run on every rank.
    cfg.save_every > 0 writes a checkpoint (checkpointing.py) to cfg.checkpoint_dir every that
    many steps, with get_state()'s JSON (the caller's sampler position ...); cfg.resume
    restores the latest one and hands that JSON to set_state before the first batch is drawn.
    A non-finite loss or gradient stops the run (DivergenceError) before the optimizer step.
    Returns {"best": results, "best_step": step, "last": results}."""
    if (cfg.save_every or cfg.resume) and not cfg.checkpoint_dir:
        raise ValueError("LoopConfig: save_every and resume need checkpoint_dir (where the checkpoint lives)")
    device = torch.device(cfg.device)
    main = distributed.is_main()
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(cfg.warmup_steps, cfg.max_steps))
    trainable = [p for p in model.parameters() if p.requires_grad]
    ddp = distributed.world_size() > 1 and not cfg.fsdp
    step_loss = distributed.wrap_ddp(LossModule(model, cfg)) if ddp else LossModule(model, cfg)
    settings = plain({k: v for k, v in asdict(cfg).items() if k in RESUME_KEYS})
    best, best_step, last, start, saved_step = None, -1, None, 0, None
    if cfg.resume:
        info = load_checkpoint(cfg.checkpoint_dir, model, opt, sched, distributed.rank(), settings)
        start = saved_step = info["step"]
        best, best_step, last = info["best"], info["best_step"], info["last"]
        if set_state is not None:
            set_state(info["caller"])
        if main:
            print(f"resumed from {checkpoint_path(cfg.checkpoint_dir)} at step {start}", flush=True)

    def diverged(step: int, what: str):
        where = f"the last good checkpoint is {checkpoint_path(cfg.checkpoint_dir)} (step {saved_step})" \
            if saved_step is not None else "no checkpoint was written (--save-every N keeps one)"
        kept = f", the best adapters (step {best_step}) are untouched" if best_step >= 0 else ""
        return DivergenceError(f"step {step}: {what}; the run diverged and stopped: {where}{kept}. "
                               "Lower --lr (or check the data) and train again")

    def check_finite_params(step: int):
        if not distributed.all_true(all(bool(torch.isfinite(p).all()) for p in trainable), device):
            raise diverged(step, "a trainable tensor is not finite")

    log = Path(log_path) if log_path and main else None      # each record appended whole or not at all
    tokens, t0, window = 0, time.time(), []
    model.train()
    for step in range(start, cfg.max_steps):
        parts_sum: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = to_device(next(batches), device)
            sync = step_loss.no_sync() if ddp and micro < cfg.grad_accum - 1 else contextlib.nullcontext()
            with sync:
                loss, parts = step_loss(batch)
                if not distributed.all_true(bool(torch.isfinite(loss)), device):
                    raise diverged(step + 1, f"the loss is {float(loss.detach())} (parts {parts}) on some rank")
                (loss / cfg.grad_accum).backward()
            tokens += int(batch["attention_mask"].sum())
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / cfg.grad_accum
        if cfg.fsdp:
            distributed.sync_gradients(trainable)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.clip) if cfg.clip > 0 else None
        if grad_norm is not None and not torch.isfinite(grad_norm):
            raise diverged(step + 1, f"the gradient norm is {float(grad_norm)}")
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        window.append(parts_sum)
        done = step + 1
        if main and (done % cfg.log_every == 0 or done == cfg.max_steps):
            elapsed = time.time() - t0
            mean = {k: sum(w.get(k, 0.0) for w in window) / len(window) for k in window[0]}
            eta = elapsed / (done - start) * (cfg.max_steps - done)
            record = {"step": done, "loss": mean, "lr": sched.get_last_lr()[0], "tokens_per_s": tokens / elapsed,
                      "elapsed_s": elapsed, "grad_norm": float(grad_norm) if grad_norm is not None else None}
            print(f"step {done}/{cfg.max_steps} | loss {sum(mean.values()) if len(mean) == 1 else mean['task']:.4f} "
                  + " ".join(f"{k} {v:.4f}" for k, v in mean.items() if k != "task")
                  + f" | lr {record['lr']:.2e} | {record['tokens_per_s']:.0f} tok/s | "
                  f"ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
            if log:
                append_line(log, json.dumps(record) + "\n")
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            window = []
        if evaluate is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps):
            model.eval()
            last = evaluate()
            model.train()
            if log:
                append_line(log, json.dumps({"step": done, "eval": last}) + "\n")
            if best is None or last["average"] > best["average"]:
                check_finite_params(done)
                best, best_step = last, done
                if on_best is not None:
                    on_best(done, last)
        if cfg.save_every and done % cfg.save_every == 0:
            check_finite_params(done)
            rngs = distributed.gather(rng_state())
            if main:
                meta = {"best": best, "best_step": best_step, "last": last, "settings": settings,
                        "caller": get_state() if get_state is not None else {}}
                path = save_checkpoint(cfg.checkpoint_dir, model, opt, sched, done, rngs, meta)
                print(f"checkpoint step {done}: {path}", flush=True)
            saved_step = done
    model.eval()
    return {"best": best, "best_step": best_step, "last": last, "config": asdict(cfg)}


@torch.no_grad()
def predict(model, batches, device, precision: str = "auto") -> tuple[list[int], list[float]]:
    """Run single-task evaluation batches through model.predict_batch (a head's argmax or score,
    or T5's parsed generation); returns (indices, predictions) in batch order."""
    idx_all, preds_all = [], []
    for idx, batch in batches:
        batch = to_device(batch, device)
        check_task_ids(model, batch)
        with autocast(device, precision):
            preds = model.predict_batch(batch)
        idx_all.extend(idx)
        preds_all.extend(preds.float().tolist())
    return idx_all, preds_all

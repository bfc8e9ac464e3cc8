"""Timing: every method's step round-robin, paired ratios to the floor and to LoRA, and the
floor's model FLOPs utilisation on CUDA (inference latency: experiments/bench/inference.py)."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn as nn

from experiments.bench.models import build, head_for, make_batch, matmul_params, train_step
from experiments.bench.settings import FLOOR, METHODS, PAPER_VS_LORA, TARGETS, BenchConfig
from mtlref.adapters import count_parameters
from mtlref.heads import family

# Dense bf16 peak of the GPUs a GPU check may meet (the vendors' data sheets), for the floor's MFU.
BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def now(device: str) -> float:
    """Wall clock after the device has finished the queued work (CUDA runs asynchronously)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()


def summary(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": min(xs), "max": max(xs), "n": len(xs)}


def round_robin(fns: dict[str, Callable[[], None]], repeats: int, warmup: int, device: str) -> dict[str, list[float]]:
    """Seconds per call of each fn: `warmup` untimed rounds, then `repeats` rounds in which
    every fn runs once, the order rotated by one each round."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = now(device)
            fns[n]()
            times[n].append(now(device) - t0)
    return times


def ratio(times: dict[str, list[float]], name: str, ref: str) -> dict:
    """Median (and quartiles) of the per-round ratios name/ref: paired samples, so drift cancels."""
    return summary([a / b for a, b in zip(times[name], times[ref])])


def floor_mfu(cfg: BenchConfig, base: nn.Module, floor_seconds: float) -> dict | None:
    """The floor's model FLOPs utilisation on CUDA: a frozen forward (2N per token) plus the
    backward through the activations only (2N per token; no weight gradients), attention's
    T x T products left out, over the GPU's dense bf16 peak. None off CUDA or for an unknown GPU."""
    if not cfg.device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(cfg.device)
    peak = next((v for k, v in BF16_PEAK_FLOPS.items() if k in name), None)
    tokens = cfg.batch_size * cfg.seq_len
    flops = 4 * matmul_params(base) * tokens / floor_seconds
    return {"gpu": name, "model_flops_per_s": flops, "bf16_peak": peak, "mfu": flops / peak if peak else None}


def time_training(cfg: BenchConfig, base: nn.Module, extra: dict[str, Callable[[], None]] | None = None) -> dict:
    """Per method (and the floor): step-time summary, tokens/s, trainable parameters, and the
    paired ratios to the floor and to LoRA. `extra` adds more step closures (a peer library)."""
    batch = make_batch(base, cfg.batch_size, cfg.seq_len, cfg.num_tasks, cfg.device, seed=cfg.seed)
    head = head_for(base, cfg)
    models = {n: build(base, n, cfg) for n in (FLOOR, *METHODS)}
    fns = {n: train_step(m, batch, head, cfg.device) for n, m in models.items()}
    fns.update(extra or {})
    times = round_robin(fns, cfg.repeats, cfg.warmup, cfg.device)
    peaks = cuda_step_peaks(fns, cfg.device)
    tokens = cfg.batch_size * cfg.seq_len * (2 if family(base) == "t5" else 1)
    out = {}
    for n, ts in times.items():
        s = summary(ts)
        row = {"seconds": s, "tokens_per_s": tokens / s["median"], "samples": ts,
               "vs_floor": ratio(times, n, FLOOR), "vs_lora": ratio(times, n, "lora")}
        if n in models:
            row["trainable_params"] = count_parameters(models[n])[0]
        if n in TARGETS:
            ref, limit = TARGETS[n]
            value = row["vs_floor" if ref == FLOOR else "vs_lora"]["median"]
            row["target"] = {"reference": ref, "max_ratio": limit, "ratio": value, "met": value <= limit}
        row["paper_vs_lora"] = PAPER_VS_LORA.get(n)
        if peaks:
            row["cuda_step_peak_mb"] = peaks[n]
        out[n] = row
    return out


def cuda_step_peaks(fns: dict[str, Callable[[], None]], device: str) -> dict[str, float] | None:
    """On CUDA, per step closure: the peak of torch.cuda.max_memory_allocated during one more
    step (MB), with everything the run holds (the base once, every method's adapters and AdamW
    state) counted in it. None off CUDA (the CPU figures come from measure_memory's subprocesses)."""
    if not device.startswith("cuda"):
        return None
    peaks = {}
    for n, f in fns.items():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        f()
        torch.cuda.synchronize(device)
        peaks[n] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return peaks

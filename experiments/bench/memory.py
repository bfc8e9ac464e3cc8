"""Peak memory of the floor and of each method's training steps, each measured in a fresh
subprocess (the memory it holds before the steps subtracted): on CPU the peak resident set size,
on CUDA torch.cuda.max_memory_allocated. The subprocesses keep the system allocator."""
from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from experiments import ROOT
from experiments.bench.machine import usable_cores
from experiments.bench.models import build, head_for, load_base, make_batch, train_step
from experiments.bench.settings import FLOOR, METHODS, BenchConfig


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024                  # bytes on macOS, KiB on Linux


def peak_resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmHWM")


def memory_child(cfg_json: str, name: str) -> dict:
    """Run in a fresh process: load, build `name`, and measure the peak memory of
    cfg.memory_steps training steps above the memory held before them."""
    cfg = BenchConfig(**json.loads(cfg_json))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base = load_base(cfg)
    model = build(base, name, cfg)
    step = train_step(model, make_batch(base, cfg.batch_size, cfg.seq_len, cfg.num_tasks, cfg.device),
                      head_for(base, cfg), cfg.device)
    gc.collect()
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize(cfg.device)
        torch.cuda.reset_peak_memory_stats(cfg.device)
        before = torch.cuda.memory_allocated(cfg.device)
        for _ in range(cfg.memory_steps):
            step()
        torch.cuda.synchronize(cfg.device)
        peak, how = torch.cuda.max_memory_allocated(cfg.device), "torch.cuda.max_memory_allocated"
    else:
        try:
            before = resident_bytes()
            Path("/proc/self/clear_refs").write_text("5")               # reset VmHWM to the current RSS
            how = "VmHWM after /proc/self/clear_refs reset"
        except OSError:
            before, how = max_rss_bytes(), "getrusage maxrss delta (peak since process start)"
        for _ in range(cfg.memory_steps):
            step()
        peak = peak_resident_bytes() if how.startswith("VmHWM") else max_rss_bytes()
    return {"peak_mb": peak / 2**20, "before_mb": before / 2**20, "delta_mb": (peak - before) / 2**20,
            "method": how}


CHILD = ("import sys, json; from experiments.bench.memory import memory_child; "
         "print(json.dumps(memory_child(sys.argv[1], sys.argv[2])))")


def measure_memory(cfg: BenchConfig, jobs: int = 0) -> dict:
    """memory_child for the floor and every method, each in its own subprocess, `jobs` at a
    time (0 = one per usable core on CPU, where memory, unlike time, does not suffer from
    running side by side; one at a time on CUDA, where they would share the GPU's memory)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    names, out = [FLOOR, *METHODS], {}
    jobs = jobs or (1 if cfg.device.startswith("cuda") else usable_cores())
    for i in range(0, len(names), jobs):
        procs = {n: subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(asdict(cfg)), n], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for n in names[i:i + jobs]}
        for n, p in procs.items():
            stdout, stderr = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"memory measurement of {n} failed (exit {p.returncode}):\n{stderr[-2000:]}")
            out[n] = json.loads(stdout.strip().splitlines()[-1])
    return out

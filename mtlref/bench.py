"""What each adapter method costs, measured side by side (the timing code behind bench.py).

Every method trains on the same backbone, batch and sequence length, one training step =
forward + loss (+ the adapters' auxiliary losses, losses.total_loss) + backward + AdamW step
on the trainable tensors, on a mixed-task batch (task_ids cycle over num_tasks). Two
reference points:
- "floor": the frozen base with no adapter, made to run its backward by adding a trainable
  scalar (initialised 0) to the input embeddings' output, so the gradient flows back through
  every activation of every layer. That is the work no adapter method can avoid; the AdamW
  step on one scalar costs nothing.
- "lora": the ratio the papers report training time against.
All models share the one copy of the frozen base weights (deepcopy with a memo), so a 7B
base is held once. Methods are timed round-robin (each repeat runs every method once, in a
rotated order), so drift in the machine's load falls on all of them alike; a method's ratio
is the median of the per-repeat ratios (paired samples), with their quartiles.

Peak memory runs each method in a fresh subprocess: on CPU the peak resident set size
(VmHWM, reset through /proc/self/clear_refs just before the first step; getrusage's maxrss
where that reset is not allowed) minus the resident size before it; on CUDA
torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated.
The memory subprocesses keep the system allocator; the timing process may call
keep_freed_memory() first (bench.py does on CPU), which its docstring explains.

Shapes: B batch, T tokens, C hidden, V vocabulary.
"""
from __future__ import annotations

import copy
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtlref.adapters import attach_adapters, count_parameters, merge_adapters
from mtlref.checkpoint import load_model
from mtlref.heads import family
from mtlref.layers import ForwardContext
from mtlref.losses import total_loss
from mtlref.presets import resolve_targets
from mtlref.train import autocast


@dataclass
class BenchConfig:
    model: str                                        # a checkpoint directory (load_model), or a
                                                      # config.json: random weights built on the device
    device: str = "cpu"
    dtype: str = "float32"                            # the frozen base's dtype; adapters are fp32
    batch_size: int = 16
    seq_len: int = 128
    targets: str = "attention+ffn"                    # presets.resolve_targets
    num_tasks: int = 8
    repeats: int = 7
    warmup: int = 2
    infer_batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    infer_repeats: int = 5
    memory_steps: int = 2                             # steps per memory subprocess (the 1st allocates AdamW state)
    threads: int = 0                                  # torch threads; 0 = torch's default
    seed: int = 0


# Each method as the papers' comparisons run it (presets: MTL-LoRA Appendix A.1 for the
# baselines, MoRE §5.1): rank, alpha and the method's own options.
METHODS = {
    "lora": dict(rank=8, alpha=16),
    "dora": dict(rank=8, alpha=16),
    "multilora": dict(rank=8, alpha=16, num_loras=3),
    "moelora": dict(rank=16, alpha=32, num_experts=8, task_dim=64),
    "mixlora": dict(rank=8, alpha=16, num_experts=8, top_k=2),
    "mtl-lora": dict(rank=8, alpha=16, num_up=3, tau=0.5),
    "more": dict(rank=8, alpha=16, tau=0.05),
}
FLOOR = "floor"
# Training-step time relative to LoRA in MoRE's comparison (MoRE paper).
PAPER_VS_LORA = {"more": 1.6, "multilora": 2.9, "moelora": 3.6, "mixlora": 4.2}
# Our targets: (reference, the most a step may cost relative to it). LoRA ≤ 1.10 × the floor
# (runs before 2026-12-01 were judged against 1.15, docs/bench/minilm-cpu.json among them).
TARGETS = {"lora": (FLOOR, 1.10), "mtl-lora": ("lora", 1.15), "more": ("lora", 1.2),
           "multilora": ("lora", 1.3), "moelora": ("lora", 1.4), "mixlora": ("lora", 2.0)}
# Inference: merged LoRA is the base model's own cost; the others keep their adapters.
INFERENCE = ("lora-merged", "lora", "mtl-lora", "mtl-lora-merged", "more", "moelora")
# The module whose output is the input embedding (the floor's trainable scalar goes there).
INPUT_EMBEDDING = {"llama": "model.embed_tokens", "mpt": "transformer.wte", "t5": "shared", "bert": "embeddings"}


# ----------------------------------------------------------------------------- machine
def cpu_info() -> dict:
    """The CPU as /proc/cpuinfo names it: model name, family/model numbers, vector extensions."""
    info = {"cpu": platform.processor() or "unknown"}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return info
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    info["cpu"] = fields.get("model name", info["cpu"])
    info["cpu_family_model"] = f"family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}"
    isa = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve")
    info["cpu_vector_isa"] = sorted(f for f in fields.get("flags", "").split() if f in isa)
    return info


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), **cpu_info(),
            "cores": os.cpu_count(), "cores_usable": usable_cores(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": device, "loadavg_start": list(os.getloadavg())}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def keep_freed_memory() -> str:
    """On glibc, stop malloc from handing freed activation buffers back to the OS (mallopt:
    mmap threshold at its 32 MiB maximum, no trimming, 64 MiB top pad). By default every
    step's fresh activations are page-faulted in and zeroed again by the kernel, a cost that
    grows with the number of temporaries rather than with the work (MiniLM, batch 16: 93k
    minor faults and 0.14 s of system time per LoRA step, 16k for the floor). The caching
    allocator torch uses on CUDA, and jemalloc/tcmalloc that PyTorch's CPU tuning guide
    recommends, keep freed blocks the same way. Returns what was done, for the JSON."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError):
        return "system allocator (not glibc: left as is)"
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    ok = all(libc.mallopt(k, v) == 1 for k, v in ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 2**31 - 1),
                                                 (M_TOP_PAD, 64 << 20)))
    return (f"glibc {version} malloc, mallopt: M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 2^31-1, M_TOP_PAD 64 MiB"
            if ok else f"glibc {version} malloc (mallopt refused; defaults)")


def now(device: str) -> float:
    """Wall clock after the device has finished the queued work (CUDA runs asynchronously)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()


def summary(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": min(xs), "max": max(xs), "n": len(xs)}


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


# ----------------------------------------------------------------------------- timing
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


def load_base(cfg: BenchConfig) -> nn.Module:
    torch.manual_seed(cfg.seed)
    if Path(cfg.model).is_file():
        return random_base(cfg.model, getattr(torch, cfg.dtype), cfg.device)
    return load_model(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device)


def random_base(config_json, dtype, device) -> nn.Module:
    """A model of config.json's shape (e.g. the public Llama-2-7b-hf config) with random weights
    made directly on the device in `dtype` (no download, no second copy): matrices and
    embeddings N(0, 0.02), norms 1, biases 0. Speed does not depend on the values."""
    from mtlref.checkpoint import family_of
    cfg = json.loads(Path(config_json).read_text())
    fam = family_of(cfg, Path(config_json).parent)
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


# Dense bf16 peak of the GPUs a GPU check may meet (the vendors' data sheets), for the floor's MFU.
BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


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


def head_for(model: nn.Module, cfg: BenchConfig) -> torch.Tensor:
    """BERT's fixed classifier [C, 2] (unused by the other families)."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    c = getattr(model.config, "hidden_size", 1)
    return torch.randn(c, 2, generator=g).to(cfg.device)


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


def forward_fn(model: nn.Module, batch: dict, device: str) -> Callable[[], None]:
    """One inference forward as a closure (no autograd, bf16 autocast on CUDA)."""
    def f() -> None:
        with torch.inference_mode(), autocast(device):
            run_model(model, batch, ForwardContext(task_ids=batch["task_ids"]))
    return f


def time_inference(cfg: BenchConfig, base: nn.Module) -> dict:
    """Forward latency per variant and batch size (eval mode, no gradients). Mixed-task
    batches, except the merged MTL-LoRA copy, which serves one task (task 0)."""
    lora, mtl = build(base, "lora", cfg).eval(), build(base, "mtl-lora", cfg).eval()
    models = {"lora-merged": merge_adapters(lora, 0), "lora": lora, "mtl-lora": mtl,
              "mtl-lora-merged": merge_adapters(mtl, 0), "more": build(base, "more", cfg).eval(),
              "moelora": build(base, "moelora", cfg).eval()}
    out = {n: {} for n in INFERENCE}
    for b in cfg.infer_batch_sizes:
        mixed = make_batch(base, b, cfg.seq_len, cfg.num_tasks, cfg.device, seed=cfg.seed)
        single = dict(mixed, task_ids=torch.zeros_like(mixed["task_ids"]))
        fns = {n: forward_fn(m, single if n.endswith("merged") else mixed, cfg.device) for n, m in models.items()}
        times = round_robin(fns, cfg.infer_repeats, 1, cfg.device)
        for n, ts in times.items():
            s = summary(ts)
            out[n][str(b)] = {"seconds": s, "tokens_per_s": b * cfg.seq_len / s["median"],
                              "vs_lora_merged": ratio(times, n, "lora-merged")}
    return out


# ----------------------------------------------------------------------------- memory
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


CHILD = ("import sys, json; from mtlref.bench import memory_child; "
         "print(json.dumps(memory_child(sys.argv[1], sys.argv[2])))")


def measure_memory(cfg: BenchConfig, jobs: int = 0) -> dict:
    """memory_child for the floor and every method, each in its own subprocess, `jobs` at a
    time (0 = one per usable core on CPU, where memory, unlike time, does not suffer from
    running side by side; one at a time on CUDA, where they would share the GPU's memory)."""
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
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

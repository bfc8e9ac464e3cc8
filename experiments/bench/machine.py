"""The machine a bench run ran on, as its JSON records it, and the allocator setting the timing
process may take (keep_freed_memory)."""
from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

import torch


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

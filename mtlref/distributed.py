"""Scaling a run: data-parallel processes (torchrun), a sharded frozen base (FSDP2), and
recomputed activations (gradient checkpointing).

    torchrun --nproc_per_node 2 train.py ...           # DDP over 2 processes
    torchrun --nproc_per_node 8 train.py --fsdp ...    # the frozen base sharded over 8 GPUs

Conventions (train.fit follows them):
- Global batch. --batch-size is the global batch of one optimizer step (per micro-batch);
  each of the W ranks takes batch_size / W of its samples (MultiTaskSampler(num_replicas=W,
  rank=r) keeps items r, r + W, ... of one global draw). Each rank's loss is the mean over its
  samples and the gradients are averaged over ranks, so the step equals one process's step on
  the whole global batch (up to summation order) for every loss that is a mean over samples.
  MoRE's contrastive loss (Eq. 8) and MixLoRA's load balance are batch statistics: under DDP
  each rank computes them on its own share, as the official multi-GPU runs do.
- DDP (default). train.LossModule (model + every loss) is the DDP module, so that the
  auxiliary losses emitted inside the backbone are part of the output DDP traces, with
  find_unused_parameters=True: the heads of tasks absent from a batch (and experts a router
  skipped) get no gradient. DDP leaves a parameter that no rank used with grad None, as a
  single process does, so AdamW skips it in both.
- FSDP2 (--fsdp). fully_shard over every transformer block and the root module; the trainable
  tensors (adapters, heads) are excluded (ignored_params), so only the frozen base is sharded
  and the optimizer state stays whole and local. sync_gradients then averages the trainable
  gradients over ranks with DDP's rule for unused parameters.
- Rank 0 alone prints and writes files. Evaluation is sharded: each rank predicts
  shard_indices(n) of every evaluation set and gather() brings the predictions to all ranks
  (every rank runs the same number of forwards, as FSDP needs).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn


# ----------------------------------------------------------------------------- processes
def init_distributed(device: str, fsdp: bool = False) -> str:
    """Join the process group torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK (gloo on
    CPU, NCCL on CUDA); returns this rank's device ("cuda" -> "cuda:LOCAL_RANK"). Without
    torchrun (no WORLD_SIZE) nothing happens and the run is a single process."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return device
    # Modules that evaluate `group.WORLD` in default arguments when they are imported: imported
    # after init_process_group (DDP imports the first on first use, fully_shard the second), they
    # pin the world group for good, destroy_process_group cannot free it, and gloo's threads then
    # die in the interpreter's finalization, where a rank can abort ("terminate called without an
    # active exception": issue 23 saw it about one run in ten). Imported first, their defaults hold None.
    # tests/test_scale.py checks that no gloo thread outlives close_distributed.
    import torch.distributed.nn.functional  # noqa: F401   (ten functions' group=group.WORLD)
    if fsdp:
        import torch.distributed.fsdp  # noqa: F401        (ShardedGradScaler's process_group=)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if str(device).startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
    return device


def close_distributed(wait: bool = True) -> None:
    """Leave the process group; wait=True first waits for every rank (rank 0 may still be
    writing files), so that no rank tears its connections down under another."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def all_true(flag: bool, device="cpu") -> bool:
    """True on every rank iff `flag` is true on every rank (so that all ranks stop together)."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_indices(n: int) -> list[int]:
    """This rank's share of n items: rank, rank + W, ..., padded by wrapping around to
    ceil(n / W) items so that every rank runs the same number of batches (the duplicates are
    dropped when the predictions are merged by index)."""
    W, r = world_size(), rank()
    return [(r + W * k) % n for k in range(-(-n // W))] if n else []


# ----------------------------------------------------------------------------- DDP, FSDP2
def wrap_ddp(module: nn.Module) -> nn.Module:
    """DDP over `module` (see the module docstring for find_unused_parameters). device_ids is
    left unset: the module is on this rank's device and the batches already are too."""
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(module, find_unused_parameters=True)


def shard_frozen_base(model: nn.Module, device) -> int:
    """FSDP2: shard the frozen parameters of `model` (a MultiTaskModel built on the CPU) over
    the ranks, one unit per transformer block of model.backbone, the rest (embeddings, final
    norm, LM head) in the root unit, `model`. fully_shard moves each unit's shard to `device`
    as it goes, so the whole base never sits on one device. The trainable tensors (adapters,
    heads) stay whole: moved to `device` and made equal to rank 0's. BERT's Layer is also its
    FFN slot: its forward is the FFN alone and Layer.block runs the whole layer, so its units
    are the modules that block calls (attention, the layer itself = FFN, output.LayerNorm).
    Returns the number of units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from mtlref.adapters import adapters_of
    for trained in [*adapters_of(model.backbone).values(), model.heads]:
        trained.to(device)
    keep = [p for p in model.parameters() if p.requires_grad]      # a list: the same order on every rank
    for p in keep:
        dist.broadcast(p.detach(), src=0)
    mesh = init_device_mesh(torch.device(device).type, (world_size(),))
    units = []
    for block in transformer_blocks(model.backbone):
        units += [block.attention, block.output.LayerNorm, block] if hasattr(block, "block") else [block]
    for unit in units + [model]:
        fully_shard(unit, mesh=mesh, ignored_params=set(keep))
    return len(units) + 1


def sync_gradients(params: list[torch.Tensor]) -> None:
    """Average the gradients of replicated tensors over ranks, by DDP's rule: a tensor no
    rank used keeps grad None; one that some rank used gets the mean over all ranks (the
    ranks that did not use it count zero)."""
    W = world_size()
    if W == 1 or not params:
        return
    used = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    dist.all_reduce(used)
    live = [p for p, u in zip(params, used.tolist()) if u > 0]
    if not live:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in live])
    dist.all_reduce(flat)
    flat /= W
    offset = 0
    for p in live:
        p.grad = flat[offset: offset + p.numel()].view_as(p).clone()
        offset += p.numel()


# ----------------------------------------------------------------------------- blocks
def transformer_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a backbone, from the block lists its Model class declares
    (llama model.layers, mpt transformer.blocks, t5 encoder.block + decoder.block, bert
    encoder.layer); models run each through layers.run_block."""
    lists = getattr(backbone, "block_lists", None)
    if not lists:
        raise ValueError(f"{type(backbone).__module__}.{type(backbone).__name__} declares no block_lists; "
                         "add the paths of its block ModuleLists and run each block through layers.run_block")
    return [block for path in lists for block in backbone.get_submodule(path)]


def set_grad_checkpoint(backbone: nn.Module, enabled: bool = True) -> int:
    """Recompute each transformer block's activations in backward instead of keeping them
    (layers.run_block); returns the number of blocks."""
    blocks = transformer_blocks(backbone)
    for block in blocks:
        block.grad_checkpoint = enabled
    return len(blocks)

"""What every adapter shares: the interface (constructor, forward, the hooks that the rest of
mtlref asks instead of testing for a class), LoRA's initialisation and the per-sample gather
helpers.

A projection adapter (slot = "linear") is attached to one `layers.AdaptedLinear` slot (or a
`layers.RowBlock` of a fused one) and returns only ΔY:
    __init__(base, num_tasks, rank, alpha, dropout=0.0, **options)   shapes read from `base`
    forward(x [..., in], y [..., out], ctx, base) -> ΔY [..., out]   in y.dtype
    delta_weight(task_id, base) -> ΔW_t [out, in] (fp32)             where `mergeable`
    as_lora(task_id, base) -> (A [k, in], B [out, k]), ΔW_t = B A     task t as one plain LoRA
                                                                       (scalings folded into B)
An FFN adapter (slot = "ffn", MixLoRA) is attached to a `layers.FeedForward` block, which hands
it the whole FFN: forward(x, ctx, ffn) -> the FFN output (see mixlora.py).
The slot is passed in, never stored (storing it would register the base weights twice).
Adapter tensors are fp32 on the base weight's device, whatever the base dtype.

The hooks: each method overrides, in its own file, what is particular to it; code elsewhere asks
the adapter, never its class (tests/test_layout.py):
    lora_entry(task_id, base), export_refusal     task t as peft's LoRA (+ DoRA's magnitude), or why
                                                  there is none (MixLoRA)          mtlref/export.py
    saved_values(), records                       what adapter_config.json records per module
                                                  (MoRE's rank maps)               adapters/io.py
    transfer_options(options, saved), transfer_free
                                                  the options of a run started from saved adapters
                                                  (MoRE's |T|)                     adapters/io.py
    format_1_options, format_2_added              option values older adapter_config.json files did
                                                  not record                       adapters/io.py
    configure_for(family, objective, name)        a mode that depends on where the adapter sits
                                                  (MoRE's official mode on T5)     the run's attach
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from mtlref.layers import AdaptedLinear, ForwardContext


ROLES = ("gate", "up", "down")            # the FFN slot's projections: layers.FeedForward.parts()[:3]


def lora_a_init(*shape: int, device=None) -> torch.Tensor:
    """LoRA's down-projection init for a tensor [..., r, in]: Kaiming-uniform with a=√5 on
    every [r, in] slice, i.e. U(-1/√in, 1/√in) (gain √(2/(1+5)) times √(3/fan_in))."""
    bound = 1.0 / math.sqrt(shape[-1])
    return torch.empty(shape, device=device, dtype=torch.float32).uniform_(-bound, bound)


def up_project(z: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """z (..., r) -> z B^T (..., out) for an up-projection B [out, r]. Bᵀ is first copied
    contiguous (r·out numbers, nothing next to the activations): the backward then forms B's
    gradient as zᵀ·g (r, out) from two row-major operands; F.linear(z, B) forms it as gᵀ·z
    (out, r) from a transposed g: 3.8 ms against 0.8 ms on CPU (out 1536, r 8, 2048 tokens;
    docs/BENCHMARKS.md)."""
    return z @ B.t().contiguous()


def per_sample_up(z: torch.Tensor, Bt: torch.Tensor) -> torch.Tensor:
    """z (B, ..., r) and per-sample up-projections Bt (B, r, out), contiguous -> (B, ..., out):
    one batched GEMM, never a (B, T, n, out) intermediate; Bt's gradient is zᵀ·g per sample."""
    b, r = z.shape[0], z.shape[-1]
    return torch.bmm(z.reshape(b, -1, r), Bt).view(*z.shape[:-1], Bt.shape[-1])


def gather(P: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample rows of a per-task tensor: P [T, ...], t (B,) task ids -> P[t] (B, ...).
    index_select, not P[t]: advanced indexing's backward accumulates the rows of repeated task
    ids with parallel atomic float adds on CPU (index_put_ with accumulate, once the tensor has
    32,768 elements and 2+ threads), so the sum's order, and its last bits, change from run to
    run; index_select's backward (index_add_) adds them in a fixed order."""
    return P.index_select(0, t)


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """v [B, k] -> [B, 1, ..., 1, k] so that it broadcasts against like [B, ..., k]."""
    return v.view(v.shape[0], *([1] * (like.dim() - 2)), v.shape[-1])


class Adapter(nn.Module):
    """Base of every adapter. Subclasses set the class attributes below, create their tensors
    in float32 on the base weight's device, and override the hooks where they differ."""

    method: str = ""                      # registry name
    options: dict = {}                    # keyword option -> its default (the constructor's)
    slot: str = "linear"                  # "linear": AdaptedLinear / RowBlock; "ffn": layers.FeedForward
    other_targets: type | None = None     # slot "ffn": the class the targets outside FFN blocks get
    zero_init: tuple[str, ...] = ()       # parameter names that start at 0 so ΔY = 0 at init
    exact_zero_init: bool = True          # ΔY is exactly 0 at init (DoRA: only to rounding)
    mergeable: bool = True                # delta_weight exists
    task_specific: bool = False           # forward needs ctx.task_ids
    task_tensors: tuple[str, ...] = ()    # parameters/buffers indexed by task on dim 0, where present (transfer)
    # adapter_config.json: the values of the options that older files did not record. Format 1
    # (no "format" key) recorded only the options given; format 2 every option but those added
    # since. Frozen history: a new option goes into format_2_added (the value that reproduces
    # what an older file was trained with), never into a changed default here.
    format_1_options: dict = {}           # the defaults mtlref had when format 1 was written
    format_2_added: dict = {}             # options added after format 2 -> their value for such files
    transfer_free: tuple[str, ...] = ()   # options a run started from saved adapters may set apart
    records: dict[str, str] = {}          # adapter_config.json key -> what it holds (saved_values)
    export_refusal: str | None = None     # why export cannot write it as a LoRA at all (None: it can)

    def __init__(self, base: AdaptedLinear, num_tasks: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1 or num_tasks < 1:
            raise ValueError(f"{self.method}: rank ({rank}) and num_tasks ({num_tasks}) must be >= 1")
        self.in_features, self.out_features = self.features(base)
        self.num_tasks, self.rank, self.alpha = num_tasks, rank, float(alpha)
        self.scaling = self.alpha / rank                                   # LoRA's α/r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @staticmethod
    def features(base: nn.Module) -> tuple[int, int]:
        """(in_features, out_features) of the slot."""
        return base.in_features, base.out_features

    @staticmethod
    def device_of(base: AdaptedLinear) -> torch.device:
        return base.weight.device

    def task_ids(self, ctx: ForwardContext, x: torch.Tensor) -> torch.Tensor:
        return ctx.require_task_ids(self.num_tasks, x.shape[0])

    def check_task(self, task_id: int) -> int:
        if not 0 <= int(task_id) < self.num_tasks:
            raise ValueError(f"task_id {task_id} is out of range: the adapters were attached with "
                             f"num_tasks={self.num_tasks}")
        return int(task_id)

    def delta_weight(self, task_id: int, base: AdaptedLinear) -> torch.Tensor:
        raise TypeError(f"{self.method} adapters cannot be merged into the base weights")

    def as_lora(self, task_id: int, base: AdaptedLinear) -> tuple[torch.Tensor, torch.Tensor]:
        """Task t's adapter as one plain LoRA, ΔW_t = B A exactly (mtlref/export.py)."""
        raise TypeError(f"{self.method} adapters cannot be written as one LoRA per task")

    # ------------------------------------------------------------------------- hooks
    def lora_entry(self, task_id: int, base: AdaptedLinear) -> dict[str, torch.Tensor]:
        """Task t as one plain LoRA in peft's terms, fp32 detached copies (mtlref/export.py):
        {"A" [k, in], "B" [out, k]} from as_lora, plus any tensor peft keeps beside them
        (DoRA: "magnitude" [out], peft's lora_magnitude_vector). Only called where
        export_refusal is None (an adapter with one is left out by --attention-only export)."""
        with torch.no_grad():
            A, B = (t.detach().float().clone() for t in self.as_lora(task_id, base))
        return {"A": A, "B": B}

    def saved_values(self) -> dict:
        """{adapter_config.json key: this module's value}, one key per entry of `records`:
        save_adapters writes config[key][module path] = value, and load_adapters checks that
        the loaded adapters give the same value again (MoRE: "rank_maps", its task -> rank map)."""
        return {}

    @classmethod
    def transfer_options(cls, options: dict, saved: dict) -> dict:
        """The options of a run that starts from a saved run's adapters (train.py --init-from):
        `options` as given, `saved` the saved adapter_config with every option's value (older
        formats completed). Called when an option of transfer_free is not given; such options
        are also left out when the saved adapters are compared with the run's (MoRE:
        scale_tasks, the saved run's |T| in Eq. 6). Default: the options as given."""
        return dict(options)

    def configure_for(self, family: str, objective: str, name: str) -> None:
        """Called once per attached adapter by the run after attach_adapters, with the backbone's
        family ("llama", "mpt", "t5", "bert"), the run's objective ("lm", "gen", "head") and the
        adapter's module path: a method whose behaviour depends on where it sits changes it
        here (MoRE's official mode on T5). Default: nothing."""

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"scaling={self.scaling:g}, num_tasks={self.num_tasks}")

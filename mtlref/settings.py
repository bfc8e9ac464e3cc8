"""A run's settings: the preset's common values < the preset's values for the method (and the
backbone family) < the command line's flags, merged once (settings), and what follows from them:
the objective's length cap, the step budget, the split the numbers score.

A preset's `methods` maps a method ("lora-st" for --single-task) to its values; a method's
`by_family` maps a backbone family to values that differ for it (MTL-LoRA's τ on MPT).
mtlref/presets.py holds the presets and says where each value comes from.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path

from mtlref.losses import AUX_WEIGHTS
from mtlref.presets import PRESETS

OBJECTIVES = ("auto", "head", "gen")
BATCHES = ("mixed", "single-task")


@dataclass
class Settings:
    """A run's hyperparameters. Each field is a preset key and, where FLAG_KEYS names it, a flag
    (train.py --batch-size -> batch_size); None = not given by anyone (as_dict leaves it out)."""
    lr: float                                   # the adapters' learning rate
    rank: int = 8
    alpha: float | None = None                  # LoRA's α; not given: 2 · rank
    head_lr: float | None = None                # the heads' lr (None: lr)
    batch_size: int | None = None               # the global batch of one optimizer step
    grad_accum: int = 1
    epochs: float = 1
    max_steps: int | None = None                # wins over epochs
    task_epochs: dict | None = None             # LoRA-ST: epochs per task (MTL-LoRA A.1)
    warmup_steps: int | None = None             # wins over warmup_ratio
    warmup_ratio: float = 0.0
    eval_every: int | None = None
    max_length: int | None = None
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    dropout: float = 0.0                        # adapter dropout
    targets: str | list | None = None           # 'attention' | 'ffn' | 'attention+ffn' | slot names
    sampler: str = "proportional"               # mtlref/data/samplers.py SCHEMES
    batches: str = "mixed"                      # or 'single-task' (MoRE Eq. 8)
    split: str = "dev"                          # mtlref/data/splits.py PROTOCOLS
    objective: str = "auto"                     # OBJECTIVES
    lambda_con: float = AUX_WEIGHTS["more_contrastive"]        # MoRE Eq. 10's λ
    balance_weight: float = AUX_WEIGHTS["mixlora_balance"]     # MixLoRA's load-balancing weight
    options: dict = field(default_factory=dict)                # the method's own options (--option KEY=VALUE)

    def as_dict(self) -> dict:
        """What metrics.json and the checkpoint record: every value somebody gave or defaulted."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


KEYS = tuple(f.name for f in fields(Settings))
# Flags that override a preset's value when given (None = not given).
FLAG_KEYS = ("rank", "alpha", "lr", "head_lr", "epochs", "max_steps", "batch_size", "max_length", "warmup_steps",
             "eval_every", "grad_accum", "dropout", "weight_decay", "targets", "sampler", "split", "batches",
             "objective", "lambda_con", "balance_weight")


def option_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def settings(args, fam: str) -> Settings:
    """Command line over the preset's values for this method and family over the preset's own.
    A preset's `methods` maps a method ("lora-st" for --single-task) to its values; a method's
    `by_family` maps a backbone family to values that differ for it (MTL-LoRA's τ on MPT)."""
    preset = copy.deepcopy(PRESETS[args.preset])
    methods = preset.pop("methods")
    per_method = methods.get("lora-st" if args.single_task else args.method, {})
    by_family = per_method.pop("by_family", {}).get(fam, {})
    s = {"options": {}}
    for part in (preset, per_method, by_family):
        for k, v in part.items():
            if k == "options":
                s["options"].update(v)
            elif k in KEYS:
                s[k] = v
            else:
                raise ValueError(f"preset {args.preset}: unknown setting {k!r}; the settings are {list(KEYS)}")
    for k in FLAG_KEYS:
        if getattr(args, k) is not None:
            s[k] = getattr(args, k)
    for kv in args.option:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise ValueError(f"--option {kv!r}: write KEY=VALUE, e.g. --option tau=0.5")
        s["options"][k] = option_value(v)
    if "lr" not in s:
        raise ValueError(f"preset {args.preset} gives no learning rate for {args.method} (its methods: "
                         f"{sorted(methods)}); pass --lr")
    out = Settings(**s)
    if out.alpha is None:
        out.alpha = 2 * out.rank
    if out.batches not in BATCHES:
        raise ValueError(f"batches must be 'mixed' or 'single-task', not {out.batches!r}")
    if out.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {out.objective!r}")
    return out


def check_lengths(args, s: Settings, backbone, model_dir: Path) -> None:
    """The collate truncates to max_length; max_length itself must fit the model's positions."""
    limit = getattr(backbone, "max_positions", None)
    if limit is not None and s.max_length > limit:
        if args.max_length is not None:
            raise ValueError(f"--max-length {args.max_length} is more than {model_dir.name} allows "
                             f"(max_position_embeddings {limit}); pass --max-length {limit} or less")
        s.max_length = limit                       # the preset's length, capped to the model's


def step_budget(s: Settings, sizes: dict[str, int], task: str | None = None) -> tuple[int, int]:
    """(optimizer steps, warm-up steps): max_steps, else epochs · Σ n_t / (batch · accumulation);
    LoRA-ST's per-task epochs come from the preset's task_epochs (MTL-LoRA A.1)."""
    epochs = (s.task_epochs or {}).get(task, s.epochs) if task else s.epochs
    steps = s.max_steps or max(1, int(epochs * sum(sizes.values()) / (s.batch_size * s.grad_accum)))
    warmup = s.warmup_steps if s.warmup_steps is not None else int(s.warmup_ratio * steps)
    return steps, warmup


def reported_split(s: Settings, bench: str) -> str:
    """What the reported numbers score: the paper split's test sets, the commonsense test files,
    or the dev sets (validation = test)."""
    return "test" if s.split == "paper" or bench == "commonsense" else "dev"

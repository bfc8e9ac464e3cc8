"""One experiment, top to bottom: what train.py runs (it only parses flags).

    1. settings(args, family)   preset < the preset's values for the method (and family) < flags  (settings.py)
    2. load_data(...)           task specs + {task: {train, validation, test}} under the split protocol
                                (data/loading.py)
    3. attach + build_model     the backbone's adapters and the objective: per-task heads (MT-DNN,
                                MTL-LoRA), T5 text-to-text (MoRE Eq. 9) or the LM (commonsense)  (objective.py)
    4. train_batches(...)       sampler (MoRE Eq. 7, ...) -> length grouping -> collate
    5. mtlref.train.fit         the loop; evaluation every N steps on the validation sets
    6. make_evaluator(...)      the best validation step's adapters are scored on the test sets  (evaluate.py)
    7. outputs                  <out>/metrics.json, adapter files (the best step's), log, table
LoRA-ST (--single-task, mtlref/lora_st.py) runs steps 3-7 once per task, each task alone: its
own optimizer, schedule, clipping and step budget, and nothing of the other tasks moves.
`args` is train.py's parsed command line (argparse.Namespace); eval.py's work is evaluate.py's.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mtlref import distributed
from mtlref.adapters import (CONFIG_FILE, REGISTRY, WEIGHTS_FILE, count_parameters, init_adapters_from, save_adapters,
                             transfer_options)
from mtlref.data.collate import Encoder, LengthGroupedBatches
from mtlref.data.loading import k_shot, load_data
from mtlref.data.samplers import MultiTaskSampler
from mtlref.evaluate import make_evaluator, print_table, score_generation
from mtlref.files import write_atomic
from mtlref.heads import family
from mtlref.objective import attach, build_model, compile_backbone, make_encoder, objective_of
from mtlref.presets import PRESETS
from mtlref.pretrained import load_model, minilm_dir, read_config
from mtlref.settings import Settings, check_lengths, reported_split, settings, step_budget
from mtlref.tokenizer import load_tokenizer
from mtlref.train import LoopConfig, fit, seed_everything


# ----------------------------------------------------------------------------- 1-2. settings, data, base model
@dataclass
class Inputs:
    """What a run trains on, made once by prepare(): its settings, the task specs (in id order) and
    {task: {train, validation, test}}, the base model and its tokenizer, where it writes, the device."""
    s: Settings
    specs: list
    splits: dict
    backbone: torch.nn.Module
    tok: object
    out: Path
    model_dir: Path
    device: str


def prepare(args) -> Inputs:
    """Settings, processes, data, base model and tokenizer of a train.py run; train and LoRA-ST
    (mtlref/lora_st.py) start here."""
    if args.method not in REGISTRY:
        raise ValueError(f"unknown method {args.method!r}; choose one of {sorted(REGISTRY)}")
    if args.single_task and args.method != "lora":
        raise ValueError(f"--single-task is LoRA-ST (one independent LoRA per task); it takes --method lora, "
                         f"not {args.method}")
    model_dir = Path(args.model) if args.model else minilm_dir()
    fam = read_config(model_dir).get("model_type", "")
    s = settings(args, fam)
    device = distributed.init_distributed(args.device, fsdp=args.fsdp)
    named = PRESETS[args.preset]["methods"]
    if named and ("lora-st" if args.single_task else args.method) not in named and distributed.is_main():
        print(f"note: preset {args.preset} has settings of its own for {sorted(named)}, not for {args.method}; "
              "it runs with the preset's common settings and the defaults", flush=True)
    if s.batch_size % distributed.world_size():
        raise ValueError(f"--batch-size {s.batch_size} (the global batch) does not split evenly over "
                         f"{distributed.world_size()} processes; pass a multiple of the process count")
    if args.fsdp and not torch.distributed.is_initialized():
        raise ValueError("--fsdp shards the base over processes: launch with torchrun --nproc_per_node N")
    if args.bench == "commonsense" and not args.val_size and s.eval_every:
        raise ValueError(f"eval_every {s.eval_every} chooses the best step on a validation set, and --val-size 0 "
                         "holds none out of the training sets; pass --val-size N (never the test set)")
    specs, splits = load_data(args.bench, args.tasks, args.data_dir, s.split, args.seed, args.jsonl,
                              args.jsonl_dev, args.max_eval_examples, args.val_size)
    if args.train_examples:
        splits = k_shot(splits, args.train_examples, args.seed)
    backbone = load_model(model_dir, dtype=torch.float32, device="cpu" if args.fsdp else device)
    tok = load_tokenizer(model_dir)
    check_lengths(args, s, backbone, model_dir)
    out = Path(args.out or f"runs/{args.bench}-{'lora-st' if args.single_task else args.method}")
    return Inputs(s, specs, splits, backbone, tok, out, model_dir, device)


def train(args) -> dict:
    """train.py: one multi-task run (--single-task: mtlref/lora_st.py)."""
    return fit_tasks(args, prepare(args), resume=args.resume)


# ----------------------------------------------------------------------------- 3. adapters from an earlier run
def saved_config(run_dir) -> dict:
    """The adapter_config.json of a train.py --out directory (--init-from's)."""
    f = Path(run_dir) / CONFIG_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing; --init-from takes a train.py --out directory")
    return json.loads(f.read_text())


def task_map(args, specs, saved_config: dict) -> list[int]:
    """--task-init NEW=SAVED,... -> for each of this run's tasks, the index of the saved run's task
    (saved_config: the --init-from run's adapter_config) that starts it; a task the saved run also
    trained starts as itself unless named."""
    saved = saved_config.get("task_names") or []
    given = dict(kv.split("=", 1) for kv in (args.task_init or "").split(",") if kv)
    out = []
    for sp in specs:
        src = given.get(sp.name, sp.name)
        if src not in saved:
            raise ValueError(f"{args.init_from}: no saved task {src!r} to start {sp.name!r} from (it trained "
                             f"{saved}); pass --task-init {sp.name}=<one of them>")
        out.append(saved.index(src))
    return out


# ----------------------------------------------------------------------------- 4. batches
def train_batches(s: Settings, specs, splits, encoder: Encoder, seed: int, length_pool: int):
    """Global batches from the sampler (every rank builds the same), grouped by length; rank r
    keeps its share (mtlref/distributed.py)."""
    sizes = {sp.name: len(splits[sp.name]["train"]) for sp in specs}
    sampler = MultiTaskSampler(sizes, s.sampler, s.batch_size, seed=seed, mixed=s.batches == "mixed")
    return LengthGroupedBatches(sampler, encoder, {t: sp["train"] for t, sp in splits.items() if "train" in sp},
                                {sp.name: i for i, sp in enumerate(specs)}, pool=length_pool, seed=seed,
                                num_replicas=distributed.world_size(), rank=distributed.rank())


# ----------------------------------------------------------------------------- 5-7. the loop, evaluation, outputs
OPENMP_ENV = ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def threads_note() -> str:
    """The run's CPU threads, for its first line and metrics.json (docs/BENCHMARKS.md: shared machines)."""
    env = ", ".join(f"{k}={os.environ[k]}" for k in OPENMP_ENV if k in os.environ)
    return f"{torch.get_num_threads()} CPU threads" + (f" ({env})" if env else "")


def run_config(args, s: Settings, specs, model_dir: Path, objective: str) -> dict:
    """What adapter_config.json records beside the adapters, for eval.py and resume."""
    return {"task_names": [sp.name for sp in specs], "bench": args.bench, "pooling": args.pooling,
            "max_length": s.max_length, "split": s.split, "seed": args.seed, "objective": objective,
            "model_dir": str(model_dir), "data_dir": args.data_dir, "jsonl": args.jsonl, "jsonl_dev": args.jsonl_dev,
            "max_eval_examples": args.max_eval_examples, "train_examples": args.train_examples,
            "init_from": args.init_from, "task_init": args.task_init, "val_size": args.val_size,
            "eval_limit": args.eval_limit, **({"compile": True} if args.compile else {})}


def fit_tasks(args, inputs: Inputs, resume: bool, task: str | None = None) -> dict:
    """Train one set of adapters (and heads) on inputs.specs and report the best validation step
    on the test sets. The multi-task run calls it once with every task; LoRA-ST once per task,
    with `task` naming it (its step budget) and a backbone without adapters each time."""
    s, specs, splits, backbone, tok = inputs.s, inputs.specs, inputs.splits, inputs.backbone, inputs.tok
    out, model_dir, device = inputs.out, inputs.model_dir, inputs.device
    main = distributed.is_main()
    t_start = time.time()
    fam = family(backbone)
    objective = objective_of(s, fam, args.bench)
    seed_everything(args.seed)                       # the same initial adapters for the same seed
    method = "lora" if task else args.method
    saved = saved_config(args.init_from) if args.init_from else None
    if saved:                                        # MoRE: the saved run's |T| in Eq. 6 (transfer_options)
        s = replace(s, options=transfer_options(method, s.options, saved))
    targets = attach(backbone, method, s, len(specs), objective)
    if saved:
        mapping = task_map(args, specs, saved)
        init_adapters_from(backbone, args.init_from, mapping)
        if main:
            print(f"adapters from {args.init_from}; per-task tensors: " + ", ".join(
                f"{sp.name} <- saved task {m}" for sp, m in zip(specs, mapping))
                + (f"; |T| of MoRE's Eq. 6: {s.options['scale_tasks']}" if method == "more" else ""), flush=True)
    model = build_model(backbone, tok, specs, objective, args.pooling).to("cpu" if args.fsdp else device)
    heads = {"heads": model.heads} if objective == "head" else None
    trainable, total, percent = count_parameters(model.backbone)
    head_params = sum(p.numel() for p in model.heads.parameters()) if heads else 0
    if args.grad_checkpoint:
        distributed.set_grad_checkpoint(backbone)
    if args.compile:
        if args.fsdp or args.grad_checkpoint:
            raise ValueError("--compile with --fsdp or --grad-checkpoint is not tested; drop one of them")
        compile_backbone(model)
    units = distributed.shard_frozen_base(model, device) if args.fsdp else 0
    sizes = {sp.name: len(splits[sp.name]["train"]) for sp in specs}
    steps, warmup = step_budget(s, sizes, task)
    world = distributed.world_size()
    if main:
        print(f"{method}{' (LoRA-ST: ' + task + ' alone)' if task else ''} on {fam} ({model_dir.name}), "
              f"{objective} objective: {len(specs)} tasks {sizes}; targets {targets}; adapter parameters "
              f"{trainable:,} ({percent:.3f}% of {total:,}); {steps} steps of {s.batch_size} "
              f"({s.batches} batches, {s.sampler} sampling); {threads_note()}"
              + (f" over {world} processes" if world > 1 else "") + (f" (FSDP, {units} units)" if units else ""),
              flush=True)
    encoder = make_encoder(tok, backbone, specs, s.max_length, objective)
    batches = train_batches(s, specs, splits, encoder, args.seed, args.length_pool)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            (out / "log.jsonl").unlink(missing_ok=True)
    extra_config = run_config(args, s, specs, model_dir, objective)
    run = {**extra_config, "method": method, "settings": {k: v for k, v in s.as_dict().items() if k != "eval_every"},
           "sampler": batches.sampler.state_dict(), "world": world, "base": backbone.base_identity}
    aux = {"more_contrastive": s.lambda_con, "mixlora_balance": s.balance_weight}    # Eq. 10's λ
    cfg = LoopConfig(max_steps=steps, lr=s.lr, head_lr=s.head_lr, weight_decay=s.weight_decay,
                     betas=tuple(s.betas), warmup_steps=warmup, grad_accum=s.grad_accum,
                     eval_every=s.eval_every or 0, device=device, precision=args.precision,
                     aux_weights=aux, fsdp=args.fsdp, save_every=args.save_every,
                     checkpoint_dir=str(out / "checkpoint"), resume=resume, extra=run)
    if objective == "lm":       # greedy answers: select on the validation slice, report the test set
        def sets(part, limit=None):
            return {sp.name: (splits[sp.name][part][:limit], i) for i, sp in enumerate(specs)}
        test_eval = lambda: score_generation(backbone, tok, sets("test", args.eval_limit), args.eval_batch_size)
        scored = {t: len(ex) for t, (ex, _) in sets("test", args.eval_limit).items()}
        evaluate = (lambda: score_generation(backbone, tok, sets("validation"), args.eval_batch_size)
                    ) if all(splits[sp.name]["validation"] for sp in specs) else test_eval   # --val-size 0: once, at the end
    else:
        scored = {t: len(splits[t].get("test") or []) for t in splits}
        evaluate = make_evaluator(model, encoder, specs, splits, "validation", args.eval_batch_size, device,
                                  args.precision)
        test_eval = make_evaluator(model, encoder, specs, splits, "test", args.eval_batch_size, device,
                                   args.precision)
    reported = {}
    clock = {"before": 0.0}     # wall seconds of the earlier segments of a resumed run, up to its checkpoint

    def on_best(step, val):
        if main:
            save_adapters(model.backbone, out / "best", extra_modules=heads, extra_config=extra_config)
        same = evaluate is test_eval or all(splits[t].get("test") is splits[t].get("validation") for t in val["tasks"])
        reported.update(val if same else test_eval(), step=step)

    fit(model, iter(batches), cfg, evaluate=evaluate, on_best=on_best, log_path=out / "log.jsonl",
        get_state=lambda: {"batches": batches.state_dict(), "reported": reported,
                           "wall_s": clock["before"] + time.time() - t_start},
        set_state=lambda st: (batches.load_state_dict(st["batches"]), reported.update(st["reported"]),
                              clock.update(before=st.get("wall_s", 0.0))))
    metrics = {"tasks": reported["tasks"], "average": reported["average"], "best_step": reported["step"],
               "split": reported_split(s, args.bench), "method": method, "model": model_dir.name,
               "scored": {t: scored[t] for t in reported["tasks"]},      # test examples each task's number scores
               "train_sizes": sizes,                                    # training examples of each task
               "method_options": backbone.adapter_config["options"],    # every option's value, defaults too
               "objective": objective, "trainable_params": trainable, "trainable_percent": percent,
               "head_params": head_params, "steps": steps,
               # resumed: this segment + the earlier ones up to the checkpoint (work redone after it counts once)
               "wall_s": round(clock["before"] + time.time() - t_start, 1),
               "wall_s_before_resume": round(clock["before"], 1),
               "threads": torch.get_num_threads(), "openmp": {k: os.environ.get(k) for k in OPENMP_ENV},
               "precision": args.precision, "device": str(device), "settings": s.as_dict()}
    if main:
        write_outputs(model.backbone, out, heads, extra_config, metrics, steps)
        print_table(reported, f"{method}{' ' + task if task else ''} — {metrics['split']} set, checkpoint of "
                              f"step {reported['step']} ({metrics['wall_s']:.0f} s wall)",
                    metrics["scored"] if objective == "lm" else None)
    return metrics


def write_outputs(backbone, out: Path, heads, extra_config: dict, metrics: dict, steps: int) -> None:
    """<out>/ holds the adapters whose numbers are reported (the best validation step's, a copy
    of <out>/best/), <out>/last/ the final step's when they differ, and metrics.json."""
    if metrics["best_step"] == steps:
        save_adapters(backbone, out, extra_modules=heads, extra_config=extra_config)
    else:
        save_adapters(backbone, out / "last", extra_modules=heads, extra_config=extra_config)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            write_atomic(out / name, lambda tmp, n=name: shutil.copyfile(out / "best" / n, tmp))
    text = json.dumps(metrics, indent=2, default=str)
    write_atomic(out / "metrics.json", lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {out}/metrics.json, {out}/{WEIGHTS_FILE}, {out}/log.jsonl")

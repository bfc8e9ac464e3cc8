"""One experiment, top to bottom: what train.py and eval.py run (they only parse flags).

    1. settings(args, family)   preset < the preset's values for the method (and family) < flags
    2. load_data(...)           task specs + {task: {train, validation, test}} under the split protocol
    3. attach + build_model     the backbone's adapters and the objective: per-task heads (MT-DNN,
                                MTL-LoRA), T5 text-to-text (MoRE Eq. 9) or the LM (commonsense)
    4. train_batches(...)       sampler (MoRE Eq. 7, ...) -> length grouping -> collate
    5. mtlref.train.fit         the loop; evaluation every N steps on the validation sets
    6. make_evaluator(...)      the best validation step's adapters are scored on the test sets
    7. outputs                  <out>/metrics.json, adapter files (the best step's), log, table
LoRA-ST (--single-task) runs steps 3-7 once per task, each task alone (train_single_task):
its own optimizer, schedule, clipping and step budget, and nothing of the other tasks moves.
`args` is train.py's parsed command line (argparse.Namespace); eval.py's for evaluate_run.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from mtlref import distributed
from mtlref.adapters import (CONFIG_FILE, REGISTRY, WEIGHTS_FILE, WriteError, adapter_state, adapters_of,
                             attach_adapters, count_parameters, detach_adapters, init_adapters_from, load_adapters,
                             save_adapters, transfer_options, write_atomic)
from mtlref.checkpoint import CheckpointError, load_model, minilm_dir, read_config
from mtlref.checkpointing import checkpoint_path
from mtlref.data.collate import Encoder, LengthGroupedBatches, eval_batches
from mtlref.data.samplers import MultiTaskSampler
from mtlref.data.splits import hold_out, make_splits
from mtlref.data.tasks import SUPERGLUE_TASKS, get_spec, load_jsonl_tasks, load_task, load_tasks
from mtlref.evaluate import generation_accuracy
from mtlref.heads import UNPARSED, CausalLM, MultiTaskModel, Seq2SeqLM, family
from mtlref.losses import AUX_WEIGHTS
from mtlref.metrics import COMMONSENSE_TASKS, GLUE_TASKS, task_metrics
from mtlref.presets import PRESETS, resolve_targets
from mtlref.tokenizer import TokenizerError, load_tokenizer
from mtlref.train import DivergenceError, LoopConfig, fit, predict, seed_everything

# A bench's default tasks are those with a training set (3 commonsense sets ship their evaluation
# files only; SuperGLUE BoolQ trains on one half of its validation file, data/tasks.py);
# --tasks may still name the others, and training then says why not.
BENCHES = {"glue": list(GLUE_TASKS),
           "superglue": [n for n in SUPERGLUE_TASKS if "train" in get_spec(n).files],
           "commonsense": [n for n in COMMONSENSE_TASKS if "train" in get_spec(n).files]}
OBJECTIVES = ("auto", "head", "gen")
# What a bad input raises; train.py and eval.py print it as one line and exit with code 2.
INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, CheckpointError, TokenizerError)


# ----------------------------------------------------------------------------- 1. settings
# Flags that override a preset's value when given (None = not given).
FLAG_KEYS = ("rank", "alpha", "lr", "head_lr", "epochs", "max_steps", "batch_size", "max_length", "warmup_steps",
             "eval_every", "grad_accum", "dropout", "weight_decay", "targets", "sampler", "split", "batches",
             "objective", "lambda_con", "balance_weight")
# What a run uses when neither the preset nor a flag says.
DEFAULTS = {"split": "dev", "sampler": "proportional", "batches": "mixed", "objective": "auto", "epochs": 1,
            "grad_accum": 1, "weight_decay": 0.0, "betas": (0.9, 0.999), "dropout": 0.0, "warmup_ratio": 0.0,
            "lambda_con": AUX_WEIGHTS["more_contrastive"], "balance_weight": AUX_WEIGHTS["mixlora_balance"]}


def option_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def settings(args, fam: str) -> dict:
    """Command line over the preset's values for this method and family over the preset's own.
    A preset's `methods` maps a method ("lora-st" for --single-task) to its values; a method's
    `by_family` maps a backbone family to values that differ for it (MTL-LoRA's τ on MPT)."""
    preset = copy.deepcopy(PRESETS[args.preset])
    methods = preset.pop("methods")
    per_method = methods.get("lora-st" if args.single_task else args.method, {})
    by_family = per_method.pop("by_family", {}).get(fam, {})
    s = {**DEFAULTS, "options": {}}
    for part in (preset, per_method, by_family):
        for k, v in part.items():
            if k == "options":
                s["options"].update(v)
            else:
                s[k] = v
    for k in FLAG_KEYS:
        if getattr(args, k, None) is not None:
            s[k] = getattr(args, k)
    for kv in args.option:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise ValueError(f"--option {kv!r}: write KEY=VALUE, e.g. --option tau=0.5")
        s["options"][k] = option_value(v)
    if "lr" not in s:
        raise ValueError(f"preset {args.preset} gives no learning rate for {args.method} (its methods: "
                         f"{sorted(methods)}); pass --lr")
    s.setdefault("rank", 8)
    s.setdefault("alpha", 2 * s["rank"])
    if s["batches"] not in ("mixed", "single-task"):
        raise ValueError(f"batches must be 'mixed' or 'single-task', not {s['batches']!r}")
    if s["objective"] not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {s['objective']!r}")
    return s


def objective_of(s: dict, fam: str, bench: str) -> str:
    """'lm' (commonsense: the LM answers), 'gen' (T5 text-to-text, MoRE Eq. 9: the default for T5)
    or 'head' (per-task heads: decoders as MTL-LoRA, BERT; T5 with --objective head)."""
    if bench == "commonsense":
        return "lm"
    if s["objective"] == "auto":
        return "gen" if fam == "t5" else "head"
    if s["objective"] == "gen" and fam != "t5":
        raise ValueError(f"--objective gen is T5's text-to-text protocol; a {fam} model trains per-task heads "
                         "(--objective head)")
    return s["objective"]


def check_lengths(args, s: dict, backbone, model_dir: Path) -> None:
    """The collate truncates to max_length; max_length itself must fit the model's positions."""
    limit = getattr(backbone, "max_positions", None)
    if limit is not None and s["max_length"] > limit:
        if args.max_length is not None:
            raise ValueError(f"--max-length {args.max_length} is more than {model_dir.name} allows "
                             f"(max_position_embeddings {limit}); pass --max-length {limit} or less")
        s["max_length"] = limit                       # the preset's length, capped to the model's


# ----------------------------------------------------------------------------- 2. data
def load_data(bench: str, tasks: str | None, data_dir, split: str, seed: int, jsonl=None, jsonl_dev=None,
              max_eval_examples: int | None = None) -> tuple[list, dict]:
    """-> (task specs in id order, {task: {"train", "validation", "test"}}). max_eval_examples
    keeps the first N of each validation and test set (quick runs; off by default)."""
    specs, splits = _load_data(bench, tasks, data_dir, split, seed, jsonl, jsonl_dev)
    if max_eval_examples:
        for sp in splits.values():
            for part in ("validation", "test"):
                if sp.get(part) is not None:
                    sp[part] = sp[part][:max_eval_examples]
    return specs, splits


def _load_data(bench, tasks, data_dir, split, seed, jsonl, jsonl_dev):
    if bench == "jsonl":
        if not jsonl:
            raise ValueError("--bench jsonl needs --jsonl FILE (lines of task, text, text_pair, label)")
        train = load_jsonl_tasks(jsonl)
        if tasks:
            unknown = [t for t in tasks.split(",") if t not in train]
            if unknown:
                raise ValueError(f"{jsonl}: no task {unknown} (the file has {sorted(train)})")
            train = {t: train[t] for t in tasks.split(",")}
        specs = [s for s, _ in train.values()]
        if jsonl_dev:
            dev = load_jsonl_tasks(jsonl_dev, specs={t: s for t, (s, _) in train.items()})
            missing = [t for t in train if t not in dev]
            if missing:
                raise ValueError(f"{jsonl_dev}: no examples of task(s) {missing}, which {jsonl} trains; "
                                 "give every task dev rows")
            return specs, {t: {"train": ex, "validation": dev[t][1], "test": dev[t][1]} for t, (_, ex) in train.items()}
        splits = {}                                   # no dev file: 10 % of each task is held out, never trained on
        for t, (_, ex) in train.items():
            held, rest = hold_out(ex, t, seed)
            splits[t] = {"train": rest, "validation": held, "test": held}
        return specs, splits
    names = tasks.split(",") if tasks else BENCHES[bench]
    specs = [get_spec(n) for n in names]
    if bench == "commonsense":                        # LLM-Adapters: train on train.json, score test.json
        data = {n: {s: load_task(n, data_dir, s) for s in ("train", "test")} for n in names}
        return specs, {n: {"train": d["train"], "validation": d["test"], "test": d["test"]} for n, d in data.items()}
    splits = make_splits(load_tasks(names, data_dir), split, seed)
    if "mnli" in names:                               # MNLI mismatched, reported beside matched
        splits["mnli_mm"] = {"test": load_task("mnli_mm", data_dir, "dev")}
        if split == "dev":
            splits["mnli_mm"]["validation"] = splits["mnli_mm"]["test"]
    return specs, splits


def k_shot(splits: dict, k: int, seed: int) -> dict:
    """Each task's training set cut to k examples drawn with `seed` (uniformly, without
    replacement; MoRE Table 4 says only "k-shot, 5 seeds"), in file order; the others unchanged."""
    out = {}
    for t, sp in splits.items():
        train = sp.get("train")
        if train is not None and len(train) > k:
            pick = np.random.default_rng([seed, zlib.crc32(t.encode())]).choice(len(train), k, replace=False)
            sp = {**sp, "train": [train[i] for i in sorted(pick.tolist())]}
        out[t] = sp
    return out


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


def task_splits(splits: dict, name: str) -> dict:
    """One task's splits, with mnli_mm beside mnli (LoRA-ST trains and reports each task alone)."""
    return {t: sp for t, sp in splits.items() if t == name or (name == "mnli" and t == "mnli_mm")}


# ----------------------------------------------------------------------------- 3. model
def attach(backbone, method: str, s: dict, num_tasks: int, objective: str, meta_ok: bool = False) -> list[str]:
    """Attach the run's adapters; returns the targets. With T5 per-task heads only the encoder
    runs, so adapters go only where a gradient reaches them (the encoder). meta_ok: the base
    is on the meta device, for counting only (mtlref/params.py)."""
    fam = family(backbone)
    targets = resolve_targets(s["targets"], fam)
    within = "encoder" if fam == "t5" and objective == "head" else None
    attach_adapters(backbone, method, targets, num_tasks=num_tasks, rank=s["rank"], alpha=s["alpha"],
                    dropout=s["dropout"] or 0.0, within=within, meta_ok=meta_ok, **s["options"])
    if method == "more" and s["options"].get("official") and fam == "t5":
        # MoRE's official code adds λ·L_con of the ENCODER's modules only (its T5 sums
        # encoder_outputs.cl_loss twice; the decoder's is computed and never used), so the
        # decoder's task embeddings, whose only gradient is L_con's (the gate is frozen), never train.
        for name, adapter in adapters_of(backbone).items():
            if name.startswith("decoder."):
                adapter.contrastive = False
                adapter.task_embedding.requires_grad_(False)
    return targets


def build_model(backbone, tok, specs, objective: str, pooling: str = "mean"):
    if objective == "lm":
        return CausalLM(backbone)
    if objective == "gen":
        return Seq2SeqLM(backbone, specs, tok)
    return MultiTaskModel(backbone, specs, tok, pooling=pooling)


def make_encoder(tok, backbone, specs, max_length: int, objective: str) -> Encoder:
    return Encoder(tok, family(backbone), max_length, text_to_text=objective == "gen",
                   decoder_start=getattr(backbone.config, "decoder_start_token_id", 0) or 0,
                   specs={sp.name: sp for sp in specs})


# ----------------------------------------------------------------------------- 4. batches
def step_budget(s: dict, sizes: dict[str, int], task: str | None = None) -> tuple[int, int]:
    """(optimizer steps, warm-up steps): max_steps, else epochs · Σ n_t / (batch · accumulation);
    LoRA-ST's per-task epochs come from the preset's task_epochs (MTL-LoRA A.1)."""
    epochs = s.get("task_epochs", {}).get(task, s["epochs"]) if task else s["epochs"]
    steps = s.get("max_steps") or max(1, int(epochs * sum(sizes.values()) / (s["batch_size"] * s["grad_accum"])))
    warmup = s["warmup_steps"] if s.get("warmup_steps") is not None else int(s["warmup_ratio"] * steps)
    return steps, warmup


def train_batches(s: dict, specs, splits, encoder: Encoder, seed: int, length_pool: int):
    """Global batches from the sampler (every rank builds the same), grouped by length; rank r
    keeps its share (mtlref/distributed.py)."""
    sizes = {sp.name: len(splits[sp.name]["train"]) for sp in specs}
    sampler = MultiTaskSampler(sizes, s["sampler"], s["batch_size"], seed=seed, mixed=s["batches"] == "mixed")
    return LengthGroupedBatches(sampler, encoder, {t: sp["train"] for t, sp in splits.items() if "train" in sp},
                                {sp.name: i for i, sp in enumerate(specs)}, pool=length_pool, seed=seed,
                                num_replicas=distributed.world_size(), rank=distributed.rank())


# ----------------------------------------------------------------------------- 5-6. evaluation
def make_evaluator(model, encoder, specs, splits, split: str, batch_size: int, device, precision: str = "auto"):
    """-> evaluate(): metrics of every `split` set. Each rank predicts its shard of a set and the
    predictions are gathered, so every rank computes the same metrics. With T5 text-to-text an
    answer that is no label counts as wrong (for F1 and MCC it is taken as the other class) and
    the share of such answers is reported as "unparsed"."""
    ids = {s.name: i for i, s in enumerate(specs)}
    by_name = {s.name: s for s in specs}                      # users' jsonl tasks are not in TASKS
    spec = {t: by_name.get(t) or get_spec(t) for t in splits}
    sets = {t: sp[split] for t, sp in splits.items() if sp.get(split)}
    text_to_text = isinstance(model, Seq2SeqLM)

    def evaluate() -> dict:
        results, start = {}, time.time()
        for task, examples in sets.items():
            tid = ids[spec[task].parent]
            mine = distributed.shard_indices(len(examples))
            idx, preds = predict(model, eval_batches(encoder, tid, split, [examples[i] for i in mine], batch_size),
                                 device, precision)
            merged = {}
            for part in distributed.gather([(mine[i], p) for i, p in zip(idx, preds)]):
                merged.update(part)
            order = sorted(merged)
            p, y = [merged[i] for i in order], [float(examples[i].label) for i in order]
            unparsed = [v == UNPARSED for v in p] if text_to_text else [False] * len(p)
            if any(unparsed) and set(spec[task].metrics) & {"f1", "mcc"}:
                p = [1.0 - g if bad else v for v, g, bad in zip(p, y, unparsed)]
            results[task] = task_metrics(task, p, y, spec[task].metrics)
            if text_to_text:
                results[task]["unparsed"] = float(np.mean(unparsed))
            if distributed.is_main():                 # progress: a full GLUE evaluation takes minutes on CPU
                name, value = next(iter(results[task].items()))
                print(f"  {split} {task}: {len(examples)} examples, {name} {value:.4f} "
                      f"({time.time() - start:.0f} s)", flush=True)
        return {"tasks": results, "average": float(np.mean([results[s.name][s.main_metric] for s in specs]))}
    return evaluate


def print_table(results: dict, title: str) -> None:
    print(f"\n{title}")
    print(f"{'task':10s} {'main':>8s}  all metrics")
    for task, m in results["tasks"].items():
        print(f"{task:10s} {next(iter(m.values())):8.4f}  " + "  ".join(f"{k} {v:.4f}" for k, v in m.items()))
    print(f"{'average':10s} {results['average']:8.4f}  (mean of the main metrics of the trained tasks)")


# ----------------------------------------------------------------------------- 7. one run
OPENMP_ENV = ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def threads_note() -> str:
    """The run's CPU threads, for its first line and metrics.json (docs/BENCHMARKS.md: shared machines)."""
    env = ", ".join(f"{k}={os.environ[k]}" for k in OPENMP_ENV if k in os.environ)
    return f"{torch.get_num_threads()} CPU threads" + (f" ({env})" if env else "")


def reported_split(s: dict, bench: str) -> str:
    """What the reported numbers score: the paper split's test sets, the commonsense test files,
    or the dev sets (validation = test)."""
    return "test" if s["split"] == "paper" or bench == "commonsense" else "dev"


def run_config(args, s: dict, specs, model_dir: Path, objective: str) -> dict:
    """What adapter_config.json records beside the adapters, for eval.py and resume."""
    return {"task_names": [sp.name for sp in specs], "bench": args.bench, "pooling": args.pooling,
            "max_length": s["max_length"], "split": s["split"], "seed": args.seed, "objective": objective,
            "model_dir": str(model_dir), "data_dir": args.data_dir, "jsonl": args.jsonl, "jsonl_dev": args.jsonl_dev,
            "max_eval_examples": args.max_eval_examples, "train_examples": getattr(args, "train_examples", None),
            "init_from": getattr(args, "init_from", None), "task_init": getattr(args, "task_init", None)}


def fit_tasks(args, s: dict, backbone, tok, specs, splits, out: Path, model_dir: Path, device,
              resume: bool, task: str | None = None) -> dict:
    """Train one set of adapters (and heads) on `specs` and report the best validation step on
    the test sets. The multi-task run calls it once with every task; LoRA-ST once per task,
    with `task` naming it (its step budget) and a backbone without adapters each time."""
    main = distributed.is_main()
    t_start = time.time()
    fam = family(backbone)
    objective = objective_of(s, fam, args.bench)
    seed_everything(args.seed)                       # the same initial adapters for the same seed
    method = "lora" if task else args.method
    saved = saved_config(args.init_from) if getattr(args, "init_from", None) else None
    if saved:                                        # MoRE: the saved run's |T| in Eq. 6 (transfer_options)
        s = dict(s, options=transfer_options(method, s["options"], saved))
    targets = attach(backbone, method, s, len(specs), objective)
    if saved:
        mapping = task_map(args, specs, saved)
        init_adapters_from(backbone, args.init_from, mapping)
        if main:
            print(f"adapters from {args.init_from}; per-task tensors: " + ", ".join(
                f"{sp.name} <- saved task {m}" for sp, m in zip(specs, mapping))
                + (f"; |T| of MoRE's Eq. 6: {s['options']['scale_tasks']}" if method == "more" else ""), flush=True)
    model = build_model(backbone, tok, specs, objective, args.pooling).to("cpu" if args.fsdp else device)
    heads = {"heads": model.heads} if objective == "head" else None
    trainable, total, percent = count_parameters(model.backbone)
    head_params = sum(p.numel() for p in model.heads.parameters()) if heads else 0
    if args.grad_checkpoint:
        distributed.set_grad_checkpoint(backbone)
    units = distributed.shard_frozen_base(model, device) if args.fsdp else 0
    sizes = {sp.name: len(splits[sp.name]["train"]) for sp in specs}
    steps, warmup = step_budget(s, sizes, task)
    world = distributed.world_size()
    if main:
        print(f"{method}{' (LoRA-ST: ' + task + ' alone)' if task else ''} on {fam} ({model_dir.name}), "
              f"{objective} objective: {len(specs)} tasks {sizes}; targets {targets}; adapter parameters "
              f"{trainable:,} ({percent:.3f}% of {total:,}); {steps} steps of {s['batch_size']} "
              f"({s['batches']} batches, {s['sampler']} sampling); {threads_note()}"
              + (f" over {world} processes" if world > 1 else "") + (f" (FSDP, {units} units)" if units else ""),
              flush=True)
    encoder = make_encoder(tok, backbone, specs, s["max_length"], objective)
    batches = train_batches(s, specs, splits, encoder, args.seed, args.length_pool)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            (out / "log.jsonl").unlink(missing_ok=True)
    extra_config = run_config(args, s, specs, model_dir, objective)
    run = {**extra_config, "method": method, "settings": {k: v for k, v in s.items() if k != "eval_every"},
           "sampler": batches.sampler.state_dict(), "world": world, "base": backbone.base_identity}
    aux = {"more_contrastive": s["lambda_con"], "mixlora_balance": s["balance_weight"]}    # Eq. 10's λ
    cfg = LoopConfig(max_steps=steps, lr=s["lr"], head_lr=s.get("head_lr"), weight_decay=s["weight_decay"],
                     betas=tuple(s["betas"]), warmup_steps=warmup, grad_accum=s["grad_accum"],
                     eval_every=s.get("eval_every") or 0, device=device, precision=args.precision,
                     aux_weights=aux, fsdp=args.fsdp, save_every=args.save_every,
                     checkpoint_dir=str(out / "checkpoint"), resume=resume, extra=run)
    if objective == "lm":                             # generation on the first --eval-limit test questions
        def evaluate():
            res = {sp.name: generation_accuracy(backbone, tok, sp.name, splits[sp.name]["test"][: args.eval_limit],
                                                i, args.eval_batch_size) for i, sp in enumerate(specs)}
            return {"tasks": res, "average": float(np.mean([r["accuracy"] for r in res.values()]))}
        test_eval = evaluate
    else:
        evaluate = make_evaluator(model, encoder, specs, splits, "validation", args.eval_batch_size, device,
                                  args.precision)
        test_eval = make_evaluator(model, encoder, specs, splits, "test", args.eval_batch_size, device,
                                   args.precision)
    reported = {}
    clock = {"before": 0.0}     # wall seconds of the earlier segments of a resumed run, up to its checkpoint

    def on_best(step, val):
        if main:
            save_adapters(model.backbone, out / "best", extra_modules=heads, extra_config=extra_config)
        same = all(splits[t].get("test") is splits[t].get("validation") for t in val["tasks"])
        reported.update(val if same else test_eval(), step=step)

    fit(model, iter(batches), cfg, evaluate=evaluate, on_best=on_best, log_path=out / "log.jsonl",
        get_state=lambda: {"batches": batches.state_dict(), "reported": reported,
                           "wall_s": clock["before"] + time.time() - t_start},
        set_state=lambda st: (batches.load_state_dict(st["batches"]), reported.update(st["reported"]),
                              clock.update(before=st.get("wall_s", 0.0))))
    metrics = {"tasks": reported["tasks"], "average": reported["average"], "best_step": reported["step"],
               "split": reported_split(s, args.bench), "method": method, "model": model_dir.name,
               "objective": objective, "trainable_params": trainable, "trainable_percent": percent,
               "head_params": head_params, "steps": steps,
               # resumed: this segment + the earlier ones up to the checkpoint (work redone after it counts once)
               "wall_s": round(clock["before"] + time.time() - t_start, 1),
               "wall_s_before_resume": round(clock["before"], 1),
               "threads": torch.get_num_threads(), "openmp": {k: os.environ.get(k) for k in OPENMP_ENV},
               "precision": args.precision, "device": str(device), "settings": dict(s)}
    if main:
        write_outputs(model.backbone, out, heads, extra_config, metrics, steps)
        print_table(reported, f"{method}{' ' + task if task else ''} — {metrics['split']} set, checkpoint of "
                              f"step {reported['step']} ({metrics['wall_s']:.0f} s wall)")
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


def train(args) -> dict:
    """train.py: one multi-task run, or LoRA-ST (--single-task)."""
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
    if s["batch_size"] % distributed.world_size():
        raise ValueError(f"--batch-size {s['batch_size']} (the global batch) does not split evenly over "
                         f"{distributed.world_size()} processes; pass a multiple of the process count")
    if args.fsdp and not torch.distributed.is_initialized():
        raise ValueError("--fsdp shards the base over processes: launch with torchrun --nproc_per_node N")
    specs, splits = load_data(args.bench, args.tasks, args.data_dir, s["split"], args.seed, args.jsonl,
                              args.jsonl_dev, args.max_eval_examples)
    if getattr(args, "train_examples", None):
        splits = k_shot(splits, args.train_examples, args.seed)
    backbone = load_model(model_dir, dtype=torch.float32, device="cpu" if args.fsdp else device)
    tok = load_tokenizer(model_dir)
    check_lengths(args, s, backbone, model_dir)
    out = Path(args.out or f"runs/{args.bench}-{'lora-st' if args.single_task else args.method}")
    if args.single_task:
        return train_single_task(args, s, backbone, tok, specs, splits, out, model_dir, device)
    return fit_tasks(args, s, backbone, tok, specs, splits, out, model_dir, device, resume=args.resume)


def train_single_task(args, s, backbone, tok, specs, splits, out: Path, model_dir: Path, device) -> dict:
    """LoRA-ST: each task trained alone, in <out>/tasks/<task>/ (a complete run directory), with
    its own optimizer, schedule, clipping and budget: exactly what `--tasks <task>` trains with
    the same settings and seed. The tasks' best adapters are then stacked into one per-task LoRA
    (per_task=True, lora_A [T, r, in]) with all heads in <out>/, scored on the test sets.
    With --resume a finished task is loaded, not trained again, and an unfinished one resumes."""
    if args.fsdp or distributed.world_size() > 1:
        raise ValueError("--single-task runs its tasks one after another in one process; launch it without "
                         "torchrun (each task alone fits where the multi-task run does)")
    states, heads, per_task = {}, {}, {}
    before = 0.0                                     # wall seconds spent on these tasks before this process
    for spec in specs:
        task_out = out / "tasks" / spec.name
        one = task_splits(splits, spec.name)
        if args.resume and (task_out / "metrics.json").is_file():
            print(f"LoRA-ST: {spec.name} finished before, loading {task_out}", flush=True)
            per_task[spec.name] = json.loads((task_out / "metrics.json").read_text())
            before += per_task[spec.name]["wall_s"]
            objective = per_task[spec.name]["objective"]
            model = build_model(backbone, tok, [spec], objective, args.pooling)
            load_adapters(backbone, task_out, extra_modules={"heads": model.heads} if objective == "head" else None)
        else:
            resume = args.resume and checkpoint_path(task_out / "checkpoint").is_file()
            per_task[spec.name] = fit_tasks(args, s, backbone, tok, [spec], one, task_out, model_dir, device,
                                            resume, task=spec.name)
            before += per_task[spec.name]["wall_s_before_resume"]
            objective = per_task[spec.name]["objective"]
            model = build_model(backbone, tok, [spec], objective, args.pooling)
            load_adapters(detach_adapters(backbone), task_out,          # the task's reported (best) adapters
                          extra_modules={"heads": model.heads} if objective == "head" else None)
        states[spec.name] = {k: v.clone() for k, v in adapter_state(backbone).items()}
        heads[spec.name] = model.heads.state_dict() if objective == "head" else None
        detach_adapters(backbone)
    return stack_single_task(args, s, backbone, tok, specs, splits, out, model_dir, device, states, heads,
                             per_task, before)


def stack_single_task(args, s, backbone, tok, specs, splits, out, model_dir, device, states, heads,
                      per_task, wall_before: float = 0.0) -> dict:
    """One per-task LoRA holding every task's adapter (lora_A[t] = task t's A ...), scored on the
    test sets: the numbers eval.py reproduces from <out>/. wall_before: the seconds spent on
    these tasks by earlier processes of a resumed run (their share of the summed wall_s)."""
    t_start = time.time()
    objective = objective_of(s, family(backbone), args.bench)
    st = dict(s, options={**s["options"], "per_task": True})
    attach(backbone, "lora", st, len(specs), objective)
    with torch.no_grad():
        for name, t in adapter_state(backbone).items():
            for i, spec in enumerate(specs):
                t[i].copy_(states[spec.name][name])
    model = build_model(backbone, tok, specs, objective, args.pooling).to(device)
    if objective == "head":
        for i, spec in enumerate(specs):
            model.heads[i].load_state_dict({k.split(".", 1)[1]: v for k, v in heads[spec.name].items()})
    model.eval()
    encoder = make_encoder(tok, backbone, specs, s["max_length"], objective)
    if objective == "lm":
        results = {"tasks": {t: m["tasks"][t] for t, m in per_task.items()}}
        results["average"] = float(np.mean([r["accuracy"] for r in results["tasks"].values()]))
    else:
        results = make_evaluator(model, encoder, specs, splits, "test", args.eval_batch_size, device,
                                 args.precision)()
    trainable, total, percent = count_parameters(backbone)
    metrics = {"tasks": results["tasks"], "average": results["average"],
               "best_step": {t: m["best_step"] for t, m in per_task.items()},
               "steps": {t: m["steps"] for t, m in per_task.items()},
               "split": reported_split(s, args.bench), "method": "lora-st", "model": model_dir.name,
               "objective": objective, "trainable_params": trainable, "trainable_percent": percent,
               "trainable_percent_per_task": percent / len(specs), "head_params": sum(m["head_params"] for m in
                                                                                     per_task.values()),
               "wall_s": round(sum(m["wall_s"] for m in per_task.values()) + time.time() - t_start, 1),
               "wall_s_before_resume": round(wall_before, 1),
               "settings": dict(s), "per_task_runs": {t: str(out / "tasks" / t) for t in per_task}}
    out.mkdir(parents=True, exist_ok=True)
    save_adapters(backbone, out, extra_modules={"heads": model.heads} if objective == "head" else None,
                  extra_config=run_config(args, s, specs, model_dir, objective))
    text = json.dumps(metrics, indent=2, default=str)
    write_atomic(out / "metrics.json", lambda tmp: Path(tmp).write_text(text))
    print_table(results, f"lora-st — {metrics['split']} set, each task's best step "
                         f"{metrics['best_step']} ({metrics['wall_s']:.0f} s wall)")
    print(f"wrote {out}/metrics.json, {out}/{WEIGHTS_FILE}; each task's run in {out}/tasks/")
    return metrics


# ----------------------------------------------------------------------------- eval.py
def evaluate_run(args) -> dict:
    """Reload a train.py run (base model + adapters + heads) and score it again."""
    cfg_file = Path(args.checkpoint) / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{args.checkpoint}: no {CONFIG_FILE}; pass a train.py --out directory")
    cfg = json.loads(cfg_file.read_text())
    model_dir = Path(args.model or cfg["model_dir"])
    objective = cfg.get("objective", "lm" if cfg.get("bench") == "commonsense" else "head")
    results = (evaluate_generation if objective == "lm" else evaluate_tasks)(args, cfg, model_dir, objective)
    out = Path(args.checkpoint) / f"eval-{args.split or 'default'}.json"
    text = json.dumps(results, indent=2)
    write_atomic(out, lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {out}")
    return results


def load_run(checkpoint, model_dir=None, device="cpu", specs=None):
    """A train.py --out directory -> (its adapter_config.json, task specs, the base model with
    the run's adapters, the objective's model with its heads, tokenizer). specs: the run's tasks
    when the caller has read them (else from the registry, or the run's jsonl file)."""
    cfg_file = Path(checkpoint) / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{checkpoint}: no {CONFIG_FILE}; pass a train.py --out directory")
    cfg = json.loads(cfg_file.read_text())
    objective = cfg.get("objective", "lm" if cfg.get("bench") == "commonsense" else "head")
    if specs is None:
        specs = ([s for s, _ in load_jsonl_tasks(cfg["jsonl"]).values()] if cfg.get("bench") == "jsonl"
                 else [get_spec(n) for n in cfg["task_names"]])
    model_dir = Path(model_dir or cfg["model_dir"])
    backbone = load_model(model_dir, device=device)
    tok = load_tokenizer(model_dir)
    model = build_model(backbone, tok, specs, objective, cfg.get("pooling", "mean")).to(device)
    load_adapters(backbone, checkpoint, extra_modules={"heads": model.heads} if objective == "head" else None)
    model.eval()
    return cfg, specs, backbone, model, tok


def evaluate_tasks(args, cfg: dict, model_dir: Path, objective: str) -> dict:
    specs, splits = load_data(cfg["bench"], ",".join(cfg["task_names"]), args.data_dir or cfg["data_dir"],
                              cfg["split"], cfg["seed"], cfg.get("jsonl"), cfg.get("jsonl_dev"),
                              cfg.get("max_eval_examples"))
    if [s.name for s in specs] != cfg["task_names"]:
        raise ValueError(f"{args.checkpoint}: the run's tasks {cfg['task_names']} are not what the data gives "
                         f"({[s.name for s in specs]})")
    _, _, backbone, model, tok = load_run(args.checkpoint, model_dir, args.device, specs)
    split = args.split or ("test" if cfg["split"] == "paper" else "validation")
    encoder = make_encoder(tok, backbone, specs, cfg["max_length"], objective)
    results = make_evaluator(model, encoder, specs, splits, split, args.batch_size, args.device, args.precision)()
    print_table(results, f"{cfg['method']} — {split} split, reloaded from {args.checkpoint}")
    return results


def evaluate_generation(args, cfg: dict, model_dir: Path, objective: str) -> dict:
    """Commonsense: generate an answer per test question with the LM head (task id = the
    run's id of that task, or 0), extract it, and score accuracy."""
    backbone = load_model(model_dir, device=args.device)
    tok = load_tokenizer(model_dir)
    load_adapters(backbone, args.checkpoint)
    backbone.eval()
    names = args.tasks.split(",") if args.tasks else cfg["task_names"]
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    results = {}
    for task in names:
        examples = load_task(task, args.data_dir or cfg["data_dir"], "test")[: args.limit]
        tid = cfg["task_names"].index(task) if task in cfg["task_names"] else 0
        results[task] = generation_accuracy(backbone, tok, task, examples, tid, args.batch_size, args.max_new_tokens,
                                            args.temperature, args.top_k, args.top_p, generator)
        print(f"{task:14s} accuracy {results[task]['accuracy']:.4f}  ({len(examples)} questions)", flush=True)
    return {"tasks": results, "average": sum(r["accuracy"] for r in results.values()) / max(1, len(results))}


# ----------------------------------------------------------------------------- the error boundary
def cli(fn, args) -> dict:
    """Run fn(args); an input error is one line on stderr and exit code 2, a diverged run or a
    failed write (a full disk: WriteError, naming the file) one line and exit code 1; --debug
    re-raises them with their tracebacks."""
    import sys
    try:
        result = fn(args)
    except (*INPUT_ERRORS, DivergenceError, WriteError) as e:
        who = f"[rank {distributed.rank()}] " if distributed.world_size() > 1 else ""
        distributed.close_distributed(wait=False)
        if args.debug:
            raise
        text = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
        print(f"{who}error: {' '.join(text.split())}", file=sys.stderr, flush=True)
        raise SystemExit(1 if isinstance(e, (DivergenceError, WriteError)) else 2) from None
    distributed.close_distributed()
    return result

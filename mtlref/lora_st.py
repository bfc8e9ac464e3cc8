"""LoRA-ST (train.py --single-task): each task trained alone with its own LoRA, optimizer,
schedule, clipping and step budget (run.fit_tasks once per task, on a backbone without
adapters each time), then the tasks' best adapters stacked into one per-task LoRA and scored."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mtlref import distributed
from mtlref.adapters import WEIGHTS_FILE, adapter_state, count_parameters, detach_adapters, load_adapters, save_adapters
from mtlref.checkpointing import checkpoint_path
from mtlref.data.loading import task_splits
from mtlref.evaluate import make_evaluator, print_table
from mtlref.files import write_atomic
from mtlref.heads import family
from mtlref.objective import attach, build_model, make_encoder, objective_of
from mtlref.run import Inputs, fit_tasks, prepare, run_config
from mtlref.settings import reported_split

def train_single_task(args) -> dict:
    """LoRA-ST: each task trained alone, in <out>/tasks/<task>/ (a complete run directory), with
    its own optimizer, schedule, clipping and budget: exactly what `--tasks <task>` trains with
    the same settings and seed. The tasks' best adapters are then stacked into one per-task LoRA
    (per_task=True, lora_A [T, r, in]) with all heads in <out>/, scored on the test sets.
    With --resume a finished task is loaded, not trained again, and an unfinished one resumes."""
    inputs = prepare(args)
    specs, backbone, tok, out = inputs.specs, inputs.backbone, inputs.tok, inputs.out
    if args.fsdp or distributed.world_size() > 1:
        raise ValueError("--single-task runs its tasks one after another in one process; launch it without "
                         "torchrun (each task alone fits where the multi-task run does)")
    states, heads, per_task = {}, {}, {}
    before = 0.0                                     # wall seconds spent on these tasks before this process
    for spec in specs:
        task_out = out / "tasks" / spec.name
        if args.resume and (task_out / "metrics.json").is_file():
            print(f"LoRA-ST: {spec.name} finished before, loading {task_out}", flush=True)
            per_task[spec.name] = json.loads((task_out / "metrics.json").read_text())
            before += per_task[spec.name]["wall_s"]
            objective = per_task[spec.name]["objective"]
            model = build_model(backbone, tok, [spec], objective, args.pooling)
            load_adapters(backbone, task_out, extra_modules={"heads": model.heads} if objective == "head" else None)
        else:
            resume = args.resume and checkpoint_path(task_out / "checkpoint").is_file()
            alone = replace(inputs, specs=[spec], splits=task_splits(inputs.splits, spec.name), out=task_out)
            per_task[spec.name] = fit_tasks(args, alone, resume, task=spec.name)
            before += per_task[spec.name]["wall_s_before_resume"]
            objective = per_task[spec.name]["objective"]
            model = build_model(backbone, tok, [spec], objective, args.pooling)
            load_adapters(detach_adapters(backbone), task_out,          # the task's reported (best) adapters
                          extra_modules={"heads": model.heads} if objective == "head" else None)
        states[spec.name] = {k: v.clone() for k, v in adapter_state(backbone).items()}
        heads[spec.name] = model.heads.state_dict() if objective == "head" else None
        detach_adapters(backbone)
    return stack_single_task(args, inputs, states, heads, per_task, before)


def stack_single_task(args, inputs: Inputs, states: dict, heads: dict, per_task: dict,
                      wall_before: float = 0.0) -> dict:
    """One per-task LoRA holding every task's adapter (lora_A[t] = task t's A ...), scored on the
    test sets: the numbers eval.py reproduces from <out>/. states, heads, per_task: each task's
    best adapters, heads and metrics; wall_before: the seconds spent on these tasks by earlier
    processes of a resumed run (their share of the summed wall_s)."""
    s, specs, splits, backbone, tok = inputs.s, inputs.specs, inputs.splits, inputs.backbone, inputs.tok
    out, model_dir, device = inputs.out, inputs.model_dir, inputs.device
    t_start = time.time()
    objective = objective_of(s, family(backbone), args.bench)
    st = replace(s, options={**s.options, "per_task": True})
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
    encoder = make_encoder(tok, backbone, specs, s.max_length, objective)
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
               "scored": {t: n for m in per_task.values() for t, n in m.get("scored", {}).items()},
               "train_sizes": {t: n for m in per_task.values() for t, n in m.get("train_sizes", {}).items()},
               "objective": objective, "trainable_params": trainable, "trainable_percent": percent,
               "trainable_percent_per_task": percent / len(specs), "head_params": sum(m["head_params"] for m in
                                                                                     per_task.values()),
               "wall_s": round(sum(m["wall_s"] for m in per_task.values()) + time.time() - t_start, 1),
               "wall_s_before_resume": round(wall_before, 1),
               "settings": s.as_dict(), "per_task_runs": {t: str(out / "tasks" / t) for t in per_task}}
    out.mkdir(parents=True, exist_ok=True)
    save_adapters(backbone, out, extra_modules={"heads": model.heads} if objective == "head" else None,
                  extra_config=run_config(args, s, specs, model_dir, objective))
    text = json.dumps(metrics, indent=2, default=str)
    write_atomic(out / "metrics.json", lambda tmp: Path(tmp).write_text(text))
    print_table(results, f"lora-st — {metrics['split']} set, each task's best step "
                         f"{metrics['best_step']} ({metrics['wall_s']:.0f} s wall)")
    print(f"wrote {out}/metrics.json, {out}/{WEIGHTS_FILE}; each task's run in {out}/tasks/")
    return metrics


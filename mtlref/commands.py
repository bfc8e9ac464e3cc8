"""The command lines of train.py, eval.py, predict.py and export.py (the scripts only call these mains), so
that tests and other programs run a command without loading a script. Each main reads its flags
and runs the library's work through cli() (mtlref/cli.py: one line and an exit code on a bad
input, a diverged run or a failed write)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mtlref.adapters import REGISTRY as METHODS
from mtlref.cli import cli
from mtlref.data.loading import VAL_SIZE
from mtlref.data.samplers import SCHEMES
from mtlref.evaluate import evaluate_run
from mtlref.export import export_head, export_merged, export_peft
from mtlref.lora_st import train_single_task
from mtlref.predict import check_paths, load_run, predict_file
from mtlref.presets import PRESETS
from mtlref.run import train
from mtlref.settings import OBJECTIVES
from mtlref.train import PRECISIONS


class Parser(argparse.ArgumentParser):
    def error(self, message):                      # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def train_args(argv=None, description: str | None = None) -> argparse.Namespace:
    """train.py's flags (None = not given: the preset's value, mtlref/settings.py)."""
    p = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="more", help=f"one of {sorted(METHODS)}")
    p.add_argument("--bench", default="glue", choices=["glue", "superglue", "commonsense", "jsonl"])
    p.add_argument("--model", default=None, help="model directory (config.json + safetensors); default MiniLM")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--jsonl", default=None, help="with --bench jsonl: train file; --jsonl-dev for the dev file")
    p.add_argument("--jsonl-dev", default=None,
                   help="with --bench jsonl: the dev file (default: 10%% of each task is held out as dev)")
    p.add_argument("--tasks", default=None, help="comma list (default: every task of the bench)")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                   help="the papers' settings (mtlref/presets.py); flags override them")
    p.add_argument("--split", default=None, choices=["dev", "paper"],
                   help="dev: validation = test = the dev sets; paper: MoRE Appendix A (default: the preset's)")
    p.add_argument("--sampler", default=None, choices=list(SCHEMES),
                   help="task sampling (default: the preset's, else proportional)")
    p.add_argument("--batches", default=None, choices=["mixed", "single-task"],
                   help="mixed-task or single-task batches (default: the preset's, else mixed)")
    p.add_argument("--single-task-batches", dest="batches", action="store_const", const="single-task",
                   help="the same as --batches single-task")
    p.add_argument("--objective", default=None, choices=OBJECTIVES,
                   help="auto: T5 text-to-text (gen, MoRE Eq. 9), per-task heads (head) for the others")
    p.add_argument("--targets", default=None, help="attention | ffn | attention+ffn | comma list of slot names")
    for name, typ in [("rank", int), ("alpha", float), ("lr", float), ("head-lr", float), ("epochs", float),
                      ("max-steps", int), ("batch-size", int), ("max-length", int), ("warmup-steps", int),
                      ("eval-every", int), ("grad-accum", int), ("dropout", float), ("weight-decay", float)]:
        p.add_argument(f"--{name}", type=typ, default=None)
    p.add_argument("--lambda-con", type=float, default=None, help="λ of MoRE Eq. 10 (weight of L_con)")
    p.add_argument("--balance-weight", type=float, default=None, help="weight of MixLoRA's load-balancing loss")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. --option num_up=3 --option tau=0.5 (see each method's docstring)")
    p.add_argument("--pooling", default="mean", choices=["mean", "cls", "pooler"])
    p.add_argument("--single-task", action="store_true",
                   help="LoRA-ST: each task trained alone with its own LoRA, optimizer and budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-examples", type=int, default=None, metavar="K",
                   help="k-shot: train on K examples per task, drawn with --seed (MoRE Table 4: k = 4, 16, 32)")
    p.add_argument("--init-from", default=None, metavar="RUN",
                   help="start the adapters from a train.py --out directory (few-shot transfer, MoRE §5.1)")
    p.add_argument("--task-init", default=None, metavar="NEW=SAVED,...",
                   help="with --init-from: the saved task whose per-task tensors (MoRE's task embedding, "
                        "MTL-LoRA's Λ_t and w_t, ...) start each new task, e.g. cb=mnli,superglue_boolq=qnli")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 autocast on CUDA, fp32 on CPU; fp32 turns it off on CUDA; bf16 turns it on on CPU")
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--max-eval-examples", type=int, default=None,
                   help="score only the first N examples of each validation and test set (quick runs)")
    p.add_argument("--length-pool", type=int, default=8,
                   help="sort each pool of N sampled batches by length before batching (1: off)")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="commonsense: score only the first N test questions per task (default: all of them; "
                        "metrics.json's \"scored\" says how many were)")
    p.add_argument("--val-size", type=int, default=VAL_SIZE,
                   help=f"commonsense: questions per task held out of its training set (seeded, never trained "
                        f"on) to choose the best step on (default {VAL_SIZE}); 0: none, the last step is reported")
    p.add_argument("--out", default=None, help="output directory (default runs/<bench>-<method>)")
    p.add_argument("--save-every", type=int, default=0, help="write <out>/checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute block activations in backward")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone with its adapters (mtlref.objective.compile_backbone)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the frozen base (FSDP2)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    return p.parse_args(argv)


def train_main(argv=None, description: str | None = None) -> dict:
    args = train_args(argv, description)
    return cli(train_single_task if args.single_task else train, args)


# ----------------------------------------------------------------------------- eval.py
def eval_args(argv=None, description: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a train.py --out directory (adapter_config.json inside)")
    p.add_argument("--split", default=None, choices=["validation", "test"],
                   help="default: what train.py reported (test for --split paper runs, else the dev set)")
    p.add_argument("--data-dir", default=None, help="default: the run's")
    p.add_argument("--model", default=None, help="default: the run's base model directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--tasks", default=None, help="commonsense: comma list of test sets")
    p.add_argument("--limit", type=int, default=None, help="commonsense: first N examples per task")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone with its adapters")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def eval_main(argv=None, description: str | None = None) -> dict:
    return cli(evaluate_run, eval_args(argv, description))


# ----------------------------------------------------------------------------- predict.py
def predict_args(argv=None, description: str | None = None) -> argparse.Namespace:
    p = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a train.py --out directory")
    p.add_argument("--input", required=True,
                   help='jsonl, one {"task", "text", "text_pair" (pair tasks), "id" (optional)} a line; - reads stdin')
    p.add_argument("--out", default=None, help="one JSON line per row, in input order (default: stdout)")
    p.add_argument("--scores", action="store_true", help="per-task heads: add each class's probability")
    p.add_argument("--merged", action="store_true",
                   help="run each task's rows through the base with its ΔW folded in (methods that merge)")
    p.add_argument("--max-merged", type=int, default=1,
                   help="--merged: merged copies of the base kept in memory, the most recently used (default 1)")
    p.add_argument("--skip-bad", action="store_true",
                   help="write each bad row with its reason to <out>.rejected.jsonl and go on (default: stop)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32, help="commonsense (generative) runs: answer length")
    p.add_argument("--model", default=None, help="default: the run's base model directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone with its adapters")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def predict_rows(args) -> dict:
    """predict.py: load the run (after checking the files), stream --input through it."""
    check_paths(args.input, args.out, args.skip_bad)
    run = load_run(args.checkpoint, args.model, args.device, compile=args.compile)
    run.max_merged = args.max_merged
    counts = predict_file(run, args.input, args.out, args.batch_size, args.skip_bad, precision=args.precision,
                          scores=args.scores, merged=args.merged, max_new_tokens=args.max_new_tokens)
    if args.out:
        print(f"wrote {args.out}: {counts['rows']:,} rows" + (f"; {counts['rejected']:,} rejected, in "
                                                            f"{args.out}.rejected.jsonl" if args.skip_bad else ""))
    return counts


def predict_main(argv=None, description: str | None = None) -> dict:
    return cli(predict_rows, predict_args(argv, description))


# ----------------------------------------------------------------------------- export.py
def export_args(argv=None, description: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a train.py --out directory")
    p.add_argument("--task", required=True, help="a task of the run, or all (one directory per task)")
    p.add_argument("--format", default="peft", choices=["peft", "merged"])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="the base model directory (default: the run's)")
    p.add_argument("--base-model-name", default=None,
                   help="base_model_name_or_path to write (default: the base model directory)")
    p.add_argument("--prefix", default="", help='module path prefix of the class that will load it, e.g. "bert."')
    p.add_argument("--uniform-rank", action="store_true", help="pad every module to the largest rank")
    p.add_argument("--attention-only", action="store_true",
                   help="mixlora: export the attention LoRAs and leave the FFN experts out")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="--format merged: shard above this size")
    p.add_argument("--device", default="cpu")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def export_run(args) -> list[Path]:
    """export.py: each asked task of a run in peft's format or merged, with its head."""
    run = load_run(args.checkpoint, args.model, args.device)
    cfg, backbone, model = run.cfg, run.backbone, run.model
    names = [s.name for s in run.specs]
    if args.task != "all" and args.task not in names:
        raise ValueError(f"{args.checkpoint}: no task {args.task!r}; the run's tasks are {names} (or all)")
    model_dir = Path(args.model or cfg["model_dir"])
    written = []
    for t, name in enumerate(names):
        if args.task not in ("all", name):
            continue
        out = Path(args.out) / name if args.task == "all" else Path(args.out)
        if args.format == "merged":
            export_merged(backbone, t, out, model_dir, int(args.max_shard_gb * 2 ** 30))
        else:
            export_peft(backbone, t, out, base_model_name_or_path=args.base_model_name or str(model_dir),
                        prefix=args.prefix, attention_only=args.attention_only, uniform_rank=args.uniform_rank)
        if hasattr(model, "heads"):
            export_head(model, t, out, cfg.get("pooling", "mean"))
        if args.attention_only:
            print(f"{name}: wrote the attention LoRAs only; the MixLoRA FFN experts are not in {out}")
        print(f"{name}: wrote {out}")
        written.append(out)
    return written


def export_main(argv=None, description: str | None = None) -> list[Path]:
    return cli(export_run, export_args(argv, description))

"""The command line's error boundary: train.py, eval.py and export.py run their work through cli()."""
from __future__ import annotations

import sys

from mtlref import distributed
from mtlref.files import WriteError
from mtlref.pretrained import CheckpointError
from mtlref.tokenizer import TokenizerError
from mtlref.train import DivergenceError

# What a bad input raises; train.py and eval.py print it as one line and exit with code 2.
INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, CheckpointError, TokenizerError)


def cli(fn, args) -> dict:
    """Run fn(args); an input error is one line on stderr and exit code 2, a diverged run or a
    failed write (a full disk: WriteError, naming the file) one line and exit code 1; --debug
    re-raises them with their tracebacks."""
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

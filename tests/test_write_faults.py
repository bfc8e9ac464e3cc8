"""A failed write loses nothing (issue 23, point 3).

When a checkpoint, adapter, metrics, log, evaluation or export file cannot be written, whether
the writer fails after writing part of the file ("torn": half the bytes, then EIO) or the disk
is full ("full": half the bytes, then ENOSPC, raised the way the writer reports it: safetensors
as SafetensorError("... (os error 28)"), Python as OSError), then
  - the CLI stops with ONE line on stderr naming the file and the cause, exit code 1, no traceback;
  - the previous checkpoint and every earlier result file are byte for byte what they were and
    load; no temporary file is left beside them; log.jsonl keeps no torn line;
  - --resume continues from the previous checkpoint and ends with the adapters of a run that
    was never interrupted, bit for bit.
Faults are injected in-process (Fault, inject) into the writers mtlref calls: safetensors'
save_file, Path.write_text, shutil.copyfile and appends to log.jsonl, matched by the name of
the file being written, whether in place or through a temporary file beside it (".<name>XXXX"),
so writing in place again makes these tests fail. One test runs a real train.py process under a
file-size limit (RLIMIT_FSIZE): there the kernel itself fails the write.
"""
import builtins
import contextlib
import errno
import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import mtlref.adapters.io
import mtlref.checkpointing
import mtlref.export
from conftest import ROOT
from mtlref.checkpointing import read_checkpoint
from mtlref.commands import eval_main, export_main, train_main
from mtlref.files import WriteError, write_atomic



KINDS = ("torn", "full")
CAUSE = {"torn": "[Errno 5] Input/output error", "full": "[Errno 28] No space left on device"}


# ----------------------------------------------------------------------------- fault injection
class Fault:
    """The `nth` write of a file named `name` (or of a temporary file for it) writes half its
    bytes, then raises: "torn" OSError(EIO); "full" ENOSPC as the writer reports it. Records
    the file's path (`hit`) and its bytes just before the failed write (`before`, None if absent)."""

    def __init__(self, name: str, kind: str, nth: int = 1):
        self.name, self.kind, self.nth, self.count = name, kind, nth, 0
        self.hit: Path | None = None
        self.before: bytes | None = None

    def fires(self, path) -> bool:
        """Called before each write: True (once) for the nth write of our file."""
        base = Path(path).name
        if base != self.name and not base.startswith("." + self.name):
            return False
        self.count += 1
        if self.count != self.nth:
            return False
        self.hit = Path(path).parent / self.name
        self.before = self.hit.read_bytes() if self.hit.is_file() else None
        return True

    def error(self, safetensors: bool = False) -> Exception:
        if self.kind == "torn":
            return OSError(errno.EIO, os.strerror(errno.EIO))
        if safetensors:               # what safetensors 0.8 raises on a real ENOSPC (checked on a full tmpfs)
            return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def halve(path) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


class TornAppend:
    """A file opened for appending to log.jsonl whose failing write appends half its data."""

    def __init__(self, f, fault: Fault, path):
        self.f, self.fault, self.path = f, fault, path

    def write(self, data):
        if self.fault.fires(self.path):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise self.fault.error()
        return self.f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


@contextlib.contextmanager
def inject(fault: Fault):
    """Route every writer mtlref uses through `fault`."""
    real_save = mtlref.adapters.io.save_file
    real_write_text, real_copyfile, real_open = pathlib.Path.write_text, shutil.copyfile, builtins.open

    def save_file(tensors, filename, metadata=None):
        fire = fault.fires(filename)
        real_save(tensors, filename, metadata=metadata)
        if fire:
            halve(filename)
            raise fault.error(safetensors=True)

    def write_text(self, data, *args, **kwargs):
        if fault.fires(self):
            real_write_text(self, data[: len(data) // 2], *args, **kwargs)
            raise fault.error()
        return real_write_text(self, data, *args, **kwargs)

    def copyfile(src, dst, *args, **kwargs):
        fire = fault.fires(dst)
        out = real_copyfile(src, dst, *args, **kwargs)
        if fire:
            halve(dst)
            raise fault.error()
        return out

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        is_log = isinstance(file, (str, os.PathLike)) and Path(file).name == fault.name == "log.jsonl"
        return TornAppend(f, fault, file) if is_log and "a" in mode else f

    with contextlib.ExitStack() as stack:
        for module in (mtlref.adapters.io, mtlref.checkpointing, mtlref.export):
            stack.enter_context(mock.patch.object(module, "save_file", save_file))
        stack.enter_context(mock.patch.object(pathlib.Path, "write_text", write_text))
        stack.enter_context(mock.patch.object(shutil, "copyfile", copyfile))
        stack.enter_context(mock.patch.object(builtins, "open", open_))
        yield fault
    assert fault.hit is not None, f"no write of {fault.name} was made {fault.nth} time(s): the fault never fired"


# ----------------------------------------------------------------------------- helpers
def fails(capsys, main, argv) -> str:
    """main(argv) exits with code 1 after exactly one stderr line and no traceback; the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*")]


def check_kept(fault: Fault, line: str, kept: str = "the previous {name} is intact") -> None:
    """The line names the file and the cause; the file is what it was before the failed write."""
    assert line.startswith(f"error: could not write {fault.hit}: {CAUSE[fault.kind]}; "
                           + kept.format(name=fault.name)), line
    if fault.before is None:
        assert not fault.hit.exists()
    else:
        assert fault.hit.read_bytes() == fault.before


def flags(tiny_bert, tiny_tasks, out) -> list[str]:
    """20 steps of MoRE with dropout (the resume must restore the RNG), a checkpoint every 5 steps,
    an evaluation every 10 (best/ is written mid-run)."""
    return ["--bench", "jsonl", "--jsonl", str(tiny_tasks), "--model", str(tiny_bert), "--method", "more",
            "--batch-size", "4", "--max-length", "16", "--eval-batch-size", "8", "--max-steps", "20",
            "--save-every", "5", "--eval-every", "10", "--lr", "5e-3", "--dropout", "0.1", "--out", str(out)]


@pytest.fixture(scope="module")
def whole(tiny_bert, tiny_tasks, tmp_path_factory) -> Path:
    """The uninterrupted run: its adapters are what every resumed run must end with."""
    out = tmp_path_factory.mktemp("whole") / "run"
    train_main(flags(tiny_bert, tiny_tasks, out))
    return out


def same_adapters(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "adapter.safetensors")), load_file(str(b / "adapter.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k
    assert json.loads((a / "metrics.json").read_text())["best_step"] == \
        json.loads((b / "metrics.json").read_text())["best_step"]


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- write_atomic itself
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("writer", ["json", "safetensors"])
def test_write_atomic_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, kind, writer):
    name = "metrics.json" if writer == "json" else "adapter.safetensors"
    path = tmp_path / name
    if writer == "json":
        def write(target):
            write_atomic(target, lambda tmp: Path(tmp).write_text(json.dumps({"new": list(range(100))})))
    else:
        def write(target):
            tensors = {"w": torch.arange(1000.0)}
            write_atomic(target, lambda tmp: mtlref.adapters.io.save_file(tensors, tmp, metadata={"format": "pt"}))
    with inject(Fault(name, kind)) as fault, pytest.raises(WriteError) as e:
        write(path)                                         # no previous file: none is left
    assert str(e.value) == (f"could not write {path}: {CAUSE[kind]}; no partial file was left; "
                            + ("free space on that disk or choose another output directory (--out)" if kind == "full"
                               else "check that disk or choose another output directory (--out)"))
    assert e.value.errno == (errno.ENOSPC if kind == "full" else errno.EIO) and isinstance(e.value, OSError)
    assert fault.before is None and list(tmp_path.iterdir()) == []

    write(path)                                             # a good write, then a failed one over it
    good = path.read_bytes()
    with inject(Fault(name, kind)) as fault, pytest.raises(WriteError) as e:
        write(path)
    assert str(e.value).startswith(f"could not write {path}: {CAUSE[kind]}; the previous {name} is intact; ")
    assert fault.before == good and path.read_bytes() == good and list(tmp_path.iterdir()) == [path]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())   # as open() makes it, not 0600


# ----------------------------------------------------------------------------- training runs
@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_checkpoint_write_stops_with_one_line_and_resume_ends_as_the_whole_run(
        capsys, tiny_bert, tiny_tasks, tmp_path, whole, kind):
    """The step-10 checkpoint fails: the step-5 one is intact and loads, --resume from it ends
    with the adapters and best step of the uninterrupted run."""
    out = tmp_path / "run"
    argv = flags(tiny_bert, tiny_tasks, out)
    with inject(Fault("state.safetensors", kind, nth=2)) as fault:
        line = fails(capsys, train_main, argv)
    check_kept(fault, line, "the previous {name} is intact (--resume continues from it)")
    assert fault.hit == out / "checkpoint" / "state.safetensors"
    assert temporaries(out) == []
    assert read_checkpoint(out / "checkpoint")[0]["step"] == 5
    assert not (out / "adapter.safetensors").exists() and not (out / "metrics.json").exists()

    resumed = train_main([*argv, "--resume"])
    assert "resumed from" in capsys.readouterr().out
    assert resumed["wall_s_before_resume"] > 0
    same_adapters(whole, out)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name, nth, where", [("adapter.safetensors", 1, "last"), ("adapter.safetensors", 2, ""),
                                              ("adapter_config.json", 1, "last"), ("adapter_config.json", 2, ""),
                                              ("metrics.json", 1, "")])
def test_a_failed_result_write_keeps_every_earlier_result_file(capsys, tiny_bert, tiny_tasks, tmp_path, whole,
                                                               name, nth, where, kind):
    """A finished run written again (--resume from its last checkpoint writes the outputs anew;
    its best step, 10, is not its last, so <out>/last/ is written, then best/'s files are copied
    to <out>/): a failed adapter or metrics write leaves every file as it was; --resume then
    completes."""
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    assert json.loads((out / "metrics.json").read_text())["best_step"] == 10
    earlier = files(out)
    argv = [*flags(tiny_bert, tiny_tasks, out), "--resume"]
    with inject(Fault(name, kind, nth)) as fault:
        line = fails(capsys, train_main, argv)
    check_kept(fault, line)
    assert fault.hit == out / where / name
    assert files(out) == earlier and temporaries(out) == []
    json.loads((out / "metrics.json").read_text())
    load_file(str(out / "adapter.safetensors"))

    train_main(argv)
    same_adapters(whole, out)


@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_log_append_leaves_no_torn_line(capsys, tiny_bert, tiny_tasks, tmp_path, whole, kind):
    """The 2nd record of log.jsonl (step 20's losses; the 1st is step 10's evaluation) fails half
    written: log.jsonl keeps its one earlier line, and after --resume every line is JSON."""
    out = tmp_path / "run"
    argv = flags(tiny_bert, tiny_tasks, out)
    with inject(Fault("log.jsonl", kind, nth=2)) as fault:
        line = fails(capsys, train_main, argv)
    check_kept(fault, line, "its earlier lines are intact")
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [10]
    assert read_checkpoint(out / "checkpoint")[0]["step"] == 15 and temporaries(out) == []

    train_main([*argv, "--resume"])
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 20 and "eval" in records[-1]
    same_adapters(whole, out)


@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_evaluation_write_keeps_the_earlier_results(capsys, tmp_path, whole, kind):
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    eval_main(["--checkpoint", str(out), "--batch-size", "8"])
    earlier = files(out)
    assert "eval-default.json" in earlier
    with inject(Fault("eval-default.json", kind)) as fault:
        line = fails(capsys, eval_main, ["--checkpoint", str(out), "--batch-size", "8"])
    check_kept(fault, line)
    assert files(out) == earlier and temporaries(out) == []


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form, name", [("merged", "model.safetensors.index.json"), ("merged", "config.json"),
                                        ("merged", "vocab.txt"), ("peft", "head_config.json"),
                                        ("peft", "adapter_model.safetensors")])
def test_a_failed_export_write_keeps_the_earlier_export(capsys, tmp_path, whole, form, name, kind):
    """export.py over an earlier export of the same task: a failed write of any of its files
    leaves that export as it was (merged: sharded, so the index is written)."""
    out = tmp_path / "export"
    argv = ["--checkpoint", str(whole), "--task", "pair", "--format", form, "--out", str(out),
            "--max-shard-gb", str(20_000 / 2 ** 30)]
    export_main(argv)
    earlier = files(out)
    assert name in earlier
    with inject(Fault(name, kind)) as fault:
        line = fails(capsys, export_main, argv)
    check_kept(fault, line)
    assert files(out) == earlier and temporaries(out) == []


# ----------------------------------------------------------------------------- a real write error
def test_a_real_write_error_in_a_train_py_process(tiny_bert, tiny_tasks, tmp_path, whole):
    """train.py --resume of a finished run under a 4 KiB file-size limit: the kernel fails the
    adapter write (EFBIG, which safetensors reports as its own SafetensorError); one line on
    stderr, exit code 1, every earlier file intact, no temporary file."""
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    earlier = files(out)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")} | {"OMP_NUM_THREADS": "1"}

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    done = subprocess.run([sys.executable, "train.py", *flags(tiny_bert, tiny_tasks, out), "--resume"], cwd=ROOT,
                          env=env, preexec_fn=limit, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[0].startswith(f"error: could not write {out}/") and "adapter.safetensors: [Errno 27] File too " \
        "large; the previous adapter.safetensors is intact; raise the file-size limit" in lines[0], lines[0]
    assert files(out) == earlier and temporaries(out) == []

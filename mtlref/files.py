"""Writing files whole or not at all, with one clear error when the disk refuses: nothing here
knows about adapters (mtlref.adapters hands these names on for the modules that import them from
there today).

    write_atomic(path, write, kept_note="")    write(tmp) beside path, then os.replace over it
    append_line(path, text)                    append whole or not at all (log.jsonl)
    WriteError, write_error(path, e, kept)     the error both raise, naming file, cause and fix
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path

from safetensors import SafetensorError


class WriteError(OSError):
    """A file could not be written (disk full, no permission, an I/O error); the message names the
    file, the cause, what was kept and the fix. train.py, eval.py and export.py print it as one
    line and exit with code 1."""


def write_error(path, e: BaseException, kept: str) -> WriteError:
    """WriteError for `path` from the writer's exception `e`. safetensors reports an OSError as
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")."""
    n = getattr(e, "errno", None)
    m = None if n else re.search(r"\(os error (\d+)\)", str(e))
    n = int(m.group(1)) if m else n
    cause = f"[Errno {n}] {getattr(e, 'strerror', None) or os.strerror(n)}" if n else f"{type(e).__name__}: {e}"
    fix = ("free space on that disk or choose another output directory (--out)" if n in (errno.ENOSPC, errno.EDQUOT)
           else "raise the file-size limit (ulimit -f) or choose another output directory" if n == errno.EFBIG
           else "make it writable or choose another output directory (--out)" if n in (errno.EACCES, errno.EPERM,
                                                                                       errno.EROFS)
           else "check that disk or choose another output directory (--out)")
    err = WriteError(f"could not write {path}: {cause}; {kept}; {fix}")
    err.errno = n
    return err


def write_atomic(path: Path, write, kept_note: str = "") -> None:
    """write(tmp) into a temporary file beside `path`, then os.replace it over `path`: a failure at
    any point leaves the previous file (or none), never a torn one, and no temporary file; it
    raises WriteError naming `path` and the cause (kept_note follows "the previous ... is intact").
    The file gets the mode a plain open() would give (mkstemp's is 0600)."""
    path = Path(path)
    existed, tmp = path.exists(), None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name)
        os.close(fd)
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        if isinstance(e, WriteError):
            raise
        kept = f"the previous {path.name} is intact{kept_note}" if existed else "no partial file was left"
        raise write_error(path, e, kept) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.remove(tmp)


def append_line(path: Path, text: str) -> None:
    """Append `text` to `path` whole or not at all: a failed write cuts the file back to its
    earlier lines (no torn line for a reader or a later append) and raises WriteError."""
    try:
        with open(path, "ab", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            try:
                data = memoryview(text.encode())
                while data:
                    data = data[f.write(data):]
            except BaseException:
                os.ftruncate(f.fileno(), size)
                raise
    except OSError as e:
        raise write_error(path, e, "its earlier lines are intact") from e


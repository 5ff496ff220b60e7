"""Writing outputs safely: every file caffetune writes (nets, solvers, JSON, TSV, caffemodels, images) goes through
here, so an interrupted command never leaves a half-written file at the target path."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from caffetune.errors import CaffetuneError


@contextlib.contextmanager
def atomic_output(path: Path | str):
    """A binary handle whose content replaces `path` only when the block succeeds: a temporary file beside the
    target, then a rename, so an interrupted write never leaves a half-written file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path | str, data: str | bytes) -> None:
    """Write a whole file atomically (see atomic_output)."""
    with atomic_output(path) as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def refuse_existing(path: Path | str, overwrite: bool) -> None:
    """Raise unless `path` is free or the caller asked to overwrite it (outputs never replace a file silently)."""
    if Path(path).exists() and not overwrite:
        raise CaffetuneError("the output exists", where=str(path),
                             fix="pass --overwrite to replace it, or choose another -o")

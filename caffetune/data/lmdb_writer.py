"""Writing an LMDB safely: into a temporary folder beside the target, in batched transactions, growing the map
when it fills (never MDB_MAP_FULL), renamed onto the target only when everything was written."""
from __future__ import annotations

import os
import shutil
import threading
import uuid
from pathlib import Path

import lmdb

from caffetune.errors import DatasetError

LMDB_MAX_KEY = 511          # bytes; LMDB's compiled-in default


def temporary_sibling(target: Path, purpose: str = "building") -> Path:
    """A hidden path beside `target`, named with our pid so a later run can tell a dead build's leftovers."""
    return target.parent / f".{target.name}.{purpose}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_siblings(target: Path) -> list[Path]:
    """Remove temporary folders that killed builds of `target` left beside it (their process is gone)."""
    removed = []
    for candidate in target.parent.glob(f".{target.name}.building-*-*"):
        try:
            pid = int(candidate.name.rsplit("-", 2)[1])
        except (ValueError, IndexError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise DatasetError("output already exists", where=str(target),
                           fix="choose another output path, or pass --overwrite to replace it")


def replace_path(source: Path, target: Path) -> None:
    """Move `source` onto `target`; an existing target is moved aside first and removed only after the rename."""
    if not target.exists():
        os.rename(source, target)
        return
    old = temporary_sibling(target, "replaced")
    os.rename(target, old)
    try:
        os.rename(source, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old) if old.is_dir() else old.unlink()


def make_key(index: int, path: str) -> bytes:
    """convert_imageset's key, `%08d_<relpath>`, cut to LMDB's key limit (the index alone keeps it unique)."""
    key = f"{index:08d}_{path}".encode("utf-8", "surrogateescape")     # undecodable file names: their own bytes
    return key[:LMDB_MAX_KEY]


class LmdbWriter:
    """`with LmdbWriter(target) as db: db.put(key, value)`: batched commits, map growth, rename on success."""

    def __init__(self, target: Path | str, *, overwrite: bool = False, batch_records: int = 1000,
                 batch_bytes: int = 64 << 20, map_size: int = 256 << 20):
        self.target = Path(target)
        self.overwrite = overwrite
        self.batch_records = batch_records
        self.batch_bytes = batch_bytes
        self.map_size = map_size
        self.count = 0
        self.map_growths = 0
        self._pending: list[tuple[bytes, bytes]] = []
        self._pending_bytes = 0
        self._last_key = b""
        self._tmp: Path | None = None
        self._env: lmdb.Environment | None = None
        self._flusher: threading.Thread | None = None

    def __enter__(self) -> LmdbWriter:
        check_target(self.target, self.overwrite)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(self.target)
        self._tmp = temporary_sibling(self.target)
        # No fsync per commit: the database is invisible until renamed, and __exit__ syncs once before the rename.
        self._env = lmdb.open(str(self._tmp), map_size=self.map_size, subdir=True, meminit=False, max_dbs=0,
                              sync=False, metasync=False)
        return self

    def put(self, key: bytes, value: bytes) -> None:
        self._pending.append((key, value))
        self._pending_bytes += len(key) + len(value)
        if len(self._pending) >= self.batch_records or self._pending_bytes >= self.batch_bytes:
            self.commit()

    def commit(self) -> None:
        """Write the pending records in one transaction, growing the map and retrying when it is full."""
        if not self._pending:
            return
        while True:
            try:
                self._write_pending()
                break
            except lmdb.MapFullError:
                self._grow()
        self.count += len(self._pending)
        self._last_key = max(self._last_key, self._pending[-1][0])
        self._pending, self._pending_bytes = [], 0
        self._flush_in_background()

    def _flush_in_background(self) -> None:
        """Start writing committed pages to disk while the next batch is prepared, so the final sync is short."""
        if self._flusher is None or not self._flusher.is_alive():
            self._flusher = threading.Thread(target=self._env.sync, args=(True,), daemon=True)
            self._flusher.start()

    def _wait_for_flush(self) -> None:
        if self._flusher is not None:
            self._flusher.join()

    def _write_pending(self) -> None:
        with self._env.begin(write=True) as txn:
            last = self._last_key
            for key, value in self._pending:
                if not key or len(key) > LMDB_MAX_KEY:
                    raise DatasetError(f"invalid LMDB key {key[:40]!r}", fix="keys must be 1..511 bytes")
                # Keys written in increasing order can be appended (no B-tree search, dense pages).
                if not txn.put(key, value, append=key > last, overwrite=False):
                    raise DatasetError(f"duplicate key {key!r}", where=str(self.target),
                                       fix="give every record a distinct key")
                last = max(last, key)

    def _grow(self) -> None:
        """Double the map until the pending batch fits with room to spare."""
        self._wait_for_flush()
        needed = self._env.info()["map_size"] + 2 * self._pending_bytes
        self.map_size = max(self.map_size * 2, needed)
        self._env.set_mapsize(self.map_size)
        self.map_growths += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._wait_for_flush()
            if exc_type is None:
                self.commit()
                self._wait_for_flush()
                self._env.sync(True)
            self._env.close()
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        if exc_type is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            return
        replace_path(self._tmp, self.target)

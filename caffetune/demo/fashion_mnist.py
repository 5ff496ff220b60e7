"""Fashion-MNIST from Debian's `dataset-fashion-mnist` (IDX files) as a folder of class folders of PNGs.

The folder is what a user brings to caffetune: one sub-folder per class, named for the class, holding images. The
demo and the transfer bench make theirs from Fashion-MNIST so that they need no data from the user.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from caffetune.errors import DatasetError

DATASET_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
SPLITS = {"train": "train", "test": "t10k"}

# The labels of Fashion-MNIST's README, in label order.
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# IDX header: two zero bytes, a type code, the number of dimensions; then one big-endian int32 per dimension.
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MANIFEST = ".fashion-mnist.json"   # hidden: image scanners skip it

Progress = Callable[[str], None]


def folder_name(class_name: str) -> str:
    """The class folder for a class name: lower case, '/' and spaces as '_' (e.g. 'T-shirt/top' -> 't-shirt_top')."""
    return class_name.lower().replace("/", "_").replace(" ", "_")


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path | str) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array of its declared type and shape."""
    path = Path(path)
    try:
        with _open(path) as handle:
            data = handle.read()
    except FileNotFoundError:
        raise DatasetError("IDX file not found", where=str(path),
                           fix=f"install Debian's package: apt-get install {DEBIAN_PACKAGE}") from None
    except (OSError, EOFError) as error:
        raise DatasetError(f"cannot read IDX file: {error}", where=str(path), fix="reinstall the file") from None
    if len(data) < 4 or data[0] or data[1] or data[2] not in _IDX_TYPES:
        raise DatasetError("not an IDX file (bad magic number)", where=str(path),
                           fix="pass a file in the IDX format of MNIST / Fashion-MNIST")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">i4"))
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetError(f"IDX file holds {len(data) - header} bytes of data, its header declares {expected}",
                           where=str(path), fix="the file is truncated; reinstall it")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _split_file(root: Path, split: str, kind: str) -> Path:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}", fix=f"use one of {', '.join(SPLITS)}")
    name = f"{SPLITS[split]}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
    plain = root / name
    return plain if plain.is_file() else root / f"{name}.gz"


def load_split(split: str, root: Path | str = DATASET_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels [N] uint8) of the 'train' or 'test' split."""
    root = Path(root)
    images = read_idx(_split_file(root, split, "images"))
    labels = read_idx(_split_file(root, split, "labels"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"images {images.shape} and labels {labels.shape} do not match", where=str(root),
                           fix=f"reinstall {DEBIAN_PACKAGE}")
    return images, labels


def pick(labels: np.ndarray, per_class: int, classes: Iterable[int], seed: int = 0) -> np.ndarray:
    """Indices of `per_class` images of each class, drawn with a fixed seed (the same call gives the same set)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in classes:
        candidates = np.flatnonzero(labels == label)
        if len(candidates) < per_class:
            raise DatasetError(f"class {CLASS_NAMES[label]!r} has {len(candidates)} images, {per_class} asked",
                               fix=f"ask for at most {len(candidates)} images per class")
        chosen.append(np.sort(rng.choice(candidates, per_class, replace=False)))
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class ImageFolder:
    """A folder of class folders written by `export`."""

    path: Path
    split: str
    counts: dict[str, int]          # class folder -> number of images

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def class_folders(self) -> list[str]:
        return list(self.counts)


def _manifest(split: str, per_class: int, classes: list[int], seed: int) -> dict:
    return {"source": DEBIAN_PACKAGE, "split": split, "per_class": per_class, "classes": classes, "seed": seed}


def _existing(path: Path, wanted: dict) -> ImageFolder | None:
    """The folder at `path` when an earlier export with the same options wrote it."""
    try:
        recorded = json.loads((path / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if {k: recorded.get(k) for k in wanted} != wanted:
        return None
    return ImageFolder(path, wanted["split"], dict(recorded["counts"]))


def _write_pngs(tmp: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, split: str) -> dict:
    counts: dict[str, int] = {}
    for index in indices:
        folder = folder_name(CLASS_NAMES[labels[index]])
        (tmp / folder).mkdir(exist_ok=True)
        ok, png = cv2.imencode(".png", images[index])
        if not ok:
            raise DatasetError(f"cannot encode image {index} as PNG")
        (tmp / folder / f"{split}_{index:05d}.png").write_bytes(png.tobytes())
        counts[folder] = counts.get(folder, 0) + 1
    return dict(sorted(counts.items()))


def export(out: Path | str, split: str, per_class: int, classes: Iterable[int] = range(10), *, seed: int = 0,
           root: Path | str = DATASET_DIR, overwrite: bool = False, progress: Progress | None = None) -> ImageFolder:
    """Write `per_class` images of each class of a split as out/<class folder>/<split>_<index>.png.

    The folder appears complete or not at all (written beside it, then renamed). Asking again with the same options
    reuses it; a folder that holds something else is refused unless `overwrite`.
    """
    out, classes = Path(out), [int(c) for c in classes]
    wanted = _manifest(split, per_class, classes, seed)
    if out.exists():
        reused = _existing(out, wanted)
        if reused:
            return reused
        if not overwrite:
            raise DatasetError("folder exists and was not written by this export", where=str(out),
                               fix="choose another folder, delete it, or pass overwrite")
    images, labels = load_split(split, root)
    indices = pick(labels, per_class, classes, seed)
    if progress:
        progress(f"writing {len(indices)} Fashion-MNIST {split} images as PNGs into {out}")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        counts = _write_pngs(tmp, images, labels, indices, split)
        (tmp / _MANIFEST).write_text(json.dumps(wanted | {"counts": counts}, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImageFolder(out, split, counts)

"""Shared pieces of the preflight tests: a good tiny setup to seed faults into, LMDBs of chosen records, images."""
from __future__ import annotations

from pathlib import Path

import cv2
import lmdb
import numpy as np

from caffetune.model import prototxt, schema
from caffetune.train import preflight

from helpers import caffe_train, smooth_image, write_tiny_classifier

NET_FILE = "train_val.prototxt"


def tiny_setup(folder: Path, **options) -> tuple[Path, Path]:
    """The good tiny classifier (conv1 + fc on 8x8 LMDBs, test LMDB of exactly test_iter x batch images)."""
    return write_tiny_classifier(folder, **options)


def edited(path: Path, *replacements: tuple[str, str]) -> str:
    text = path.read_text()
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    return text


def check_text(text: str, install=None, solver_text: str | None = None, **options) -> preflight.Report:
    """preflight.check on one net file (and its solver, when given)."""
    solver = prototxt.parse(solver_text, "SolverParameter") if solver_text is not None else None
    return preflight.check({NET_FILE: prototxt.parse(text)}, install=install, solver=solver,
                           roles={NET_FILE: "net"}, **options)


def messages(problems) -> list[str]:
    return [str(problem) for problem in problems]


def assert_clean(report: preflight.Report) -> None:
    assert report.problems == [] and report.warnings == [], messages(report.problems + report.warnings)


def only(problems) -> str:
    assert len(problems) == 1, messages(problems)
    return str(problems[0])


def write_records(path: Path, records: list[tuple[object, int]]) -> Path:
    """An LMDB of Datums in the given order: (C x H x W uint8 array, label) for raw records, (bytes of an encoded
    image, label) for encoded ones; keys %08d."""
    env = lmdb.open(str(path), map_size=1 << 28)
    with env.begin(write=True) as txn:
        for index, (pixels, label) in enumerate(records):
            datum = schema.current().Datum(label=label)
            if isinstance(pixels, bytes):
                datum.data, datum.encoded = pixels, True
            else:
                datum.channels, datum.height, datum.width = pixels.shape
                datum.data = np.ascontiguousarray(pixels, np.uint8).tobytes()
            txn.put(f"{index:08d}".encode(), datum.SerializeToString())
    env.close()
    return path


def random_chw(rng, channels: int, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (channels, height, width), dtype=np.uint8)


def write_images(folder: Path, count: int, size: tuple[int, int], classes: int = 4, seed: int = 0,
                 gray: bool = False) -> list[tuple[str, int]]:
    """count PNG images of size (width, height) under folder; returns (relative path, label) in list order."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for index in range(count):
        image = smooth_image(rng, size[1], size[0], 1 if gray else 3)
        name = f"img{index:03d}.png"
        cv2.imwrite(str(folder / name), image)
        entries.append((name, index % classes))
    return entries


def write_list(path: Path, entries: list[tuple[str, int]]) -> Path:
    path.write_text("".join(f"{name} {label}\n" for name, label in entries))
    return path


def fatal_line(result) -> str:
    """The FATAL line of a caffe run's log ('' when it did not abort)."""
    return next((line for line in result.stderr.splitlines() if line.startswith("F")), "")


def train(install, folder: Path, net_text: str, solver_text: str, *extra: str):
    """Write the net and the solver into folder and run the real `caffe train` on them."""
    (folder / NET_FILE).write_text(net_text)
    solver = folder / "solver.prototxt"
    solver.write_text(solver_text)
    return caffe_train(install, solver, *extra)

"""Reading Caffe LMDBs: what a database holds (count, labels, shape, encoding) and its records as images."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import lmdb
import numpy as np
from google.protobuf.message import DecodeError

from . import schema
from .datum import UnreadableImage, datum_to_image
from .errors import DatasetError


@dataclass
class DbSummary:
    """What an LMDB of Datums holds. `shape` is (C, H, W) of the first record; (0, 0, 0) when the db is empty."""

    count: int
    label_histogram: dict[int, int] = field(default_factory=dict)
    shape: tuple[int, int, int] = (0, 0, 0)
    encoded: bool = False

    def as_dict(self) -> dict:
        return {"count": self.count, "label_histogram": {str(k): v for k, v in self.label_histogram.items()},
                "shape": list(self.shape), "encoded": self.encoded}


def check_db_path(db_path: Path | str) -> Path:
    """The LMDB folder, or a DatasetError naming what is wrong with the path."""
    path = Path(db_path)
    if not path.exists():
        raise DatasetError("LMDB not found", where=str(path),
                           fix="check the path, or build the database with `caffetune build-lmdb`")
    if path.is_file():
        if path.name in ("data.mdb", "lock.mdb"):
            raise DatasetError(f"this is the database's {path.name} file, not the database", where=str(path),
                               fix=f"pass the folder that contains it: {path.parent}")
        raise DatasetError("not an LMDB (an LMDB is a folder holding data.mdb)", where=str(path),
                           fix="pass the LMDB folder (e.g. OUT/train_lmdb from `caffetune build-lmdb`)")
    if not (path / "data.mdb").is_file():
        raise DatasetError("not an LMDB: the folder holds no data.mdb", where=str(path),
                           fix="pass the LMDB folder (e.g. OUT/train_lmdb from `caffetune build-lmdb`)")
    return path


def open_readonly(db_path: Path | str) -> lmdb.Environment:
    path = check_db_path(db_path)
    try:
        return lmdb.open(str(path), readonly=True, lock=False, readahead=False, max_readers=4)
    except lmdb.Error as error:
        raise DatasetError(f"not a readable LMDB: {error}", where=str(path),
                           fix="rebuild the database with `caffetune build-lmdb`") from None


def parse_datum(value: bytes, where: str):
    datum = schema.current().Datum()
    try:
        datum.ParseFromString(value)
    except DecodeError:
        raise DatasetError("record is not a Caffe Datum", where=where,
                           fix="Caffe's Data layer reads Datums; build the database with `caffetune build-lmdb`") \
            from None
    return datum


def _image_of(datum, where: str) -> np.ndarray:
    try:
        return datum_to_image(datum)
    except UnreadableImage as error:
        raise DatasetError(error.reason, where=where, fix="rebuild the database with `caffetune build-lmdb`") \
            from None


def iter_datums(db_path: Path | str, limit: int | None = None) -> Iterator[tuple[str, object]]:
    """(key, Datum) in key order, which is the order Caffe's Data layer reads."""
    env = open_readonly(db_path)
    try:
        with env.begin(buffers=False) as txn:
            for index, (key, value) in enumerate(txn.cursor()):
                if limit is not None and index >= limit:
                    break
                name = key.decode("utf-8", "replace")
                yield name, parse_datum(value, f"{db_path} (key {name})")
    finally:
        env.close()


def iter_records(db_path: Path | str, limit: int | None = None) -> Iterator[tuple[str, np.ndarray, int]]:
    """(key, HxWxC uint8 BGR image, label) in key order; encoded Datums are decoded as Caffe decodes them."""
    for key, datum in iter_datums(db_path, limit):
        yield key, _image_of(datum, f"{db_path} (key {key})"), datum.label


def summarize(db_path: Path | str) -> DbSummary:
    """Count, label histogram, (C, H, W) and encoding of a database (labels need one pass over every record)."""
    labels: Counter[int] = Counter()
    summary = DbSummary(count=0)
    for key, datum in iter_datums(db_path):
        if summary.count == 0:
            summary.encoded = bool(datum.encoded)
            image = _image_of(datum, f"{db_path} (key {key})")
            summary.shape = (image.shape[2], image.shape[0], image.shape[1])
        labels[datum.label] += 1
        summary.count += 1
    summary.label_histogram = dict(sorted(labels.items()))
    return summary

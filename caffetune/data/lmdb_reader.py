"""Reading Caffe LMDBs: what a database holds (count, labels, shape, encoding) and its records as images."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import numpy as np
from google.protobuf.message import DecodeError

from caffetune import files
from caffetune.data.datum import UnreadableImage, datum_to_image
from caffetune.errors import DatasetError
from caffetune.model import schema


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


def image_of(datum, where: str) -> np.ndarray:
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


def first_datum(db_path: Path | str):
    """The first record (in key order, the one Caffe's Data layer reads first) as a Datum; None when empty."""
    env = open_readonly(db_path)
    try:
        with env.begin() as txn:
            first = next(iter(txn.cursor()), None)
    finally:
        env.close()
    return None if first is None else parse_datum(first[1], f"{db_path} (first record)")


def entry_count(db_path: Path | str) -> int:
    """How many records the database holds (from LMDB's own statistics: no record is read)."""
    env = open_readonly(db_path)
    try:
        return env.stat()["entries"]
    finally:
        env.close()


def iter_records(db_path: Path | str, limit: int | None = None) -> Iterator[tuple[str, np.ndarray, int]]:
    """(key, HxWxC uint8 BGR image, label) in key order; encoded Datums are decoded as Caffe decodes them."""
    for key, datum in iter_datums(db_path, limit):
        yield key, image_of(datum, f"{db_path} (key {key})"), datum.label


def _read_varint(buffer: memoryview, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buffer[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            return value, position
        shift += 7


def label_of(value: memoryview) -> int | None:
    """A serialized Datum's label, read from the wire format without copying (or touching) the pixel data:
    length-delimited fields are skipped, so only the first and last page of each record are read."""
    try:
        return _scan_label(value, schema.current().Datum.DESCRIPTOR.fields_by_name["label"].number)
    except IndexError:          # a varint runs past the end: not a Datum
        return None


def _scan_label(value: memoryview, label_number: int) -> int | None:
    position, label = 0, 0
    while position < len(value):
        tag, position = _read_varint(value, position)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            field_value, position = _read_varint(value, position)
            if number == label_number:
                label = field_value - (1 << 64) if field_value >= 1 << 63 else field_value
        elif wire_type == 2:
            length, position = _read_varint(value, position)
            position += length
        elif wire_type in (1, 5):
            position += 8 if wire_type == 1 else 4
        else:
            return None
    return label if position == len(value) else None


def summarize(db_path: Path | str) -> DbSummary:
    """Count, label histogram, (C, H, W) of the first record and its encoding. Labels are read from the wire
    format, so even a database of hundreds of GB is summarized at the speed of its page headers."""
    labels: Counter[int] = Counter()
    summary = DbSummary(count=0)
    env = open_readonly(db_path)
    try:
        with env.begin(buffers=True) as txn:
            for key, value in txn.cursor():
                if summary.count == 0:
                    first = parse_datum(bytes(value), f"{db_path} (key {bytes(key).decode('utf-8', 'replace')})")
                    image = image_of(first, f"{db_path} (first record)")
                    summary.encoded, summary.shape = bool(first.encoded), (image.shape[2], image.shape[0],
                                                                           image.shape[1])
                label = label_of(value)
                if label is None:
                    raise DatasetError("record is not a Caffe Datum", where=f"{db_path} (key {bytes(key)!r})",
                                       fix="build the database with `caffetune build-lmdb`")
                labels[label] += 1
                summary.count += 1
    finally:
        env.close()
    summary.label_histogram = dict(sorted(labels.items()))
    return summary


def label_names(db_path: Path | str, labels_file: Path | str | None = None) -> list[str]:
    """Class names, one a line, from `labels_file`, else the labels.txt beside the database (as build-lmdb writes
    it); empty when there is none."""
    path = Path(labels_file) if labels_file else Path(db_path).parent / "labels.txt"
    return path.read_text().splitlines() if path.is_file() else []


def export_samples(db_path: Path | str, out_dir: Path | str, count: int = 8) -> list[Path]:
    """Write the first `count` records as PNG files (`<n>_label<L>.png`, BGR as stored) into `out_dir`."""
    import cv2  # noqa: PLC0415 - only exporting needs the encoder

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (_key, image, label) in enumerate(iter_records(db_path, limit=count)):
        ok, buffer = cv2.imencode(".png", image)
        if not ok:
            raise DatasetError("could not encode a sample as PNG", where=str(db_path))
        target = out_dir / f"{index:03d}_label{label}.png"
        files.write_atomic(target, buffer.tobytes())
        written.append(target)
    return written

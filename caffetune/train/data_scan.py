"""One streaming, bounded pass over a dataset a net reads, for the preflight checks (`scan_lmdb`, `scan_list`).

Costs (docs/preflight.md has the measured figures):
- LMDB (Data layer): one cursor pass in key order, the order Caffe reads. Each record is walked at the protobuf wire
  level (caffemodels.iter_fields), its pixels never parsed or copied: channels, height, width and label are small
  fields, so a raw record costs its first and last page. Encoded records (JPEG/PNG bytes) are sized from their
  headers with Pillow (nothing is decoded), for at most ENCODED_SIZE_SAMPLE records spread evenly over the database.
- Image list (ImageData layer): every line is parsed and every image stat()ed (a missing image anywhere makes caffe
  abort when it reaches it); image sizes are read from the headers of at most LIST_SIZE_SAMPLE images spread evenly
  over the list, and only when the layer does not resize (new_height/new_width).
"""
from __future__ import annotations

import io
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from caffetune.data import lmdb_reader
from caffetune.errors import DatasetError
from caffetune.model import caffemodels, schema

ENCODED_SIZE_SAMPLE = 2000   # encoded LMDB records whose header is read for their size
PIXEL_SAMPLE = 32           # raw LMDB records whose pixels are read (min/max), spread evenly over the database
LIST_SIZE_SAMPLE = 1000      # listed images whose header is read for their size (lists without resize)
HEADER_BYTES = 1 << 18       # bytes of an encoded image given to Pillow (JPEG headers with EXIF fit easily)
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


@dataclass
class DataScan:
    """What a data layer's dataset holds, in the order Caffe reads it."""

    source: Path
    kind: str                                   # "lmdb" or "list"
    count: int = 0
    labels: Counter = field(default_factory=Counter)
    runs: int = 0                               # maximal runs of equal consecutive labels in read order
    sizes: dict = field(default_factory=dict)   # (C, H, W) -> (first key or "list:line", how many)
    sized: int = 0                              # records whose size was read (all of them unless sampled)
    encoded: bool = False
    missing: list = field(default_factory=list)   # list: (line number, path) of images that do not exist (first 5)
    missing_count: int = 0
    bad_lines: list = field(default_factory=list)  # list: (line number, why) of lines caffe misreads (first 5)
    bad_count: int = 0
    pixel_sampled: int = 0                      # raw records whose pixels were read
    pixel_max: int = 0                          # the largest pixel value among them
    flat_records: int = 0                       # of them, records of one grey level (all pixels equal)
    relative: list = field(default_factory=list)   # list: (line number, path) of relative image paths (first 5)
    relative_count: int = 0

    @property
    def label_histogram(self) -> dict[int, int]:
        return dict(sorted(self.labels.items()))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the first record read (0, 0, 0 when none)."""
        return next(iter(self.sizes), (0, 0, 0))

    @property
    def sampled(self) -> bool:
        return self.sized < self.count

    def _label(self, label: int, previous: int | None) -> None:
        self.labels[label] += 1
        if label != previous:
            self.runs += 1

    def _pixels(self, data) -> None:
        import numpy as np

        pixels = np.frombuffer(data, np.uint8)
        if pixels.size:
            self.pixel_sampled += 1
            low, high = int(pixels.min()), int(pixels.max())
            self.pixel_max = max(self.pixel_max, high)
            self.flat_records += low == high

    def _size(self, shape: tuple[int, int, int], where: str) -> None:
        self.sized += 1
        first, seen = self.sizes.get(shape, (where, 0))
        self.sizes[shape] = (first, seen + 1)


# --- LMDB ---------------------------------------------------------------------------------------------------------
def _datum_numbers() -> dict[str, int]:
    fields = schema.current().Datum.DESCRIPTOR.fields_by_name
    return {name: fields[name].number for name in ("channels", "height", "width", "data", "label", "encoded")}


def datum_fields(value, numbers: dict[str, int]) -> dict:
    """A serialized Datum's small fields, and the span of its data, read from the wire format (no copy)."""
    names = {number: name for name, number in numbers.items()}
    found = {"label": 0, "encoded": 0, "channels": 0, "height": 0, "width": 0}
    for number, wire, start, end in caffemodels.iter_fields(value, 0, len(value)):
        name = names.get(number)
        if name == "data":
            found["data"] = (start, end)
        elif name and wire == caffemodels.VARINT:
            found[name] = caffemodels.signed64(start)
    return found


def image_header_size(data: bytes) -> tuple[int, int, int] | None:
    """(C, H, W) an encoded image decodes to in Caffe (OpenCV ANYCOLOR, EXIF orientation applied), from its header
    alone; None when Pillow cannot read the header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            channels = 1 if image.mode in _GRAY_MODES else 3
            orientation = image.getexif().get(0x0112, 1) if image.format == "JPEG" else 1
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    if orientation in (5, 6, 7, 8):   # rotated a quarter turn: OpenCV swaps width and height
        width, height = height, width
    return channels, height, width


def scan_lmdb(path: Path | str) -> DataScan:
    """Count, labels (and their runs), sizes and encoding of every record of a Datum LMDB, in key order.
    Raises DatasetError (naming the record's key) when a record is not a Datum."""
    path = Path(path)
    numbers = _datum_numbers()
    scan = DataScan(source=path, kind="lmdb")
    env = lmdb_reader.open_readonly(path)
    try:
        entries = env.stat()["entries"]
        stride = max(1, math.ceil(entries / ENCODED_SIZE_SAMPLE))
        pixel_stride = max(1, math.ceil(entries / PIXEL_SAMPLE))
        previous = None
        with env.begin(buffers=True) as txn:
            for index, (key, value) in enumerate(txn.cursor()):
                try:
                    found = datum_fields(value, numbers)
                except caffemodels.WireError:
                    raise DatasetError("record is not a Caffe Datum", where=f"{path} (key {_key(key)})",
                                       fix="Caffe's Data layer reads Datums; build the database with "
                                           "`caffetune build-lmdb`") from None
                scan.count += 1
                scan._label(found["label"], previous)
                previous = found["label"]
                if found["encoded"]:
                    scan.encoded = True
                    if index % stride == 0 and "data" in found:
                        start, end = found["data"]
                        shape = image_header_size(bytes(value[start:min(end, start + HEADER_BYTES)]))
                        if shape is not None:
                            scan._size(shape, _key(key))
                else:
                    scan._size((found["channels"], found["height"], found["width"]), _key(key))
                    if index % pixel_stride == 0 and "data" in found:
                        scan._pixels(value[found["data"][0]:found["data"][1]])
    finally:
        env.close()
    return scan


def _key(key) -> str:
    return bytes(key).decode("utf-8", "replace")


# --- image lists --------------------------------------------------------------------------------------------------
def _count_lines(source: Path) -> int:
    count = 0
    with open(source, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            count += block.count(b"\n")
    return count + 1


def parse_line(line: str) -> tuple[str, str]:
    """(path, label text) as Caffe's ImageDataLayer splits a line: at its last space."""
    position = line.rfind(" ")
    return (line, line) if position < 0 else (line[:position], line[position + 1:])


def scan_list(source: Path | str, root_folder: str = "", resized: bool = False, is_color: bool = True) -> DataScan:
    """Every line of an ImageData list: labels, missing images, lines caffe misreads; image sizes from a sample of
    headers when the layer does not resize."""
    source = Path(source)
    scan = DataScan(source=source, kind="list")
    stride = 0 if resized else max(1, math.ceil(_count_lines(source) / LIST_SIZE_SAMPLE))
    previous = None
    with open(source, encoding="utf-8", errors="replace", newline="\n") as handle:
        for number, raw in enumerate(handle, 1):
            line = raw.rstrip("\n")
            path, label_text = parse_line(line)
            where = f"{source}:{number}"
            problem = _line_problem(line, path, label_text)
            if problem:
                scan.bad_count += 1
                if len(scan.bad_lines) < 5:
                    scan.bad_lines.append((number, problem))
                continue
            scan.count += 1
            label = int(label_text)
            scan._label(label, previous)
            previous = label
            full = root_folder + path
            if not os.path.isabs(full):   # caffe resolves it from its working directory, not from here
                scan.relative_count += 1
                if len(scan.relative) < 5:
                    scan.relative.append((number, full))
            elif not os.path.isfile(full):
                scan.missing_count += 1
                if len(scan.missing) < 5:
                    scan.missing.append((number, full))
            elif stride and (scan.count - 1) % stride == 0:
                shape = _file_size(full, is_color)
                if shape is not None:
                    scan._size(shape, where)
    return scan


def _line_problem(line: str, path: str, label_text: str) -> str | None:
    if not line.strip():
        return "a blank line: caffe reads it as an image with an empty name and aborts when it gets there"
    if path == line:
        return f"no space before a label in {line!r}: caffe reads the label as atoi({line!r})"
    stripped = label_text.strip()
    if not stripped.lstrip("-").isdigit():
        return f"label {label_text!r} is not an integer: caffe reads it as {_atoi(label_text)}"
    return None


def _atoi(text: str) -> int:
    """C's atoi: the leading integer, 0 when there is none."""
    text = text.lstrip()
    digits = len(text) - len(text.lstrip("+-"))
    end = digits
    while end < len(text) and text[end].isdigit():
        end += 1
    try:
        return int(text[:end])
    except ValueError:
        return 0


def _file_size(path: str, is_color: bool) -> tuple[int, int, int] | None:
    """(C, H, W) caffe's cv::imread gives (3 channels unless is_color: false), from the file's header."""
    with open(path, "rb") as handle:
        shape = image_header_size(handle.read(HEADER_BYTES))
    if shape is None:
        return None
    return (3 if is_color else 1,) + shape[1:]

"""Reading .caffemodel files layer by layer, without building a net and without loading every blob.

A caffemodel is one serialized NetParameter. Parsing it whole with protobuf copies every weight into Python objects
(a VGG16 file is 500 MB); instead we walk its wire format over an mmap: the top-level fields are read one at a time,
each layer's small fields go through the schema's LayerParameter (or V1LayerParameter), and each blob's data stays
in the file -- `BlobRef` records where its packed floats lie, so `array()` is a zero-copy numpy view and a writer can
copy the bytes verbatim (`copy_file_range`). Field numbers come from the schema's descriptors.

Handles the current format (`layer`, field 100), the V1 format (`layers`, field 2, with enum types) and V0 weights
nested inside V1 entries; blob shapes come from `shape` or the legacy num/channels/height/width.
"""
from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from caffetune.errors import PrototxtError
from caffetune.model import schema
from caffetune.model.wire import (  # noqa: F401 - re-exported: callers use caffemodels.iter_fields etc.
    FIXED32,
    FIXED64,
    LENGTH,
    VARINT,
    WireError,
    check_wire_type,
    encode_key,
    encode_varint,
    expected_wire_type,
    iter_fields,
    length_prefix,
    number_of,
    read_varint,
    signed64,
)

_NOT_A_CAFFEMODEL_FIX = "pass a .caffemodel written by Caffe (net.save, caffe train snapshots)"


# ---- BlobProto writing -----------------------------------------------------------------------------------------
def blob_header(shape: tuple[int, ...]) -> bytes:
    """The bytes of a BlobProto before its packed float32 values: the shape, then the data field's opening."""
    dims = b"".join(encode_varint(int(d)) for d in shape)
    encoded_shape = length_prefix(number_of("BlobShape", "dim"), len(dims)) + dims if shape else b""
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    return (length_prefix(number_of("BlobProto", "shape"), len(encoded_shape)) + encoded_shape
            + length_prefix(number_of("BlobProto", "data"), 4 * count))


def encode_blob(array: np.ndarray) -> bytes:
    """A BlobProto (shape + packed float data) for an array, as Caffe's Blob::ToProto writes it."""
    return blob_header(array.shape) + np.ascontiguousarray(array, dtype="<f4").tobytes()


# ---- the reader ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlobRef:
    """One parameter blob inside a caffemodel: its shape and where its values lie in the file."""

    shape: tuple[int, ...]
    legacy: bool                  # shape came from num/channels/height/width
    dtype: str                    # "float32", "float64", or "" when the blob holds no data
    offset: int                   # file offset of the packed values
    count: int                    # number of values stored
    span: tuple[int, int]         # byte range of the whole BlobProto message (for verbatim copies)

    @property
    def shape_count(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.span[1] - self.span[0]


@dataclass
class LayerRecord:
    """One layer entry of a caffemodel: name, type, its blobs, and the byte range of the whole entry."""

    index: int
    name: str
    type: str
    format: str                   # "V2" (layer), "V1" (layers) or "V0" (layers { layer { ... } })
    blobs: list[BlobRef] = field(default_factory=list)
    span: tuple[int, int] = (0, 0)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [blob.shape for blob in self.blobs]

    @property
    def parameter_count(self) -> int:
        return sum(blob.shape_count for blob in self.blobs if blob.dtype)


@dataclass(frozen=True)
class _LayerFormat:
    """Field numbers of one layer message type, read from the schema."""

    message: str
    name: int
    type: int
    blobs: int
    nested: int | None = None     # V1's `layer` field holding a V0LayerParameter


def _layer_formats() -> dict[str, _LayerFormat]:
    s = schema.current()
    formats = {"V2": _LayerFormat("LayerParameter", number_of("LayerParameter", "name"),
                                  number_of("LayerParameter", "type"), number_of("LayerParameter", "blobs"))}
    if s.has_message("V1LayerParameter"):
        nested = number_of("V1LayerParameter", "layer") if s.has_message("V0LayerParameter") else None
        formats["V1"] = _LayerFormat("V1LayerParameter", number_of("V1LayerParameter", "name"),
                                     number_of("V1LayerParameter", "type"), number_of("V1LayerParameter", "blobs"),
                                     nested)
    if s.has_message("V0LayerParameter"):
        formats["V0"] = _LayerFormat("V0LayerParameter", number_of("V0LayerParameter", "name"),
                                     number_of("V0LayerParameter", "type"), number_of("V0LayerParameter", "blobs"))
    return formats


class Caffemodel:
    """A caffemodel opened for reading: `with Caffemodel(path) as model: for layer in model.layers(): ...`"""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._file = None
        self._map: mmap.mmap | bytes = b""
        self._formats = _layer_formats()
        self._entries: list[tuple[str, int, int]] | None = None
        self._name = ""

    def __enter__(self) -> Caffemodel:
        try:
            self._file = open(self.path, "rb")
        except FileNotFoundError:
            raise PrototxtError("file not found", where=str(self.path), fix="check the path") from None
        except IsADirectoryError:
            raise PrototxtError("is a directory, not a .caffemodel", where=str(self.path),
                                fix=_NOT_A_CAFFEMODEL_FIX) from None
        size = os.fstat(self._file.fileno()).st_size
        if size:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._map.madvise(mmap.MADV_SEQUENTIAL)
        self._check_not_hdf5()
        return self

    def __exit__(self, *exc) -> None:
        if isinstance(self._map, mmap.mmap):
            try:
                self._map.close()
            except BufferError:
                pass  # a caller still holds a view; the map is freed with it
        if self._file:
            self._file.close()

    @property
    def size(self) -> int:
        return len(self._map)

    @property
    def fileno(self) -> int:
        return self._file.fileno()

    def _check_not_hdf5(self) -> None:
        if self._map[:8] == b"\x89HDF\r\n\x1a\n":
            raise PrototxtError("this is an HDF5 caffemodel (.caffemodel.h5); caffetune reads the protobuf format",
                                where=str(self.path),
                                fix="save the net with Caffe's binary format (net.save('x.caffemodel'))")

    def _error(self, detail: str) -> PrototxtError:
        return PrototxtError(f"not a caffemodel (binary NetParameter): {detail}", where=str(self.path),
                             fix=_NOT_A_CAFFEMODEL_FIX)

    @property
    def name(self) -> str:
        """The net's `name` field (read by the first pass over the top-level fields)."""
        self._top_level()
        return self._name

    def _top_level(self) -> list[tuple[str, int, int]]:
        """(format, start, end) of each layer entry, from one pass over the top-level fields (no blob is read)."""
        if self._entries is not None:
            return self._entries
        net = schema.current().NetParameter.DESCRIPTOR
        layer_number, v1_number = net.fields_by_name["layer"].number, None
        if "layers" in net.fields_by_name:
            v1_number = net.fields_by_name["layers"].number
        name_number = net.fields_by_name["name"].number
        entries = []
        try:
            for number, wire, start, end in iter_fields(self._map, 0, len(self._map)):
                check_wire_type(net, number, wire)
                if number == layer_number:
                    entries.append(("V2", start, end))
                elif number == v1_number:
                    entries.append(("V1", start, end))
                elif number == name_number:
                    self._name = bytes(self._map[start:end]).decode("utf-8", "replace")
        except WireError as error:
            raise self._error(str(error)) from None
        if not entries:
            raise self._error("it holds no layers")
        self._entries = entries
        return entries

    def layers(self) -> Iterator[LayerRecord]:
        """Each layer entry in file order, with its blobs' shapes and locations (their values are not read)."""
        for index, (kind, start, end) in enumerate(self._top_level()):
            try:
                yield self._layer(index, kind, start, end)
            except WireError as error:
                raise self._error(f"layer entry {index}: {error}") from None

    def _layer(self, index: int, kind: str, start: int, end: int) -> LayerRecord:
        fmt = self._formats[kind]
        descriptor = schema.current().message_class(fmt.message).DESCRIPTOR
        record = LayerRecord(index=index, name="", type="", format=kind, span=(start, end))
        for number, wire, value_start, value_end in iter_fields(self._map, start, end):
            check_wire_type(descriptor, number, wire)
            if number == fmt.name:
                record.name = bytes(self._map[value_start:value_end]).decode("utf-8", "replace")
            elif number == fmt.type:
                record.type = self._type_name(descriptor, wire, value_start, value_end)
            elif number == fmt.blobs:
                record.blobs.append(self._blob(value_start, value_end))
            elif number == fmt.nested and fmt.nested is not None:
                nested = self._layer(index, "V0", value_start, value_end)
                record.name, record.type = record.name or nested.name, record.type or nested.type
                record.blobs.extend(nested.blobs)
                record.format = "V0"
        return record

    def _type_name(self, descriptor, wire: int, start: int, end: int) -> str:
        if wire == LENGTH:
            return bytes(self._map[start:end]).decode("utf-8", "replace")
        from caffetune.model.layers import v1_enum_to_type  # the V1 enum number -> its current type string
        value = descriptor.fields_by_name["type"].enum_type.values_by_number.get(start)
        return v1_enum_to_type(value.name) if value else f"V1 type {start}"

    def _blob(self, start: int, end: int) -> BlobRef:
        blob = schema.current().BlobProto.DESCRIPTOR
        numbers = {name: blob.fields_by_name[name].number
                   for name in ("shape", "data", "double_data", "num", "channels", "height", "width")}
        legacy, dims, values = {}, None, []
        for number, wire, value_start, value_end in iter_fields(self._map, start, end):
            check_wire_type(blob, number, wire)
            if number == numbers["shape"]:
                dims = self._shape_dims(value_start, value_end)
            elif number in (numbers["data"], numbers["double_data"]):
                values.append((number == numbers["data"], wire, value_start, value_end))
            elif number in (numbers["num"], numbers["channels"], numbers["height"], numbers["width"]):
                legacy[number] = signed64(value_start)
        dtype, offset, count = self._data_location(values)
        if dims is None and legacy:
            dims = [legacy.get(numbers[k], 0) for k in ("num", "channels", "height", "width")]
            return BlobRef(tuple(dims), True, dtype, offset, count, (start, end))
        return BlobRef(tuple(dims or ()), False, dtype, offset, count, (start, end))

    def _shape_dims(self, start: int, end: int) -> list[int]:
        dims = []
        for _number, wire, value_start, value_end in iter_fields(self._map, start, end):
            if wire == VARINT:
                dims.append(signed64(value_start))
            elif wire == LENGTH:  # packed dims
                pos = value_start
                while pos < value_end:
                    dim, pos = read_varint(self._map, pos, value_end)
                    dims.append(signed64(dim))
        return dims

    def _data_location(self, values) -> tuple[str, int, int]:
        if not values:
            return "", 0, 0
        if len(values) > 1 or values[0][1] != LENGTH:
            # Unpacked or split values: legal protobuf, never written by Caffe. Caller must use `array()`'s
            # slow path; record the first chunk and flag it by a negative count.
            is_float = values[0][0]
            return ("float32" if is_float else "float64"), values[0][2], -1
        is_float, _wire, start, end = values[0]
        width = 4 if is_float else 8
        if (end - start) % width:
            raise WireError(f"packed data of {end - start} bytes is not a whole number of {width}-byte values")
        return ("float32" if is_float else "float64"), start, (end - start) // width

    def array(self, blob: BlobRef, *, copy: bool = False) -> np.ndarray:
        """The blob's values shaped as stored: a read-only view into the file unless `copy`."""
        if blob.count < 0:
            message = schema.current().BlobProto()
            message.ParseFromString(bytes(self._map[blob.span[0]:blob.span[1]]))
            flat = np.asarray(message.data or message.double_data,
                              dtype=np.float32 if message.data else np.float64)
        elif not blob.count:
            flat = np.zeros(0, dtype=np.float32)
        else:
            flat = np.frombuffer(self._map, dtype="<f4" if blob.dtype == "float32" else "<f8",
                                 count=blob.count, offset=blob.offset)
        if flat.size == blob.shape_count:
            flat = flat.reshape(blob.shape)
        return flat.copy() if copy else flat

    def raw(self, start: int, end: int) -> memoryview:
        return memoryview(self._map)[start:end]

    def layer_message(self, record: LayerRecord):
        """The layer entry parsed through the schema without its blobs (bottoms, tops, params, ...)."""
        fmt = self._formats["V2" if record.format == "V2" else "V1"]
        message = schema.current().message_class(fmt.message)()
        parts = bytearray()
        start, end = record.span
        for number, wire, value_start, value_end in iter_fields(self._map, start, end):
            if number == fmt.blobs:
                continue
            parts += encode_key(number, wire)
            if wire == VARINT:
                parts += encode_varint(value_start)
            else:
                if wire == LENGTH:
                    parts += encode_varint(value_end - value_start)
                parts += self._map[value_start:value_end]
        message.ParseFromString(bytes(parts))
        return message


def layer_shapes(path: Path | str) -> dict[str, list[tuple[int, ...]]]:
    """Caffemodel layer name -> its blobs' shapes in order (V2, V1 and V0 files), without building a net.

    Raises PrototxtError naming the path when the file is not a caffemodel.
    """
    with Caffemodel(path) as model:
        return {layer.name: layer.shapes for layer in model.layers()}


def read_layers(path: Path | str) -> list[LayerRecord]:
    """Every layer entry's name, type and blob shapes (the values are not read)."""
    with Caffemodel(path) as model:
        return list(model.layers())


def legacy_shape(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """A shape as Caffe's Blob::LegacyShape pads it to 4 axes (None above 4 axes)."""
    if len(shape) > 4:
        return None
    return (1,) * (4 - len(shape)) + tuple(shape)


def shape_matches(blob: BlobRef, target: tuple[int, ...]) -> bool:
    """Caffe's Blob::ShapeEquals: legacy 4-D blobs match a target of up to 4 axes padded with leading 1s."""
    if blob.legacy:
        return legacy_shape(tuple(target)) == tuple(blob.shape)
    return tuple(blob.shape) == tuple(target)


def copy_range(source: Caffemodel, start: int, end: int, handle) -> None:
    """Copy bytes [start, end) of the source file into `handle` without passing them through Python objects."""
    handle.flush()
    offset = start
    try:
        while offset < end:
            copied = os.copy_file_range(source.fileno, handle.fileno(), end - offset, offset)
            if copied <= 0:
                break
            offset += copied
    except OSError:
        pass  # filesystems without copy_file_range: fall through to a plain write
    if offset < end:
        handle.seek(0, os.SEEK_END)
        with source.raw(offset, end) as view:
            handle.write(view)
    handle.seek(0, os.SEEK_END)

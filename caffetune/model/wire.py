"""The protobuf wire format, read and written by hand where whole-message parsing would copy too much (a 500 MB
caffemodel): varints, field keys, length prefixes, and the wire types the schema's descriptors imply."""
from __future__ import annotations

from collections.abc import Iterator

from caffetune.model import schema

# Wire types of the protobuf encoding.
VARINT, FIXED64, LENGTH, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5


class WireError(ValueError):
    """The bytes are not valid protobuf wire format (raised inside this module, reported as PrototxtError)."""


# ---- wire-format reading ---------------------------------------------------------------------------------------
def read_varint(buffer, pos: int, end: int) -> tuple[int, int]:
    """Decode one varint at `pos`; returns (value, position after it)."""
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError(f"truncated varint at byte {pos}")
        byte = buffer[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def signed64(value: int) -> int:
    """A varint read as int32/int64 (negative numbers are 10-byte two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def iter_fields(buffer, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end) of each field in buffer[start:end]; for VARINT fields the
    value start is the decoded value itself."""
    pos = start
    while pos < end:
        key, pos = read_varint(buffer, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError(f"field number 0 at byte {pos}")
        if wire == VARINT:
            value, pos = read_varint(buffer, pos, end)
            yield number, wire, value, pos
            continue
        if wire == LENGTH:
            length, pos = read_varint(buffer, pos, end)
            value_end = pos + length
        elif wire == FIXED64:
            value_end = pos + 8
        elif wire == FIXED32:
            value_end = pos + 4
        else:
            raise WireError(f"wire type {wire} (groups are not used by Caffe) at byte {pos}")
        if value_end > end:
            raise WireError(f"field {number} runs past the end of its message ({value_end} > {end})")
        yield number, wire, pos, value_end
        pos = value_end


def expected_wire_type(field_descriptor) -> int:
    """The wire type protobuf uses for a field of the schema (packed repeated scalars are length-delimited)."""
    fd = field_descriptor
    if fd.type in (fd.TYPE_MESSAGE, fd.TYPE_STRING, fd.TYPE_BYTES):
        return LENGTH
    if fd.label == fd.LABEL_REPEATED and fd.GetOptions().packed:
        return LENGTH
    if fd.type in (fd.TYPE_DOUBLE, fd.TYPE_FIXED64, fd.TYPE_SFIXED64):
        return FIXED64
    if fd.type in (fd.TYPE_FLOAT, fd.TYPE_FIXED32, fd.TYPE_SFIXED32):
        return FIXED32
    return VARINT


def check_wire_type(descriptor, number: int, wire: int) -> None:
    """Reject a field whose wire type contradicts the schema: how a non-caffemodel file gives itself away."""
    fd = descriptor.fields_by_number.get(number)
    if fd is None:
        return  # unknown field (a fork's): protobuf keeps it, so do we
    allowed = {expected_wire_type(fd)}
    if fd.label == fd.LABEL_REPEATED and fd.type not in (fd.TYPE_MESSAGE, fd.TYPE_STRING, fd.TYPE_BYTES):
        allowed |= {LENGTH, _scalar_wire_type(fd)}  # parsers accept packed and unpacked alike
    if wire not in allowed:
        raise WireError(f"field {descriptor.name}.{fd.name} has wire type {wire}, the schema says {min(allowed)}")


def _scalar_wire_type(fd) -> int:
    if fd.type in (fd.TYPE_DOUBLE, fd.TYPE_FIXED64, fd.TYPE_SFIXED64):
        return FIXED64
    if fd.type in (fd.TYPE_FLOAT, fd.TYPE_FIXED32, fd.TYPE_SFIXED32):
        return FIXED32
    return VARINT


def number_of(message_name: str, field_name: str) -> int:
    return schema.current().message_class(message_name).DESCRIPTOR.fields_by_name[field_name].number


# ---- wire-format writing ---------------------------------------------------------------------------------------
def encode_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_key(number: int, wire: int) -> bytes:
    return encode_varint(number << 3 | wire)


def length_prefix(number: int, length: int) -> bytes:
    """The bytes that open a length-delimited field `number` whose value is `length` bytes long."""
    return encode_key(number, LENGTH) + encode_varint(length)

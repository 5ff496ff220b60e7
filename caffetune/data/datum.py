"""Images <-> Caffe Datums, the way Caffe's ReadImageToDatum and DecodeDatum do it.

Decoding is OpenCV's, as in Caffe: BGR channel order, EXIF orientation applied, 8-bit; `--resize WxH` squashes with
cv2.resize INTER_LINEAR (Caffe's ReadImageToCVMat). What Caffe leaves to chance is decided here and reported: alpha
is composited onto a background, 16-bit samples are scaled to 8 bits, CMYK JPEGs are converted, truncated files are
refused. A raw Datum holds uint8 CHW pixels; an encoded one holds the original file bytes when nothing had to change
(as convert_imageset does), else the image re-encoded.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from caffetune.errors import DatasetError
from caffetune.model import schema

RESIZE_MODES = ("squash", "crop", "pad")
ALPHA_MODES = ("white", "black", "drop")
ENCODINGS = ("jpg", "png")
_PNG_END = b"IEND\xaeB`\x82"        # the IEND chunk has no data, so its CRC is always the same
_EXTENSION_ENCODINGS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "bmp": "bmp", "tif": "tiff", "tiff": "tiff",
                        "webp": "webp"}


class UnreadableImage(Exception):
    """An input file that is not a usable image; `reason` goes into the skipped-files report."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageOptions:
    """How every image of a dataset is decoded, resized and stored."""

    resize: tuple[int, int] | None = None     # (width, height); None keeps each image's size
    resize_mode: str = "squash"               # squash (Caffe's), crop (fill then centre-crop), pad (fit then pad)
    gray: bool = False
    encoded: str | None = None                # None: raw pixels; "auto": keep the file's format; "jpg"/"png"
    alpha: str = "white"                      # background for transparent pixels; "drop" ignores alpha like Caffe

    def __post_init__(self) -> None:
        choices = {"resize_mode": RESIZE_MODES, "alpha": ALPHA_MODES, "encoded": (None, "auto") + ENCODINGS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise DatasetError(f"{name} must be one of {', '.join(map(str, allowed))}, not {getattr(self, name)!r}")
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) <= 0):
            raise DatasetError(f"resize must be (width, height) > 0, not {self.resize}", fix="e.g. --resize 256x256")


@dataclass
class Decoded:
    """A decoded image (HxWxC uint8 BGR, C = 1 or 3) and what had to be converted to get it."""

    image: np.ndarray
    conversions: list[str] = field(default_factory=list)   # "alpha", "16-bit", "cmyk", "float"
    file_channels: int = 0     # channels Caffe's decoder gets from the file's own bytes (0: unknown)


@dataclass(frozen=True)
class HeaderInfo:
    """What a file's header says, read without decoding it."""

    format: str                # "jpeg", "png", "other"
    unusual: bool = False      # needs IMREAD_UNCHANGED and explicit conversion (alpha, 16-bit, ...)
    cmyk: bool = False
    complete: bool = True      # JPEG: an end-of-image marker follows the first scan
    channels: int = 0          # what cv::imdecode(IMREAD_ANYCOLOR) gives; 0 when not known from the header


# --- reading the header ----------------------------------------------------------------------------------------

def _png_header(data: bytes) -> HeaderInfo:
    bit_depth, colour_type = data[24], data[25]
    unusual = bit_depth == 16 or colour_type in (4, 6) or _png_has_chunk(data, b"tRNS")
    return HeaderInfo("png", unusual=unusual, channels=1 if colour_type in (0, 4) else 3)


def _png_has_chunk(data: bytes, wanted: bytes) -> bool:
    """Whether an ancillary chunk appears before the image data (tRNS makes palette or grey images transparent)."""
    position = 8
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        if kind == wanted:
            return True
        if kind in (b"IDAT", b"IEND"):
            return False
        position += 12 + length
    return False


def _jpeg_frame(data: bytes) -> tuple[int, int]:
    """(colour components of the frame header, offset of the first scan) of a JPEG; 4 components mean CMYK/YCCK.
    Walks the marker segments, so an EXIF thumbnail (inside APP1) is never mistaken for the image."""
    position, components = 2, 0
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            break
        marker = data[position + 1]
        if marker == 0xFF:          # fill byte
            position += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            position += 2
            continue
        if marker == 0xDA:          # start of scan: entropy-coded data follows
            return components, position
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and position + 9 < len(data):
            components = data[position + 9]
        position += 2 + struct.unpack(">H", data[position + 2:position + 4])[0]
    return components, -1


def sniff(data: bytes) -> HeaderInfo:
    """Format and unusual properties of an image file's bytes."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 33:
        return _png_header(data)
    if data[:2] == b"\xff\xd8":
        components, scan = _jpeg_frame(data)
        return HeaderInfo("jpeg", cmyk=components == 4, complete=scan > 0 and data.find(b"\xff\xd9", scan) > 0,
                          channels=1 if components == 1 else 3)
    return HeaderInfo("other", unusual=True)


def check_complete(data: bytes, info: HeaderInfo) -> None:
    """Refuse truncated JPEG/PNG files, which OpenCV would otherwise decode with a grey or black bottom part.
    Bytes after the end marker (some cameras append data) are fine."""
    if not data:
        raise UnreadableImage("empty file")
    if info.format == "jpeg" and not info.complete:
        raise UnreadableImage("truncated JPEG (no end-of-image marker)")
    if info.format == "png" and data.rfind(_PNG_END) < 0:
        raise UnreadableImage("truncated PNG (no IEND chunk)")


# --- decoding --------------------------------------------------------------------------------------------------

def _to_uint8(image: np.ndarray, conversions: list[str]) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        conversions.append("16-bit")
        return ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if image.dtype in (np.float32, np.float64):     # e.g. OpenEXR/HDR: assume 0..1
        conversions.append("float")
        return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    conversions.append(str(image.dtype))
    return np.clip(image, 0, 255).astype(np.uint8)


def _composite(image: np.ndarray, alpha_mode: str) -> np.ndarray:
    colour, alpha = image[..., :-1], image[..., -1:]
    if alpha_mode == "drop":
        return np.ascontiguousarray(colour)
    background = 255.0 if alpha_mode == "white" else 0.0
    weight = alpha.astype(np.float32) / 255.0
    return np.rint(colour * weight + background * (1.0 - weight)).astype(np.uint8)


def _normalise(image: np.ndarray, gray: bool, alpha_mode: str, conversions: list[str]) -> np.ndarray:
    """Any decoded array (1-4 channels, any depth) -> uint8 BGR, or grey when asked."""
    image = _to_uint8(image, conversions)
    if image.ndim == 3 and image.shape[2] in (2, 4):
        conversions.append("alpha")
        image = _composite(image, alpha_mode)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if gray:
        return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image


def decode(data: bytes, options: ImageOptions) -> Decoded:
    """Decode an image file's bytes as Caffe would (cv2.imdecode, BGR), converting unusual inputs deliberately."""
    info = sniff(data)
    check_complete(data, info)
    buffer = np.frombuffer(data, np.uint8)
    conversions = ["cmyk"] if info.cmyk else []
    if info.unusual:
        image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
        if image is None:
            raise UnreadableImage("not an image OpenCV can decode")
        image = _normalise(image, options.gray, options.alpha, conversions)
    else:
        image = cv2.imdecode(buffer, cv2.IMREAD_GRAYSCALE if options.gray else cv2.IMREAD_COLOR)
        if image is None:
            raise UnreadableImage("corrupt image data" if info.format != "other" else "not an image")
    if image.size == 0:
        raise UnreadableImage("image has no pixels")
    if image.ndim == 2:
        image = image[:, :, None]
    return Decoded(image, conversions, file_channels=info.channels)


# --- resizing --------------------------------------------------------------------------------------------------

def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return resized[:, :, None] if resized.ndim == 2 else resized


def resize(image: np.ndarray, size: tuple[int, int], mode: str = "squash") -> np.ndarray:
    """Resize HxWxC to `size` (width, height): squash (Caffe's), crop (fill, centre-crop) or pad (fit, black pad)."""
    width, height = size
    if image.shape[1] == width and image.shape[0] == height:
        return image
    if mode == "squash":
        return _resize(image, width, height)
    if mode == "crop":
        return _centre_crop(_scaled(image, max(width / image.shape[1], height / image.shape[0]), size), size)
    return _centre_pad(_scaled(image, min(width / image.shape[1], height / image.shape[0]), size), size)


def _scaled(image: np.ndarray, scale: float, size: tuple[int, int]) -> np.ndarray:
    """Scale keeping the aspect ratio; rounding never leaves the scaled side short of (crop) or over (pad) `size`."""
    width, height = size
    fitted_w, fitted_h = max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))
    if scale >= max(width / image.shape[1], height / image.shape[0]):       # crop: cover the target
        fitted_w, fitted_h = max(width, fitted_w), max(height, fitted_h)
    else:                                                                    # pad: fit inside it
        fitted_w, fitted_h = min(width, fitted_w), min(height, fitted_h)
    return _resize(image, fitted_w, fitted_h)


def _centre_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    return np.ascontiguousarray(image[top:top + height, left:left + width])


def _centre_pad(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    canvas = np.zeros((height, width, image.shape[2]), np.uint8)
    top, left = (height - image.shape[0]) // 2, (width - image.shape[1]) // 2
    canvas[top:top + image.shape[0], left:left + image.shape[1]] = image
    return canvas


# --- Datums ----------------------------------------------------------------------------------------------------

def encoding_for(path: str, options: ImageOptions) -> str | None:
    """The format an encoded Datum will hold: the one asked for, or (auto) the file's own, like convert_imageset."""
    if options.encoded in (None, "auto"):
        return None if options.encoded is None else _EXTENSION_ENCODINGS.get(Path(path).suffix.lower()[1:], "png")
    return options.encoded


def _can_keep_original(path: str, decoded: Decoded, resized: bool, encoding: str) -> bool:
    """convert_imageset's rule (keep the file's bytes when nothing changed), plus: no deliberate conversion."""
    extension = _EXTENSION_ENCODINGS.get(Path(path).suffix.lower()[1:])
    same_channels = decoded.file_channels == decoded.image.shape[2]     # e.g. not a grey JPEG stored as colour
    return not resized and not decoded.conversions and same_channels and extension == encoding


def encode(image: np.ndarray, encoding: str) -> bytes:
    ok, buffer = cv2.imencode(f".{encoding}", image)
    if not ok:
        raise UnreadableImage(f"OpenCV could not encode the image as {encoding}")
    return buffer.tobytes()


def raw_datum(image: np.ndarray, label: int):
    """A raw Datum: uint8 pixels in CHW order (Caffe's CVMatToDatum)."""
    height, width, channels = image.shape
    data = np.ascontiguousarray(image.transpose(2, 0, 1)).tobytes()
    # encoded=False is set explicitly, as CVMatToDatum does, so the bytes equal convert_imageset's
    return schema.current().Datum(channels=channels, height=height, width=width, data=data, label=label,
                                  encoded=False)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field_tag(name: str, wire_type: int) -> bytes:
    return _varint(schema.current().Datum.DESCRIPTOR.fields_by_name[name].number << 3 | wire_type)


def serialize_raw(image: np.ndarray, label: int) -> bytes:
    """raw_datum(image, label).SerializeToString(), without its three 200 KB copies: the planes are joined once.
    Field numbers come from the schema; the bytes equal protobuf's (fields in number order, as Caffe writes them)."""
    height, width, channels = image.shape
    if label < 0 or channels == 1:
        return raw_datum(image, label).SerializeToString()
    planes = [plane.tobytes() for plane in cv2.split(image)]      # CHW, much faster than a transpose copy
    size = height * width * channels
    head = b"".join([_field_tag("channels", 0), _varint(channels), _field_tag("height", 0), _varint(height),
                     _field_tag("width", 0), _varint(width), _field_tag("data", 2), _varint(size)])
    tail = _field_tag("label", 0) + _varint(label) + _field_tag("encoded", 0) + b"\x00"
    return b"".join([head, *planes, tail])


def encoded_datum(data: bytes, label: int):
    """An encoded Datum: the image file's bytes; Caffe decodes them with cv::imdecode."""
    return schema.current().Datum(data=data, label=label, encoded=True)


@dataclass
class Converted:
    """One image turned into a serialized Datum, with the pixels Caffe will see (for the mean)."""

    datum: bytes
    image: np.ndarray
    conversions: list[str]


def convert(path: str, data: bytes, label: int, options: ImageOptions) -> Converted:
    """Image file bytes -> serialized Datum, as ReadImageToDatum does (raises UnreadableImage)."""
    decoded = decode(data, options)
    image = decoded.image
    if options.resize:
        image = resize(image, options.resize, options.resize_mode)
    resized = image is not decoded.image
    encoding = encoding_for(path, options)
    if encoding is None:
        return Converted(serialize_raw(image, label), image, decoded.conversions)
    if _can_keep_original(path, decoded, resized, encoding):
        payload = data
    else:
        payload = encode(image, encoding)
        if encoding in ("jpg", "webp"):       # lossy: the mean must be of what Caffe will decode
            image = decode_bytes(payload, gray=options.gray)
    return Converted(encoded_datum(payload, label).SerializeToString(), image, decoded.conversions)


def decode_bytes(payload: bytes, gray: bool = False) -> np.ndarray:
    """Decode an encoded Datum's bytes like Caffe's DecodeDatumToCVMatNative (any colour, 8-bit) -> HxWxC."""
    flag = cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_ANYCOLOR
    image = cv2.imdecode(np.frombuffer(payload, np.uint8), flag)
    if image is None:
        raise UnreadableImage("encoded Datum does not decode")
    return image[:, :, None] if image.ndim == 2 else image


def datum_to_image(datum) -> np.ndarray:
    """A Datum's pixels as HxWxC uint8 BGR (decoding encoded Datums; float Datums are rounded and clipped)."""
    if datum.encoded:
        return decode_bytes(datum.data)
    shape = (datum.channels, datum.height, datum.width)
    if datum.data:
        pixels = np.frombuffer(datum.data, np.uint8)
    else:
        pixels = np.clip(np.rint(np.asarray(datum.float_data, np.float32)), 0, 255).astype(np.uint8)
    if pixels.size != shape[0] * shape[1] * shape[2]:
        raise UnreadableImage(f"Datum holds {pixels.size} values, not channels*height*width = {shape}")
    return pixels.reshape(shape).transpose(1, 2, 0)

"""The dataset mean, accumulated while the database is written: exact integer pixel sums -> a BlobProto
(1 x C x H x W, what `transform_param { mean_file }` and compute_image_mean use) and per-channel values."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from caffetune import files
from caffetune.errors import DatasetError
from caffetune.model import prototxt, schema


@dataclass
class PixelSum:
    """Sum of HxWxC uint8 images of one shape (integers, so merging partial sums is exact)."""

    shape: tuple[int, int, int]
    total: np.ndarray
    count: int = 0

    @classmethod
    def of(cls, image: np.ndarray, dtype=np.uint64) -> PixelSum:
        """A sum starting with `image`; uint32 suffices for partial sums of up to 16 million images."""
        return cls(tuple(image.shape), image.astype(dtype), 1)

    def add(self, image: np.ndarray) -> None:
        np.add(self.total, image, out=self.total, casting="unsafe")
        self.count += 1


@dataclass
class MeanAccumulator:
    """One running sum; a mean exists only when every image has the same shape (as Caffe requires). Once a second
    shape appears the sum is dropped: only the shapes are remembered, so memory stays bounded."""

    total: PixelSum | None = None
    shapes: set = field(default_factory=set)

    def add(self, image: np.ndarray) -> None:
        self.merge(PixelSum.of(image))

    def merge(self, part: PixelSum) -> None:
        self.shapes.add(part.shape)
        if len(self.shapes) > 1:
            self.total = None
        elif self.total is None:
            self.total = PixelSum(part.shape, part.total.astype(np.uint64), part.count)
        else:
            self.total.total += part.total
            self.total.count += part.count

    def problem(self) -> str | None:
        if not self.shapes:
            return "no images were written"
        if len(self.shapes) > 1:
            shapes = sorted(f"{w}x{h}x{c}" for h, w, c in self.shapes)
            return (f"images have {len(shapes)} different sizes ({', '.join(shapes[:4])}...): a mean image needs "
                    f"one size (pass --resize WxH)")
        return None

    def mean_chw(self) -> np.ndarray:
        """The mean image, C x H x W float32 (BGR, like the Datums)."""
        if self.problem():
            raise DatasetError(f"no mean image: {self.problem()}", fix="pass --resize WxH")
        return (self.total.total / self.total.count).astype(np.float32).transpose(2, 0, 1).copy()


def to_blob(mean_chw: np.ndarray):
    """A 1 x C x H x W BlobProto, as compute_image_mean writes it (legacy num/channels/height/width fields)."""
    channels, height, width = mean_chw.shape
    blob = schema.current().BlobProto(num=1, channels=channels, height=height, width=width)
    blob.data.extend(mean_chw.ravel().tolist())
    return blob


def channel_means(mean_chw: np.ndarray) -> list[float]:
    """Per-channel means (B, G, R order), for `transform_param { mean_value }`."""
    return [float(v) for v in mean_chw.reshape(mean_chw.shape[0], -1).mean(axis=1, dtype=np.float64)]


def write(mean_chw: np.ndarray, binaryproto: Path, values_json: Path) -> list[float]:
    """Write mean.binaryproto and the per-channel values as JSON; returns the values."""
    values = channel_means(mean_chw)
    files.write_atomic(binaryproto, to_blob(mean_chw).SerializeToString())
    order = "BGR" if len(values) == 3 else "gray"
    text = json.dumps({"channels": order, "mean_value": [round(v, 4) for v in values],
                       "shape": list(mean_chw.shape), "mean_file": binaryproto.name}, indent=2)
    files.write_atomic(values_json, text + "\n")
    return values


def load(binaryproto: Path | str) -> np.ndarray:
    """A mean.binaryproto as C x H x W float32."""
    blob = prototxt.load_binary(binaryproto, "BlobProto")
    if blob.HasField("shape"):
        dims = [int(d) for d in blob.shape.dim][-3:]
    else:
        dims = [blob.channels, blob.height, blob.width]
    data = np.asarray(blob.data, np.float32)
    if data.size != int(np.prod(dims)):
        raise DatasetError(f"mean file holds {data.size} values for shape {dims}", where=str(binaryproto),
                           fix="recompute it with `caffetune build-lmdb` or compute_image_mean")
    return data.reshape(dims)

"""Numpy versions of Caffe's fillers (filler.hpp): the values a layer's blobs start from when there is nothing to
copy, as Caffe would draw them (constant, uniform, gaussian, positive_unitball, xavier, msra, bilinear)."""
from __future__ import annotations

import numpy as np
from google.protobuf.message import Message

from caffetune.errors import NetError
from caffetune.model import layers as L


def filler_fields(params: Message) -> list[str]:
    """Names of the single FillerParameter fields of a layer's parameters (weight_filler, bias_filler, filler)."""
    return [f.name for f in params.DESCRIPTOR.fields if f.message_type is not None
            and f.message_type.name == "FillerParameter" and f.label != f.LABEL_REPEATED]


def _filler_for(layer: Message, index: int):
    """The FillerParameter field Caffe reads for blob `index` (weight_filler/filler for 0, bias_filler for 1) and
    whether it is written; (None, False) when the layer's parameters have no such field."""
    params = L.param_message(layer)
    if params is None:
        return None, False
    fillers = filler_fields(params)
    wanted = [n for n in fillers if n != "bias_filler"] if index == 0 else ["bias_filler"] if index == 1 else []
    if not wanted or wanted[0] not in fillers:
        return None, False
    return getattr(params, wanted[0]), params.HasField(wanted[0])


# Defaults Caffe's layer code uses when no filler is written (scale_layer.cpp, prelu_layer.cpp).
_UNWRITTEN_FILLER_VALUE = {"Scale": 1.0, "PReLU": 0.25}


def fill(shape: tuple, filler, rng: np.random.Generator) -> np.ndarray:
    """A blob initialised like Caffe's filler.hpp (constant, uniform, gaussian, positive_unitball, xavier, msra,
    bilinear)."""
    kind = filler.type if filler is not None else "constant"
    count = int(np.prod(shape))
    fan_in = count // shape[0] if shape and shape[0] else count
    fan_out = count // shape[1] if len(shape) > 1 and shape[1] else count
    if kind == "constant":
        return np.full(shape, filler.value if filler is not None else 0.0, np.float32)
    if kind == "uniform":
        return _uniform(rng, shape, filler.min, filler.max)
    if kind == "gaussian":
        values = _normal(rng, shape, filler.mean, filler.std)
        if filler.sparse >= 0 and shape:
            keep = rng.random(shape) < filler.sparse / shape[0]
            values *= keep
        return values
    if kind == "positive_unitball":
        values = _uniform(rng, (shape[0], count // shape[0]), 0.0, 1.0)
        return (values / values.sum(axis=1, keepdims=True)).reshape(shape)
    if kind in ("xavier", "msra"):
        n = {0: fan_in, 1: fan_out}.get(filler.variance_norm, (fan_in + fan_out) / 2)
        if kind == "xavier":
            scale = np.sqrt(3.0 / n)
            return _uniform(rng, shape, -scale, scale)
        return _normal(rng, shape, 0.0, np.sqrt(2.0 / n))
    if kind == "bilinear":
        return _bilinear(shape)
    raise NetError(f"unknown filler type {kind!r}", fix="use one of Caffe's filler types (xavier, gaussian, ...)")


def _uniform(rng: np.random.Generator, shape: tuple, low: float, high: float) -> np.ndarray:
    """Float32 throughout: a 100M-value VGG fc6 must not pass through float64 (memory stays ~1x the blob)."""
    values = rng.random(shape, dtype=np.float32)
    values *= np.float32(high - low)
    values += np.float32(low)
    return values


def _normal(rng: np.random.Generator, shape: tuple, mean: float, std: float) -> np.ndarray:
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= np.float32(std)
    values += np.float32(mean)
    return values


def _bilinear(shape: tuple) -> np.ndarray:
    height, width = shape[-2], shape[-1]
    f = np.ceil(width / 2.0)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    x = np.arange(width)[None, :]
    y = np.arange(height)[:, None]
    kernel = (1 - np.abs(x / f - c)) * (1 - np.abs(y / f - c))
    return np.broadcast_to(kernel, shape).astype(np.float32)


def initial_blob(layer: Message, index: int, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    if L.type_name(layer) == "BatchNorm":
        return np.zeros(shape, np.float32)  # mean, variance and the moving-average factor start at 0
    filler, written = _filler_for(layer, index)
    if not written and L.type_name(layer) in _UNWRITTEN_FILLER_VALUE and index == 0:
        return np.full(shape, _UNWRITTEN_FILLER_VALUE[L.type_name(layer)], np.float32)
    return fill(shape, filler, rng)  # an unwritten filler reads as Caffe's default: constant 0

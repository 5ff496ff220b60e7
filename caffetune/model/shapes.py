"""Output-shape and parameter-shape inference for a net, following Caffe's Reshape/LayerSetUp arithmetic.

Used when pycaffe is not available (and by `graft`, which must not build a whole net just to learn its parameter
shapes). Covers the layer types of image classifiers (data layers, convolution, pooling, inner product,
normalisation, element-wise and reshaping layers, losses); a layer of another type gets unknown (None) output
shapes and a note in `problems`, and everything downstream of it is unknown too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import Message

from caffetune.model import layers as L

Shape = tuple  # of int, or None for a dimension that is not known (e.g. channels of an LMDB that is not built yet)


@dataclass
class NetShapes:
    """Shapes for one phase of a net: each layer's tops and learnable blobs (None where unknown)."""

    phase: str
    outputs: dict[str, list[Shape | None]] = field(default_factory=dict)   # layer name -> its tops' shapes
    params: dict[str, list[Shape] | None] = field(default_factory=dict)    # layer name -> its blobs' shapes
    blobs: dict[str, Shape | None] = field(default_factory=dict)           # blob name -> latest shape
    problems: list[str] = field(default_factory=list)


class Unknown(Exception):
    """A shape cannot be inferred; the message says why."""


@dataclass
class _Context:
    net: Message
    base_dirs: list[Path]


# ---- helpers ---------------------------------------------------------------------------------------------------
def _axis(axis: int, rank: int) -> int:
    """Caffe's CanonicalAxisIndex."""
    return axis + rank if axis < 0 else axis


def _count(shape: Shape) -> int | None:
    return None if None in shape else math.prod(shape)


def _maybe(function, *dims):
    """function(*dims), or None when a dimension is unknown."""
    return None if None in dims else function(*dims)


def is_complete(shape: Shape | None) -> bool:
    return shape is not None and None not in shape


def _repeated_or(params, name: str, h_name: str, w_name: str, spatial: int, default: int) -> list[int]:
    """A per-spatial-axis value from the repeated field or the _h/_w pair (ConvolutionParameter's convention)."""
    if spatial == 2 and params.HasField(h_name):
        return [getattr(params, h_name), getattr(params, w_name)]
    values = list(getattr(params, name))
    if not values:
        return [default] * spatial
    return values * spatial if len(values) == 1 else values


def _need(bottoms: list[Shape | None], count: int = 1) -> list[Shape]:
    if len(bottoms) < count:
        raise Unknown(f"needs {count} bottom(s), has {len(bottoms)}")
    if any(b is None for b in bottoms[:count]):
        raise Unknown("a bottom's shape is unknown")
    return bottoms  # type: ignore[return-value]


def _crop(layer, params, height: int, width: int) -> tuple[int, int]:
    crop = layer.transform_param.crop_size if layer.HasField("transform_param") else 0
    crop = crop or getattr(params, "crop_size", 0)  # V1 data layers kept crop_size in their own message
    return (crop, crop) if crop else (height, width)


# ---- data layers -----------------------------------------------------------------------------------------------
def _resolve(ctx: _Context, source: str) -> Path | None:
    """Caffe opens relative paths from its working directory; also try the net file's folder."""
    candidates = [Path(source)] if Path(source).is_absolute() else [d / source for d in ctx.base_dirs]
    return next((c for c in candidates if c.exists()), None)


def _first_datum_chw(path: Path, layer) -> tuple[int, int, int]:
    # The one place where model/ reads a dataset: imported here so that model/ stays importable without data/.
    from caffetune.data import lmdb_reader  # noqa: PLC0415
    from caffetune.errors import DatasetError  # noqa: PLC0415

    try:
        datum = lmdb_reader.first_datum(path)
    except DatasetError as error:
        raise Unknown(f"{error.what}: {path}") from None
    if datum is None:
        raise Unknown(f"the LMDB {path} is empty")
    if not datum.encoded:
        return datum.channels, datum.height, datum.width
    return _encoded_chw(datum.data, layer)


def _encoded_chw(data: bytes, layer) -> tuple[int, int, int]:
    import cv2  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYCOLOR)
    if image is None:
        raise Unknown("the first encoded Datum does not decode")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if layer.HasField("transform_param"):
        channels = 3 if layer.transform_param.force_color else 1 if layer.transform_param.force_gray else channels
    return channels, image.shape[0], image.shape[1]


def _data(layer, params, bottoms, ctx) -> tuple[list, list]:
    lmdb_backend = type(params).DESCRIPTOR.fields_by_name["backend"].enum_type.values_by_name["LMDB"].number
    path = _resolve(ctx, params.source) if params.backend == lmdb_backend else None  # LevelDB is not read
    if path is None:  # no LMDB (yet): batch and crop are known, the rest is not
        channels, height, width = None, None, None
    else:
        channels, height, width = _first_datum_chw(path, layer)
    height, width = _crop(layer, params, height, width)
    batch = params.batch_size
    return [(batch, channels, height, width), (batch,)][:len(layer.top)], []


def _image_data(layer, params, bottoms, ctx) -> tuple[list, list]:
    channels = 3 if params.is_color else 1
    height, width = params.new_height, params.new_width
    if not (height and width):
        height, width = _first_listed_image_hw(params, ctx) if _resolve(ctx, params.source) else (None, None)
    height, width = _crop(layer, params, height, width)
    return [(params.batch_size, channels, height, width), (params.batch_size,)][:len(layer.top)], []


def _first_listed_image_hw(params, ctx) -> tuple[int, int]:
    import cv2  # noqa: PLC0415

    listing = _resolve(ctx, params.source)
    if listing is None:
        raise Unknown(f"its image list {params.source} does not exist (yet)")
    try:
        line = next((ln for ln in listing.read_text().splitlines() if ln.strip()), None)
    except UnicodeDecodeError:
        raise Unknown(f"the image list {listing} is not text") from None
    if line is None:
        raise Unknown(f"the image list {listing} is empty")
    image = cv2.imread(params.root_folder + line.rsplit(maxsplit=1)[0])
    if image is None:
        raise Unknown(f"the first listed image {params.root_folder}{line.split()[0]} does not load")
    return image.shape[0], image.shape[1]


def _memory_data(layer, params, bottoms, ctx) -> tuple[list, list]:
    return [(params.batch_size, params.channels, params.height, params.width), (params.batch_size,)], []


def _blob_shape(shape) -> Shape:
    return tuple(int(d) for d in shape.dim)


def _input(layer, params, bottoms, ctx) -> tuple[list, list]:
    shapes = [_blob_shape(s) for s in params.shape]
    if not shapes:
        raise Unknown("input_param has no shape")
    return [shapes[0] if len(shapes) == 1 else shapes[i] for i in range(len(layer.top))], []


def _dummy_data(layer, params, bottoms, ctx) -> tuple[list, list]:
    if params.shape:
        shapes = [_blob_shape(s) for s in params.shape]
    else:
        shapes = [tuple(x) for x in zip(params.num, params.channels, params.height, params.width)]
    return [shapes[0] if len(shapes) == 1 else shapes[i] for i in range(len(layer.top))], []


def _window_data(layer, params, bottoms, ctx) -> tuple[list, list]:
    crop = layer.transform_param.crop_size or params.crop_size
    if not crop:
        raise Unknown("window_data_param needs crop_size")
    return [(params.batch_size, 3, crop, crop), (params.batch_size,)], []


# ---- computation layers ----------------------------------------------------------------------------------------
def _convolution(layer, params, bottoms, ctx, deconv: bool = False) -> tuple[list, list]:
    (bottom,) = _need(bottoms)[:1]
    axis = _axis(params.axis, len(bottom))
    spatial = len(bottom) - axis - 1
    kernel = _repeated_or(params, "kernel_size", "kernel_h", "kernel_w", spatial, 0)
    stride = _repeated_or(params, "stride", "stride_h", "stride_w", spatial, 1)
    pad = _repeated_or(params, "pad", "pad_h", "pad_w", spatial, 0)
    dilation = list(params.dilation) * (spatial if len(params.dilation) == 1 else 1) or [1] * spatial
    channels, group = bottom[axis], params.group
    spans = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    if deconv:
        out = [_maybe(lambda i, s=s, e=e, p=p: s * (i - 1) + e - 2 * p, i)
               for i, s, e, p in zip(bottom[axis + 1:], stride, spans, pad)]
        weight = (channels, params.num_output // group, *kernel)
    else:
        out = [_maybe(lambda i, s=s, e=e, p=p: (i + 2 * p - e) // s + 1, i)
               for i, s, e, p in zip(bottom[axis + 1:], stride, spans, pad)]
        weight = (params.num_output, _maybe(lambda c: c // group, channels), *kernel)
    top = (*bottom[:axis], params.num_output, *out)
    blobs = [weight] + ([(params.num_output,)] if params.bias_term else [])
    return [top] * len(layer.top), blobs


def _deconvolution(layer, params, bottoms, ctx) -> tuple[list, list]:
    return _convolution(layer, params, bottoms, ctx, deconv=True)


def _pooled(size: int, kernel: int, stride: int, pad: int, ceil: bool) -> int:
    span = (size + 2 * pad - kernel) / stride
    pooled = (math.ceil(span) if ceil else math.floor(span)) + 1
    if pad and (pooled - 1) * stride >= size + pad:
        pooled -= 1  # the last pooling window must start inside the image (Caffe's clipping rule)
    return pooled


def _pooling(layer, params, bottoms, ctx) -> tuple[list, list]:
    (bottom,) = _need(bottoms)[:1]
    num, channels, height, width = bottom
    if params.global_pooling:
        return [(num, channels, 1, 1)] * len(layer.top), []
    kernel = [params.kernel_h, params.kernel_w] if params.HasField("kernel_h") else [params.kernel_size] * 2
    stride = [params.stride_h, params.stride_w] if params.HasField("stride_h") else [params.stride] * 2
    pad = [params.pad_h, params.pad_w] if params.HasField("pad_h") else [params.pad] * 2
    ceil = getattr(params, "round_mode", 0) == 0
    out = [_maybe(lambda n, k=k, s=s, p=p: _pooled(n, k, s, p, ceil), size)
           for size, k, s, p in zip((height, width), kernel, stride, pad)]
    return [(num, channels, *out)] * len(layer.top), []


def _inner_product(layer, params, bottoms, ctx) -> tuple[list, list]:
    (bottom,) = _need(bottoms)[:1]
    axis = _axis(params.axis, len(bottom))
    inputs = _count(bottom[axis:])
    weight = (inputs, params.num_output) if params.transpose else (params.num_output, inputs)
    blobs = [weight] + ([(params.num_output,)] if params.bias_term else [])
    return [(*bottom[:axis], params.num_output)], blobs


def _same(layer, params, bottoms, ctx) -> tuple[list, list]:
    (bottom,) = _need(bottoms)[:1]
    return [bottom] * len(layer.top), []


def _batch_norm(layer, params, bottoms, ctx) -> tuple[list, list]:
    (bottom,) = _need(bottoms)[:1]
    channels = bottom[1] if len(bottom) > 1 else 1
    return [bottom], [(channels,), (channels,), (1,)]


def _scale_like(layer, params, bottoms, ctx) -> tuple[list, list]:
    bottom = _need(bottoms)[0]
    if len(bottoms) > 1:
        return [bottom], []  # the second bottom is the scale (or bias): nothing to learn
    axis = _axis(params.axis, len(bottom))
    end = len(bottom) if params.num_axes == -1 else axis + params.num_axes
    shape = tuple(bottom[axis:end])
    blobs = [shape] + ([shape] if getattr(params, "bias_term", False) else [])
    return [bottom], blobs


def _prelu(layer, params, bottoms, ctx) -> tuple[list, list]:
    (bottom,) = _need(bottoms)[:1]
    return [bottom], [(1,) if params.channel_shared else (bottom[1],)]


def _embed(layer, params, bottoms, ctx) -> tuple[list, list]:
    (bottom,) = _need(bottoms)[:1]
    blobs = [(params.input_dim, params.num_output)] + ([(params.num_output,)] if params.bias_term else [])
    return [(*bottom, params.num_output)], blobs


def _concat(layer, params, bottoms, ctx) -> tuple[list, list]:
    shapes = _need(bottoms, len(bottoms))
    axis = _axis(params.axis if params.HasField("axis") or not params.HasField("concat_dim") else params.concat_dim,
                 len(shapes[0]))
    total = _maybe(lambda *sizes: sum(sizes), *(s[axis] for s in shapes))
    return [(*shapes[0][:axis], total, *shapes[0][axis + 1:])], []


def _slice(layer, params, bottoms, ctx) -> tuple[list, list]:
    (bottom,) = _need(bottoms)[:1]
    axis = _axis(params.axis if params.HasField("axis") or not params.HasField("slice_dim") else params.slice_dim,
                 len(bottom))
    points = list(params.slice_point)
    if points:
        sizes = [b - a for a, b in zip([0] + points, points + [bottom[axis]])]
    else:
        sizes = [bottom[axis] // len(layer.top)] * len(layer.top)
    return [(*bottom[:axis], size, *bottom[axis + 1:]) for size in sizes], []


def _flatten(layer, params, bottoms, ctx) -> tuple[list, list]:
    (bottom,) = _need(bottoms)[:1]
    start, end = _axis(params.axis, len(bottom)), _axis(params.end_axis, len(bottom))
    return [(*bottom[:start], _count(bottom[start:end + 1]), *bottom[end + 1:])], []


def _reshape(layer, params, bottoms, ctx) -> tuple[list, list]:
    (bottom,) = _need(bottoms)[:1]
    start = _axis(params.axis, len(bottom) + 1) if params.axis < 0 else params.axis
    end = len(bottom) if params.num_axes == -1 else start + params.num_axes
    dims = [bottom[start + i] if d == 0 else d for i, d in enumerate(params.shape.dim)]
    replaced = _count(bottom[start:end])
    if -1 in dims:
        known = _count([d for d in dims if d != -1])
        dims[dims.index(-1)] = replaced // known
    return [(*bottom[:start], *dims, *bottom[end:])], []


def _crop_layer(layer, params, bottoms, ctx) -> tuple[list, list]:
    bottom, reference = _need(bottoms, 2)[:2]
    axis = _axis(params.axis, len(bottom))
    return [(*bottom[:axis], *reference[axis:])], []


def _argmax(layer, params, bottoms, ctx) -> tuple[list, list]:
    (bottom,) = _need(bottoms)[:1]
    if params.HasField("axis"):
        axis = _axis(params.axis, len(bottom))
        shape = list(bottom)
        shape[axis] = params.top_k
        return [tuple(shape)], []
    return [(bottom[0], 2 if params.out_max_val else 1, params.top_k)], []


def _accuracy(layer, params, bottoms, ctx) -> tuple[list, list]:
    tops: list = [()]
    if len(layer.top) > 1:
        (bottom,) = _need(bottoms)[:1]
        tops.append((bottom[_axis(params.axis, len(bottom))],))
    return tops, []


def _scalar(layer, params, bottoms, ctx) -> tuple[list, list]:
    return [()] * len(layer.top), []


def _nothing(layer, params, bottoms, ctx) -> tuple[list, list]:
    return [], []


def _eltwise(layer, params, bottoms, ctx) -> tuple[list, list]:
    return [_need(bottoms)[0]], []


_DATA = {"Data": _data, "ImageData": _image_data, "MemoryData": _memory_data, "Input": _input,
         "DummyData": _dummy_data, "WindowData": _window_data}
_LOSSES = ("SoftmaxWithLoss", "EuclideanLoss", "HingeLoss", "InfogainLoss", "MultinomialLogisticLoss",
           "SigmoidCrossEntropyLoss", "ContrastiveLoss")
_ELEMENTWISE = ("ReLU", "Sigmoid", "TanH", "Dropout", "LRN", "Power", "AbsVal", "BNLL", "ELU", "Exp", "Log",
                "Threshold", "MVN", "Softmax", "Split", "Clip", "Swish")
RULES = {**_DATA, "Convolution": _convolution, "Deconvolution": _deconvolution, "Pooling": _pooling,
         "InnerProduct": _inner_product, "BatchNorm": _batch_norm, "Scale": _scale_like, "Bias": _scale_like,
         "PReLU": _prelu, "Embed": _embed, "Concat": _concat, "Slice": _slice, "Flatten": _flatten,
         "Reshape": _reshape, "Crop": _crop_layer, "ArgMax": _argmax, "Accuracy": _accuracy,
         "Eltwise": _eltwise, "Silence": _nothing, **{t: _same for t in _ELEMENTWISE},
         **{t: _scalar for t in _LOSSES}}


# ---- the net ---------------------------------------------------------------------------------------------------
def _net_inputs(net: Message) -> dict[str, Shape]:
    """The deprecated net-level `input:` blobs with `input_shape` or `input_dim`."""
    shapes = {}
    for i, name in enumerate(net.input):
        if i < len(net.input_shape):
            shapes[name] = _blob_shape(net.input_shape[i])
        elif len(net.input_dim) >= 4 * (i + 1):
            shapes[name] = tuple(net.input_dim[4 * i:4 * i + 4])
    return shapes


def infer(net: Message, phase: str = "TRAIN", base_dir: Path | str | None = None) -> NetShapes:
    """Shapes of every layer of the net that runs in `phase`, in net order."""
    ctx = _Context(net, [Path.cwd()] + ([Path(base_dir)] if base_dir else []))
    result = NetShapes(phase=phase, blobs=dict(_net_inputs(net)))
    for layer in L.all_layers(net):
        if phase not in L.phases(layer):
            continue
        _infer_layer(layer, ctx, result)
    return result


def _infer_layer(layer: Message, ctx: _Context, result: NetShapes) -> None:
    kind = L.type_name(layer)
    bottoms = [result.blobs.get(name) for name in layer.bottom]
    rule = RULES.get(kind)
    try:
        if rule is None:
            raise Unknown(f"caffetune has no shape rule for type {kind}")
        tops, params = rule(layer, L.param_message(layer), bottoms, ctx)
    except (Unknown, ValueError, ZeroDivisionError, IndexError, TypeError, AttributeError) as why:
        # AttributeError: a field this (fork) schema does not have - the shape is unknown, not a crash
        tops, params = [None] * len(layer.top), [] if L.learnable_blob_count(layer) == 0 else None
        if all(is_complete(b) for b in bottoms):  # else the cause is upstream, already reported or a missing LMDB
            detail = why if isinstance(why, Unknown) else f"cannot infer its shape ({why})"
            result.problems.append(f"{layer.name}: {detail}")
    result.outputs[layer.name] = list(tops) + [None] * (len(layer.top) - len(tops))
    result.params[layer.name] = params
    for name, shape in zip(layer.top, result.outputs[layer.name]):
        result.blobs[name] = shape


def infer_all(net: Message, base_dir: Path | str | None = None) -> NetShapes:
    """TRAIN shapes, completed with the layers that run only in TEST (e.g. accuracy)."""
    train = infer(net, "TRAIN", base_dir)
    test = infer(net, "TEST", base_dir)
    for name in test.outputs:
        if name not in train.outputs or (train.params[name] is None and test.params[name] is not None):
            train.outputs[name] = test.outputs[name]
            train.params[name] = test.params[name]
    train.problems += [p for p in test.problems if p not in train.problems]
    return train

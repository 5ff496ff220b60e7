"""A uniform view over a net's layers, current (`layer {}`) or legacy V1 (`layers {}` with enum types).

Everything here reads the schema's descriptors instead of hand-written tables where Caffe's own knowledge lives in
the schema: which `*_param` message belongs to a layer type (as pycaffe's net_spec does), V1 enum names, and which
layer types carry learnable blobs (their parameter message declares a weight filler).
"""
from __future__ import annotations

import re
from functools import cache

from google.protobuf.message import Message

from caffetune.errors import NetError

# Caffe's UpgradeV1LayerType (upgrade_proto.cpp) maps V1 enum names to type strings. Most follow CamelCase of the
# enum name; these do not.
_V1_TYPE_EXCEPTIONS = {
    "ABSVAL": "AbsVal", "ARGMAX": "ArgMax", "BNLL": "BNLL", "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output",
    "IM2COL": "Im2col", "LRN": "LRN", "MVN": "MVN", "RELU": "ReLU", "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "TANH": "TanH",
}
# Layer types whose blob count is not "a weight, plus a bias when bias_term" (Caffe's layer sources).
_FIXED_BLOB_COUNTS = {"BatchNorm": 3, "LSTM": 3, "RNN": 5}
# Parameter messages shared by several types (Deconvolution uses ConvolutionParameter, ...).
_SHARED_PARAM = {"Deconvolution": "convolution_param", "SoftmaxWithLoss": "softmax_param",
                 "Im2col": "convolution_param", "LSTM": "recurrent_param", "RNN": "recurrent_param",
                 "ImageData": "image_data_param", "HDF5Data": "hdf5_data_param"}
_GENERIC_PARAMS = {"transform_param", "loss_param"}

# Data-layer type names, in one place. Layers that produce a net's input (no bottoms; a deploy net has none of
# them but Input):
DATA_TYPES = frozenset({"Data", "ImageData", "HDF5Data", "MemoryData", "WindowData", "DummyData", "Input"})
# Layers that read a dataset caffetune builds or points at: an LMDB of Datums (Data), an image list (ImageData).
SOURCE_DATA_TYPES = ("Data", "ImageData")
# Layers that read an LMDB of Datums (the databases `caffetune build-lmdb` writes).
LMDB_DATA_TYPES = ("Data",)
# Caffe's BasePrefetchingDataLayer subclasses: they hold `prefetch` batches in memory.
PREFETCHING_DATA_TYPES = frozenset({"Data", "ImageData", "WindowData"})


def is_v1_layer(layer: Message) -> bool:
    return layer.DESCRIPTOR.name == "V1LayerParameter"


def is_v1(net: Message) -> bool:
    """True when the net uses the legacy `layers {}` entries (V1)."""
    return len(net.layers) > 0 and len(net.layer) == 0


def check_not_mixed(net: Message, where: str = "net") -> None:
    if len(net.layers) and len(net.layer):
        raise NetError(f"the net mixes current `layer {{}}` entries ({len(net.layer)}) with legacy V1 `layers {{}}` "
                       f"entries ({len(net.layers)}); Caffe rejects such a net", where=where,
                       fix="convert the V1 entries with Caffe's upgrade_net_proto_text, or write all layers in one "
                           "format")


def all_layers(net: Message) -> list:
    """The net's layer entries (V2 `layer` or V1 `layers`), in order."""
    return list(net.layers) if is_v1(net) else list(net.layer)


def layer_field(net: Message) -> str:
    """Name of the repeated field holding the layers: "layers" for V1 nets, else "layer"."""
    return "layers" if is_v1(net) else "layer"


def v1_enum_to_type(enum_name: str) -> str:
    if enum_name in _V1_TYPE_EXCEPTIONS:
        return _V1_TYPE_EXCEPTIONS[enum_name]
    return "".join(word.capitalize() for word in enum_name.split("_"))


@cache
def _v1_type_table(enum_descriptor) -> dict[str, str]:
    """V2 type string -> V1 enum name, from the schema's LayerType enum."""
    return {v1_enum_to_type(value.name): value.name for value in enum_descriptor.values if value.name != "NONE"}


def type_name(layer: Message) -> str:
    """The layer's type as a current-format string ("InnerProduct"), also for V1 enum types (INNER_PRODUCT)."""
    if is_v1_layer(layer):
        enum = layer.DESCRIPTOR.fields_by_name["type"].enum_type
        return v1_enum_to_type(enum.values_by_number[layer.type].name)
    return layer.type


def v1_type_value(layer_descriptor, type_string: str) -> int:
    """The V1 enum number for a type string, e.g. "SoftmaxWithLoss" -> SOFTMAX_LOSS."""
    enum = layer_descriptor.fields_by_name["type"].enum_type
    name = _v1_type_table(enum).get(type_string)
    if name is None:
        raise NetError(f"layer type {type_string} has no legacy V1 equivalent",
                       fix="write the net in the current format with --upgrade")
    return enum.values_by_name[name].number


@cache
def _param_fields(layer_descriptor) -> dict[str, str]:
    """Type-string -> `*_param` field name, from the message type of each field (pycaffe's net_spec trick)."""
    table = {}
    for field in layer_descriptor.fields:
        if field.name.endswith("_param") and field.message_type is not None and field.name not in _GENERIC_PARAMS:
            table[re.sub("Parameter$", "", field.message_type.name)] = field.name
    return table


def param_field_name(layer: Message) -> str | None:
    kind = type_name(layer)
    fields = _param_fields(layer.DESCRIPTOR)
    name = _SHARED_PARAM.get(kind) or fields.get(kind)
    return name if name in layer.DESCRIPTOR.fields_by_name else None


def param_message(layer: Message):
    """The layer's own `*_param` submessage (inner_product_param, convolution_param, ...) or None."""
    name = param_field_name(layer)
    return getattr(layer, name) if name else None


def learnable_blob_count(layer: Message) -> int:
    """How many learnable blobs Caffe gives this layer (weights, bias, BatchNorm's 3 statistics, ...)."""
    kind = type_name(layer)
    if kind in _FIXED_BLOB_COUNTS:
        return _FIXED_BLOB_COUNTS[kind]
    params = param_message(layer)
    if params is None:
        return 0
    fields = params.DESCRIPTOR.fields_by_name
    has_weight = "weight_filler" in fields or ("filler" in fields and kind in ("Scale", "Bias", "PReLU"))
    if not has_weight:
        return 0
    bottoms = len(layer.bottom)
    weights = 0 if kind in ("Scale", "Bias") and bottoms > 1 else 1  # the second bottom supplies the scale/bias
    if kind == "Bias":
        return weights
    bias = 1 if "bias_term" in fields and params.bias_term else 0   # unset: the schema's default
    return weights + bias


def num_output(layer: Message) -> int | None:
    params = param_message(layer)
    if params is None or "num_output" not in params.DESCRIPTOR.fields_by_name:
        return None
    return params.num_output if params.HasField("num_output") else None


def lr_mults(layer: Message) -> list[float]:
    """Per-blob learning-rate multipliers as written (param.lr_mult, or V1 blobs_lr); unwritten ones read 1."""
    count = learnable_blob_count(layer)
    if is_v1_layer(layer):
        written = list(layer.blobs_lr)
    else:
        written = [spec.lr_mult for spec in layer.param]
    return [written[i] if i < len(written) else 1.0 for i in range(count)]


def decay_mults(layer: Message) -> list[float]:
    count = learnable_blob_count(layer)
    written = list(layer.weight_decay) if is_v1_layer(layer) else [spec.decay_mult for spec in layer.param]
    return [written[i] if i < len(written) else 1.0 for i in range(count)]


def is_in_place(layer: Message) -> bool:
    return len(layer.bottom) == 1 and len(layer.top) == 1 and layer.bottom[0] == layer.top[0]


def phases(layer: Message) -> set[str]:
    """Phases the layer runs in ("TRAIN", "TEST"), from include/exclude rules on phase only."""
    enum = layer.DESCRIPTOR.fields_by_name["include"].message_type.fields_by_name["phase"].enum_type
    names = {value.number: value.name for value in enum.values}
    included = {names[rule.phase] for rule in layer.include if rule.HasField("phase")}
    result = included or {"TRAIN", "TEST"}
    result -= {names[rule.phase] for rule in layer.exclude if rule.HasField("phase")}
    return result

"""Reading 2014's V0 nets: `layers { layer { name type ... } bottom top }`, upgraded V0 -> V1 -> current.

    net = upgrade.to_current(prototxt.parse(text))     # what Caffe's upgrade_net_proto_text writes

This follows Caffe's upgrade_proto.cpp: UpgradeV0PaddingLayers (a "padding" layer folds into the conv/pool layer
reading it), UpgradeV0LayerParameter (V0's flat fields move into the typed *_param messages and transform_param),
UpgradeV0LayerType (lower-case names -> V1 enum values), UpgradeV1Net (V1 -> `layer {}` with string types) and
UpgradeNetInput (`input:` fields -> an Input layer, where the schema has one). Where Caffe only logs an error and
carries on (a field that does not belong to the layer's type), the field is dropped and a note says so.
Every field is looked up in the schema in use first: fork schemas differ.
"""
from __future__ import annotations

from pathlib import Path

from google.protobuf.message import Message

from caffetune.errors import NetError, PrototxtError
from caffetune.model import comments, layers, prototxt, textedit

# UpgradeV0LayerType: V0's type strings -> V1 enum names.
V0_TYPES = {
    "accuracy": "ACCURACY", "bnll": "BNLL", "concat": "CONCAT", "conv": "CONVOLUTION", "data": "DATA",
    "dropout": "DROPOUT", "euclidean_loss": "EUCLIDEAN_LOSS", "flatten": "FLATTEN", "hdf5_data": "HDF5_DATA",
    "hdf5_output": "HDF5_OUTPUT", "im2col": "IM2COL", "images": "IMAGE_DATA", "infogain_loss": "INFOGAIN_LOSS",
    "innerproduct": "INNER_PRODUCT", "lrn": "LRN", "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS",
    "pool": "POOLING", "relu": "RELU", "sigmoid": "SIGMOID", "softmax": "SOFTMAX", "softmax_loss": "SOFTMAX_LOSS",
    "split": "SPLIT", "tanh": "TANH", "window_data": "WINDOW_DATA",
}
_LEARNED = {"conv": "convolution_param", "innerproduct": "inner_product_param"}
_SPATIAL = {"conv": "convolution_param", "pool": "pooling_param"}
_SOURCES = {"data": "data_param", "hdf5_data": "hdf5_data_param", "images": "image_data_param",
            "window_data": "window_data_param"}
_WINDOW = {"window_data": "window_data_param"}
_IMAGES = {"images": "image_data_param"}
# V0 field -> (target field, {V0 type: V1 *_param}); None as the table: transform_param, for every type.
_FIELDS = {
    "num_output": ("num_output", _LEARNED), "biasterm": ("bias_term", _LEARNED),
    "weight_filler": ("weight_filler", _LEARNED), "bias_filler": ("bias_filler", _LEARNED),
    "pad": ("pad", _SPATIAL), "kernelsize": ("kernel_size", _SPATIAL),
    "group": ("group", {"conv": "convolution_param"}),
    "stride": ("stride", _SPATIAL), "pool": ("pool", {"pool": "pooling_param"}),
    "dropout_ratio": ("dropout_ratio", {"dropout": "dropout_param"}),
    "local_size": ("local_size", {"lrn": "lrn_param"}), "alpha": ("alpha", {"lrn": "lrn_param"}),
    "beta": ("beta", {"lrn": "lrn_param"}), "k": ("k", {"lrn": "lrn_param"}),
    "source": ("source", {**_SOURCES, "infogain_loss": "infogain_loss_param"}),
    "batchsize": ("batch_size", _SOURCES), "rand_skip": ("rand_skip", {"data": "data_param", **_IMAGES}),
    "shuffle_images": ("shuffle", _IMAGES), "new_height": ("new_height", _IMAGES),
    "new_width": ("new_width", _IMAGES), "concat_dim": ("concat_dim", {"concat": "concat_param"}),
    "det_fg_threshold": ("fg_threshold", _WINDOW), "det_bg_threshold": ("bg_threshold", _WINDOW),
    "det_fg_fraction": ("fg_fraction", _WINDOW), "det_context_pad": ("context_pad", _WINDOW),
    "det_crop_mode": ("crop_mode", _WINDOW), "hdf5_output_param": (None, {"hdf5_output": "hdf5_output_param"}),
    "scale": ("scale", None), "meanfile": ("mean_file", None), "cropsize": ("crop_size", None),
    "mirror": ("mirror", None),
}
_COPIED = ("name", "type", "blobs", "blobs_lr", "weight_decay")


def is_v0(net: Message) -> bool:
    """True when some `layers {}` entry holds a V0 `layer {}` (Caffe's NetNeedsV0ToV1Upgrade)."""
    fields = net.DESCRIPTOR.fields_by_name
    if "layers" not in fields or "layer" not in fields["layers"].message_type.fields_by_name:
        return False
    return any(entry.HasField("layer") for entry in net.layers)


def _fold_padding(net: Message) -> list[Message]:
    """UpgradeV0PaddingLayers: drop "padding" layers; the conv/pool layer reading one takes its pad and bottom."""
    last_writer: dict[str, Message] = {}
    kept = []
    for entry in net.layers:
        if entry.layer.type != "padding":
            kept.append(_copy(entry))
        for slot, blob in enumerate(entry.bottom):
            source = last_writer.get(blob)
            if source is None or source.layer.type != "padding":
                continue
            if entry.layer.type not in ("conv", "pool") or len(entry.bottom) != 1 or len(source.bottom) != 1:
                raise NetError(f"V0 padding layer {source.layer.name} feeds {entry.layer.name or '?'}, which is "
                               f"not a single-input conv or pool layer; Caffe cannot upgrade that",
                               where=entry.layer.name or None, fix="remove the padding layer and set pad by hand")
            kept[-1].layer.pad = source.layer.pad
            kept[-1].bottom[slot] = source.bottom[0]
        for blob in entry.top:
            last_writer[blob] = entry
    return kept


def _copy(message: Message) -> Message:
    duplicate = type(message)()
    duplicate.CopyFrom(message)
    return duplicate


def _set(target: Message, name: str, value, notes: list[str], where: str) -> None:
    """Set a scalar, message or (for repeated fields such as conv pad) append; a field the schema lacks is noted."""
    fields = target.DESCRIPTOR.fields_by_name
    if name not in fields:
        notes.append(f"{where}: {target.DESCRIPTOR.name} has no field {name} in this schema; dropped")
        return
    field = fields[name]
    if field.label == field.LABEL_REPEATED:
        getattr(target, name).append(value)
    elif field.message_type is not None:
        getattr(target, name).CopyFrom(value)
    elif field.enum_type is not None:
        setattr(target, name, field.enum_type.values_by_name[_enum_name(value)].number)
    else:
        setattr(target, name, value)


def _enum_name(value) -> str:
    return value if isinstance(value, str) else {0: "MAX", 1: "AVE", 2: "STOCHASTIC"}.get(value, str(value))


def _v0_layer_to_v1(entry: Message, notes: list[str]) -> Message:
    """UpgradeV0LayerParameter for one `layers { layer {...} bottom top }` entry."""
    result = type(entry)()
    result.bottom[:], result.top[:] = list(entry.bottom), list(entry.top)
    v0 = entry.layer
    where = v0.name or "?"
    if v0.name:
        result.name = v0.name
    if v0.HasField("type"):
        enum = result.DESCRIPTOR.fields_by_name["type"].enum_type
        if v0.type not in V0_TYPES or V0_TYPES[v0.type] not in enum.values_by_name:
            raise NetError(f"unknown V0 layer type {v0.type!r}", where=where,
                           fix=f"V0 types are: {', '.join(sorted(V0_TYPES))}")
        result.type = enum.values_by_name[V0_TYPES[v0.type]].number
    result.blobs.extend(v0.blobs)
    result.blobs_lr[:] = list(v0.blobs_lr)
    result.weight_decay[:] = list(v0.weight_decay)
    for field, value in v0.ListFields():
        if field.name in _COPIED:
            continue
        target_name, table = _FIELDS.get(field.name, (field.name, {}))
        if table is None:
            _set(result.transform_param, target_name, _pool_value(field, value), notes, where)
        elif v0.type in table and table[v0.type] in result.DESCRIPTOR.fields_by_name:
            params = getattr(result, table[v0.type])
            if target_name is None:
                params.CopyFrom(value)
            else:
                _set(params, target_name, _pool_value(field, value), notes, where)
        else:
            notes.append(f"{where}: V0 field {field.name} does not apply to a {v0.type!r} layer; dropped "
                         f"(as Caffe does)")
    return result


def _pool_value(field, value):
    """V0 enums (pool: MAX) are written by name into the new message's enum."""
    return field.enum_type.values_by_number[value].name if field.enum_type is not None else value


def v0_to_v1(net: Message) -> tuple[Message, list[str]]:
    """UpgradeV0Net: the V1 net (`layers {}` with enum types) of a V0 net, and notes on what was dropped."""
    notes: list[str] = []
    result = _copy(net)
    entries = [_v0_layer_to_v1(entry, notes) for entry in _fold_padding(net)]
    del result.layers[:]
    result.layers.extend(entries)
    return result, notes


def _upgrade_v1_data(entry: Message) -> None:
    """UpgradeNetDataTransformation: scale/mean_file/crop_size/mirror move from the data params to transform_param."""
    for name in ("data_param", "image_data_param", "window_data_param"):
        if name not in entry.DESCRIPTOR.fields_by_name or not entry.HasField(name):
            continue
        params = getattr(entry, name)
        for field in ("scale", "mean_file", "crop_size", "mirror"):
            if field in params.DESCRIPTOR.fields_by_name and params.HasField(field):
                setattr(entry.transform_param, field, getattr(params, field))
                params.ClearField(field)


def v1_to_current(net: Message) -> Message:
    """UpgradeV1Net: `layers { type: ENUM }` -> `layer { type: "String" }` (name, blobs, param specs, rules, every
    same-named *_param)."""
    result = _copy(net)
    del result.layers[:]
    for old in net.layers:
        old = _copy(old)
        _upgrade_v1_data(old)
        new = result.layer.add()
        if old.HasField("name"):
            new.name = old.name
        if old.HasField("type"):
            new.type = layers.type_name(old)
        new.bottom[:], new.top[:] = list(old.bottom), list(old.top)
        for rule in ("include", "exclude"):
            getattr(new, rule).extend(getattr(old, rule))
        new.blobs.extend(old.blobs)
        _param_specs(old, new)
        new.loss_weight[:] = list(old.loss_weight)
        for field, value in old.ListFields():
            target = new.DESCRIPTOR.fields_by_name.get(field.name)
            if field.name.endswith("_param") and target is not None and target.message_type is field.message_type:
                getattr(new, field.name).CopyFrom(value)
    return result


def _written(message: Message, name: str) -> list:
    """A repeated field's values, or [] where this schema's message has no such field."""
    return list(getattr(message, name)) if name in message.DESCRIPTOR.fields_by_name else []


def _param_specs(old: Message, new: Message) -> None:
    """V1's per-blob lists (param names, blob_share_mode, blobs_lr, weight_decay) -> `param {}` specs."""
    names, modes = _written(old, "param"), _written(old, "blob_share_mode")
    rates, decays = _written(old, "blobs_lr"), _written(old, "weight_decay")
    for index in range(max(len(names), len(modes), len(rates), len(decays))):
        spec = new.param.add()
        if index < len(names):
            spec.name = names[index]
        if index < len(modes):
            mode = old.DESCRIPTOR.fields_by_name["blob_share_mode"].enum_type.values_by_number[modes[index]].name
            spec.share_mode = spec.DESCRIPTOR.fields_by_name["share_mode"].enum_type.values_by_name[mode].number
        if index < len(rates):
            spec.lr_mult = rates[index]
        if index < len(decays):
            spec.decay_mult = decays[index]


def upgrade_input(net: Message) -> Message:
    """UpgradeNetInput: `input:` + `input_shape`/`input_dim` -> a first Input layer named "input", where the schema
    has an Input layer (forks that predate it keep the fields)."""
    layer_fields = net.DESCRIPTOR.fields_by_name["layer"].message_type.fields_by_name
    if not net.input or "input_param" not in layer_fields:
        return net
    result = _copy(net)
    has_shape = "input_shape" in net.DESCRIPTOR.fields_by_name and len(net.input_shape) > 0
    if has_shape or net.input_dim:
        layer = type(result.layer.add())()
        del result.layer[-1]
        layer.name, layer.type = "input", "Input"
        for number, blob in enumerate(net.input):
            layer.top.append(blob)
            shape = layer.input_param.shape.add()
            if has_shape:
                shape.CopyFrom(net.input_shape[number])
            else:
                shape.dim.extend(net.input_dim[number * 4:number * 4 + 4])
        entries = [layer] + [_copy(entry) for entry in result.layer]
        del result.layer[:]
        result.layer.extend(entries)
    for field in ("input", "input_shape", "input_dim"):
        if field in result.DESCRIPTOR.fields_by_name:
            result.ClearField(field)
    return result


def to_current(net: Message) -> tuple[Message, list[str]]:
    """A V0 net as Caffe's upgrade_net_proto_text writes it (V0 -> V1 -> current, inputs as an Input layer)."""
    v1, notes = v0_to_v1(net)
    return upgrade_input(v1_to_current(v1)), notes


def repair_layer_keys(text: str) -> tuple[str, list[str]]:
    """`layers { type: "Softmax" ... }` blocks (a current layer under the V1 key: its type is a string, which no V1
    enum accepts) re-keyed as `layer {`; returns the text and the names of the blocks re-keyed."""
    nodes = textedit.try_scan(text)
    if nodes is None:
        return text, []
    edits, names = [], []
    for node in nodes:
        kinds = {child.name: text[child.value_start:child.value_end] for child in node.children or []}
        if node.name == "layers" and kinds.get("type", "")[:1] in ("'", '"') and \
                text.startswith("layers", node.start):
            edits.append(node.start)
            names.append(kinds.get("name", "?").strip("'\""))
    for start in reversed(edits):
        text = text[:start] + "layer" + text[start + len("layers"):]
    return text, names


def read_net(text: str, path: str = "<text>") -> tuple[str, Message, list[str]]:
    """(text, net, notes) for a net's text as Caffe would read it: a V0 net upgraded to the current format (the text
    becomes its canonical form, comments kept), `layers {}` blocks with string types re-keyed as `layer {}`."""
    notes: list[str] = []
    try:
        net = prototxt.parse(text, path=path)
    except PrototxtError as error:
        repaired, names = repair_layer_keys(text)
        if not names:
            raise
        try:
            net = prototxt.parse(repaired, path=path)
        except PrototxtError:
            raise error from None
        text = repaired
        notes.append(f"{_file_name(path)}: `layers {{` block(s) {', '.join(names)} hold current layers (string "
                     f"types); read as `layer {{` (stock Caffe rejects the file as written)")
    if is_v0(net):
        layers.check_not_mixed(net, where=path)
        net, dropped = to_current(net)
        text = comments.canonical(text, net)
        notes += [f"{_file_name(path)} is a V0 net (2014 format): read as Caffe's upgrade_net_proto_text upgrades "
                  f"it to the current format (V0 -> V1 -> current)"] + dropped
    return text, net, notes


def load(path) -> tuple[Message, list[str]]:
    """Read a net file as `read_net` does (V0 upgraded, mis-keyed layers read): (net, notes)."""
    _, net, notes = read_net(prototxt.read_text(path), str(path))
    layers.check_not_mixed(net, where=str(path))
    return net, notes


def _file_name(path) -> str:
    """The file's name for a note (the plan is about that file; a full path would make notes differ per checkout)."""
    return Path(str(path)).name if path else "the net"

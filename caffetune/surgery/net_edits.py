"""Edits of a net message for fine-tuning: rename a head, set its class count, fillers, accuracy top_k, data layers.

Every function returns a new message and leaves the caller's untouched:

    net = net_edits.rename_layer(net, "fc8", "fc8_flickr")
    net = net_edits.set_num_output(net, "fc8_flickr", 20)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import Message

from caffetune.errors import NetError
from caffetune.model import layers, upgrade


def copy(message: Message) -> Message:
    result = type(message)()
    result.CopyFrom(message)
    return result


def _find(net: Message, name: str) -> tuple[int, Message]:
    for index, layer in enumerate(layers.all_layers(net)):
        if layer.name == name:
            return index, layer
    raise NetError(f"the net has no layer named {name}", where=name)


def rename_blob_after(net: Message, index: int, old: str, new: str) -> Message:
    """Rename blob `old` written by layer `index`: its top there, then every later bottom and in-place top on it,
    until another layer writes a blob of that name again."""
    result = copy(net)
    entries = layers.all_layers(result)
    entries[index].top[:] = [new if top == old else top for top in entries[index].top]
    for layer in entries[index + 1:]:
        rewrites_blob = old in layer.top and old not in layer.bottom
        layer.bottom[:] = [new if bottom == old else bottom for bottom in layer.bottom]
        if rewrites_blob:
            break
        layer.top[:] = [new if top == old else top for top in layer.top]
    return result


def rename_layer(net: Message, old: str, new: str) -> Message:
    """Rename a layer (so pretrained weights are not copied into it); its top blob follows when it carries the
    layer's name, as in Caffe's Flickr Style example (fc8 -> fc8_flickr)."""
    if old == new:
        return copy(net)
    names = [layer.name for layer in layers.all_layers(net)]
    if new in names:
        raise NetError(f"cannot rename {old} to {new}: the net already has a layer named {new}", where=old,
                       fix="choose another name with --name or --rename")
    index, _ = _find(net, old)
    result = copy(net)
    layer = layers.all_layers(result)[index]
    layer.name = new
    if old in layer.top:
        result = rename_blob_after(result, index, old, new)
    return result


def set_num_output(net: Message, name: str, count: int) -> Message:
    result = copy(net)
    _, layer = _find(result, name)
    params = layers.param_message(layer)
    if params is None or "num_output" not in params.DESCRIPTOR.fields_by_name:
        raise NetError(f"layer {name} ({layers.type_name(layer)}) has no num_output", where=name)
    params.num_output = count
    return result


def ensure_fillers(net: Message, name: str) -> tuple[Message, str | None]:
    """Give a new head the fillers of Caffe's Flickr Style example (gaussian std 0.01, bias 0) where it has none;
    Caffe's default filler is all zeros. Returns (net, a note saying what was added, or None)."""
    result = copy(net)
    _, layer = _find(result, name)
    params = layers.param_message(layer)
    added = {}    # which filler -> what it now is
    if params is not None and "weight_filler" in params.DESCRIPTOR.fields_by_name and not params.HasField(
            "weight_filler"):
        params.weight_filler.type, params.weight_filler.std = "gaussian", 0.01
        added["weight"] = "gaussian(std 0.01) weights"
    if params is not None and "bias_filler" in params.DESCRIPTOR.fields_by_name and params.bias_term and \
            not params.HasField("bias_filler"):
        params.bias_filler.type, params.bias_filler.value = "constant", 0
        added["bias"] = "constant(0) bias"
    if not added:
        return result, None
    missing = "no fillers" if len(added) == 2 else f"no {next(iter(added))} filler"
    return result, f"{name}: had {missing}; gave it {' and '.join(added.values())}"


def fix_accuracy_top_k(net: Message, classes: int) -> tuple[Message, list[str]]:
    """Accuracy layers with top_k > classes make Caffe abort; set their top_k to the class count.
    Returns (net, notes)."""
    result = copy(net)
    notes = []
    for layer in layers.all_layers(result):
        if layers.type_name(layer) == "Accuracy" and layer.accuracy_param.top_k > classes:
            notes.append(f"{layer.name}: top_k {layer.accuracy_param.top_k} > {classes} classes; set to {classes}")
            layer.accuracy_param.top_k = classes
    return result, notes


@dataclass(frozen=True)
class DataOptions:
    train_source: str | None = None
    val_source: str | None = None
    batch_size: int | None = None
    val_batch_size: int | None = None
    mean_file: str | None = None
    mean_value: tuple[float, ...] = ()
    crop_size: int | None = None
    mirror: bool | None = None            # the TRAIN layer's random left-right flip (None: leave as it is)


def source_kind(source: str) -> str:
    """"ImageData" for a list file (path label per line), "Data" for an LMDB directory."""
    path = Path(source)
    if path.is_dir() or (path.suffix == "" and not path.is_file()) or source.endswith("lmdb"):
        return "Data"
    return "ImageData"


def _set_type(layer: Message, type_string: str) -> None:
    if layers.is_v1_layer(layer):
        layer.type = layers.v1_type_value(layer.DESCRIPTOR, type_string)
    else:
        layer.type = type_string


def _set_source(layer: Message, source: str, train: bool) -> None:
    kind = source_kind(source)
    current = layers.type_name(layer)
    batch = layer.data_param.batch_size if current == "Data" else layer.image_data_param.batch_size
    if current != kind:
        _set_type(layer, kind)
        layer.ClearField("data_param" if kind == "ImageData" else "image_data_param")
        if kind == "ImageData":
            layer.image_data_param.batch_size = batch
            if train:
                layer.image_data_param.shuffle = True
        else:
            layer.data_param.batch_size = batch
    if kind == "Data":
        layer.data_param.source = source
        layer.data_param.backend = layer.data_param.LMDB   # Caffe's default backend is LEVELDB
    else:
        layer.image_data_param.source = source


def _set_batch(layer: Message, batch: int) -> None:
    if layers.type_name(layer) == "ImageData":
        layer.image_data_param.batch_size = batch
    else:
        layer.data_param.batch_size = batch


def _set_transform(layer: Message, options: DataOptions) -> None:
    transform = layer.transform_param
    if options.mean_file:
        transform.mean_file = options.mean_file
        transform.ClearField("mean_value")
    if options.mean_value:
        transform.mean_value[:] = list(options.mean_value)
        transform.ClearField("mean_file")
    if options.crop_size is not None:
        transform.crop_size = options.crop_size


def set_data_layers(net: Message, options: DataOptions) -> Message:
    """Point the TRAIN and TEST Data/ImageData layers at new sources, batch sizes, mean and crop."""
    if options.mean_file and options.mean_value:
        raise NetError("both a mean file and mean values were given; Caffe accepts only one",
                       fix="pass either --mean-file or --mean-value")
    result = copy(net)
    data_layers = [layer for layer in layers.all_layers(result) if layers.type_name(layer) in layers.SOURCE_DATA_TYPES]
    if not data_layers and (options.train_source or options.val_source):
        raise NetError("the net has no Data or ImageData layer to point at --train-source/--val-source",
                       fix="pass a train_val net (or a deploy net, from which caffetune builds one)")
    for layer in data_layers:
        phases = layers.phases(layer)
        train = "TRAIN" in phases
        source = options.train_source if train else options.val_source
        if source:
            _set_source(layer, source, train)
        batch = options.batch_size if train else (options.val_batch_size or options.batch_size)
        if batch:
            _set_batch(layer, batch)
        _set_transform(layer, options)
        if train and options.mirror is not None:
            layer.transform_param.mirror = options.mirror
    return result


def upgrade_v1(net: Message) -> Message:
    """The current-format (`layer {}`) equivalent of a V1 net, as Caffe's upgrade_net_proto_text writes it: the
    one upgrade of model/upgrade.py (data_param scale/mean/crop/mirror moved into transform_param, param specs,
    `input:` fields turned into an Input layer where the schema has one)."""
    if not layers.is_v1(net):
        return copy(net)
    return upgrade.upgrade_input(upgrade.v1_to_current(net))

"""Deploy <-> train_val derivation.

    train_val = derive.train_val_from_deploy(deploy, heads, classes=20, data=DataOptions(...))
    deploy = derive.deploy_from_train_val(train_val, heads)

A deploy net has an `Input` layer (or legacy `input:` fields) and no loss. Its train_val gets Data layers for TRAIN
and TEST (LMDB, mirror on TRAIN, crop to the input size), a SoftmaxWithLoss and Accuracy (top-1, and top-5 when
there are more than 5 classes) on each head, in place of the Softmax `prob`. A train_val's deploy net drops the data,
loss, accuracy and TRAIN-only layers, keeps only what feeds the main (last) head, and ends in a Softmax `prob`.
"""
from __future__ import annotations

from pathlib import Path

from google.protobuf.message import Message

from caffetune.data import lmdb_reader
from caffetune.errors import DatasetError, NetError
from caffetune.model import layers
from caffetune.model.heads import Head
from caffetune.surgery.net_edits import DataOptions, copy


def _is_loss(layer: Message) -> bool:
    return layers.type_name(layer).endswith("Loss")


def is_deploy(net: Message) -> bool:
    """An Input layer or `input:` fields, and no loss layer."""
    entries = layers.all_layers(net)
    has_input = len(net.input) > 0 or any(layers.type_name(layer) == "Input" for layer in entries)
    return has_input and not any(_is_loss(layer) for layer in entries)


def input_shape(net: Message) -> tuple[str, list[int]]:
    """The deploy net's input blob and its shape (N, C, H, W)."""
    for layer in layers.all_layers(net):
        if layers.type_name(layer) == "Input" and layer.top and "input_param" in layer.DESCRIPTOR.fields_by_name:
            shapes = layer.input_param.shape
            return layer.top[0], list(shapes[0].dim) if shapes else []
    if net.input:
        if "input_shape" in net.DESCRIPTOR.fields_by_name and net.input_shape:   # older schemas lack it
            return net.input[0], list(net.input_shape[0].dim)
        return net.input[0], list(net.input_dim[:4])
    raise NetError("the net has no Input layer or input: fields", fix="pass a deploy net or a train_val net")


def _replace_layers(net: Message, entries: list[Message]) -> None:
    field = layers.layer_field(net) if len(net.layer) or len(net.layers) else "layer"
    container = getattr(net, field)
    snapshot = [copy(layer) for layer in entries]
    del container[:]
    container.extend(snapshot)


def _new_layer(net: Message, type_string: str, name: str, bottoms, tops) -> Message:
    """A detached layer entry of the net's format (V1 enum type or current type string)."""
    v1 = layers.is_v1(net)
    layer = getattr(net, "layers" if v1 else "layer").add()
    layer.name = name
    if v1:
        layer.type = layers.v1_type_value(layer.DESCRIPTOR, type_string)
    else:
        layer.type = type_string
    layer.bottom[:], layer.top[:] = list(bottoms), list(tops)
    detached = copy(layer)
    del getattr(net, "layers" if v1 else "layer")[-1]
    return detached


def _phase_value(layer: Message, phase: str) -> int:
    enum = layer.DESCRIPTOR.fields_by_name["include"].message_type.fields_by_name["phase"].enum_type
    return enum.values_by_name[phase].number


def _data_layer(net: Message, blob: str, phase: str, crop: int | None, data: DataOptions) -> Message:
    layer = _new_layer(net, "Data", blob, [], [blob, "label"])
    layer.include.add().phase = _phase_value(layer, phase)
    train = phase == "TRAIN"
    layer.transform_param.mirror = train
    if crop:
        layer.transform_param.crop_size = data.crop_size or crop
    if data.mean_file:
        layer.transform_param.mean_file = data.mean_file
    layer.transform_param.mean_value[:] = list(data.mean_value)
    source = (data.train_source if train else data.val_source) or f"{phase.lower()}_lmdb"
    layer.data_param.source = source
    layer.data_param.batch_size = (data.batch_size if train else (data.val_batch_size or data.batch_size)) or \
        (32 if train else 16)
    layer.data_param.backend = layer.data_param.LMDB
    return layer


def _score_blob(net: Message, head: Head) -> str:
    """The blob the classifier consumers read for this head (the head's top, after any pass-through layers)."""
    for layer in layers.all_layers(net):
        if layer.name in head.consumers and layer.bottom:
            return layer.bottom[0]
    return head.top


def _loss_layers(net: Message, heads: list[Head], classes: int) -> list[Message]:
    added = []
    for number, head in enumerate(heads):
        suffix = "" if len(heads) == 1 else f"_{number + 1}"
        score = _score_blob(net, head)
        added.append(_new_layer(net, "SoftmaxWithLoss", f"loss{suffix}", [score, "label"], [f"loss{suffix}"]))
        for top_k in (1, 5) if classes > 5 else (1,):
            name = f"accuracy{suffix}" if top_k == 1 else f"accuracy_top{top_k}{suffix}"
            accuracy = _new_layer(net, "Accuracy", name, [score, "label"], [name])
            accuracy.include.add().phase = _phase_value(accuracy, "TEST")
            if top_k != 1:
                accuracy.accuracy_param.top_k = top_k
            added.append(accuracy)
    return added


def train_val_from_deploy(net: Message, heads: list[Head], classes: int, data: DataOptions | None = None) -> Message:
    """The train_val net for a deploy net whose heads are already renamed and resized."""
    data = data or DataOptions()
    blob, dims = input_shape(net)
    crop = dims[2] if len(dims) == 4 and dims[2] == dims[3] else None
    result = copy(net)
    for field in ("input", "input_shape", "input_dim"):
        if field in result.DESCRIPTOR.fields_by_name:
            result.ClearField(field)
    softmax_consumers = {name for head in heads for name in head.consumers}
    kept = [layer for layer in layers.all_layers(result) if layers.type_name(layer) != "Input"
            and not (layers.type_name(layer) == "Softmax" and layer.name in softmax_consumers)]
    data_layers = [_data_layer(result, blob, phase, crop, data) for phase in ("TRAIN", "TEST")]
    _replace_layers(result, data_layers + kept + _loss_layers(result, heads, classes))
    return result


def _declared_size(layer: Message) -> tuple[int, int, int] | None:
    """(channels, height, width) that an Input, DummyData or MemoryData layer declares for its first top."""
    kind = layers.type_name(layer)
    fields = layer.DESCRIPTOR.fields_by_name
    shaped = {"Input": "input_param", "DummyData": "dummy_data_param"}.get(kind)
    if shaped in fields:
        params = getattr(layer, shaped)
        dims = list(params.shape[0].dim) if params.shape else []
        if kind == "DummyData" and not dims and params.num:      # the legacy num/channels/height/width lists
            dims = [params.num[0], params.channels[0], params.height[0], params.width[0]]
        return tuple(dims[1:]) if len(dims) == 4 else None
    if kind == "MemoryData" and "memory_data_param" in fields:
        params = layer.memory_data_param
        return (params.channels, params.height, params.width) if params.height and params.width else None
    return None


def _stacked_channels(layer: Message, channels: int) -> int:
    """Channels of a video data layer that stacks `new_length` frames (TSN's VideoData, asked of the schema): two
    per optical-flow frame (x and y), else the image's channels per frame."""
    params = layers.param_message(layer)
    fields = params.DESCRIPTOR.fields_by_name if params is not None else {}
    if "new_length" not in fields:
        return channels
    modality = fields.get("modality")
    flow = modality is not None and modality.enum_type is not None and \
        modality.enum_type.values_by_number[params.modality].name == "FLOW"
    return params.new_length * (2 if flow else channels)


def _input_size(layer: Message) -> tuple[int, int, int]:
    """(channels, height, width) a data layer feeds: declared (Input, DummyData, MemoryData), else from its crop or
    resize settings or its LMDB's first Datum."""
    declared = _declared_size(layer)
    if declared:
        return declared
    transform = layer.transform_param
    channels = _stacked_channels(layer, 1 if len(transform.mean_value) == 1 else 3)
    if transform.crop_size:
        return channels, transform.crop_size, transform.crop_size
    image = layer.image_data_param
    if layers.type_name(layer) == "ImageData" and image.new_height and image.new_width:
        return (1 if image.is_color is False else 3), image.new_height, image.new_width
    if layers.type_name(layer) == "Data" and _datum_shape(layer.data_param.source):
        return _datum_shape(layer.data_param.source)
    raise NetError(f"cannot tell the input size of data layer {layer.name} (no crop_size)", where=layer.name,
                   fix="pass --crop-size, or write the deploy net by hand")


def _datum_shape(source: str) -> tuple[int, int, int] | None:
    """(channels, height, width) of the first Datum of an existing LMDB (the images a Data layer without crop feeds)."""
    if not source or not Path(source).is_dir():
        return None
    try:
        datum = lmdb_reader.first_datum(source)
    except DatasetError:
        return None
    return None if datum is None else (datum.channels, datum.height, datum.width)


def _needed_layers(entries: list[Message], outputs: set[str]) -> list[Message]:
    """The layers that contribute to `outputs`, walking backwards (in-place layers on a needed blob included)."""
    needed, kept = set(outputs), []
    for layer in reversed(entries):
        if needed & set(layer.top):
            kept.append(layer)
            needed |= set(layer.bottom)
    return list(reversed(kept))


def _is_data(layer: Message) -> bool:
    """Caffe's data layers, and a fork's (TSN's VideoData): no input, and a transform_param for what it reads."""
    if layers.type_name(layer) in layers.DATA_TYPES:
        return True
    return not layer.bottom and bool(layer.top) and "transform_param" in layer.DESCRIPTOR.fields_by_name and \
        layer.HasField("transform_param")


def _runs_in_test(layer: Message) -> bool:
    return "TEST" in layers.phases(layer)


def _deploy_score_blob(net: Message, head: Head) -> str:
    """What the deploy Softmax reads: the consumers' input, or the head's own per-sample scores when a Reshape on
    the way regroups the batch (a segment consensus, as TSN's deploy nets score each frame)."""
    kinds = {layer.name: layers.type_name(layer) for layer in layers.all_layers(net)}
    if any(kinds.get(name) == "Reshape" for name in head.path):
        return head.top
    return _score_blob(net, head)


def deploy_from_train_val(net: Message, heads: list[Head]) -> Message:
    """The deploy net of a train_val net: Input layer, the layers feeding the main head, Softmax `prob`."""
    entries = layers.all_layers(net)
    data = [layer for layer in entries if _is_data(layer)]
    if not data:
        raise NetError("the net has no data layer to derive the deploy input from")
    source = next((layer for layer in data if "TEST" in layers.phases(layer)), data[0])
    channels, height, width = _input_size(source)
    blob = source.top[0]
    main = heads[-1]
    score = _deploy_score_blob(net, main)
    body = [copy(layer) for layer in entries if not _is_data(layer) and not _is_loss(layer)
            and layers.type_name(layer) != "Accuracy" and _runs_in_test(layer)]
    for layer in body:
        layer.ClearField("include")
        layer.ClearField("exclude")
    result = copy(net)
    existing = next((layer for layer in body if layers.type_name(layer) == "Softmax" and layer.top
                     and list(layer.bottom[:1]) == [score]), None)
    if existing is not None:     # the net's own Softmax on the scores stays the output (no second `prob`)
        body = _needed_layers(body, {existing.top[0]})
    else:
        taken = {name for layer in body for name in [layer.name, *layer.top]}
        name = next(f"prob{suffix}" for suffix in ["", *(f"_{n}" for n in range(1, len(taken) + 2))]
                    if f"prob{suffix}" not in taken)       # another layer may already write `prob`
        prob = _new_layer(result, "Softmax", name, [score], [name])
        body = _needed_layers(body + [prob], {name})
    dims = [1, channels, height, width]
    layer_fields = result.DESCRIPTOR.fields_by_name["layer"].message_type.fields_by_name
    if layers.is_v1(net) or "input_param" not in layer_fields:
        _set_input_fields(result, blob, dims)
        _replace_layers(result, body)
    else:
        source_layer = _new_layer(result, "Input", blob, [], [blob])
        source_layer.input_param.shape.add().dim.extend(dims)
        _replace_layers(result, [source_layer] + body)
    return result


def _set_input_fields(net: Message, blob: str, dims: list[int]) -> None:
    """The legacy deploy input (`input:` + `input_dim:`), for V1 nets and for fork schemas that predate the Input
    layer; `input_shape {}` where the schema has it and the net is not V1 (what such forks read)."""
    net.input.append(blob)
    fields = net.DESCRIPTOR.fields_by_name
    if not layers.is_v1(net) and "input_shape" in fields:
        net.input_shape.add().dim.extend(dims)
    else:
        net.input_dim.extend(dims)

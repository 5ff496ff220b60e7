"""The second half of the class-count analysis (see class_layers): the class layers' multiples, box regressors
beside per-RoI classifiers, and the non-learnable settings that carry the class count K.

    class_layers(graph, anchors, count)       # each traced learnable layer: O = multiple x K, or refused

    add_regressors(graph, analysis)           # Fast/Faster R-CNN bbox_pred (4K), R-FCN rfcn_bbox (4K x k^2)
    add_settings(graph, analysis, anchors)    # num_classes, Reshape dims, output_dim, param_str, class_weighting
    label_layers(net, count)                  # center-loss style layers: K outputs indexed by the label
"""
from __future__ import annotations

from google.protobuf.message import Message

from caffetune.errors import NetError
from caffetune.model import layers
from caffetune.surgery.class_layers import (
    COUNT_KEY,
    DETECTION_CONSUMERS,
    PASS,
    PS_POOLING,
    ROI_POOLING,
    SOFTMAX_FAMILY,
    Analysis,
    ClassLayer,
    Setting,
    _Anchor,
    _Graph,
    _python_kind,
    _upstream_types,
    is_learnable,
)

BOX = 4                  # coordinates per box
AGNOSTIC_WIDTHS = (4, 8)  # one box, or background + object boxes (py-R-FCN's class-agnostic regression)


def background(graph: _Graph, anchors: list[_Anchor], task: str) -> bool | None:
    flags = {anchor.background for anchor in anchors if anchor.background is not None}
    if flags:
        return True in flags
    kinds = {graph.kind(i) for i in range(len(graph.entries))}
    return True if task == "detection" and kinds & ROI_POOLING else None


def class_layers(graph: _Graph, anchors: list[_Anchor], count: int) -> list[ClassLayer]:
    found: dict[int, ClassLayer] = {}
    for anchor in anchors:
        consumer = graph.entries[anchor.layer]
        for index, factor in anchor.trace.hits:
            layer = graph.entries[index]
            width = layers.num_output(layer)
            if width % count:
                raise NetError(f"{layer.name} has {width} outputs, not a multiple of the {count} classes "
                               f"{consumer.name} ({graph.kind(anchor.layer)}) sees", where=layer.name,
                               fix="check the net: its class count is inconsistent; nothing was rewritten")
            multiple = width // count
            if factor > 1 and multiple % factor:
                raise NetError(f"{layer.name} has {width} outputs, not {count} classes x {factor} position-"
                               f"sensitive maps", where=layer.name, fix="check the net's group_size and output_dim")
            previous = found.get(index)
            if previous is not None:
                continue
            found[index] = ClassLayer(layer.name, index, graph.kind(index), width, multiple,
                                      _reason(graph, anchor, multiple, factor), _group(layer), _fixed(layer))
    return [found[index] for index in sorted(found)]


def _reason(graph: _Graph, anchor: _Anchor, multiple: int, factor: int) -> str:
    layer, kind = graph.entries[anchor.layer], graph.kind(anchor.layer)
    scoring = kind in SOFTMAX_FAMILY or kind in DETECTION_CONSUMERS or kind.endswith("Loss")
    consumer = f"{layer.name} ({kind})" if scoring else f"the net's output {layer.top[0]}"
    if factor > 1:
        return f"{factor} position-sensitive maps per class, pooled for {consumer}"
    if multiple > 1:
        return f"{multiple} per location x classes, scores for {consumer}"
    return f"class scores for {consumer}"


def _group(layer: Message) -> int:
    params = layers.param_message(layer)
    return params.group if params is not None and "group" in params.DESCRIPTOR.fields_by_name else 1


def _fixed(layer: Message) -> bool:
    mults = layers.lr_mults(layer)
    return bool(mults) and all(m == 0 for m in mults) and (len(layer.param) > 0 or len(layer.blobs_lr) > 0)


def _ps_pool_after(graph: _Graph, index: int, hops: int = 3) -> int | None:
    """The PSROIPooling reading layer `index`'s output (directly or through pass-through layers), if any."""
    current = index
    for _ in range(hops):
        readers = [r for blob in graph.entries[current].top[:1] for r in graph.readers(blob, current)]
        pools = [r for r in readers if graph.kind(r) in PS_POOLING and graph.entries[r].bottom[0] in
                 graph.entries[current].top and _has_output_dim(graph.entries[r])]
        if pools:
            return pools[0]
        passing = [r for r in readers if graph.kind(r) in PASS and not layers.is_in_place(graph.entries[r])]
        if len(passing) != 1:
            return None
        current = passing[0]
    return None


def _has_output_dim(layer: Message) -> bool:
    params = layers.param_message(layer)
    return params is not None and "output_dim" in params.DESCRIPTOR.fields_by_name


def _per_roi(graph: _Graph, layer: ClassLayer) -> bool:
    return bool(_upstream_types(graph, layer.index) & ROI_POOLING) or _ps_pool_after(graph, layer.index) is not None


def add_regressors(graph: _Graph, analysis: Analysis) -> None:
    """Box regressors sharing the input of a per-RoI class layer: class-specific at 4K per RoI, else agnostic."""
    known = {layer.index for layer in analysis.layers}
    for cls in list(analysis.layers):
        source = graph.entries[cls.index].bottom[:1]
        if not source or not _per_roi(graph, cls):
            continue
        for index, layer in enumerate(graph.entries):
            if index in known or not is_learnable(layer) or layer.bottom[:1] != source:
                continue
            known.add(index)
            _add_regressor(graph, analysis, index, cls)


def _add_regressor(graph: _Graph, analysis: Analysis, index: int, cls: ClassLayer) -> None:
    layer, count = graph.entries[index], analysis.count
    width = layers.num_output(layer)
    pool = _ps_pool_after(graph, index)
    per_roi = layers.param_message(graph.entries[pool]).output_dim if pool is not None else width
    if per_roi == BOX * count and per_roi not in AGNOSTIC_WIDTHS:
        analysis.layers.append(ClassLayer(layer.name, index, graph.kind(index), width, width // count,
                                          f"class-specific box regression: {BOX} coordinates x classes per RoI, "
                                          f"beside {cls.name}", _group(layer), _fixed(layer)))
        analysis.layers.sort(key=lambda entry: entry.index)
        if pool is not None:
            analysis.settings.append(Setting(graph.entries[pool].name, ("psroi_pooling_param", "output_dim"),
                                             per_roi, BOX, f"pools {layer.name}: {BOX} x classes box maps"))
    elif per_roi in AGNOSTIC_WIDTHS and per_roi != BOX * count:
        analysis.kept.append(f"{layer.name}: class-agnostic box regression ({per_roi} per RoI), beside {cls.name}")
    elif per_roi == BOX * count:
        raise NetError(f"{layer.name} regresses {per_roi} values per RoI: class-specific ({BOX} x {count} classes) "
                       f"and class-agnostic read the same", where=layer.name,
                       fix="edit the net by hand for this class count; caffetune will not guess")


def add_settings(graph: _Graph, analysis: Analysis, anchors: list) -> None:
    _count_settings(graph, analysis)
    _reshape_dims(graph, analysis, anchors)
    _forward_reshapes(graph, analysis)
    analysis.kept += [f"{name}: label_map_file {value} (the names of the classes; list yours in it)"
                      for name, value in _label_maps(graph.net)]
    _ps_output_dims(graph, analysis, anchors)
    _python_counts(graph, analysis)
    analysis.settings += class_weightings(graph.net, analysis.count)
    _void_labels(graph, analysis, anchors)
    analysis.label_layers = label_layers(graph.net, analysis.count, {layer.index for layer in analysis.layers})


def _void_labels(graph: _Graph, analysis: Analysis, anchors: list) -> None:
    """A loss ignoring label K (SegNet's CamVid: 11 classes, void = 11) marks the old data's void label: kept,
    since your masks say which value is void, but said so (with N classes it need not be N)."""
    for index in dict.fromkeys(anchor.layer for anchor in anchors):
        layer = graph.entries[index]
        params = layer.loss_param if "loss_param" in layer.DESCRIPTOR.fields_by_name else None
        if params is not None and params.HasField("ignore_label") and params.ignore_label == analysis.count:
            analysis.kept.append(f"{layer.name}: loss_param.ignore_label {params.ignore_label} (the old data's void "
                                 f"label, numbered after its {analysis.count} classes: set your masks' void value)")


def _inconsistent(layer: Message, what: str, value, count: int) -> NetError:
    return NetError(f"{layer.name} ({layers.type_name(layer)}) has {what} {value}, but the class layers hold "
                    f"{count} classes", where=layer.name,
                    fix="make the net consistent first; caffetune will not half-rewrite it")


COUNT_FIELDS = frozenset({"num_classes", "num_class", "classes", "class_num", "n_classes", "nclasses"})


def count_fields(layer: Message) -> list[tuple[str, str, int]]:
    """(params field, count field, value) of each class count a layer's parameters hold: SSD's num_classes, a
    C++ proposal-target layer's num_classes (its schema default when unset), YOLO's classes ..."""
    own = layers.param_field_name(layer)
    found = []
    for fd in layer.DESCRIPTOR.fields:
        if fd.message_type is None or fd.label == fd.LABEL_REPEATED or not fd.name.endswith("_param"):
            continue
        if fd.name != own and not layer.HasField(fd.name):
            continue
        params = getattr(layer, fd.name)
        for inner in params.DESCRIPTOR.fields:
            if inner.name not in COUNT_FIELDS or inner.label == inner.LABEL_REPEATED or \
                    inner.cpp_type not in _INTEGER_TYPES:
                continue
            value = getattr(params, inner.name)
            if params.HasField(inner.name) or value:
                found.append((fd.name, inner.name, value))
    return found


_INTEGER_TYPES = frozenset({1, 2, 3, 4})   # FieldDescriptor.CPPTYPE_INT32, INT64, UINT32, UINT64


def _count_settings(graph: _Graph, analysis: Analysis) -> None:
    """Every class count a layer's parameters hold follows N; a two-way count of a class-agnostic part (an
    objectness score, proposal targets for class-agnostic boxes) stays."""
    agnostic_boxes = any("class-agnostic box regression" in line for line in analysis.kept)
    for index, layer in enumerate(graph.entries):
        kind = graph.kind(index)
        for field, key, value in count_fields(layer):
            where = f"{kind} {key}"
            if index in analysis.agnostic:
                analysis.kept.append(f"{layer.name}: {where} {value} (object / not object: class-agnostic)")
            elif value == analysis.count:
                analysis.settings.append(Setting(layer.name, (field, key), value, 1, where))
            elif value == 2 and agnostic_boxes and kind not in DETECTION_CONSUMERS:
                analysis.kept.append(f"{layer.name}: {where} 2 (targets of the class-agnostic box regression)")
            else:
                unset = "" if getattr(layer, field).HasField(key) else " (unset: the schema's default)"
                raise _inconsistent(layer, f"{field}.{key}{unset}", value, analysis.count)


def unknown_counts(graph: _Graph) -> None:
    """A net with no class layer caffetune can trace, but a layer holding a class count (YOLO's Region or
    DetectionLoss: outputs laid out as cells x (classes + box values)) is refused, never half-rewritten."""
    for index, layer in enumerate(graph.entries):
        for field, key, value in count_fields(layer):
            raise NetError(f"its {graph.kind(index)} layer holds a class count ({field}.{key}: {value}), but "
                           f"caffetune cannot tie it to the layers feeding it: their outputs are laid out by "
                           f"{graph.kind(index)} itself (such as YOLO's cells x (classes + box values))",
                           where=layer.name, fix=f"edit {layer.name} and the layers feeding it by hand for your "
                                                 f"class count; caffetune will not half-rewrite the net")


def _reshape_dims(graph: _Graph, analysis: Analysis, anchors: list) -> None:
    seen = set()
    for anchor in anchors:
        for index, axis in anchor.trace.reshapes:
            layer = graph.entries[index]
            dims = list(layer.reshape_param.shape.dim)
            positions = [axis % len(dims)] if axis is not None and -len(dims) <= axis < len(dims) else \
                [i for i, dim in enumerate(dims) if dim == analysis.count]
            for position in positions:
                if (index, position) in seen or dims[position] <= 0:
                    continue
                if dims[position] != analysis.count:
                    raise _inconsistent(layer, f"dim {position} =", dims[position], analysis.count)
                seen.add((index, position))
                analysis.settings.append(Setting(layer.name, ("reshape_param", "shape", "dim", position),
                                                 dims[position], 1, f"Reshape: class axis of "
                                                                    f"{graph.entries[anchor.layer].name}'s scores"))


def _forward_reshapes(graph: _Graph, analysis: Analysis) -> None:
    """Reshapes after a class layer or its Softmax (py-R-FCN's test nets reshape probabilities to [-1, 21] and
    class-specific boxes to [-1, 84]): a positive dim equal to the path's width per RoI follows N."""
    done = {(s.layer, s.path) for s in analysis.settings}
    for entry in analysis.layers:
        width = entry.num_output
        pool = _ps_pool_after(graph, entry.index)
        if pool is not None:
            width = layers.param_message(graph.entries[pool]).output_dim
        if width % analysis.count:
            continue
        for index in _downstream(graph, pool if pool is not None else entry.index):
            layer = graph.entries[index]
            dims = list(layer.reshape_param.shape.dim)
            for position, dim in enumerate(dims):
                path = ("reshape_param", "shape", "dim", position)
                if dim == width and (layer.name, path) not in done:
                    done.add((layer.name, path))
                    analysis.settings.append(Setting(layer.name, path, dim, width // analysis.count,
                                                     f"Reshape of {entry.name}'s outputs: "
                                                     f"{width // analysis.count} x classes per row"))


def _downstream(graph: _Graph, index: int, limit: int = 12) -> list[int]:
    """Reshape layers reached from layer `index`'s output through layers that keep its values per class."""
    found, frontier, seen = [], [index], {index}
    while frontier and len(seen) < limit * 4:
        current = frontier.pop()
        for blob in graph.entries[current].top[:1]:
            for reader in graph.readers(blob, current):
                kind = graph.kind(reader)
                if reader in seen or graph.entries[reader].bottom[:1] != [blob]:
                    continue
                seen.add(reader)
                if kind == "Reshape":
                    found.append(reader)
                if kind in PASS and not layers.is_in_place(graph.entries[reader]):
                    frontier.append(reader)
    return found


def _ps_output_dims(graph: _Graph, analysis: Analysis, anchors: list) -> None:
    seen = set()
    for anchor in anchors:
        for index in anchor.trace.ps_pools:
            layer = graph.entries[index]
            value = layers.param_message(layer).output_dim
            if index in seen:
                continue
            if value != analysis.count:
                raise _inconsistent(layer, "output_dim", value, analysis.count)
            seen.add(index)
            field = layers.param_field_name(layer)
            analysis.settings.append(Setting(layer.name, (field, "output_dim"), value, 1,
                                             "position-sensitive pooling of the class maps: one output per class"))


def _python_counts(graph: _Graph, analysis: Analysis) -> None:
    specific = any(layer.reason.startswith("class-specific box") for layer in analysis.layers)
    for layer in graph.entries:
        kind = _python_kind(layer)
        match = COUNT_KEY.search(layer.python_param.param_str) if kind else None
        if match is None:
            continue
        value = int(match.group("value"))
        where = f"{layer.python_param.module}.{layer.python_param.layer}"
        if kind != "count":
            raise NetError(f"Python layer {layer.name} ({where}) holds a class count in its param_str "
                           f"({match.group(0)}), and caffetune does not know what it means", where=layer.name,
                           fix="edit that param_str and the class layers by hand")
        if value == analysis.count:
            analysis.settings.append(Setting(layer.name, ("python_param", "param_str"), value, 1,
                                             f"{where} param_str {match.group('key')}"))
        elif value == 2 and not specific:
            analysis.kept.append(f"{layer.name}: {where} keeps '{match.group('key')}': 2 (class-agnostic box "
                                 f"targets: background + object)")
        else:
            raise _inconsistent(layer, f"param_str {match.group('key')}", value, analysis.count)


def class_weightings(net: Message, count: int) -> list[Setting]:
    """Per-class weight lists of losses (SegNet's loss_param.class_weighting): one entry per class."""
    found = []
    for layer in layers.all_layers(net):
        if "loss_param" not in layer.DESCRIPTOR.fields_by_name or not layer.HasField("loss_param"):
            continue
        params = layer.loss_param
        if "class_weighting" not in params.DESCRIPTOR.fields_by_name or not len(params.class_weighting):
            continue
        if len(params.class_weighting) != count:
            raise _inconsistent(layer, "class_weighting entries:", len(params.class_weighting), count)
        found.append(Setting(layer.name, ("loss_param", "class_weighting"), list(params.class_weighting), 0,
                             "per-class loss weights (one per class)"))
    return found


def label_layers(net: Message, count: int, skip: set[int] = frozenset()) -> list[ClassLayer]:
    """Layers with `count` outputs that read a classifier's label blob (center loss: one centre per class)."""
    entries = layers.all_layers(net)
    labels = {layer.bottom[1] for layer in entries
              if layers.type_name(layer) in SOFTMAX_FAMILY and len(layer.bottom) > 1}
    found = []
    for index, layer in enumerate(entries):
        if index in skip or layers.num_output(layer) != count or not labels & set(layer.bottom[1:]):
            continue
        found.append(ClassLayer(layer.name, index, layers.type_name(layer), count, 1,
                                f"one learned entry per class, indexed by the label blob {layer.bottom[1]}"))
    return found


def _label_maps(net: Message) -> list[tuple[str, str]]:
    """(layer, file) for every label_map_file a layer names (SSD's AnnotatedData, DetectionOutput save_output)."""
    found = []

    def visit(name: str, message: Message) -> None:
        for fd, value in message.ListFields():
            if fd.name == "label_map_file" and value:
                found.append((name, value))
            elif fd.message_type is not None:
                for item in (value if fd.label == fd.LABEL_REPEATED else [value]):
                    visit(name, item)

    for layer in layers.all_layers(net):
        visit(layer.name, layer)
    return list(dict.fromkeys(found))


def _describe(graph: _Graph, anchor: _Anchor) -> str:
    names = ", ".join(dict.fromkeys(graph.entries[i].name for i, _ in anchor.trace.hits))
    return f"{names} -> {graph.entries[anchor.layer].name}"


def choose_group(graph: _Graph, anchors: list[_Anchor], objectness: list[_Anchor],
                  chosen: tuple[str, ...]) -> list[_Anchor]:
    if chosen:
        anchors = [a for a in anchors if any(graph.entries[i].name in chosen for i, _ in a.trace.hits)]
    unknown = [a for a in anchors if a.count is None]
    if unknown:
        raise NetError(f"cannot tell how many classes {graph.entries[unknown[0].layer].name} sees: its scores come "
                       f"from " + ", ".join(graph.entries[i].name for i, _ in unknown[0].trace.hits),
                       where=graph.entries[unknown[0].layer].name,
                       fix="edit the class-dependent layers by hand; caffetune will not half-rewrite the net")
    if not anchors:
        agnostic = ", ".join(dict.fromkeys(graph.entries[i].name for a in objectness for i, _ in a.trace.hits))
        what = (f"only a class-agnostic objectness score ({agnostic})" if agnostic else
                "no learnable layer whose output reaches a class score consumer")
        counts = [f"{layer.name}'s {match.group(0)}" for layer in graph.entries if _python_kind(layer) == "count"
                  for match in [COUNT_KEY.search(layer.python_param.param_str)] if match]
        unread = f"; {', '.join(counts)} sizes no layer of this net" if counts else ""   # py-faster-rcnn RPN stage
        raise NetError(f"no class-dependent layer found: the net has {what}" +
                       (f" among --head {', '.join(chosen)}" if chosen else "") + unread,
                       fix="nothing depends on the class count here; train the net as it is, or name the class "
                           "layers with --head")
    counts = {}
    for anchor in anchors:
        counts.setdefault(anchor.count, []).append(anchor)
    if len(counts) > 1:
        listing = "; ".join(f"{count} classes: " + ", ".join(_describe(graph, a) for a in group)
                            for count, group in counts.items())
        raise NetError(f"the net has class outputs with different class counts ({listing})",
                       fix="choose one task's class layers with --head NAME (one of its layers is enough)")
    return anchors

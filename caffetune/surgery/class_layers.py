"""Finding every layer and setting of a detection or segmentation net that depends on the class count.

    analysis = class_layers.analyze(net)            # None for a plain classifier (see heads.find_heads)
    analysis.count, analysis.layers, analysis.settings, analysis.background

Everything is found from the graph and the layer types, never from layer names (docs/detection-segmentation.md).
The walk starts at the layers consuming class scores ("anchors"): detection layers (their `num_classes` is K;
their confidence input, and the location input when `share_location` is false, is traced) and softmax-family
layers (K is the class axis of the nearest Reshape on the path, else a PSROIPooling's `output_dim`, else the
producer's `num_output`). Tracing goes back through pass-through layers, PSROIPooling (group_size^2 maps per class)
and Deconvolutions (FCN's upscore layers); each learnable layer reached has O = m x K outputs and becomes m x N.

Two-way object / not object scores are class-agnostic and stay: a region proposal network's (it feeds a proposal
or anchor-target layer, or is reshaped as [0, 2, -1, 0]) and RefineDet's anchor refinement (read again by another
detection layer). The settings half (box regressors, counts in parameters, Reshape dims ...) is class_settings.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from google.protobuf.message import Message

from caffetune.errors import NetError
from caffetune.model import heads, layers

DETECTION_CONSUMERS = {"MultiBoxLoss": "multibox_loss_param", "DetectionOutput": "detection_output_param"}
COUNT_ONLY = {"DetectionEvaluate": "detection_evaluate_param"}   # num_classes, no class-score input
SOFTMAX_FAMILY = frozenset({"SoftmaxWithLoss", "Softmax", "Accuracy", "SigmoidCrossEntropyLoss", "Sigmoid",
                            "MultinomialLogisticLoss", "InfogainLoss", "HingeLoss", "ArgMax", "SoftmaxWithLossOHEM"})
# Layers whose output keeps the classes of their first input (activations, reshaping, resampling).
PASS = frozenset({"Dropout", "ReLU", "PReLU", "ELU", "TanH", "AbsVal", "Power", "Sigmoid", "Pooling", "Flatten",
                  "Reshape", "Permute", "Split", "BatchNorm", "BN", "Scale", "Bias", "Softmax", "Crop", "Upsample",
                  "Interp", "Normalize", "LRN", "MVN"})
MERGE = frozenset({"Eltwise", "Concat"})
GATING = frozenset({"Scale", "Eltwise", "Axpy", "Bias"})   # layers a probability gate multiplies features in
UPSAMPLING = frozenset({"Deconvolution", "Upsample", "Interp"})
PS_POOLING = frozenset({"PSROIPooling", "DeformablePSROIPooling"})
ROI_POOLING = frozenset({"ROIPooling", "ROIAlign", "ROIPool", "RoIPooling"}) | PS_POOLING
PROPOSAL_TYPES = frozenset({"Proposal", "ProposalLayer", "AnchorTarget", "AnchorTargetLayer", "RPNProposal"})
# Python layers of py-faster-rcnn / py-R-FCN: "count" ones hold num_classes in param_str (4 x num_classes box
# targets), "rpn" ones are the class-agnostic proposal machinery.
PYTHON_LAYERS = {("roi_data_layer.layer", "RoIDataLayer"): "count",
                 ("rpn.proposal_target_layer", "ProposalTargetLayer"): "count",
                 ("rpn.anchor_target_layer", "AnchorTargetLayer"): "rpn",
                 ("rpn.proposal_layer", "ProposalLayer"): "rpn"}
COUNT_KEY = re.compile(r"""(?P<q>['"]?)(?P<key>num_classes|n_classes|num_class|nclasses|classes)(?P=q)\s*:\s*"""
                       r"""(?P<value>\d+)""")


@dataclass
class ClassLayer:
    """A learnable layer whose output size is `multiple` x the class count."""

    name: str
    index: int
    type: str
    num_output: int
    multiple: int
    reason: str
    group: int = 1                     # convolution group (FCN's upscore: group = num_output)
    fixed: bool = False                # every lr_mult 0 (a fixed bilinear upsampler)

    def new_size(self, classes: int) -> int:
        return self.multiple * classes


@dataclass
class Setting:
    """A non-learnable value carrying the class count: `path` inside layer `layer` (field names and indices)."""

    layer: str
    path: tuple
    old: object
    multiple: int                      # new value = multiple x N (param_str: the number inside the text)
    reason: str


@dataclass
class Analysis:
    task: str                          # "detection" or "segmentation"
    count: int                         # K, the old class count
    background: bool | None            # K counts a background class (None: cannot tell)
    layers: list[ClassLayer] = field(default_factory=list)
    settings: list[Setting] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)       # class-agnostic layers left as they are, with why
    label_layers: list[ClassLayer] = field(default_factory=list)   # center-loss style, K outputs by label
    agnostic: set[int] = field(default_factory=set)     # detection layers scoring object / not object only


@dataclass
class _Trace:
    hits: list = field(default_factory=list)       # (index, factor)
    reshapes: list = field(default_factory=list)   # (index, class axis or None)
    ps_pools: list = field(default_factory=list)   # indices of PSROIPooling layers on the path
    upsampled: bool = False


class _Graph:
    def __init__(self, net: Message):
        self.net = net
        self.entries = layers.all_layers(net)

    def producer(self, blob: str, before: int) -> int | None:
        for index in range(before - 1, -1, -1):
            if blob in self.entries[index].top:
                return index
        return None

    def readers(self, blob: str, after: int) -> list[int]:
        """Layers after `after` reading `blob` (until it is written again by a layer not reading it)."""
        found = []
        for index in range(after + 1, len(self.entries)):
            layer = self.entries[index]
            if blob in layer.bottom:
                found.append(index)
            if blob in layer.top and blob not in layer.bottom:
                break
        return found

    def kind(self, index: int) -> str:
        return layers.type_name(self.entries[index])


def is_learnable(layer: Message) -> bool:
    return layers.num_output(layer) is not None and layers.learnable_blob_count(layer) > 0


def _softmax_axis(layer: Message) -> int:
    for name in ("softmax_param", "accuracy_param", "argmax_param"):
        if name in layer.DESCRIPTOR.fields_by_name and layer.HasField(name):
            params = getattr(layer, name)
            if "axis" in params.DESCRIPTOR.fields_by_name and params.HasField("axis"):
                return params.axis
    return 1


def _trace(graph: _Graph, blob: str, before: int, axis: int | None, trace: _Trace, factor: int = 1,
           depth: int = 0) -> None:
    """Walk back from `blob` to the learnable layers producing it; records hits, Reshapes and PSROIPoolings."""
    index = graph.producer(blob, before)
    if index is None or depth > 200:
        return
    layer, kind = graph.entries[index], graph.kind(index)
    if is_learnable(layer):
        trace.hits.append((index, factor))
        if kind == "Deconvolution" and layer.bottom:       # an upscore: its input has as many channels
            trace.upsampled = True
            upstream = _Trace()
            _trace(graph, layer.bottom[0], index, None, upstream, factor, depth + 1)
            width = layers.num_output(layer)
            trace.hits += [(i, f) for i, f in upstream.hits if layers.num_output(graph.entries[i]) == width]
        return
    if kind in PS_POOLING:
        params = layers.param_message(layer)
        if params is None or "group_size" not in params.DESCRIPTOR.fields_by_name or not layer.bottom:
            return
        trace.ps_pools.append(index)
        _trace(graph, layer.bottom[0], index, None, trace, factor * params.group_size ** 2, depth + 1)
        return
    if kind == "Reshape":
        trace.reshapes.append((index, axis))
        axis = None
    elif kind == "Softmax":
        axis = _softmax_axis(layer) if axis is None else axis
    elif kind in ("Permute", "Flatten"):
        axis = None
    if kind in UPSAMPLING:
        trace.upsampled = True
    if kind in MERGE:
        for bottom in layer.bottom:
            _trace(graph, bottom, index, axis, trace, factor, depth + 1)
    elif (kind in PASS or layers.is_in_place(layer)) and layer.bottom:
        _trace(graph, layer.bottom[0], index, axis, trace, factor, depth + 1)


def _reshape_dim(layer: Message, axis: int | None) -> int | None:
    dims = list(layer.reshape_param.shape.dim)
    if axis is None or not -len(dims) <= axis < len(dims):
        return None
    value = dims[axis]
    return value if value > 0 else None


@dataclass
class _Anchor:
    layer: int
    count: int | None
    trace: _Trace
    label: str | None = None           # the label blob of a loss
    detection: bool = False
    background: bool | None = None


def _detection_anchor(graph: _Graph, index: int) -> list[_Anchor]:
    layer = graph.entries[index]
    field = DETECTION_CONSUMERS[graph.kind(index)]
    if field not in layer.DESCRIPTOR.fields_by_name:
        raise NetError(f"{layer.name} is a {graph.kind(index)} layer, which the schema in use does not know",
                       where=layer.name, fix="pass the fork's caffe.proto with --proto (SSD: weiliu89/caffe)")
    params = getattr(layer, field)
    if not params.HasField("num_classes"):
        raise NetError(f"{layer.name} ({graph.kind(index)}) has no num_classes", where=layer.name,
                       fix="set num_classes in the layer (the count its confidence input holds)")
    background = not (params.HasField("background_label_id") and params.background_label_id < 0)
    anchors = []
    if len(layer.bottom) > 1:
        conf = _Trace()
        _trace(graph, layer.bottom[1], index, None, conf)
        anchors.append(_Anchor(index, params.num_classes, conf, detection=True, background=background))
    if layer.bottom and not params.share_location:       # one box per class: loc = priors x 4 x K
        loc = _Trace()
        _trace(graph, layer.bottom[0], index, None, loc)
        anchors.append(_Anchor(index, params.num_classes, loc, detection=True, background=background))
    return anchors


def _softmax_anchor(graph: _Graph, index: int) -> _Anchor | None:
    layer = graph.entries[index]
    if not layer.bottom:
        return None
    trace = _Trace()
    _trace(graph, layer.bottom[0], index, _softmax_axis(layer), trace)
    if not trace.hits:
        return None
    count = None
    if trace.reshapes:
        reshape, axis = trace.reshapes[0]
        count = _reshape_dim(graph.entries[reshape], axis)
    elif trace.ps_pools:
        pool = graph.entries[trace.ps_pools[0]]
        count = layers.param_message(pool).output_dim
    else:
        widths = {layers.num_output(graph.entries[i]) for i, factor in trace.hits if factor == 1}
        count = widths.pop() if len(widths) == 1 else None
    label = layer.bottom[1] if len(layer.bottom) > 1 else None
    return _Anchor(index, count, trace, label=label)


def _python_kind(layer: Message) -> str | None:
    if layers.type_name(layer) != "Python" or "python_param" not in layer.DESCRIPTOR.fields_by_name:
        return None
    module, name = layer.python_param.module, layer.python_param.layer
    for (known_module, known_layer), kind in PYTHON_LAYERS.items():
        if name == known_layer and (module == known_module or module.endswith("." + known_module)):
            return kind
    return "unknown"


def _is_rpn_layer(layer: Message) -> bool:
    return layers.type_name(layer) in PROPOSAL_TYPES or _python_kind(layer) == "rpn"


def _feeds_rpn(graph: _Graph, index: int, hops: int = 4) -> bool:
    """Does layer `index`'s output reach a proposal or anchor-target layer within a few layers?"""
    frontier = [index]
    for _ in range(hops):
        following = []
        for current in frontier:
            for blob in graph.entries[current].top:
                for reader in graph.readers(blob, current):
                    if _is_rpn_layer(graph.entries[reader]):
                        return True
                    following.append(reader)
        frontier = following
    return False


def _is_objectness(graph: _Graph, anchor: _Anchor) -> bool:
    """A region proposal network's two-way (object / not object) score: class-agnostic."""
    refines = anchor.count == 2 and _refines(graph, anchor)    # RefineDet's anchor refinement
    if anchor.detection or refines:
        return refines
    if anchor.label:
        source = graph.producer(anchor.label, anchor.layer)
        if source is not None and _is_rpn_layer(graph.entries[source]):
            return True
    if any(_feeds_rpn(graph, index) for index, _ in anchor.trace.hits):
        return True
    if anchor.count == 2 and anchor.trace.reshapes:
        dims = list(graph.entries[anchor.trace.reshapes[0][0]].reshape_param.shape.dim)
        return len(dims) == 4 and dims[1] == 2 and dims[2] == -1
    return False


def _refines(graph: _Graph, anchor: _Anchor) -> bool:
    """Are these two-way scores read again by another detection layer, past its loc/conf/prior/label inputs?
    RefineDet's anchor refinement: object / not object per prior, refining the priors of the class scores."""
    mine = {index for index, _ in anchor.trace.hits}
    for index, layer in enumerate(graph.entries):
        if index == anchor.layer or graph.kind(index) not in DETECTION_CONSUMERS:
            continue
        for blob in layer.bottom[3:]:
            trace = _Trace()
            _trace(graph, blob, index, None, trace)
            if mine & {hit for hit, _ in trace.hits}:
                return True
    return False


def _upstream_types(graph: _Graph, index: int, limit: int = 400) -> set[str]:
    """The types of every layer feeding layer `index` (breadth-first over all bottoms)."""
    seen, kinds, frontier = {index}, set(), [index]
    while frontier and len(seen) < limit:
        current = frontier.pop()
        for blob in graph.entries[current].bottom:
            producer = graph.producer(blob, current)
            if producer is not None and producer not in seen:
                seen.add(producer)
                kinds.add(graph.kind(producer))
                frontier.append(producer)
    return kinds


def find_anchors(net: Message) -> tuple[_Graph, list[_Anchor], list[_Anchor]]:
    """(graph, class anchors, objectness anchors) of the net."""
    graph = _Graph(net)
    anchors = []
    for index in range(len(graph.entries)):
        kind = graph.kind(index)
        if kind in DETECTION_CONSUMERS:
            anchors += _detection_anchor(graph, index)
        elif (kind in SOFTMAX_FAMILY or (kind.startswith("Softmax") and kind.endswith("Loss"))) and \
                not _is_gate(graph, index):
            anchor = _softmax_anchor(graph, index)
            if anchor is not None:
                anchors.append(anchor)
    anchors += _output_anchors(graph, {anchor.layer for anchor in anchors})
    objectness = [anchor for anchor in anchors if _is_objectness(graph, anchor)]
    agnostic = {index for anchor in objectness for index, _ in anchor.trace.hits}   # and their other readers
    objectness += [a for a in anchors if a not in objectness and a.trace.hits and
                   {index for index, _ in a.trace.hits} <= agnostic]
    return graph, [anchor for anchor in anchors if anchor not in objectness], objectness


def _is_gate(graph: _Graph, index: int) -> bool:
    """A Sigmoid/Softmax whose output multiplies features (squeeze-and-excitation, attention) scores no classes."""
    if graph.kind(index) not in ("Sigmoid", "Softmax") or not graph.entries[index].top:
        return False
    top = graph.entries[index].top[0]
    return any(graph.kind(reader) in GATING and len(graph.entries[reader].bottom) > 1
               for reader in graph.readers(top, index))


def _output_anchors(graph: _Graph, consumers: set[int]) -> list[_Anchor]:
    """Unscored per-pixel class maps that leave the net (an FCN deploy net's upsampled, cropped `score`)."""
    found, sinks = [], {blob for index, layer in enumerate(graph.entries) if not layer.top and layer.bottom and
                        graph.kind(index) != "Silence" and index not in consumers for blob in layer.bottom}
    for blob in sorted(heads.net_outputs(graph.entries) | sinks):   # sinks write blobs out (MatWrite, HDF5Output)
        index = graph.producer(blob, len(graph.entries))
        if index is None or index in consumers:
            continue
        trace = _Trace()
        _trace(graph, blob, len(graph.entries), 1, trace)
        widths = {layers.num_output(graph.entries[i]) for i, factor in trace.hits}
        if trace.upsampled and len(widths) == 1 and not trace.reshapes and not trace.ps_pools:
            found.append(_Anchor(index, widths.pop(), trace))
    return found


def dense_task(graph: _Graph, anchors: list[_Anchor]) -> str | None:
    """"detection", "segmentation", or None for a plain classifier."""
    kinds = {graph.kind(index) for index in range(len(graph.entries))}
    if kinds & (set(DETECTION_CONSUMERS) | set(COUNT_ONLY) | ROI_POOLING) or kinds & PROPOSAL_TYPES:
        return "detection"
    if any(_python_kind(layer) in ("rpn", "count") for layer in graph.entries):
        return "detection"
    for anchor in anchors:
        if anchor.trace.upsampled or any(_upstream_types(graph, index) & UPSAMPLING for index, _ in
                                         anchor.trace.hits) or _resampled_label(graph, anchor):
            return "segmentation"
    return None


def _resampled_label(graph: _Graph, anchor: _Anchor) -> bool:
    """Per-pixel labels resampled to the score map (DeepLab's label_shrink Interp): a segmentation loss."""
    source = graph.producer(anchor.label, anchor.layer) if anchor.label else None
    return source is not None and bool(({graph.kind(source)} | _upstream_types(graph, source)) & UPSAMPLING)


def analyze(net: Message, heads_chosen: tuple[str, ...] = ()) -> Analysis | None:
    """The class-dependent layers and settings of a detection/segmentation net; None for a plain classifier.
    Raises NetError when the dependence cannot be established consistently (nothing is half-rewritten)."""
    layers.check_not_mixed(net)
    graph, anchors, objectness = find_anchors(net)
    task = dense_task(graph, anchors + objectness) or ("detection" if objectness else None)  # CTPN: text / not
    from caffetune.surgery import class_settings  # the settings half of the analysis

    if task is None:
        class_settings.unknown_counts(graph)      # YOLO's Region / DetectionLoss: refused, not a classifier
        return None

    anchors = class_settings.choose_group(graph, anchors, objectness, heads_chosen)
    count = anchors[0].count
    analysis = Analysis(task, count, class_settings.background(graph, anchors, task))
    analysis.agnostic = {anchor.layer for anchor in objectness if anchor.detection}
    analysis.layers = class_settings.class_layers(graph, anchors, count)
    class_settings.add_regressors(graph, analysis)
    class_settings.add_settings(graph, analysis, anchors)
    analysis.kept += [f"{graph.entries[i].name}: class-agnostic objectness score "
                      f"({layers.num_output(graph.entries[i])} outputs: 2 per anchor, object / not object)"
                      for i in sorted({i for anchor in objectness for i, _ in anchor.trace.hits})]
    analysis.kept = list(dict.fromkeys(analysis.kept))
    return analysis


def summary(net: Message) -> tuple[list[str], str] | None:
    """For inspect and draw: (class-dependent layer names, one line about them) of a detection/segmentation net,
    None for a plain classifier."""
    try:
        analysis = analyze(net)
    except NetError as error:
        return [], f"class-dependent layers not established: {error.what}"
    if analysis is None:
        return None
    background = " (background included)" if analysis.background else ""
    settings = ", ".join(dict.fromkeys(setting.layer for setting in analysis.settings))
    return ([entry.name for entry in analysis.layers + analysis.label_layers],
            f"{analysis.task} net, {analysis.count} classes{background}; class-dependent layers"
            + (f", and settings in {settings}" if settings else ""))

"""Finding a net's classifier head(s): the learnable layers that write the class scores (docs/heads.md).

A head is a layer with learnable weights and a `num_output` (InnerProduct, Convolution - SqueezeNet's, NIN's and
DenseNet's heads are 1x1 convolutions -, Deconvolution, ...). It is found in one of two ways:

1. Scored heads: the learnable layers whose output reaches a class-scoring consumer (SoftmaxWithLoss, Accuracy,
   ArgMax, the class-scoring losses, and a Softmax or Sigmoid whose probabilities leave the net or are only
   scored) through layers that keep the class axis (activations, Dropout, Pooling, Flatten, Reshape, BatchNorm,
   Scale, Split, any in-place layer; Eltwise and Concat along another axis join several score paths, as in
   two-stream and segment-consensus nets). A Sigmoid read by other layers is an activation (squeeze-and-excitation
   gates, sigmoid CIFAR nets), never a consumer. GoogLeNet's train_val has three scored heads.
2. Output heads, only when no layer scores classes (deploy nets without a Softmax: R-CNN's fc-rcnn, TSN's
   fc-action, DenseNet's fc6): a learnable layer whose linear output is a net output (nothing reads it; no
   activation rewrites it) and whose input is a feature vector (globally pooled, or an earlier learnable layer's
   output that went through an activation or Dropout). Embeddings written on a spatial map (SphereFace's fc5) or
   on another linear layer (the siamese `feat`) and truncated feature extractors (fc7 -> ReLU) are not heads.

When the candidates disagree on the class count the net is ambiguous: the error ranks them, each with its reason.
The graph helpers (`net_outputs`, `producer`, `readers`, `score_sources`, `is_class_scoring`) are public so that
the detection/segmentation analysis can reuse them.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from google.protobuf.message import Message

from caffetune.errors import NetError
from caffetune.model import layers

# Consumers that read class scores (BVLC's types); fork losses are recognised by name (see is_class_scoring).
CLASS_SCORING = frozenset({"SoftmaxWithLoss", "Accuracy", "ArgMax", "SigmoidCrossEntropyLoss",
                           "MultinomialLogisticLoss", "InfogainLoss", "HingeLoss"})
# Probabilities: class-scoring only when they leave the net or are only scored; inside the net they are gates.
PROBABILITIES = frozenset({"Softmax", "Sigmoid"})
_CLASS_LOSS_WORDS = ("Softmax", "Sigmoid", "CrossEntropy", "Logistic", "Infogain", "Hinge", "Focal")
ACTIVATIONS = frozenset({"ReLU", "PReLU", "ELU", "TanH", "Sigmoid", "AbsVal", "BNLL", "Power", "Exp", "Log",
                         "Threshold", "Swish", "Clip", "ReLU6"})
# Layers whose output keeps the class axis of their (first) input.
KEEPS_CLASS_AXIS = ACTIVATIONS | {"Dropout", "Pooling", "Flatten", "Reshape", "Split", "BatchNorm", "Scale",
                                  "Bias", "MVN"}
# Layers that join several inputs without mixing classes (Concat only along another axis than the class axis).
JOINS = frozenset({"Eltwise", "Concat"})
# Layers that only consume a blob (Caffe's Silence): what they read leaves the net unused.
SINKS = frozenset({"Silence"})
# What may sit between an output head's input and the learnable layer or pooling that made the feature vector
# (Normalize: an L2-normalised feature, as in bilinear and NormFace nets; any in-place layer is element-wise).
_FEATURE_PASS = ACTIVATIONS | {"Dropout", "Flatten", "Reshape", "BatchNorm", "Scale", "Bias", "Split", "Normalize"}
# Layers that pool a spatial map into one feature vector besides global/average Pooling (bilinear pooling's
# outer product summed over positions: Bilinear, CompactBilinear).
_VECTOR_POOLS = ("Bilinear",)


@dataclass(frozen=True)
class Head:
    """A classifier layer to replace."""

    name: str            # layer name
    index: int           # position among the net's layers
    type: str            # current-format type string ("InnerProduct", "Convolution", ...)
    num_output: int      # the old class count
    top: str = ""        # the blob it writes
    consumers: tuple[str, ...] = ()   # the class-scoring layers its scores reach
    path: tuple[str, ...] = ()        # the layers between the head and those consumers (Reshape, Pooling, ...)
    reason: str = ""                  # why it is a head, in words


# --- graph helpers ------------------------------------------------------------------------------------------------

def producer(entries: list, blob: str, before: int) -> int | None:
    """Index of the last layer before position `before` that writes `blob`."""
    for index in range(before - 1, -1, -1):
        if blob in entries[index].top:
            return index
    return None


def readers(entries: list, blob: str, after: int) -> list[int]:
    """Indexes of the layers after position `after` that read `blob` as written at `after` (until rewritten)."""
    found = []
    for index in range(after + 1, len(entries)):
        layer = entries[index]
        if blob in layer.bottom:
            found.append(index)
        if blob in layer.top:      # rewritten (also in place): later reads see the new value
            break
    return found


def net_outputs(entries: list) -> set[str]:
    """Blobs nothing reads after their last write (what Caffe reports as the net's outputs)."""
    last_write: dict[str, int] = {}
    for index, layer in enumerate(entries):
        for blob in layer.top:
            last_write[blob] = index
    return {blob for blob, index in last_write.items()
            if not any(blob in entries[later].bottom for later in range(index + 1, len(entries)))}


def is_learnable_head_type(layer: Message) -> bool:
    """A layer that could be a head: learnable weights and a num_output."""
    return layers.num_output(layer) is not None and layers.learnable_blob_count(layer) > 0


def _is_scoring_type(kind: str) -> bool:
    if kind in CLASS_SCORING:
        return True
    return "Loss" in kind and any(word in kind for word in _CLASS_LOSS_WORDS)   # fork losses: FocalLoss, ...


def is_class_scoring(entries: list, index: int, outputs: set[str] | None = None) -> bool:
    """Whether the layer at `index` reads class scores: a class-scoring loss/Accuracy/ArgMax, or a Softmax/Sigmoid
    whose probabilities leave the net or are read only by class-scoring layers."""
    layer = entries[index]
    kind = layers.type_name(layer)
    if not layer.bottom:
        return False
    if kind not in PROBABILITIES:
        return _is_scoring_type(kind)
    outputs = net_outputs(entries) if outputs is None else outputs
    return bool(layer.top) and _only_scored(entries, layer.top[0], index, outputs, set())


def _only_scored(entries: list, blob: str, index: int, outputs: set[str], seen: set[int]) -> bool:
    """Whether `blob` (written at `index`) leaves the net or is read only by class-scoring layers, possibly through
    layers that keep the class axis (a consensus Reshape + Pooling after the Softmax)."""
    later = readers(entries, blob, index)
    if not later:
        return blob in outputs
    for position in later:
        reader = entries[position]
        if _is_scoring_type(layers.type_name(reader)) or layers.type_name(reader) in SINKS:
            continue
        if position in seen or is_learnable_head_type(reader) or not reader.top or \
                layers.type_name(reader) not in KEEPS_CLASS_AXIS | JOINS:
            return False
        seen.add(position)
        if not all(_only_scored(entries, top, position, outputs, seen) for top in reader.top):
            return False
    return True


def _field(message: Message | None, name: str, default=None):
    if message is None or name not in message.DESCRIPTOR.fields_by_name:
        return default
    return getattr(message, name) if message.HasField(name) else default


def class_axis(layer: Message) -> int:
    """The axis a consumer reads classes along (softmax_param/accuracy_param/argmax_param axis; default 1)."""
    for name in ("softmax_param", "accuracy_param", "argmax_param"):
        if name in layer.DESCRIPTOR.fields_by_name and layer.HasField(name):
            axis = _field(getattr(layer, name), "axis")
            if axis is not None:
                return axis
    return 1


def _concat_axis(layer: Message) -> int:
    params = layers.param_message(layer)
    axis = _field(params, "axis")
    if axis is None:
        axis = _field(params, "concat_dim", 1)
    return axis


def _keeps_class_axis(layer: Message, axis: int, activations: bool = True) -> bool:
    kind = layers.type_name(layer)
    if kind == "Concat":
        return _concat_axis(layer) != axis
    if kind in ACTIVATIONS:
        return activations
    return kind in KEEPS_CLASS_AXIS or kind in JOINS or layers.is_in_place(layer)


def score_sources(entries: list, blob: str, before: int, axis: int = 1,
                  activations: bool = True) -> tuple[list[int], list[int]]:
    """(heads, path): the learnable layers whose scores reach `blob` as read at position `before`, and the
    class-axis-keeping layers passed on the way (indexes, in net order); `activations=False` stops at activations
    (what passed through one is a feature, not a score)."""
    found, path, seen = set(), set(), set()
    pending = [(blob, before)]
    while pending:
        name, position = pending.pop()
        index = producer(entries, name, position)
        if index is None or index in seen:
            continue
        seen.add(index)
        layer = entries[index]
        if is_learnable_head_type(layer):
            found.add(index)
        elif layer.bottom and _keeps_class_axis(layer, axis, activations):
            path.add(index)
            joined = layers.type_name(layer) in JOINS
            pending.extend((bottom, index) for bottom in (layer.bottom if joined else layer.bottom[:1]))
    return sorted(found), sorted(path)


# --- the two rules ------------------------------------------------------------------------------------------------

def _reconstructs_input(entries: list, position: int) -> bool:
    """Whether a loss compares its input with what the net itself reads (an autoencoder's reconstruction loss):
    its target, followed back through shape-only layers, is a blob some learnable layer also reads."""
    layer = entries[position]
    if len(layer.bottom) < 2:
        return False
    blob, index = layer.bottom[1], position
    while True:
        readers_of = [entries[i] for i in range(len(entries)) if i != position and blob in entries[i].bottom]
        if any(is_learnable_head_type(reader) for reader in readers_of):
            return True
        source = producer(entries, blob, index)
        if source is None or layers.type_name(entries[source]) not in ("Flatten", "Reshape", "Split") or \
                not entries[source].bottom:
            return False
        blob, index = entries[source].bottom[0], source


def _head(entries: list, index: int, consumers=(), path=(), reason: str = "") -> Head:
    layer = entries[index]
    return Head(name=layer.name, index=index, type=layers.type_name(layer), num_output=layers.num_output(layer),
                top=layer.top[0] if layer.top else "", consumers=tuple(consumers),
                path=tuple(entries[i].name for i in path), reason=reason)


def _consumer_text(entries: list, names: list[str]) -> str:
    kinds = {layer.name: layers.type_name(layer) for layer in entries}
    return ", ".join(f"{kinds.get(name, '?')} {name}" for name in names)


def traced_heads(net: Message) -> list[Head]:
    """Rule 1: every learnable layer whose scores reach a class-scoring consumer (before the class-count check)."""
    entries = layers.all_layers(net)
    outputs = net_outputs(entries)
    consumers: dict[int, list[str]] = {}
    paths: dict[int, set[int]] = {}
    for position, layer in enumerate(entries):
        if not is_class_scoring(entries, position, outputs) or _reconstructs_input(entries, position):
            continue
        found, path = score_sources(entries, layer.bottom[0], position, class_axis(layer))
        for index in found:
            consumers.setdefault(index, []).append(layer.name)
            paths.setdefault(index, set()).update(path)
    return [_head(entries, index, names, sorted(paths[index]),
                  f"its scores reach {_consumer_text(entries, names)}")
            for index, names in sorted(consumers.items())]


def _feature_vector_input(entries: list, layer: Message, index: int, sizes: dict | None) -> str | None:
    """Why the layer's input is a feature vector (a reason), or None. Its inferred spatial size must be 1 where
    shapes are known; and walking back through activations, Dropout and reshaping layers must reach a global or
    average pooling, or an InnerProduct after an activation or Dropout."""
    if len(layer.bottom) != 1:
        return None
    shape = (sizes or {}).get(layer.bottom[0])
    if shape and len(shape) > 2 and all(isinstance(d, int) for d in shape[2:]) and \
            any(d != 1 for d in shape[2:]):
        return None       # a spatial map: an embedding or a dense prediction, not a classifier
    blob, position, shaped = layer.bottom[0], index, ""
    while True:
        source = producer(entries, blob, position)
        if source is None:
            return None
        writer = entries[source]
        kind = layers.type_name(writer)
        if kind == "Pooling":
            params = layers.param_message(writer)
            if _field(params, "global_pooling", False) or _field(params, "pool") == 1:   # 1: AVE
                return f"it reads the pooled features of {writer.name}"
            return None
        if is_learnable_head_type(writer):
            return f"it reads the features of {writer.name} after {shaped}" \
                if shaped and kind == "InnerProduct" else None
        if any(word in kind for word in _VECTOR_POOLS):
            return f"it reads the {kind} pooled features of {writer.name}"
        sliced = _maxout_input(entries, writer, source)
        if sliced is not None:       # max-feature-map (LightCNN): an activation over the halves of one blob
            shaped = writer.name
            blob, position = sliced
            continue
        if not writer.bottom or (kind not in _FEATURE_PASS and not layers.is_in_place(writer)):
            return None
        if kind in ACTIVATIONS or kind == "Dropout":
            shaped = writer.name
        blob, position = writer.bottom[0], source


def _maxout_input(entries: list, layer: Message, index: int) -> tuple[str, int] | None:
    """(blob, position) that a maxout reads: an Eltwise MAX whose inputs are all the tops of one Slice, None for
    any other layer."""
    if layers.type_name(layer) != "Eltwise" or _field(layers.param_message(layer), "operation", 1) != 2:  # 2: MAX
        return None
    sources = {producer(entries, blob, index) for blob in layer.bottom}
    if len(sources) != 1 or None in sources:
        return None
    (source,) = sources
    splitter = entries[source]
    if layers.type_name(splitter) != "Slice" or set(splitter.top) != set(layer.bottom) or not splitter.bottom:
        return None
    return splitter.bottom[0], source


def _blob_sizes(net: Message) -> dict | None:
    """Inferred blob shapes (TEST phase) or None: only a hint, so any failure of inference is ignored."""
    from caffetune.model import shapes

    try:
        return shapes.infer(net, "TEST").blobs
    except Exception:    # noqa: BLE001 - fork layers, missing data sources: fall back to the structural rule
        return None


def output_heads(net: Message) -> list[Head]:
    """Rule 2: learnable layers whose linear scores leave the net unscored, computed from a feature vector."""
    entries = layers.all_layers(net)
    sizes, found = None, {}
    for blob in sorted(net_outputs(entries)):
        sources, path = score_sources(entries, blob, len(entries), activations=False)
        for index in sources:
            if index in found:
                continue
            if sizes is None:
                sizes = _blob_sizes(net) or {}
            why = _feature_vector_input(entries, entries[index], index, sizes)
            if why:
                found[index] = _head(entries, index, path=path,
                                     reason=f"its output {blob} leaves the net unscored and {why}")
    return [found[index] for index in sorted(found)]


def learnable_layers(net: Message) -> list[tuple[int, Message]]:
    """Every layer with learnable weights and a num_output, in order (the possible heads)."""
    return [(i, layer) for i, layer in enumerate(layers.all_layers(net)) if is_learnable_head_type(layer)]


def _describe(candidates) -> str:
    return ", ".join(f"{layer.name} ({layers.type_name(layer)}, num_output {layers.num_output(layer)})"
                     for _, layer in candidates) or "none"


def _named_heads(net: Message, names: list[str]) -> list[Head]:
    entries = layers.all_layers(net)
    by_name = {layer.name: i for i, layer in learnable_layers(net)}
    traced = {head.name: head for head in traced_heads(net) + output_heads(net)}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise NetError(f"--head {', '.join(missing)}: no learnable layer with num_output has that name",
                       where=missing[0], fix=f"choose among: {_describe(learnable_layers(net))}")
    return sorted((traced.get(name) or _head(entries, by_name[name], reason="named with --head")
                   for name in dict.fromkeys(names)), key=lambda head: head.index)


def rank(candidates: list[Head]) -> list[Head]:
    """Candidates best first: scored before unscored, more consumers first, later in the net first."""
    return sorted(candidates, key=lambda head: (-len(head.consumers), -head.index))


def _ambiguous(candidates: list[Head]) -> NetError:
    listing = "".join(f"\n  {number}. {head.name} ({head.type}, num_output {head.num_output}): {head.reason}"
                      for number, head in enumerate(rank(candidates), 1))
    return NetError(f"ambiguous classifier heads with different class counts:{listing}",
                    fix="choose the head(s) with --head NAME (repeatable)")


def candidate_heads(net: Message) -> list[Head]:
    """Rule 1's heads, else rule 2's (unchecked: they may disagree on the class count)."""
    return traced_heads(net) or output_heads(net)


def find_heads(net: Message, names: list[str] | None = None) -> list[Head]:
    """The classifier heads of `net` (or the layers `names`, validated). Raises NetError when none or ambiguous."""
    layers.check_not_mixed(net)
    if names:
        return _named_heads(net, list(names))
    found = candidate_heads(net)
    if not found:
        raise NetError("no classifier head found: no learnable layer's output reaches a Softmax, SoftmaxWithLoss, "
                       "Accuracy or similar layer, and no learnable layer writes a net output from pooled or "
                       "fully-connected features", fix=f"name the head with --head; candidates: "
                                                       f"{_describe(learnable_layers(net)[-5:])}")
    if len(Counter(head.num_output for head in found)) > 1:
        raise _ambiguous(found)
    return found

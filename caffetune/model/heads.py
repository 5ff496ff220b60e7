"""Finding a net's classifier head(s): the learnable layers whose scores feed a softmax, loss or accuracy.

A head is a layer with learnable weights and a `num_output` (InnerProduct, Convolution - SqueezeNet's head is a 1x1
convolution -, Deconvolution, ...) whose top reaches a classifier consumer (SoftmaxWithLoss, Softmax, Accuracy,
SigmoidCrossEntropyLoss, ...) directly or through pass-through layers (Dropout, ReLU, Pooling, Flatten, Reshape,
any in-place layer). GoogLeNet's train_val has three: loss1/classifier, loss2/classifier, loss3/classifier.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from google.protobuf.message import Message

from caffetune.model import layers
from caffetune.errors import NetError

CLASSIFIER_CONSUMERS = frozenset({
    "SoftmaxWithLoss", "Softmax", "Accuracy", "SigmoidCrossEntropyLoss", "Sigmoid", "MultinomialLogisticLoss",
    "InfogainLoss", "HingeLoss", "ArgMax",
})
PASS_THROUGH = frozenset({"Dropout", "ReLU", "PReLU", "ELU", "Pooling", "Flatten", "Reshape", "Split", "BatchNorm",
                          "Scale", "Bias", "Power", "TanH", "AbsVal"})


@dataclass(frozen=True)
class Head:
    """A classifier layer to replace."""

    name: str            # layer name
    index: int           # position among the net's layers
    type: str            # current-format type string ("InnerProduct", "Convolution", ...)
    num_output: int      # the old class count
    top: str = ""        # the blob it writes
    consumers: tuple[str, ...] = ()   # the classifier layers its scores reach


def _producer(entries: list, blob: str, before: int) -> int | None:
    """Index of the last layer before position `before` that writes `blob`."""
    for index in range(before - 1, -1, -1):
        if blob in entries[index].top:
            return index
    return None


def _is_passable(layer: Message) -> bool:
    return layers.type_name(layer) in PASS_THROUGH or layers.is_in_place(layer)


def _trace_back(entries: list, blob: str, before: int) -> int | None:
    """Walk from a consumer's score input back to the learnable layer producing it, through pass-through layers."""
    index = _producer(entries, blob, before)
    while index is not None:
        layer = entries[index]
        if layers.num_output(layer) is not None and layers.learnable_blob_count(layer) > 0:
            return index
        if not _is_passable(layer) or not layer.bottom:
            return None
        index = _producer(entries, layer.bottom[0], index)
    return None


def learnable_layers(net: Message) -> list[tuple[int, Message]]:
    """Every layer with learnable weights and a num_output, in order (the possible heads)."""
    return [(i, layer) for i, layer in enumerate(layers.all_layers(net))
            if layers.num_output(layer) is not None and layers.learnable_blob_count(layer) > 0]


def _describe(candidates) -> str:
    return ", ".join(f"{layer.name} ({layers.type_name(layer)}, num_output {layers.num_output(layer)})"
                     for _, layer in candidates) or "none"


def _head(index: int, layer: Message, consumers=()) -> Head:
    return Head(name=layer.name, index=index, type=layers.type_name(layer), num_output=layers.num_output(layer),
                top=layer.top[0] if layer.top else "", consumers=tuple(consumers))


def traced_heads(net: Message) -> list[Head]:
    """Every learnable layer whose output reaches a classifier consumer (before the class-count filter)."""
    entries = layers.all_layers(net)
    found: dict[int, list[str]] = {}
    for position, layer in enumerate(entries):
        if layers.type_name(layer) in CLASSIFIER_CONSUMERS and layer.bottom:
            index = _trace_back(entries, layer.bottom[0], position)
            if index is not None:
                found.setdefault(index, []).append(layer.name)
    return [_head(index, entries[index], consumers) for index, consumers in sorted(found.items())]


def _named_heads(net: Message, names: list[str]) -> list[Head]:
    by_name = {layer.name: (i, layer) for i, layer in learnable_layers(net)}
    traced = {head.name: head for head in traced_heads(net)}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise NetError(f"--head {', '.join(missing)}: no learnable layer with num_output has that name",
                       where=missing[0], fix=f"choose among: {_describe(learnable_layers(net))}")
    return sorted((traced.get(name) or _head(*by_name[name]) for name in dict.fromkeys(names)),
                  key=lambda head: head.index)


def find_heads(net: Message, names: list[str] | None = None) -> list[Head]:
    """The classifier heads of `net` (or the layers `names`, validated). Raises NetError when none or ambiguous."""
    layers.check_not_mixed(net)
    if names:
        return _named_heads(net, list(names))
    traced = traced_heads(net)
    if not traced:
        raise NetError("no classifier head found: no learnable layer's output reaches a Softmax, SoftmaxWithLoss, "
                       "Accuracy or similar layer", fix=f"name the head with --head; candidates: "
                                                        f"{_describe(learnable_layers(net)[-5:])}")
    counts = Counter(head.num_output for head in traced)
    if len(counts) > 1:
        listing = ", ".join(f"{h.name} ({h.type}, num_output {h.num_output})" for h in traced)
        raise NetError(f"ambiguous classifier heads with different class counts: {listing}",
                       fix="choose the head(s) with --head NAME (repeatable)")
    return traced

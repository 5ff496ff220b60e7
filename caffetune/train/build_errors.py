"""Caffe's messages when it cannot build a net, turned into what / where / why / fix.

pycaffe's build stops at the first CHECK and names neither the layer nor the cause in user terms; for the failures
users report most (a fork's layer type, an input smaller than a kernel, a loss comparing blobs of different sizes,
a layer given the wrong number of inputs), `explain` finds the layer in the net and says what to change. Other
messages are shown as caffe wrote them.
"""
from __future__ import annotations

import re

from google.protobuf.message import Message

from caffetune.errors import Problem
from caffetune.model import layers, shapes
from caffetune.train.checks_common import error, layer_where

# Layer types that exist only in a fork of Caffe, and the fork (these are the ones people meet most).
FORK_TYPES = {
    **dict.fromkeys(("Normalize", "PriorBox", "DetectionOutput", "DetectionEvaluate", "MultiBoxLoss",
                     "AnnotatedData", "Permute", "SmoothL1Loss"), "SSD (weiliu89/caffe)"),
    **dict.fromkeys(("Interp", "DenseCRF", "MatRead", "MatWrite", "SegAccuracy", "UniqueLabel"), "DeepLab"),
    **dict.fromkeys(("ROIPooling",), "py-faster-rcnn's caffe-fast-rcnn"),
    **dict.fromkeys(("ConvolutionDepthwise", "DepthwiseConvolution"), "a MobileNet fork"),
    **dict.fromkeys(("ShuffleChannel",), "a ShuffleNet fork"),
    **dict.fromkeys(("Upsample", "BN"), "a SegNet fork (caffe-segnet)"),
    **dict.fromkeys(("Region", "Reorg", "Yolov3", "YoloDetectionOutput"), "a YOLO fork"),
}
_SHAPE_FAILURE = re.compile(r"shape\[i\] >= 0|(height|width)_out.* > 0")


def explain(message: str, net: Message, name: str, phases: list[str]) -> Problem:
    """The problem for caffe's build failure `message` of net file `name` in `phases`."""
    phase = phases[0]
    for rule in (_unknown_type, _too_small, _loss_count, _label_count, _bottom_count):
        found = rule(message, net, name, phase)
        if found is not None:
            return found
    return error(f"caffe cannot build the {' and '.join(phases)} net: {message}", name,
                 "fix the layer named in caffe's message")


def _layers_of(net: Message, phase: str, kind: str) -> list[Message]:
    return [layer for layer in layers.all_layers(net) if layers.type_name(layer) == kind
            and phase in layers.phases(layer)]


def _unknown_type(message: str, net: Message, name: str, phase: str) -> Problem | None:
    match = re.search(r"Unknown layer type: (\S+)", message)
    if not match:
        return None
    kind = match.group(1)
    found = _layers_of(net, phase, kind) or [layer for layer in layers.all_layers(net)
                                             if layers.type_name(layer) == kind]
    where = layer_where(name, found[0]) if found else name
    fork = FORK_TYPES.get(kind)
    origin = f"it comes from {fork}" if fork else "it is not one of this Caffe's layers (a fork's, or misspelled)"
    return error(f"layer {found[0].name if found else '?'} has type {kind}, which this Caffe cannot build: {origin}",
                 where, "build that fork and pass its caffe binary (--caffe PATH) and caffe.proto (--proto); or "
                        "replace the layer with one of this Caffe's types (`caffetune doctor` shows which Caffe "
                        "is used)",
                 f"caffe stops with `Unknown layer type: {kind}` before training starts")


def _too_small(message: str, net: Message, name: str, phase: str) -> Problem | None:
    """A blob shape with a negative or zero side: the input got smaller than a kernel or a pooling window."""
    if not _SHAPE_FAILURE.search(message):
        return None
    inferred = shapes.infer(net, phase)
    for layer in layers.all_layers(net):
        outputs = [shape for shape in inferred.outputs.get(layer.name) or [] if shape]
        if any(dim <= 0 for shape in outputs for dim in shape):
            inputs = ", ".join("x".join(map(str, inferred.blobs.get(bottom) or ["?"])) for bottom in layer.bottom)
            return error(f"layer {layer.name} ({layers.type_name(layer)}) would output "
                         f"{'x'.join(map(str, outputs[0]))}: its input ({inputs}) is smaller than its kernel or "
                         "window", layer_where(name, layer),
                         "feed larger images (crop_size, or image_data_param new_height/new_width, or `caffetune "
                         "build-lmdb --resize`), or give this layer a smaller kernel_size/stride (or pad)",
                         f"caffe stops building the net with `{message.strip()}`")
    return None


def _loss_count(message: str, net: Message, name: str, phase: str) -> Problem | None:
    """SigmoidCrossEntropyLoss / EuclideanLoss compare two blobs value by value."""
    match = re.search(r"\((\d+) vs\. (\d+)\) (SIGMOID_CROSS_ENTROPY_LOSS|EUCLIDEAN_LOSS)", message)
    if not match:
        return None
    kind = {"SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "EUCLIDEAN_LOSS": "EuclideanLoss"}[match[3]]
    found = _layers_of(net, phase, kind)
    layer = found[0] if found else None
    bottoms = " and ".join(layer.bottom) if layer is not None else "its two inputs"
    fix = ("SigmoidCrossEntropyLoss takes one score per label value: for a single 0/1 label use num_output 1 on "
           "the head; for a class index (0..N-1) use SoftmaxWithLoss" if kind == "SigmoidCrossEntropyLoss"
           else "make the prediction and the target the same size (num_output = the target's values per image)")
    return error(f"loss layer {layer.name if layer is not None else kind} compares {bottoms}, of {match[1]} and "
                 f"{match[2]} values", layer_where(name, layer) if layer is not None else name, fix,
                 f"{kind} needs inputs of equal size; caffe stops building the net")


def _label_count(message: str, net: Message, name: str, phase: str) -> Problem | None:
    if "Number of labels must match number of predictions" not in message:
        return None
    found = [layer for layer in layers.all_layers(net) if layers.type_name(layer) in ("SoftmaxWithLoss", "Accuracy")
             and phase in layers.phases(layer)]
    where = layer_where(name, found[0]) if found else name
    return error(f"the label blob does not hold one class index per prediction ({message.strip()})", where,
                 "give the data and label the same batch_size, and one label per image (for per-pixel labels, a "
                 "label map of the score map's size; set the loss's axis when the class axis is not 1)",
                 "SoftmaxWithLoss and Accuracy read one label per prediction; caffe stops building the net")


def _bottom_count(message: str, net: Message, name: str, phase: str) -> Problem | None:
    match = re.search(r"(\w+) Layer takes (at least |at most |)(\d+) bottom blob", message)
    if not match:
        return None
    kind, bound, wanted = match[1], match[2].strip(), int(match[3])
    found = _layers_of(net, phase, kind)
    layer = found[0] if found else None
    given = len(layer.bottom) if layer is not None else "another number of"
    label = " (the label is missing: a deploy net's input has no label top)" if kind.endswith("Loss") or \
        kind == "Accuracy" else ""
    return error(f"layer {layer.name if layer is not None else kind} ({kind}) has {given} bottom blob(s); it takes "
                 f"{bound + ' ' if bound else ''}{wanted}{label}", layer_where(name, layer) if layer else name,
                 f"give it {wanted} bottom blob(s): for a loss or accuracy, the scores and the label top of the "
                 "data layer", "caffe stops building the net")

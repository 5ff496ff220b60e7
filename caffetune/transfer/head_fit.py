"""Fit a new classifier head on the pretrained features before fine-tuning (a linear probe as the head's start).

A renamed head starts from its filler: random scores, a large loss, and the first iterations of fine-tuning are
spent teaching it what the frozen (or slowly moving) features already say. Here the pretrained net (the new head
aside) runs once over the training set with Caffe's own data layer, in the TEST phase (centre crop, no mirror,
BatchNorm with its global statistics), the head's input features are collected, and a multinomial logistic
regression (softmax + cross-entropy, as SoftmaxWithLoss computes it, with L2 on the weights) is fitted to them with
L-BFGS. The fitted weights and bias become the head's blobs in a new caffemodel that also carries every pretrained
blob, so `caffe train -weights` starts where a linear probe ends ("linear probing, then fine-tuning").

Only InnerProduct heads are fitted: an InnerProduct layer computes exactly the probe's linear scores.
"""
from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf.message import Message

from caffetune.errors import DatasetError, NetError
from caffetune.model import caffe_tools, caffemodels, heads, layers, prototxt
from caffetune.surgery import solver
from caffetune.surgery.net_edits import copy
from caffetune.transfer import graft


@dataclass
class FitOptions:
    heads: list[str] = field(default_factory=list)    # head layers to fit (default: the net's new heads)
    l2: float = 1e-3                                    # L2 on the weights, per example (as a mean loss)
    max_images: int | None = None                       # use the first N training images only
    max_steps: int = 500                                # L-BFGS iterations


@dataclass
class HeadFit:
    name: str
    images: int
    features: int                                       # the head's input size per image
    classes: int
    loss: float                                         # mean cross-entropy on the training features
    accuracy: float                                     # top-1 on the training features
    steps: int

    def as_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass
class FitReport:
    fits: list[HeadFit]
    output: str
    forward_batches: int                                # forward passes of the training batch size
    batch_size: int
    graft: graft.Report | None = None

    def as_dict(self) -> dict:
        return {"fits": [fit.as_dict() for fit in self.fits], "output": self.output,
                "forward_batches": self.forward_batches, "batch_size": self.batch_size,
                "graft": self.graft.as_dict() if self.graft else None}


# --- the net that reads the training set in the TEST phase ------------------------------------------------------
def train_data_layer(net: Message) -> Message:
    """The one Data/ImageData layer that feeds the TRAIN phase."""
    found = [layer for layer in layers.all_layers(net)
             if layers.type_name(layer) in layers.SOURCE_DATA_TYPES and "TRAIN" in layers.phases(layer)]
    if len(found) != 1:
        raise NetError(f"fitting a head needs one TRAIN-phase Data or ImageData layer; the net has {len(found)}",
                       fix="pass the train_val.prototxt that `caffetune rewrite` wrote (its TRAIN data layer reads "
                           "the training LMDB)")
    if len(found[0].top) < 2:
        raise NetError("the TRAIN data layer has no label top", where=found[0].name,
                       fix="give the data layer two tops: data and label")
    return found[0]


def _as_test_reader(layer: Message) -> None:
    """Read the source in order, every image once, the TEST way: no mirror, no shuffle, no random skip."""
    phase = layer.DESCRIPTOR.fields_by_name["include"].message_type.fields_by_name["phase"].enum_type
    layer.ClearField("include")
    layer.ClearField("exclude")
    layer.include.add().phase = phase.values_by_name["TEST"].number
    layer.transform_param.ClearField("mirror")
    if layers.type_name(layer) == "ImageData":
        layer.image_data_param.ClearField("shuffle")
        layer.image_data_param.ClearField("rand_skip")
    else:
        layer.data_param.ClearField("rand_skip")


def probe_net(net: Message) -> Message:
    """A copy of `net` whose TEST phase reads the TRAIN data layer's source (in order, TEST transform)."""
    result = copy(net)
    train = train_data_layer(result)
    reader = copy(train)
    _as_test_reader(reader)
    field_name = layers.layer_field(result)
    kept = []
    for layer in getattr(result, field_name):
        runs_in_test = "TEST" in layers.phases(layer)
        if layer == train:
            kept += [copy(layer), reader] if not runs_in_test else [reader]
        elif not (layers.type_name(layer) in layers.SOURCE_DATA_TYPES and runs_in_test):
            kept.append(copy(layer))
    result.ClearField(field_name)
    getattr(result, field_name).extend(kept)
    return result


def training_set_size(layer: Message) -> int:
    """How many images the data layer's source holds (LMDB entries, or lines of an ImageData list)."""
    if layers.type_name(layer) == "Data" and layer.data_param.backend != layer.data_param.LMDB:
        raise DatasetError("fitting a head reads LMDB sources only; this one is LevelDB", where=layer.name,
                           fix="rebuild the data as LMDB with `caffetune build-lmdb`")
    source = layer.image_data_param.source if layers.type_name(layer) == "ImageData" else layer.data_param.source
    size = solver.dataset_size(source)
    if size is None:
        raise DatasetError("the training data does not exist", where=source,
                           fix="build it with `caffetune build-lmdb`, or fix the TRAIN data layer's source")
    return size


def batch_size(layer: Message) -> int:
    return (layer.image_data_param if layers.type_name(layer) == "ImageData" else layer.data_param).batch_size


# --- heads --------------------------------------------------------------------------------------------------------
def new_heads(net: Message, source_layers: set[str], names: list[str] | None = None) -> list[heads.Head]:
    """The heads to fit: the named ones, or every classifier head the source caffemodel has no weights for."""
    if names:
        chosen = heads.find_heads(net, names)
    else:
        chosen = [head for head in heads.find_heads(net) if head.name not in source_layers]
        if not chosen:
            raise NetError("every classifier head of the net has weights in the caffemodel: no new head to fit",
                           fix="rewrite the net first (`caffetune rewrite` renames the heads), or name one with "
                               "--head")
    for head in chosen:
        _check_fittable(net, head)
    return chosen


def _check_fittable(net: Message, head: heads.Head) -> None:
    layer = layers.all_layers(net)[head.index]
    if head.type != "InnerProduct":
        raise NetError(f"head {head.name} is a {head.type} layer; only InnerProduct heads can be fitted",
                       where=head.name, fix="fine-tune it from its filler instead (leave out --fit-head)")
    if layer.inner_product_param.axis not in (1, -3) and layer.inner_product_param.HasField("axis"):
        raise NetError(f"head {head.name} has inner_product_param.axis {layer.inner_product_param.axis}; only "
                       f"axis 1 (one example per row) can be fitted", where=head.name,
                       fix="fine-tune it from its filler instead (leave out --fit-head)")


# --- features -----------------------------------------------------------------------------------------------------
def _layer_after(names: list[str], name: str) -> str | None:
    index = names.index(name) + 1
    return names[index] if index < len(names) else None


def extract_features(pycaffe_net, head_layers: list[Message], label_blob: str, images: int, batch: int,
                     progress: Callable[[str], None]) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """Forward the net over `images` training images; each head's input (N x D) and the labels (N)."""
    names = list(pycaffe_net._layer_names)
    order = sorted(head_layers, key=lambda layer: names.index(layer.name))
    collected: dict[str, list[np.ndarray]] = {layer.name: [] for layer in order}
    labels = []
    passes = math.ceil(images / batch)
    for step in range(passes):
        start = None
        for layer in order:
            pycaffe_net.forward(start=start, end=layer.name)
            values = pycaffe_net.blobs[layer.bottom[0]].data
            collected[layer.name].append(values.reshape(values.shape[0], -1).copy())    # the blob is reused
            start = _layer_after(names, layer.name)
        labels.append(pycaffe_net.blobs[label_blob].data.reshape(-1).copy())
        progress(f"features: batch {step + 1}/{passes}")
    features = {name: np.concatenate(parts)[:images] for name, parts in collected.items()}
    return features, np.concatenate(labels)[:images].astype(np.int64), passes


def check_informative(features: np.ndarray, head: str, blob: str) -> None:
    """Refuse features that are the same for every image: there is nothing to fit (an all-zero caffemodel, say)."""
    if len(features) and np.ptp(features, axis=0).max() == 0:
        raise DatasetError(f"the input of head {head} (blob {blob}) is the same for every training image, so there "
                           f"is nothing to fit", where=head,
                           fix="check that --weights is the pretrained model (weights saved from a net without "
                               "fillers are all zero)")


# --- the fit ------------------------------------------------------------------------------------------------------
def _softmax_loss(params: np.ndarray, features: np.ndarray, onehot: np.ndarray, l2: float, bias: bool):
    classes, dims = onehot.shape[1], features.shape[1]
    coefficients = params[:classes * dims].reshape(classes, dims)
    scores = features @ coefficients.T + (params[classes * dims:] if bias else 0.0)
    scores -= scores.max(axis=1, keepdims=True)
    log_prob = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
    loss = -(onehot * log_prob).sum() / len(features) + 0.5 * l2 * (coefficients ** 2).sum()
    delta = (np.exp(log_prob) - onehot) / len(features)
    gradient = [(delta.T @ features + l2 * coefficients).ravel()]
    if bias:
        gradient.append(delta.sum(axis=0))
    return loss, np.concatenate(gradient)


def row_space(features: np.ndarray) -> np.ndarray:
    """An orthonormal basis (r x D) of the span of the feature rows."""
    _, singular, vt = np.linalg.svd(features.astype(np.float64), full_matrices=False)
    return vt[singular > singular[0] * 1e-10] if singular.size and singular[0] > 0 else vt[:1]


def fit_softmax(features: np.ndarray, labels: np.ndarray, classes: int, *, l2: float = 1e-3, bias: bool = True,
                max_steps: int = 500) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Multinomial logistic regression: (weights classes x D, bias or None, {loss, accuracy, steps})."""
    from scipy.optimize import minimize  # noqa: PLC0415 - only fitting needs scipy

    if labels.min() < 0 or labels.max() >= classes:
        raise DatasetError(f"the training labels go up to {labels.max()} but the head has {classes} outputs",
                           fix="rewrite the net with --classes set to the dataset's class count")
    onehot = np.eye(classes)[labels]
    # At the optimum the weights lie in the span of the feature rows (the gradient of the loss does, and the L2
    # term pulls any other component to zero), so with fewer images than features the fit runs, exactly, on the
    # images' coordinates in that span: a 4096-wide fc7 probed with 500 images becomes a 500-wide problem.
    basis = row_space(features) if len(features) < features.shape[1] else None
    reduced = features @ basis.T if basis is not None else features
    dims = reduced.shape[1]
    start = np.zeros(classes * dims + (classes if bias else 0))
    result = minimize(_softmax_loss, start, args=(reduced, onehot, l2, bias), jac=True, method="L-BFGS-B",
                      options={"maxiter": max_steps})
    coefficients = result.x[:classes * dims].reshape(classes, dims)
    coefficients = coefficients @ basis if basis is not None else coefficients
    offsets = result.x[classes * dims:] if bias else None
    scores = features @ coefficients.T + (offsets if bias else 0.0)
    full = np.concatenate([coefficients.ravel()] + ([offsets] if bias else []))
    stats = {"loss": float(_softmax_loss(full, features, onehot, 0.0, bias)[0]),
             "accuracy": float((scores.argmax(axis=1) == labels).mean()), "steps": int(result.nit)}
    return coefficients, offsets, stats


def head_blobs(layer: Message, coefficients: np.ndarray, offsets: np.ndarray | None) -> list[np.ndarray]:
    """The fitted values in the layer's blob layout (transposed weights when inner_product_param.transpose)."""
    matrix = coefficients.T if layer.inner_product_param.transpose else coefficients
    blobs = [np.ascontiguousarray(matrix, dtype="<f4")]
    if offsets is not None:
        blobs.append(np.ascontiguousarray(offsets, dtype="<f4"))
    return blobs


# --- the whole job ------------------------------------------------------------------------------------------------
def fit_heads(net_path: Path | str, source: Path | str, output: Path | str, options: FitOptions | None = None, *,
              caffe: str | None = None, check: bool = True,
              progress: Callable[[str], None] | None = None) -> FitReport:
    """Fit the net's new head(s) on the source weights' features of the training set; write `output`.
    `check`: run preflight first (data, weight shapes, pycaffe builds the net in a subprocess), so that a net
    Caffe cannot build is one clear error rather than an abort inside this process."""
    options = options or FitOptions()
    progress = progress or (lambda message: None)
    net_path, source, output = Path(net_path), Path(source), Path(output)
    if output.resolve() == source.resolve():
        raise NetError("the output would overwrite the pretrained caffemodel", where=str(output),
                       fix="write the fitted weights to a new file with -o")
    net = prototxt.load(net_path)
    layers.check_not_mixed(net, str(net_path))
    source_layers = {record.name for record in caffemodels.read_layers(source)}
    chosen = new_heads(net, source_layers, options.heads)
    by_name = {layer.name: layer for layer in layers.all_layers(net)}
    data_layer = train_data_layer(net)
    install = caffe_tools.find_caffe(caffe)
    if check:
        # The one import against the stage order (docs/architecture.md): fit-head runs run's own checks first.
        from caffetune.train import preflight  # noqa: PLC0415

        preflight.check({net_path.name: net}, weights=[source], install=install,
                        roles={net_path.name: "net"}).raise_for_problems()
    available = training_set_size(data_layer)
    images = min(available, options.max_images) if options.max_images else available
    if images == 0:
        raise DatasetError("the training set is empty", where=data_layer.name, fix="build it with images in it")
    batch = batch_size(data_layer) or 1
    features, labels, passes = _features(probe_net(net), source, [by_name[h.name] for h in chosen],
                                         data_layer.top[1], images, batch, install, progress)
    fits, blobs = [], {}
    for head in chosen:
        layer = by_name[head.name]
        check_informative(features[head.name], head.name, layer.bottom[0])
        progress(f"fitting {head.name}: {images} images x {features[head.name].shape[1]} features")
        bias = layer.inner_product_param.bias_term
        coefficients, offsets, stats = fit_softmax(features[head.name], labels, head.num_output, l2=options.l2,
                                                   bias=bias, max_steps=options.max_steps)
        blobs[head.name] = head_blobs(layer, coefficients, offsets)
        fits.append(HeadFit(head.name, images, features[head.name].shape[1], head.num_output, stats["loss"],
                            stats["accuracy"], stats["steps"]))
    report = graft.graft(source, net_path, output, fitted=blobs)
    return FitReport(fits, str(output), passes, batch, report)


def _features(probe: Message, source: Path, head_layers: list[Message], label_blob: str, images: int, batch: int,
              install: caffe_tools.CaffeInstall, progress) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    pycaffe = caffe_tools.import_pycaffe(install)
    pycaffe.set_mode_cpu()
    with tempfile.TemporaryDirectory(prefix="caffetune-fit-") as folder:
        path = Path(folder) / "probe.prototxt"
        path.write_text(prototxt.format(probe))
        pycaffe_net = pycaffe.Net(str(path), pycaffe.TEST, weights=str(source))
    return extract_features(pycaffe_net, head_layers, label_blob, images, batch, progress)

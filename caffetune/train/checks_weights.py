"""Preflight checks of the pretrained weights against the nets: what caffe copies, and whether it is worth copying.

- same-named layers must agree in blob count and shapes, or caffe stops while copying;
- weights that are constant (all zero: saved from a net without fillers) cannot be fine-tuned;
- a head that kept its pretrained name and size while the data has fewer classes: the old class weights are copied
  silently and the softmax keeps the old classes;
- weights that match no layer (nothing copied); a weights file that is an LFS pointer, an HTML page, a prototxt;
- layers that start from their fillers frozen (lr_mult 0), and BatchNorm using zero stored statistics in TRAIN.
Blob values are read only for the weight blob of each copied Convolution/InnerProduct/Deconvolution layer, as a
zero-copy view of the .caffemodel (one min/max pass over it).
"""
from __future__ import annotations

from pathlib import Path

from google.protobuf.message import Message

from caffetune.errors import CaffetuneError, Problem
from caffetune.model import caffemodels, layers
from caffetune.model import heads as heads_module
from caffetune.train.checks_common import Run, error, warning

RENAME_FIX = "rename it (a new layer name starts from scratch) or use `caffetune rewrite`"
_FILTER_TYPES = ("Convolution", "InnerProduct", "Deconvolution")


def read_pretrained(paths: list[Path]) -> tuple[dict, list[Problem]]:
    """Layer name -> blobs of the weights; with several files, later ones win as in Caffe's sequential copy."""
    merged, problems = {}, []
    for path in paths:
        if not Path(path).is_file():
            problems.append(error(f"weights file {path} does not exist", str(path),
                                  "check the path of the .caffemodel"))
            continue
        try:
            merged.update({record.name: record.blobs for record in caffemodels.read_layers(path)})
        except CaffetuneError as failure:
            problems.append(_unreadable(Path(path), failure))
    return merged, problems


def _unreadable(path: Path, failure: CaffetuneError) -> Problem:
    """A weights file caffe cannot parse, saying what it is when that can be told from its first bytes (a Git LFS
    pointer, an HTML page from a failed download, a text prototxt) or that it ends early."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    text = head.lower()
    why = "caffe stops with `Failed to parse NetParameter file` when it loads the weights"
    if text.startswith(b"version https://git-lfs"):
        return error(f"weights file {path} is a Git LFS pointer ({path.stat().st_size} bytes), not the weights",
                     str(path), "fetch the real file: `git lfs pull` in its repository (or download it directly)", why)
    if b"<html" in text or b"<!doctype" in text:
        return error(f"weights file {path} is an HTML page (a failed or redirected download), not a .caffemodel",
                     str(path), "download the .caffemodel again (from Google Drive: use the confirm link, or gdown)",
                     "caffe's parser reads the leading `<` as the end of an empty net: it copies nothing and trains "
                     "from scratch without a word (other pages stop it with `Failed to parse NetParameter file`)")
    if head and all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head) and (b"layer" in head or b"name" in head):
        return error(f"weights file {path} is a text file (a .prototxt?), not binary weights", str(path),
                     "pass the binary .caffemodel to --weights; the .prototxt describes the net", why)
    ends_early = "past the end" in failure.what
    return error(failure.what + (": the file ends early (an incomplete download or copy?)" if ends_early else ""),
                 str(path), "download or copy the .caffemodel again" if ends_early else
                 (failure.fix or "pass a .caffemodel written by Caffe"), why)


def _legacy(shape) -> tuple:
    return caffemodels.legacy_shape(tuple(shape)) or tuple(shape)


def _blob_matches(blob, target) -> bool:
    return caffemodels.shape_matches(blob, tuple(target)) or _legacy(blob.shape) == _legacy(target)


def _merged_shapes(run: Run, name: str) -> dict:
    merged = {}
    for key, found in run.param_shapes.items():
        if key.split(":")[0] == name:
            merged.update(found)
    return merged


def check_copy(run: Run) -> tuple[list[Problem], list[str], list[str]]:
    """(problems, layers copied from the weights, learnable layers initialised by their fillers)."""
    problems, copied, scratch = [], [], []
    for name, net in run.nets.items():
        built = _merged_shapes(run, name) or None
        for layer in layers.all_layers(net):
            count = len(built[layer.name]) if built and layer.name in built else layers.learnable_blob_count(layer)
            if count == 0:
                continue
            blobs = run.pretrained.get(layer.name)
            if blobs is None:
                scratch.append(layer.name)
                continue
            problem = _compare_layer(layer, blobs, count, built.get(layer.name) if built else None, name)
            if problem:
                problems.append(problem)
            else:
                copied.append(layer.name)
    return problems, list(dict.fromkeys(copied)), list(dict.fromkeys(scratch))


def _compare_layer(layer: Message, blobs: list, count: int, shapes: list | None, name: str) -> Problem | None:
    kind = layers.type_name(layer)
    where = f"{name}: layer {layer.name}"
    if len(blobs) != count:
        why = "bias_term differs" if kind in ("Convolution", "InnerProduct", "Deconvolution") else (
            "BatchNorm variants differ (Caffe's BatchNorm has 3 blobs; a fused BatchNorm+Scale has more)"
            if kind in ("BatchNorm", "Scale") else "the layer types differ")
        return error(f"layer {layer.name} has {len(blobs)} blob(s) in the weights but {count} in the net ({why}); "
                     "caffe would stop with 'Incompatible number of blobs'", where, RENAME_FIX)
    for index, (blob, target) in enumerate(zip(blobs, shapes or [])):
        if not _blob_matches(blob, target):
            return error(f"layer {layer.name} blob {index} has shape {tuple(blob.shape)} in the weights but "
                         f"{tuple(target)} in the net", where, RENAME_FIX)
    return None


# --- are the weights trained? ---------------------------------------------------------------------------------
def constant_blobs(paths: list[Path], names: set[str]) -> dict[str, float | None]:
    """Layer name -> the constant value of its weight blob (None when it varies), for the layers in `names`;
    later files win, as in Caffe's copy."""
    found: dict[str, float | None] = {}
    for path in paths:
        try:
            with caffemodels.Caffemodel(path) as model:
                for record in model.layers():
                    if record.name not in names or not record.blobs or not record.blobs[0].dtype:
                        continue
                    values = model.array(record.blobs[0])
                    if values.size < 2:
                        continue
                    low, high = float(values.min()), float(values.max())
                    found[record.name] = low if low == high else None
        except (CaffetuneError, OSError):
            continue  # read_pretrained has reported it
    return found


def check_constant_weights(run: Run, copied: list[str]) -> list[Problem]:
    """Copied filter weights that are all one value: every filter of the layer gets the same gradient and stays
    equal to the others (and zero weights pass no gradient to the layers below)."""
    kinds = {layer.name: layers.type_name(layer) for net in run.nets.values() for layer in layers.all_layers(net)}
    names = {name for name in copied if kinds.get(name) in _FILTER_TYPES}
    if not names:
        return []
    found = constant_blobs(run.weights, names)
    constant = {name: value for name, value in found.items() if value is not None}
    if not constant:
        return []
    shown = ", ".join(f"{name} (all {value:g})" for name, value in list(constant.items())[:6])
    files = ", ".join(Path(w).name for w in run.weights)
    why = ("the filters of such a layer are all equal and receive equal gradients, so they stay equal; zero weights "
           "also pass no gradient to the layers below")
    if len(constant) == len(found):
        return [error(f"the weights in {files} are not trained: every copied weight blob is constant ({shown})",
                      files, "pass the trained .caffemodel (this one looks saved from a net built without weight "
                             "fillers, before training)", why)]
    return [warning(f"{len(constant)} of the {len(found)} copied layers have constant weights: {shown}", files,
                    "check that this .caffemodel is the trained one; rename these layers to start them from their "
                    "fillers", why)]


def check_head_kept(run: Run, copied: list[str]) -> list[Problem]:
    """A head copied from the weights (same name and size) while the training labels use fewer classes."""
    problems = []
    for name, net in run.nets.items():
        scan = run.scan_for(name, "TRAIN") if "TRAIN" in run.phases(name) else None
        if scan is None or not scan.labels:
            continue
        classes = max(scan.labels) + 1
        for head in heads_module.traced_heads(net):
            if head.name in copied and head.num_output > classes:
                problems.append(warning(
                    f"head {head.name} kept its pretrained name and size ({head.num_output} classes), so its "
                    f"pretrained class weights are copied, but the training data has {classes} classes",
                    f"{name}: layer {head.name}",
                    f"rename the head and set num_output {classes}: `caffetune rewrite --classes {classes} --name "
                    "NEW`",
                    f"the softmax keeps {head.num_output - classes} classes no image has, which the net still "
                    "predicts at first, and the new classes start from old classes' weights"))
    return problems


# --- is anything fine-tuned? ------------------------------------------------------------------------------------
def check_nothing_copied(run: Run, copied: list[str], scratch: list[str]) -> list[Problem]:
    """--weights given, yet no learnable layer of the nets has a same-named layer in them: caffe copies by layer name
    and ignores the rest silently, so the run trains from scratch."""
    if copied or not scratch or not run.pretrained:
        return []
    names = [name for name, blobs in run.pretrained.items() if blobs]
    shown = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
    files = ", ".join(Path(w).name for w in run.weights)
    return [warning(f"no layer of the net is copied from {files}: none of its {len(scratch)} learnable layers "
                    f"({', '.join(scratch[:4])}{' ...' if len(scratch) > 4 else ''}) has a same-named layer there "
                    f"(it has: {shown or 'no layer with weights'})", files,
                    "keep the pretrained layer names in the net (rename only the new head), or pass the "
                    ".caffemodel of this architecture (`caffetune inspect` lists a model's layers)",
                    "caffe copies weights by layer name and ignores the others without a word: the run trains "
                    "from scratch")]


def _deterministic_filler(layer: Message) -> bool:
    """A weight filler that is meant to stay: bilinear upsampling (FCN's frozen Deconvolution), or a constant."""
    params = layers.param_message(layer)
    if params is None or "weight_filler" not in params.DESCRIPTOR.fields_by_name:
        return False
    filler = params.weight_filler
    return filler.type == "bilinear" or (filler.type == "constant" and filler.value != 0)


def check_frozen_fillers(run: Run, scratch: list[str]) -> list[Problem]:
    """Convolution/InnerProduct layers that start from their random (or zero) fillers with lr_mult 0 on their
    weights: they stay random for the whole run. An error for a head (the classifier never learns), a warning for
    any other layer. Skipped when every layer is frozen (check_frozen reports that)."""
    problems = []
    starting = set(scratch) if run.pretrained else None
    for name, net in run.nets.items():
        if "TRAIN" not in run.phases(name):
            continue
        learnable = [layer for layer in run.layers_in(name, "TRAIN") if layers.learnable_blob_count(layer)]
        if not any(mult > 0 for layer in learnable for mult in layers.lr_mults(layer)):
            continue
        head_names = {head.name for head in heads_module.traced_heads(net)}
        for layer in learnable:
            if (layers.type_name(layer) not in _FILTER_TYPES or layers.lr_mults(layer)[0] > 0
                    or (starting is not None and layer.name not in starting) or _deterministic_filler(layer)):
                continue
            head = layer.name in head_names
            field_name = "blobs_lr" if layers.is_v1(net) else "param { lr_mult }"
            origin = "is not in the weights, so it starts from its filler" if run.pretrained else \
                "starts from its filler (no weights are given)"
            problems.append((error if head else warning)(
                f"{'head' if head else 'layer'} {layer.name} is frozen ({field_name} 0) and {origin}",
                f"{name}: layer {layer.name}",
                f"give it a learning rate ({field_name} 10 and 20 on a new head), or copy it from the weights",
                "a frozen layer keeps its random initial weights for the whole run" +
                (": the classifier never learns and the accuracy stays at chance" if head else
                 ": every layer after it sees a fixed random projection")))
    return problems


def check_global_stats_from_scratch(run: Run, scratch: list[str]) -> list[Problem]:
    """BatchNorm using its stored statistics in TRAIN (use_global_stats: true, as deploy nets set it) while it is not
    in the weights: the statistics start at zero and are never updated, so the layer divides by sqrt(eps)."""
    problems = []
    starting = set(scratch) if run.pretrained else None
    for name in run.nets:
        if "TRAIN" not in run.phases(name):
            continue
        found = [layer for layer in run.layers_in(name, "TRAIN") if layers.type_name(layer) == "BatchNorm"
                 and layer.batch_norm_param.HasField("use_global_stats") and layer.batch_norm_param.use_global_stats
                 and (starting is None or layer.name in starting)]
        if found:
            shown = ", ".join(layer.name for layer in found[:4]) + (" ..." if len(found) > 4 else "")
            origin = "are not in the weights" if run.pretrained else "start from zero statistics (no weights)"
            eps = found[0].batch_norm_param.eps or 1e-5
            problems.append(error(
                f"{len(found)} BatchNorm layer(s) ({shown}) use their stored statistics in TRAIN "
                f"(use_global_stats: true) but {origin}", f"{name}: layer {found[0].name} (TRAIN)",
                "remove use_global_stats from the TRAIN net (it then computes batch statistics and learns the "
                "running averages), or copy these layers from weights that have their statistics",
                f"the stored mean and variance are zero and are not updated in this mode: each layer multiplies its "
                f"input by 1/sqrt(eps) = {eps ** -0.5:.0f}, and the loss explodes"))
    return problems

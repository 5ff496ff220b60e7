"""Preflight checks of what the nets are fed and what they optimise: silent ways a run trains on nothing useful.

- an Input or MemoryData layer in a net `caffe train` builds: nothing fills it (a deploy net given to train);
- a TRAIN net without a loss (caffe reports loss = 0 and updates nothing);
- a data layer without batch_size;
- training labels of a single class, or labels that skip classes (e.g. numbered from 1); a TEST phase reading the
  training set, or a validation set of one class; paired Data layers (images, labels) of different lengths;
- TRAIN and TEST data layers that preprocess differently (scale, mean): the test numbers measure other inputs;
- mean_value that is the ImageNet mean in R, G, B order while caffe's images are B, G, R.
Everything here reads the parsed nets, the dataset scans already made (run.scans) and the pycaffe builds' loss
weights (run.loss_blobs); nothing is read again.
"""
from __future__ import annotations

from pathlib import Path

from google.protobuf.message import Message

from caffetune.errors import Problem
from caffetune.model import heads as heads_module
from caffetune.model import layers
from caffetune.train import checks_data
from caffetune.train.checks_common import Run, error, layer_where, plural, warning

_UNFED = {"Input": "caffe train never fills an Input layer: the net trains on whatever memory the blob holds "
                   "(zeros), and the labels are as meaningless",
          "MemoryData": "caffe train never gives a MemoryData layer its arrays: it stops at the first iteration "
                        "with `MemoryDataLayer needs to be initialized by calling Reset`"}
_PARAM_FIELDS = {"Data": "data_param", "ImageData": "image_data_param", "HDF5Data": "hdf5_data_param",
                 "MemoryData": "memory_data_param", "WindowData": "window_data_param"}
_TRANSFORMING = ("Data", "ImageData", "WindowData", "MemoryData")   # the layers that apply transform_param
_TRANSFORM_FIELDS = ("scale", "mean_file", "mean_value", "force_color", "force_gray")
DERIVE = "`caffetune rewrite --classes N --train-source ... --val-source ...` writes a train_val net from it"
RGB_IMAGENET_MEAN = (123.68, 116.78, 103.94)   # what torchvision/Keras write; caffe's own is 104, 117, 123 (B, G, R)


def check_unfed_inputs(run: Run) -> list[Problem]:
    """Input / MemoryData layers in a phase caffe builds the net in (the deploy net given as the training net)."""
    problems = []
    for name in run.nets:
        seen = set()
        for phase in run.phases(name):
            for layer in run.layers_in(name, phase):
                kind = layers.type_name(layer)
                if kind in _UNFED and layer.name not in seen:
                    seen.add(layer.name)
                    problems.append(error(
                        f"the net reads its {'/'.join(layer.top) or 'input'} from a{'n' if kind == 'Input' else ''} "
                        f"{kind} layer ({layer.name}), which caffe train does not feed", layer_where(name, layer),
                        "give the training net a data layer: Data on an LMDB (`caffetune build-lmdb`) or ImageData "
                        f"on an image list, with a label top (this looks like a deploy net: {DERIVE})",
                        _UNFED[kind]))
        if run.nets[name].input:   # the old deploy format: net-level `input:` fields
            problems.append(error(f"the net declares net-level inputs ({', '.join(run.nets[name].input)}), which "
                                  "caffe train does not feed", name,
                                  f"give the training net a data layer (this is a deploy net: {DERIVE})",
                                  _UNFED["Input"].replace("an Input layer", "net-level inputs")))
    return problems


def check_batch_sizes(run: Run) -> list[Problem]:
    """A data layer without batch_size (it has no default: 0) gives empty batches."""
    problems, seen = [], set()
    for name in run.nets:
        for layer in (entry for phase in run.phases(name) for entry in run.layers_in(name, phase)):
            params = layers.param_message(layer)
            if (layers.type_name(layer) not in layers.DATA_TYPES or params is None or (name, id(layer)) in seen
                    or "batch_size" not in params.DESCRIPTOR.fields_by_name or params.batch_size > 0):
                continue
            seen.add((name, id(layer)))
            field_name = _PARAM_FIELDS.get(layers.type_name(layer), "data layer's parameters")
            problems.append(error(f"data layer {layer.name} has no batch_size (it has no default: 0)",
                                  layer_where(name, layer), f"set batch_size in its {field_name}",
                                  "caffe builds a batch of 0 images and stops with `Check failed: data_`"))
    return problems


# --- is there anything to minimise? ---------------------------------------------------------------------------
def _declares_loss(layer: Message) -> bool:
    return layers.type_name(layer).endswith("Loss") or any(weight > 0 for weight in layer.loss_weight)


def check_loss(run: Run) -> list[Problem]:
    """A TRAIN net whose blobs all have loss weight 0: caffe trains on (loss = 0) and no weight changes. The loss
    weights come from the real Caffe when the net was built (run.loss_blobs); otherwise from the layer types."""
    problems = []
    for name in run.nets:
        if "TRAIN" not in run.phases(name):
            continue
        built = run.loss_blobs.get(f"{name}:TRAIN")
        if built is None:
            if any(_declares_loss(layer) for layer in run.layers_in(name, "TRAIN")):
                continue
        elif built:
            continue
        outputs = _net_outputs(run.layers_in(name, "TRAIN"))
        problems.append(error(
            f"the TRAIN net has no loss (its outputs: {', '.join(outputs) or 'none'})", name,
            "train a train_val net: a loss layer (e.g. SoftmaxWithLoss on the scores and the label) after the "
            "head (for a deploy net: " + DERIVE + ")",
            "caffe minimises the sum of the loss-weighted outputs: with none it logs loss = 0 and no weight "
            "ever changes"))
    return problems


def _net_outputs(found: list[Message]) -> list[str]:
    consumed = {bottom for layer in found for bottom in layer.bottom}
    tops = [top for layer in found for top in layer.top if top not in consumed]
    return list(dict.fromkeys(tops))


# --- the labels -----------------------------------------------------------------------------------------------
def check_label_classes(run: Run) -> list[Problem]:
    """Training labels of one class only (nothing to tell apart), or skipping classes below the highest label."""
    problems = []
    for name, net in run.nets.items():
        scan = run.scan_for(name, "TRAIN") if "TRAIN" in run.phases(name) else None
        heads = heads_module.traced_heads(net)
        labels = set(scan.labels) - checks_data.ignored_labels(net) if scan is not None else set()
        if not labels or not heads or min(labels) < 0:
            continue
        where = f"{name}: {scan.source}"
        if len(labels) == 1:
            label = next(iter(labels))
            problems.append(error(
                f"every one of the {scan.count} training records has label {label}", where,
                "rebuild the training set with one label per class (`caffetune build-lmdb` numbers the class "
                "folders 0..N-1); a list written without labels reads as all 0",
                f"the net learns to answer {label} whatever the image: the loss drops to 0 and the accuracy is the "
                f"share of class {label} in the validation set"))
            continue
        missing = sorted(set(range(max(labels) + 1)) - labels)
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            start = " (the labels start at 1)" if missing == [0] else ""
            problems.append(warning(
                f"the training labels skip {plural(len(missing), 'class')}: {shown}{start}; they run from "
                f"{min(labels)} to {max(labels)} over {len(labels)} classes", where,
                "number the classes 0..N-1 without gaps and set num_output to N",
                "caffe's label is the index of the score: a class no image has still takes an output, and labels "
                "numbered from 1 shift every class by one against a label file or a pretrained head"))
    return problems


def _test_only(run: Run, name: str, layer_name: str) -> bool:
    """Whether the TEST data is a layer of its own (include { phase: TEST }, or a test_net file), not the training
    layer that also runs in TEST."""
    return run.role(name) == "test_net" or any(layer.name == layer_name and layers.phases(layer) == {"TEST"}
                                               for layer in run.layers_in(name, "TEST"))


def check_validation_set(run: Run) -> list[Problem]:
    """The TEST data layer reading the training set itself, or a validation set of one class only."""
    problems, train_sources = [], {}
    for (name, _layer, phase), scan in run.scans.items():
        if phase == "TRAIN" and scan is not None:
            train_sources[Path(scan.source).resolve()] = name
    for (name, layer_name, phase), scan in run.scans.items():
        if phase != "TEST" or scan is None or not _test_only(run, name, layer_name):
            continue
        where = f"{name}: layer {layer_name} (TEST)"
        if Path(scan.source).resolve() in train_sources:
            problems.append(warning(
                f"the TEST phase reads the training set {scan.source}", where,
                "hold out a validation set (`caffetune build-lmdb --val-fraction`) and point the TEST layer at it",
                "the test accuracy then measures how well the net remembers its training images: it cannot show "
                "overfitting, and best.caffemodel and early stopping follow it"))
        elif len(scan.labels) == 1 and scan.count > 1 and heads_module.traced_heads(run.nets[name]):
            problems.append(warning(
                f"every one of the {scan.count} validation records has label {next(iter(scan.labels))}", where,
                "build the validation set from every class (a list without labels reads as all 0)",
                "the test accuracy only measures that class: a net answering it always scores 1"))
    return problems


def check_paired_databases(run: Run) -> list[Problem]:
    """Two or more Data layers in one phase (images and labels in separate LMDBs, as for segmentation) are read in
    lockstep: databases of different lengths drift apart when the shorter one wraps around."""
    problems = []
    for name in run.nets:
        for phase in run.phases(name):
            found = {}
            for layer in run.layers_in(name, phase):
                scan = run.scans.get((name, layer.name, phase))
                if layers.type_name(layer) == "Data" and scan is not None and scan.count:
                    found.setdefault(Path(scan.source).resolve(), (layer.name, scan.count))
            if len({count for _layer, count in found.values()}) > 1:
                shown = ", ".join(f"{layer} {count}" for layer, count in found.values())
                problems.append(warning(
                    f"the {phase} Data layers read databases of different lengths ({shown} records)",
                    f"{name}: {phase}", "build them from the same list, in the same order, so that record i of "
                    "each belongs to the same image",
                    "caffe reads them in lockstep and each wraps around at its own end: from then on every image "
                    "is paired with another image's label"))
    return problems


# --- preprocessing ------------------------------------------------------------------------------------------------
def _transformed(run: Run) -> dict:
    """(data top) -> phase -> (file, layer) of the layers with a transform_param, in every file."""
    found: dict = {}
    for name in run.nets:
        for phase in run.phases(name):
            for layer in run.layers_in(name, phase):
                if layers.type_name(layer) in _TRANSFORMING and layer.top:
                    found.setdefault(layer.top[0], {}).setdefault(phase, (name, layer))
    return found


def _setting(params: Message, field_name: str):
    value = getattr(params, field_name)
    return [round(v, 4) for v in value] if field_name == "mean_value" else value


def _shown(params: Message, field_name: str) -> str:
    value = _setting(params, field_name)
    unset = {"scale": "1 (none)", "mean_file": "none", "mean_value": "none"}.get(field_name, "false")
    if field_name == "mean_value":
        return " ".join(f"{v:g}" for v in value) if value else unset
    if field_name == "mean_file":
        return value or unset
    return (f"{value:g}" if value != 1 else unset) if field_name == "scale" else str(value).lower()


def check_transform_phases(run: Run) -> list[Problem]:
    """TRAIN and TEST data layers of the same top must preprocess alike (mirror and crop may differ)."""
    problems = []
    for top, by_phase in _transformed(run).items():
        if "TRAIN" not in by_phase or "TEST" not in by_phase:
            continue
        (train_file, train_layer), (test_file, test_layer) = by_phase["TRAIN"], by_phase["TEST"]
        train, test = train_layer.transform_param, test_layer.transform_param
        differ = [f for f in _TRANSFORM_FIELDS if f in train.DESCRIPTOR.fields_by_name
                  and _setting(train, f) != _setting(test, f)]
        if not differ:
            continue
        detail = "; ".join(f"{f} {_shown(train, f)} in TRAIN, {_shown(test, f)} in TEST" for f in differ)
        other = f"{test_layer.name} (TEST)" if test_file == train_file else f"{test_file}: {test_layer.name} (TEST)"
        where = f"{train_file}: layers {train_layer.name} (TRAIN) and {other}"
        problems.append(warning(
            f"the TRAIN and TEST data layers of '{top}' preprocess differently: {detail}", where,
            "give both phases the same scale and mean (and the deploy net too); only mirror and crop usually differ",
            "the net is tested on inputs of another range than it learns from: the test accuracy and the best "
            "snapshot say little (a common cause of a test accuracy stuck at chance)"))
    return problems


def check_mean_order(run: Run) -> list[Problem]:
    """mean_value written as the ImageNet mean in R, G, B order: caffe (OpenCV) decodes images as B, G, R."""
    problems, seen = [], set()
    for name in run.nets:
        for layer in (entry for phase in run.phases(name) for entry in run.layers_in(name, phase)):
            if layers.type_name(layer) not in ("Data", "ImageData") or (name, layer.name) in seen:
                continue
            seen.add((name, layer.name))
            values = list(layer.transform_param.mean_value)
            if len(values) == 3 and all(abs(v - m) <= 2 for v, m in zip(values, RGB_IMAGENET_MEAN)):
                problems.append(warning(
                    f"mean_value {' '.join(f'{v:g}' for v in values)} is the ImageNet mean in R, G, B order",
                    layer_where(name, layer),
                    "write it in caffe's B, G, R order: mean_value: 104 mean_value: 117 mean_value: 123 (unless "
                    "this dataset was written in R, G, B by your own script)",
                    "caffe's data layers read images with OpenCV, as B, G, R: the red and blue channels are offset "
                    "by 20 grey levels each, unlike what the pretrained net saw"))
    return problems


def check_feed(run: Run) -> list[Problem]:
    """Every check of this module that needs no build (check_loss runs after the builds)."""
    return (check_unfed_inputs(run) + check_batch_sizes(run) + check_label_classes(run) +
            check_transform_phases(run) + check_mean_order(run) + check_validation_set(run) +
            check_paired_databases(run))

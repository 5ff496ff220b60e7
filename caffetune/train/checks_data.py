"""Preflight checks of the data layers (Data on an LMDB, ImageData on a list file) against their dataset.

Each dataset is scanned once (data_scan: one streaming pass, sizes sampled where documented) and the scan is kept in
`Run.scans` for the solver checks (test_iter coverage) and the weight checks (a head that kept its class count).
"""
from __future__ import annotations

from pathlib import Path

import lmdb
from google.protobuf.message import Message

from caffetune.data import mean
from caffetune.errors import CaffetuneError, DatasetError, Problem
from caffetune.model import heads as heads_module
from caffetune.model import layers
from caffetune.train import checks_hdf5, data_scan
from caffetune.train.checks_common import Run, error, layer_where, warning

REBUILD = "`caffetune build-lmdb`"


def database_kind(path: Path) -> str | None:
    """"LMDB", "LEVELDB" or None, from the files a database folder holds."""
    if (path / "data.mdb").is_file():
        return "LMDB"
    if (path / "CURRENT").is_file() or any(path.glob("*.ldb")):
        return "LEVELDB"
    return None


def _enum_name(message: Message, field_name: str) -> str:
    value = getattr(message, field_name)
    return message.DESCRIPTOR.fields_by_name[field_name].enum_type.values_by_number[value].name


def _chw(shape) -> str:
    return f"{shape[0]}x{shape[1]}x{shape[2]} (CxHxW)"


def _heads(net: Message) -> list:
    try:
        return heads_module.find_heads(net)
    except CaffetuneError:
        return heads_module.traced_heads(net)


# --- the source -----------------------------------------------------------------------------------------------------
def check_data_source(layer: Message, where: str) -> list[Problem]:
    """A Data layer's source: it exists, it is the database's folder, and `backend` names its kind."""
    source = Path(layer.data_param.source)
    backend = _enum_name(layer.data_param, "backend")
    if not layer.data_param.source:
        return [error("the Data layer has no data_param.source", where, "set source to the LMDB folder")]
    if not source.exists():
        return [error(f"data source {source} does not exist", where,
                      "build it with `caffetune build-lmdb`, or fix the path (caffe resolves relative paths from "
                      "the folder it is started in)", "caffe aborts when it sets up the data layer")]
    if source.is_file():
        return [error(f"data source {source} is a file inside the database, not the database", where,
                      f'set source: "{source.parent}" (the folder that holds {source.name})')]
    kind = database_kind(source)
    if kind is None:
        return [error(f"data source {source} is neither an LMDB nor a LevelDB folder", where,
                      "point source at the folder `caffetune build-lmdb` or convert_imageset wrote")]
    if kind != backend:
        default = " (the default when backend is not set)" if not layer.data_param.HasField("backend") else ""
        return [error(f"data source {source} is a {kind} database but backend is {backend}{default}", where,
                      f"add `backend: {kind}` to data_param", "caffe aborts when it opens the database")]
    return []


def check_list_scan(scan: data_scan.DataScan, params: Message, where: str) -> list[Problem]:
    """Lines caffe misreads, and images missing anywhere in the list (caffe aborts when it reaches one)."""
    problems = []
    if scan.bad_count:
        number, why = scan.bad_lines[0]
        problems.append(error(f"{scan.bad_count} line(s) of {scan.source} are not `path label`; the first, "
                              f"{scan.source}:{number}: {why}", where,
                              "write one `relative/path.jpg label` per line, without blank lines"))
    if scan.missing_count:
        shown = "; ".join(f"{scan.source}:{number}: {path}" for number, path in scan.missing[:3])
        root = params.root_folder
        problems.append(error(
            f"{scan.missing_count} of the {scan.count} images listed in {scan.source} are missing under "
            f'root_folder "{root}" (e.g. {shown})', where,
            "set image_data_param.root_folder to the folder the list's paths are relative to (with a trailing /)"
            if scan.missing_count == scan.count else "remove the missing images from the list, or restore them",
            "caffe's ImageData layer aborts with `Could not load` when it reaches the first missing image, "
            "possibly hours into the run"))
    if scan.relative_count:
        number, path = scan.relative[0]
        problems.append(error(
            f"{scan.relative_count} of the {scan.count} images listed in {scan.source} have relative paths and "
            f"image_data_param has no root_folder (e.g. {scan.source}:{number}: {path})", where,
            'set image_data_param.root_folder to the folder the paths are relative to, e.g. root_folder: "./" '
            "when they are relative to where you start `caffetune run` (it makes the folder absolute), or write "
            "absolute paths in the list",
            "caffe opens root_folder + path from its working directory, and `caffetune run` starts caffe in the "
            "run directory: it aborts with `Could not load` at the first image"))
    if scan.count == 0 and not problems:
        problems.append(error(f"image list {scan.source} is empty", where, "list `path label` lines, one per image"))
    return problems


def ignored_labels(net: Message) -> set[int]:
    """The label every SoftmaxWithLoss and Accuracy layer of the net ignores (loss_param / accuracy_param
    ignore_label), if they all name the same one: such records are skipped, not scored."""
    found = []
    for layer in layers.all_layers(net):
        kind = layers.type_name(layer)
        params = layer.loss_param if kind == "SoftmaxWithLoss" else layer.accuracy_param if kind == "Accuracy" \
            else None
        if params is not None:
            found.append(params.ignore_label if params.HasField("ignore_label") else None)
    return {found[0]} if found and found[0] is not None and len(set(found)) == 1 else set()


def check_labels(scan: data_scan.DataScan, head_list: list, where: str, ignored: set[int] = frozenset()
                 ) -> list[Problem]:
    """Every label must lie in 0..num_output-1 of every head (Caffe only checks this in debug builds), except a
    label that every loss and accuracy layer ignores."""
    if not scan.labels:
        return [error(f"the database {scan.source} is empty", where, "rebuild it from a non-empty image folder")]
    problems = []
    high = max(label for label in scan.labels if label not in ignored) if set(scan.labels) - ignored else 0
    for head in head_list:
        bad = sorted(label for label in scan.labels if (label < 0 or label >= head.num_output)
                     and label not in ignored)
        if bad:
            shown = ", ".join(map(str, bad[:8])) + (" ..." if len(bad) > 8 else "")
            problems.append(error(
                f"labels {shown} in {scan.source} are outside 0..{head.num_output - 1}: head {head.name} has "
                f"num_output {head.num_output} but the data has {high + 1} classes", where,
                f"set {head.name}'s num_output to {high + 1} (`caffetune rewrite --classes {high + 1}`) or "
                "rebuild the database with labels 0..N-1",
                "release builds of Caffe do not check labels: the loss reads scores that do not exist (a garbage "
                "loss, or a crash)"))
    return problems


# --- record shapes ----------------------------------------------------------------------------------------------
def transposed(shape: tuple[int, int, int]) -> bool:
    """Whether a raw Datum's (C, H, W) looks like an H x W x C image stored without transposing it: pycaffe's
    array_to_datum takes C x H x W, so an OpenCV/PIL image gives channels = its height and width = its channels."""
    channels, height, width = shape
    return channels > 4 and height > 4 and width in (1, 3, 4)


def check_transposed(scan: data_scan.DataScan, where: str) -> list[Problem]:
    shape = scan.shape
    if scan.encoded or not transposed(shape):
        return []
    key = scan.sizes[shape][0]
    return [error(f"the records of {scan.source} look transposed: record {key} says {shape[0]} channels of "
                  f"{shape[1]}x{shape[2]} pixels: images of {shape[0]}x{shape[1]} pixels with {shape[2]} "
                  "channels stored as H x W x C", where,
                  "rebuild the database with `caffetune build-lmdb`, or transpose each image to C x H x W "
                  "(image.transpose(2, 0, 1)) before caffe.io.array_to_datum",
                  "caffe reads every Datum as C x H x W: conv1 would see one 'channel' per image row")]


def check_pixels(scan: data_scan.DataScan, where: str) -> list[Problem]:
    """Raw records whose pixels are all 0/1 (images of floats in [0, 1] cast to bytes) or of one grey level each,
    judged from a sample of PIXEL_SAMPLE records spread over the database."""
    sampled = scan.pixel_sampled
    if sampled < 2:
        return []
    note = f"the {sampled} records sampled of {scan.count}"
    why = "the net sees no image content: the loss stays near -log(1/classes) and the accuracy at chance"
    if scan.pixel_max <= 1:
        return [error(f"the pixels of {scan.source} are all 0 or 1 ({note})", where,
                      "store bytes 0..255: multiply images of floats in [0, 1] by 255 before casting to uint8 (or "
                      "rebuild with `caffetune build-lmdb` from the image files)", why)]
    if scan.flat_records == sampled:
        return [error(f"every image of {scan.source} is a single grey level ({note})", where,
                      "rebuild the database from the image files (`caffetune build-lmdb`); check the script that "
                      "wrote it", why)]
    return []


def _effective_sizes(scan: data_scan.DataScan, params: Message) -> dict:
    """(C, H, W) -> (first key, count) as the transformer sees them (force_color / force_gray on encoded data)."""
    if not scan.encoded or not (params.force_color or params.force_gray):
        return dict(scan.sizes)
    channels = 3 if params.force_color else 1
    merged: dict = {}
    for (_c, height, width), (key, count) in scan.sizes.items():
        first, seen = merged.get((channels, height, width), (key, 0))
        merged[(channels, height, width)] = (first, seen + count)
    return merged


def _sampled_note(scan: data_scan.DataScan) -> str:
    return f" (sizes read from a sample of {scan.sized} of {scan.count} records)" if scan.sampled else ""


def check_sizes(sizes: dict, scan: data_scan.DataScan, crop: int, where: str, resize_fix: str) -> list[Problem]:
    """One batch is shaped by its first record: channels must agree everywhere, and without crop_size so must the
    height and width (caffe's transformer CHECKs them, and a fully connected layer rejects a new input size)."""
    if len(sizes) < 2:
        return []
    listing = ", ".join(f"{_chw(shape)} x{count} (first: {key})" for shape, (key, count) in list(sizes.items())[:4])
    if len({shape[0] for shape in sizes}) > 1:
        return [error(f"the records of {scan.source} have different channel counts: {listing}"
                      f"{_sampled_note(scan)}", where,
                      f"rebuild the database all in color or all gray ({REBUILD}, --gray for gray), or set "
                      "transform_param.force_color: true (encoded records)",
                      "caffe stops with `Check failed: channels == datum_channels` at the first mixed batch")]
    if crop:
        return []
    smallest = min(min(height, width) for _c, height, width in sizes)
    return [error(f"the records of {scan.source} have {len(sizes)} different sizes: {listing}"
                  f"{_sampled_note(scan)}", where,
                  f"{resize_fix}, or set transform_param.crop_size <= {smallest}",
                  "caffe shapes each batch by its first record, so it stops with `Check failed: datum_height == "
                  "height` inside a batch, or `Check failed: K_ == new_K` in the first InnerProduct layer when "
                  "the next batch has another size")]


def check_transform(params: Message, sizes: dict, where: str) -> list[Problem]:
    """mean file / mean values against every record size; crop against the smallest."""
    problems = []
    if params.mean_file and len(params.mean_value):
        problems.append(error("transform_param has both mean_file and mean_value", where,
                              "keep one of them (Caffe refuses both)"))
    channels = next(iter(sizes))[0]
    if params.mean_file:
        problems += check_mean_file(Path(params.mean_file), sizes, params.crop_size, where)
    if len(params.mean_value) not in (0, 1, channels):
        wanted = "one mean_value entry" if channels == 1 else f"one mean_value entry, or {channels} (one per channel)"
        problems.append(error(f"{len(params.mean_value)} mean_value entries for {channels}-channel images", where,
                              f"give {wanted}",
                              "caffe stops with `Specify either 1 mean_value or as many as channels`"))
    crop = params.crop_size
    small = [(shape, key) for shape, (key, _count) in sizes.items() if crop > min(shape[1], shape[2])]
    if crop and small:
        (_c, height, width), key = small[0]
        problems.append(error(f"crop_size {crop} is larger than the stored images ({height}x{width})",
                              f"{where}, record {key}", f"use crop_size <= {min(height, width)}, or rebuild the "
                              f"database with larger images (`caffetune build-lmdb --resize {crop}x{crop}` or "
                              "larger)", "caffe stops with `Check failed: datum_height >= crop_size`"))
    return problems


def check_mean_file(path: Path, sizes: dict, crop: int, where: str) -> list[Problem]:
    if not path.is_file():
        return [error(f"mean file {path} does not exist", where,
                      "compute it with `caffetune build-lmdb` (it writes mean.binaryproto) or compute_image_mean")]
    try:
        values = mean.load(path)
    except CaffetuneError as failure:
        return [error(f"mean file {path} is unreadable: {failure.what}", where, failure.fix or "")]
    wrong = [shape for shape in sizes if tuple(values.shape) != tuple(shape)]
    if not wrong:
        return []
    shape = wrong[0]
    per_channel = " ".join(f"mean_value: {v:.1f}" for v in values.reshape(values.shape[0], -1).mean(axis=1))
    at_crop = crop and tuple(values.shape[1:]) == (crop, crop) and shape[1:] != (crop, crop)
    what = (f"mean file {path} is {_chw(values.shape)}, the crop size, but the stored images are {_chw(shape)}"
            if at_crop else f"mean file {path} is {_chw(values.shape)} but the stored images are {_chw(shape)}")
    why = ("caffe subtracts the mean from the whole image before cropping, so the mean must have the image's size; "
           if at_crop else "") + "caffe stops with `Check failed: datum_height == data_mean_.height()`"
    return [error(what, where, f"recompute the mean at {shape[1]}x{shape[2]} from this data ({REBUILD} writes "
                               f"mean.binaryproto), or replace mean_file with its per-channel values: {per_channel}",
                  why)]


def check_channels(net: Message, layer: Message, channels: int, pretrained: dict, where: str) -> list[Problem]:
    """Gray data into a conv1 trained on color (or the reverse): the pretrained weights fix the channel count."""
    conv = next((entry for entry in layers.all_layers(net) if layer.top and layer.top[0] in entry.bottom
                 and layers.type_name(entry) == "Convolution"), None)
    if conv is None or not pretrained.get(conv.name):
        return []
    shape = pretrained[conv.name][0].shape
    expected = shape[1] * (conv.convolution_param.group or 1) if len(shape) == 4 else None
    if expected is None or expected == channels:
        return []
    kind = "gray" if channels == 1 else f"{channels}-channel"
    return [error(f"the data is {kind} ({channels} channel(s)) but {conv.name}'s pretrained weights expect "
                  f"{expected} channels", where,
                  "rebuild the database in color (`caffetune build-lmdb` without --gray)" if channels == 1 and
                  expected == 3 else f"rebuild the database with {expected} channels",
                  f"caffe stops copying the weights with `Cannot copy param 0 weights from layer '{conv.name}'; "
                  "shape mismatch`")]


# --- order ------------------------------------------------------------------------------------------------------
def expected_runs(scan: data_scan.DataScan) -> float:
    """Label runs expected in a shuffled sequence with these class frequencies: 1 + (n - 1)(1 - sum p_i^2)."""
    n = scan.count
    return 1 + (n - 1) * (1 - sum((c / n) ** 2 for c in scan.labels.values()))


def check_class_order(scan: data_scan.DataScan, batch: int | None, where: str, fix: str) -> list[Problem]:
    """A training set read in class order: every batch holds one class (or two)."""
    classes, n = len(scan.labels), scan.count
    if classes < 2 or n < 4 * classes or scan.runs > expected_runs(scan) / 4:
        return []
    per_run = n / scan.runs
    return [warning(f"the training data {scan.source} is sorted by class: its labels come in {scan.runs} runs of "
                    f"{per_run:.0f} records on average in read order (a shuffled set this size has about "
                    f"{expected_runs(scan):.0f})", where, fix,
                    f"caffe reads it in that order, so a batch of {batch or 1} holds one class: each iteration "
                    "pulls the net towards that class and it learns mostly the last classes it saw")]


# --- the layers -------------------------------------------------------------------------------------------------
class _Scans:
    """Each dataset scanned once, whatever the number of layers reading it."""

    def __init__(self):
        self.done: dict = {}

    def get(self, key, scan):
        if key not in self.done:
            try:
                self.done[key] = (scan(), None)
            except CaffetuneError as failure:
                self.done[key] = (None, failure)
            except (OSError, lmdb.Error) as failure:   # unreadable file, corrupt database
                self.done[key] = (None, DatasetError(f"{type(failure).__name__}: {failure}", where=str(key[1]),
                                                     fix="rebuild it with `caffetune build-lmdb`"))
        return self.done[key]


def _data_layer(run: Run, name: str, layer: Message, scans: _Scans) -> tuple[data_scan.DataScan | None, list]:
    where = layer_where(name, layer)
    problems = check_data_source(layer, where)
    source = Path(layer.data_param.source)
    if problems or database_kind(source) != "LMDB":
        return None, problems
    scan, failure = scans.get(("lmdb", source), lambda: data_scan.scan_lmdb(source))
    if failure is not None:
        return None, [error(f"cannot read the database: {failure.what}", failure.where or where, failure.fix or "")]
    net, params = run.nets[name], layer.transform_param
    problems = check_labels(scan, _heads(net), where, ignored_labels(net))
    if not scan.count:
        return scan, problems
    found = check_transposed(scan, where) + check_pixels(scan, where)
    if found:
        return scan, problems + found
    sizes = _effective_sizes(scan, params)
    if sizes:
        problems += check_sizes(sizes, scan, params.crop_size, where, "rebuild the database at one size "
                                "(`caffetune build-lmdb --resize WxH`)") or check_transform(params, sizes, where)
        problems += check_channels(net, layer, next(iter(sizes))[0], run.pretrained, where)
    if "TRAIN" in layers.phases(layer) and "TRAIN" in run.phases(name):
        problems += check_class_order(scan, layer.data_param.batch_size, where,
                                      f"rebuild it shuffled ({REBUILD} shuffles unless --no-shuffle; "
                                      "convert_imageset needs --shuffle)")
    return scan, problems


def _image_data_layer(run: Run, name: str, layer: Message, scans: _Scans) -> tuple[data_scan.DataScan | None, list]:
    where, params = layer_where(name, layer), layer.image_data_param
    source = Path(params.source)
    if not source.is_file():
        return None, [error(f"image list {source} does not exist", where,
                            "write the list (`caffetune build-lmdb` writes train.txt/val.txt) or fix the path")]
    if bool(params.new_height) != bool(params.new_width):
        return None, [error("image_data_param sets only one of new_height and new_width", where,
                            "set both (to resize) or neither", "caffe refuses it when it sets the layer up")]
    resized = bool(params.new_height)
    scan, failure = scans.get(("list", source, params.root_folder, resized, params.is_color),
                              lambda: data_scan.scan_list(source, params.root_folder, resized, params.is_color))
    if failure is not None:
        return None, [error(f"cannot read the image list: {failure.what}", failure.where or where, "fix the file")]
    problems = check_list_scan(scan, params, where)
    if not scan.count:
        return scan, problems
    problems += check_labels(scan, _heads(run.nets[name]), where, ignored_labels(run.nets[name]))
    channels = 3 if params.is_color else 1
    sizes = {(channels, params.new_height, params.new_width): (f"{source}:1", scan.count)} if resized else \
        dict(scan.sizes)
    if sizes:
        problems += check_sizes(sizes, scan, layer.transform_param.crop_size, where,
                                "resize every image as it is read (image_data_param new_height and new_width)") \
            or check_transform(layer.transform_param, sizes, where)
    problems += check_channels(run.nets[name], layer, channels, run.pretrained, where)
    if "TRAIN" in layers.phases(layer) and "TRAIN" in run.phases(name) and not params.shuffle:
        problems += check_class_order(scan, params.batch_size, where, "set image_data_param.shuffle: true")
    return scan, problems


def check_data(run: Run) -> list[Problem]:
    """Every Data and ImageData layer of every net; records each scan in run.scans for the later checks."""
    problems, scans = [], _Scans()
    for name, net in run.nets.items():
        for layer in layers.all_layers(net):
            kind = layers.type_name(layer)
            if kind == "HDF5Data":
                problems += checks_hdf5.check_hdf5_source(layer, layer_where(name, layer))
            if kind not in ("Data", "ImageData"):
                continue
            read = _data_layer if kind == "Data" else _image_data_layer
            scan, found = read(run, name, layer, scans)
            problems += found
            for phase in set(layers.phases(layer)) & set(run.phases(name)):
                run.scans[(name, layer.name, phase)] = scan
    return problems

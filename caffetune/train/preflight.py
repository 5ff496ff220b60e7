"""Checks before `caffe train` starts: every known way a fine-tuning run fails late or silently learns nothing.

`check(nets, weights=..., snapshot=..., install=...)` returns a `Report`: every problem found (all at once, each with
its fix) and the facts worth printing (which layers are copied from the weights, which start from scratch).
`Report.raise_for_problems()` raises PreflightError. Whether a net builds, and the exact blob shapes to compare with
the weights, come from the real Caffe: pycaffe builds each net in a subprocess.
"""
from __future__ import annotations

import json
import subprocess
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import Message

from caffetune import files
from caffetune.model import heads as heads_module
from caffetune.model import layers
from caffetune.data import lmdb_reader
from caffetune.data import mean
from caffetune.model import prototxt
from caffetune.model import caffemodels as weights_module
from caffetune.model import caffe_tools
from caffetune.model.caffe_tools import CaffeInstall
from caffetune.errors import CaffetuneError, PreflightError, Problem

RENAME_FIX = "rename it (a new layer name starts from scratch) or use `caffetune rewrite`"


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    info: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)      # learnable layers whose blobs come from the weights
    scratch: list[str] = field(default_factory=list)     # learnable layers initialised by their fillers
    param_shapes: dict = field(default_factory=dict)      # "file:PHASE" -> layer -> blob shapes (from pycaffe)

    def raise_for_problems(self) -> None:
        if self.problems:
            raise PreflightError(self.problems)


# --- the data --------------------------------------------------------------------------------------------------
def _enum_name(message: Message, field_name: str) -> str:
    value = getattr(message, field_name)
    return message.DESCRIPTOR.fields_by_name[field_name].enum_type.values_by_number[value].name


def database_kind(path: Path) -> str | None:
    """"LMDB", "LEVELDB" or None, from the files a database folder holds."""
    if (path / "data.mdb").is_file():
        return "LMDB"
    if (path / "CURRENT").is_file() or any(path.glob("*.ldb")):
        return "LEVELDB"
    return None


def check_data_source(layer: Message, where: str) -> list[Problem]:
    """A Data layer's source: it exists, it is the database's folder, and `backend` names its kind."""
    source = Path(layer.data_param.source)
    backend = _enum_name(layer.data_param, "backend")
    if not layer.data_param.source:
        return [Problem("the Data layer has no data_param.source", where, "set source to the LMDB folder")]
    if not source.exists():
        return [Problem(f"data source {source} does not exist", where,
                        "build it with `caffetune build-lmdb`, or fix the path (caffe resolves relative paths "
                        "from the folder it is started in)")]
    if source.is_file():
        folder = source.parent
        return [Problem(f"data source {source} is a file inside the database, not the database", where,
                        f'set source: "{folder}" (the folder that holds {source.name})')]
    kind = database_kind(source)
    if kind is None:
        return [Problem(f"data source {source} is neither an LMDB nor a LevelDB folder", where,
                        "point source at the folder `caffetune build-lmdb` or convert_imageset wrote")]
    if kind != backend:
        default = " (the default when backend is not set)" if not layer.data_param.HasField("backend") else ""
        return [Problem(f"data source {source} is a {kind} database but backend is {backend}{default}", where,
                        f"add `backend: {kind}` to data_param")]
    return []


def check_image_list(layer: Message, where: str) -> list[Problem]:
    """An ImageData layer's list file exists and its first images exist under root_folder."""
    params = layer.image_data_param
    source = Path(params.source)
    if not source.is_file():
        return [Problem(f"image list {source} does not exist", where,
                        "write the list (`caffetune build-lmdb` writes train.txt/val.txt) or fix the path")]
    lines = [line.strip() for line in source.read_text(errors="replace").splitlines()[:20] if line.strip()]
    if not lines:
        return [Problem(f"image list {source} is empty", where, "list `path label` lines, one per image")]
    missing = [line.rsplit(" ", 1)[0] for line in lines if not Path(params.root_folder + line.rsplit(" ", 1)[0])
               .is_file()]
    if missing:
        return [Problem(f"{len(missing)} of the first {len(lines)} images of {source} do not exist under root_folder "
                        f'"{params.root_folder}" (e.g. {params.root_folder}{missing[0]})', where,
                        "set image_data_param.root_folder to the folder the list's paths are relative to (with a "
                        "trailing /)")]
    return []


def _summarize(source: Path, where: str) -> tuple[lmdb_reader.DbSummary | None, list[Problem]]:
    try:
        return lmdb_reader.summarize(source), []
    except CaffetuneError as error:
        return None, [Problem(f"cannot read the database: {error.what}", where, error.fix or "")]


def check_labels(summary, head_list: list, where: str, source: Path) -> list[Problem]:
    """Every label must lie in 0..num_output-1 of every head (Caffe only checks this in debug builds)."""
    problems = []
    if not summary.label_histogram:
        return [Problem(f"the database {source} is empty", where, "rebuild it from a non-empty image folder")]
    low, high = min(summary.label_histogram), max(summary.label_histogram)
    for head in head_list:
        if low < 0 or high > head.num_output - 1:
            bad = sorted(label for label in summary.label_histogram if label < 0 or label >= head.num_output)
            shown = ", ".join(map(str, bad[:8])) + (" ..." if len(bad) > 8 else "")
            problems.append(Problem(
                f"labels {shown} in {source} are outside 0..{head.num_output - 1}: head {head.name} has "
                f"num_output {head.num_output} but the data has {high + 1} classes", where,
                f"set {head.name}'s num_output to {high + 1} (`caffetune rewrite --classes {high + 1}`) or "
                "rebuild the database with labels 0..N-1"))
    return problems


def check_transform(layer: Message, summary, where: str) -> list[Problem]:
    """mean file / mean values against the stored images' (C, H, W); crop against the image size."""
    channels, height, width = summary.shape
    params = layer.transform_param
    problems = []
    if params.mean_file and len(params.mean_value):
        problems.append(Problem("transform_param has both mean_file and mean_value", where,
                                "keep one of them (Caffe refuses both)"))
    if params.mean_file:
        problems += _check_mean_file(Path(params.mean_file), (channels, height, width), where)
    if len(params.mean_value) not in (0, 1, channels):
        problems.append(Problem(f"{len(params.mean_value)} mean_value entries for {channels}-channel images", where,
                                f"give 1 or {channels} mean_value entries"))
    crop = params.crop_size
    if crop and (crop > height or crop > width):
        problems.append(Problem(f"crop_size {crop} is larger than the stored images ({height}x{width})", where,
                                f"use crop_size <= {min(height, width)}, or rebuild the database with "
                                f"`caffetune build-lmdb --resize {crop + 29}` or larger"))
    return problems


def _check_mean_file(path: Path, shape: tuple[int, int, int], where: str) -> list[Problem]:
    if not path.is_file():
        return [Problem(f"mean file {path} does not exist", where, "compute it with `caffetune build-lmdb` (it "
                                                                    "writes mean.binaryproto) or compute_image_mean")]
    try:
        mean_shape = tuple(mean.load(path).shape)
    except CaffetuneError as error:
        return [Problem(f"mean file {path} is unreadable: {error.what}", where, error.fix or "")]
    if mean_shape != tuple(shape):
        return [Problem(f"mean file {path} is {_chw(mean_shape)} but the stored images are {_chw(shape)}", where,
                        "recompute the mean from this database (`caffetune build-lmdb` or compute_image_mean), or "
                        "use mean_value with per-channel values")]
    return []


def _chw(shape) -> str:
    return f"{shape[0]}x{shape[1]}x{shape[2]} (CxHxW)"


def _first_conv_after(net: Message, blob: str) -> Message | None:
    for layer in layers.all_layers(net):
        if blob in layer.bottom and layers.type_name(layer) == "Convolution":
            return layer
    return None


def check_channels(net: Message, layer: Message, summary, pretrained: dict, where: str) -> list[Problem]:
    """Gray data into a conv1 trained on color (or the reverse): the pretrained weights fix the channel count."""
    conv = _first_conv_after(net, layer.top[0]) if layer.top else None
    if conv is None or conv.name not in pretrained or not pretrained[conv.name]:
        return []
    shape = pretrained[conv.name][0].shape
    group = conv.convolution_param.group or 1
    expected = shape[1] * group if len(shape) == 4 else None
    channels = summary.shape[0]
    if expected is None or expected == channels:
        return []
    kind = "gray" if channels == 1 else f"{channels}-channel"
    return [Problem(f"the data is {kind} ({channels} channel(s)) but {conv.name}'s pretrained weights expect "
                    f"{expected} channels", where,
                    "rebuild the database in color (`caffetune build-lmdb` without --gray)" if channels == 1 and
                    expected == 3 else f"rebuild the database with {expected} channels")]


# --- the net ---------------------------------------------------------------------------------------------------
def _heads(net: Message) -> list:
    try:
        return heads_module.find_heads(net)
    except CaffetuneError:
        return heads_module.traced_heads(net)


def check_accuracy_top_k(net: Message, where: str) -> list[Problem]:
    """Accuracy's top_k may not exceed the class count of the scores it reads."""
    classes = {consumer: head for head in heads_module.traced_heads(net) for consumer in head.consumers}
    problems = []
    for layer in layers.all_layers(net):
        head = classes.get(layer.name)
        if layers.type_name(layer) != "Accuracy" or head is None:
            continue
        top_k = layer.accuracy_param.top_k
        if top_k > head.num_output:
            problems.append(Problem(f"Accuracy layer {layer.name} has top_k {top_k} but {head.name} scores only "
                                    f"{head.num_output} classes", f"{where}: {layer.name}",
                                    f"set accuracy_param.top_k <= {head.num_output} (or drop the top-{top_k} "
                                    "accuracy layer)"))
    return problems


def _legacy(shape) -> tuple:
    return weights_module.legacy_shape(tuple(shape)) or tuple(shape)


def _blob_matches(blob, target) -> bool:
    return weights_module.shape_matches(blob, tuple(target)) or _legacy(blob.shape) == _legacy(target)


def check_weights(net: Message, pretrained: dict, built: dict | None, where: str, report: Report) -> list[Problem]:
    """Same-named layers must agree in blob count and shapes, or Caffe stops while copying the weights."""
    problems = []
    for layer in layers.all_layers(net):
        count = len(built[layer.name]) if built and layer.name in built else layers.learnable_blob_count(layer)
        if count == 0:
            continue
        blobs = pretrained.get(layer.name)
        if blobs is None:
            report.scratch.append(layer.name)
            continue
        problem = _compare_layer(layer, blobs, count, built.get(layer.name) if built else None, where)
        if problem:
            problems.append(problem)
        else:
            report.copied.append(layer.name)
    return problems


def _compare_layer(layer: Message, blobs: list, count: int, shapes: list | None, where: str) -> Problem | None:
    kind = layers.type_name(layer)
    if len(blobs) != count:
        why = "bias_term differs" if kind in ("Convolution", "InnerProduct", "Deconvolution", "Scale") else (
            "BatchNorm variants differ (Caffe's BatchNorm has 3 blobs; a fused BatchNorm+Scale has more)"
            if kind in ("BatchNorm", "Scale") else "the layer types differ")
        return Problem(f"layer {layer.name} has {len(blobs)} blob(s) in the weights but {count} in the net ({why}); "
                       f"caffe would stop with 'Incompatible number of blobs'", f"{where}: {layer.name}", RENAME_FIX)
    for index, (blob, target) in enumerate(zip(blobs, shapes or [])):
        if not _blob_matches(blob, target):
            return Problem(f"layer {layer.name} blob {index} has shape {tuple(blob.shape)} in the weights but "
                           f"{tuple(target)} in the net", f"{where}: {layer.name}", RENAME_FIX)
    return None


def read_pretrained(paths: list[Path]) -> tuple[dict, list[Problem]]:
    """Layer name -> blobs of the weights; with several files, later ones win as in Caffe's sequential copy."""
    merged, problems = {}, []
    for path in paths:
        if not Path(path).is_file():
            problems.append(Problem(f"weights file {path} does not exist", str(path),
                                    "check the path of the .caffemodel"))
            continue
        try:
            merged.update({record.name: record.blobs for record in weights_module.read_layers(path)})
        except CaffetuneError as error:
            problems.append(Problem(error.what, str(path), error.fix or "pass a .caffemodel written by Caffe"))
    return merged, problems


# --- building with the real Caffe -------------------------------------------------------------------------------
_BUILD_SCRIPT = textwrap.dedent("""
    import json, sys
    import caffe
    caffe.set_mode_cpu()
    net = caffe.Net(sys.argv[1], getattr(caffe, sys.argv[2]))
    print(json.dumps({name: [list(b.data.shape) for b in blobs] for name, blobs in net.params.items()}))
""")


def build_with_caffe(install: CaffeInstall, net_file: Path, phase: str, timeout: int = 300) -> tuple[dict | None,
                                                                                                     str | None]:
    """Build a net with pycaffe in a subprocess: (layer -> param shapes, None) or (None, caffe's error)."""
    try:
        result = caffe_tools.run_pycaffe(install, _BUILD_SCRIPT, [str(net_file), phase], timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"building the {phase} net took more than {timeout}s"
    if result.returncode == 0:
        return json.loads(result.stdout.strip().splitlines()[-1]), None
    lines = result.stderr.strip().splitlines()
    fatal = [line for line in lines if line.startswith("F") or "Check failed" in line or "Error" in line]
    return None, (fatal or lines or [f"exit status {result.returncode}"])[-1]


def _phases_of(field_name: str) -> list[str]:
    return {"net": ["TRAIN", "TEST"], "train_net": ["TRAIN"], "test_net": ["TEST"]}.get(field_name, ["TRAIN", "TEST"])


def check_builds(install: CaffeInstall, nets: dict[str, Message], roles: dict[str, str], report: Report) -> list:
    """Build every net in the phases caffe will build it; collects the param shapes for the weight check."""
    problems = []
    with tempfile.TemporaryDirectory(prefix="caffetune-preflight-") as tmp:
        for name, net in nets.items():
            path = Path(tmp) / name
            files.write_atomic(path, prototxt.format(net))
            failed: dict[str, list[str]] = {}
            for phase in _phases_of(roles.get(name, "net")):
                shapes, error = build_with_caffe(install, path, phase)
                if error:
                    failed.setdefault(caffe_tools.strip_glog_prefix(error), []).append(phase)
                else:
                    report.param_shapes[f"{name}:{phase}"] = shapes
            problems += [Problem(f"caffe cannot build the {' and '.join(phases)} net: {error}", name,
                                 "fix the layer named in caffe's message") for error, phases in failed.items()]
    return problems


# --- all together -----------------------------------------------------------------------------------------------
def check_net_data(net: Message, name: str, pretrained: dict) -> list[Problem]:
    """The data layers of one net: source, backend, labels, mean, crop, channels."""
    problems = []
    head_list = _heads(net)
    for layer in layers.all_layers(net):
        where = f"{name}: {layer.name} ({'/'.join(sorted(layers.phases(layer)))})"
        if layers.type_name(layer) == "ImageData":
            problems += check_image_list(layer, where)
        if layers.type_name(layer) not in layers.LMDB_DATA_TYPES:
            continue
        found = check_data_source(layer, where)
        problems += found
        if found or database_kind(Path(layer.data_param.source)) != "LMDB":
            continue
        summary, unreadable = _summarize(Path(layer.data_param.source), where)
        problems += unreadable
        if summary is None:
            continue
        problems += check_labels(summary, head_list, where, Path(layer.data_param.source))
        if summary.count:
            problems += check_transform(layer, summary, where)
            problems += check_channels(net, layer, summary, pretrained, where)
    return problems


def _merged_shapes(report: Report, name: str) -> dict:
    merged = {}
    for key, shapes in report.param_shapes.items():
        if key.split(":")[0] == name:
            merged.update(shapes)
    return merged


def check(nets: dict[str, Message], *, weights: list[Path] = (), snapshot: Path | None = None,
          install: CaffeInstall | None = None, roles: dict[str, str] | None = None) -> Report:
    """Every check on the nets of a run (file name -> net, paths absolute). `roles`: file name -> "net",
    "train_net" or "test_net", for the phases to build. Without `install` nothing is built."""
    report = Report()
    if snapshot and weights:
        report.problems.append(Problem("both a snapshot and weights are given", str(snapshot),
                                       "use --snapshot to continue a run, or --weights to fine-tune; caffe refuses "
                                       "both"))
    if snapshot and not Path(snapshot).is_file():
        report.problems.append(Problem(f"snapshot {snapshot} does not exist", str(snapshot),
                                       "pass a .solverstate written by caffe (runs/<name>/snapshots/), or use "
                                       "`caffetune run --resume runs/<name>`"))
    pretrained, problems = read_pretrained(list(weights))
    report.problems += problems
    for name, net in nets.items():
        report.problems += check_net_data(net, name, pretrained)
        report.problems += check_accuracy_top_k(net, name)
    if install is not None and not report.problems:
        report.problems += check_builds(install, nets, roles or {}, report)
    if pretrained:
        for name, net in nets.items():
            report.problems += check_weights(net, pretrained, _merged_shapes(report, name) or None, name, report)
        report.info += _copy_summary(report, list(weights))
    return report


def _copy_summary(report: Report, weights: list[Path]) -> list[str]:
    copied, scratch = list(dict.fromkeys(report.copied)), list(dict.fromkeys(report.scratch))
    report.copied, report.scratch = copied, scratch
    source = ", ".join(Path(w).name for w in weights)
    return [f"copied from {source}: {', '.join(copied) or 'no layer'}",
            f"from scratch (fillers): {', '.join(scratch) or 'no layer'}"]

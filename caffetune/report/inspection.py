"""What `caffetune inspect` reports: a net's layers, heads, parameters and learning-rate states, and what a
weights file holds and how it pairs with the net (the pairing is Caffe's, see graft.plan).

Output shapes come from the real Caffe (pycaffe, in a subprocess: a Caffe CHECK failure aborts its process) when it
is available and can build the net, else from caffetune's shape inference.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path

from google.protobuf.message import Message

from caffetune.errors import CaffetuneError, NetError
from caffetune.model import caffe_tools, caffemodels, heads, prototxt, shapes, upgrade
from caffetune.model import layers as L
from caffetune.surgery import class_layers, lr_policy
from caffetune.transfer import fillers, graft

# pycaffe allocates every blob of the net (for the whole batch): above this, shapes come from inference alone.
PYCAFFE_MAX_BYTES = int(float(os.environ.get("CAFFETUNE_PYCAFFE_MAX_BYTES", 2e9)))


@dataclass
class LayerRow:
    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    outputs: list                       # each top's shape (None dims unknown)
    params: list | None                 # each learnable blob's shape, None when unknown
    param_count: int | None
    lr_mult: list[float]
    decay_mult: list[float]
    state: str = ""                     # frozen / fine-tuned / new, "" for layers without blobs
    head: bool = False
    weights: str = ""                   # with --weights: copied / scratch / mismatched / partial
    weights_detail: str = ""


@dataclass
class NetReport:
    path: str
    name: str
    phase: str
    shape_source: str                   # "pycaffe" or "caffetune"
    layers: list[LayerRow]
    heads: list[str]
    head_note: str
    total_params: int
    trainable_params: int
    unknown_params: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    weights: dict | None = None         # graft.Plan.as_dict() for the --weights file

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class WeightsReport:
    path: str
    net_name: str
    format: str                          # V2 / V1 / V0 (mixed files list several)
    file_size: int
    layers: list[dict]
    total_params: int
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


# ---- shapes from pycaffe ---------------------------------------------------------------------------------------
# Loads pycaffe's compiled module alone: `import caffe` would also import scikit-image and friends (0.4 s), none
# of which building a net needs. Blob.shape reads a shape without allocating the blob (`.data` would allocate every
# activation of the net).
_PYCAFFE_SHAPES = textwrap.dedent("""
    import importlib.machinery, importlib.util, json, os, sys
    package = os.path.dirname(importlib.util.find_spec("caffe").origin)
    loader = importlib.machinery.ExtensionFileLoader("_caffe", os.path.join(package, "_caffe.so"))
    _caffe = importlib.util.module_from_spec(importlib.util.spec_from_loader("_caffe", loader))
    loader.exec_module(_caffe)
    _caffe.set_mode_cpu()
    net = _caffe.Net(sys.argv[1], {"TRAIN": 0, "TEST": 1}[sys.argv[2]])
    blobs = dict(zip(net._blob_names, net._blobs))
    outputs, params = {}, {}
    for index, name in enumerate(net._layer_names):
        outputs[name] = [list(blobs[net._blob_names[i]].shape) for i in net._top_ids(index)]
        if len(net.layers[index].blobs):
            params[name] = [list(blob.shape) for blob in net.layers[index].blobs]
    print("SHAPES " + json.dumps({"outputs": outputs, "params": params}))
""")


def without_fillers(net: Message) -> Message:
    """A copy of the net whose fillers are all `constant`: Caffe then builds it without drawing random numbers for
    every weight (shapes do not depend on fillers; a VGG16 builds in half the time)."""
    copy = type(net)()
    copy.CopyFrom(net)
    for layer in L.all_layers(copy):
        params = L.param_message(layer)
        if params is None:
            continue
        for name in fillers.filler_fields(params):
            params.ClearField(name)  # an unwritten filler is Caffe's constant 0
    return copy


def pycaffe_shapes(net_path: Path | str, phase: str, install=None, timeout: int = 600) -> shapes.NetShapes:
    """Shapes Caffe itself computes by building the net; raises CaffetuneError when it cannot."""
    install = install or caffe_tools.find_caffe()
    net = without_fillers(upgrade.load(net_path)[0])
    # Caffe resolves the net's relative paths (LMDBs, list files) from the working directory, wherever the file is.
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", prefix="caffetune-shapes-") as handle:
        handle.write(prototxt.format(net))
        handle.flush()
        result = caffe_tools.run_pycaffe(install, _PYCAFFE_SHAPES, [handle.name, phase], timeout=timeout)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("SHAPES ")), None)
    if result.returncode != 0 or line is None:
        why = _caffe_failure(result.stderr)
        raise CaffetuneError(f"pycaffe could not build the net: {why}", where=str(net_path))
    data = json.loads(line[len("SHAPES "):])
    net_shapes = shapes.NetShapes(phase=phase)
    net_shapes.outputs = {k: [tuple(s) for s in v] for k, v in data["outputs"].items()}
    net_shapes.params = {k: [tuple(s) for s in v] for k, v in data["params"].items()}
    return net_shapes


def _caffe_failure(stderr: str) -> str:
    """The reason in a Caffe crash log: its glog FATAL line ("F1122 ... ] Check failed: ..."), else the last line."""
    lines = stderr.strip().splitlines() or ["no output"]
    fatal = [line for line in lines if caffe_tools.is_fatal_line(line)]
    return caffe_tools.strip_glog_prefix(fatal[-1]) if fatal else lines[-1]


def net_shapes_for(net: Message, net_path: Path | str, phase: str, use_pycaffe: bool,
                   caffe: str | None = None) -> tuple[shapes.NetShapes, str, list[str]]:
    """(shapes, where they came from, notes): pycaffe's when it can build the net, else caffetune's inference."""
    notes = []
    inferred = shapes.infer(net, phase, Path(net_path).parent)
    needed = build_bytes(net, inferred)
    if use_pycaffe and needed > PYCAFFE_MAX_BYTES:
        notes.append(f"building the net in pycaffe would allocate about {needed / 1e9:.1f} GB (parameters and "
                     f"prefetched batches); shapes inferred by caffetune instead")
        use_pycaffe = False
    if use_pycaffe:
        try:
            found = pycaffe_shapes(net_path, phase, caffe_tools.find_caffe(caffe))
            for name in found.outputs:  # net.params lists only the layers that have blobs
                found.params.setdefault(name, [])
            return found, "pycaffe", notes
        except CaffetuneError as error:
            notes.append(f"{error.what}; shapes inferred by caffetune instead")
    return inferred, "caffetune", notes + inferred.problems


_PREFETCH_BATCHES = 4        # DataParameter.prefetch's default


def build_bytes(net: Message, net_shapes: shapes.NetShapes) -> int:
    """What building the net allocates in Caffe (float32): its parameters, and the batches its data layers
    prefetch. Activations are allocated only on first use, which reading shapes never does."""
    def size(shape_list) -> int:
        return sum(4 * math.prod(shape) for shape in shape_list if shapes.is_complete(shape))

    params = sum(size(blobs or []) for blobs in net_shapes.params.values())
    prefetched = sum(_PREFETCH_BATCHES * size(net_shapes.outputs.get(layer.name, []))
                     for layer in L.all_layers(net) if L.type_name(layer) in L.PREFETCHING_DATA_TYPES)
    return params + prefetched


# ---- the net report --------------------------------------------------------------------------------------------
def _count(shape_list) -> int | None:
    if shape_list is None or any(s is None or None in s for s in shape_list):
        return None
    return sum(math.prod(s) for s in shape_list)


def _detected_heads(net: Message) -> tuple[list[str], str]:
    dense = class_layers.summary(net)   # detection/segmentation: every class-dependent layer, marked like heads
    if dense is not None and (dense[0] or dense[1]):   # its layers, or why the analysis refused the net
        return dense
    try:
        return [head.name for head in heads.find_heads(net)], ""
    except NetError as error:
        return [head.name for head in heads.traced_heads(net)], error.what


def _row(layer: Message, net_shapes: shapes.NetShapes, states: dict, head_names: set) -> LayerRow:
    params = net_shapes.params.get(layer.name, [] if L.learnable_blob_count(layer) == 0 else None)
    lr_mult = L.lr_mults(layer)
    if L.type_name(layer) == "BatchNorm":  # Caffe masks BatchNorm's statistics from the solver (lr_mult 0)
        lr_mult = [0.0] * len(lr_mult)
    return LayerRow(name=layer.name, type=L.type_name(layer), bottoms=list(layer.bottom), tops=list(layer.top),
                    outputs=net_shapes.outputs.get(layer.name, [None] * len(layer.top)), params=params,
                    param_count=_count(params), lr_mult=lr_mult, decay_mult=L.decay_mults(layer),
                    state=states.get(layer.name, ""), head=layer.name in head_names)


def _trainable(row: LayerRow) -> int:
    if row.param_count is None or row.type == "BatchNorm":  # BatchNorm's statistics are not learned by gradient
        return 0
    return sum(math.prod(shape) for shape, mult in zip(row.params, row.lr_mult)
               if mult > 0 and None not in shape)


def inspect_net(net_path: Path | str, weights_path: Path | str | None = None, *, phase: str = "TRAIN",
                use_pycaffe: bool = True, caffe: str | None = None) -> NetReport:
    """The report for a net (and, with `weights_path`, how Caffe would copy that file's layers into it)."""
    net, read_notes = upgrade.load(net_path)      # V0 nets upgraded as Caffe reads them
    net_shapes, source, notes = net_shapes_for(net, net_path, phase, use_pycaffe, caffe)
    notes = read_notes + notes
    head_names, head_note = _detected_heads(net)
    states = lr_policy.layer_states(net)
    rows = [_row(layer, net_shapes, states, set(head_names)) for layer in L.all_layers(net)
            if phase in L.phases(layer)]
    report = NetReport(path=str(net_path), name=net.name, phase=phase, shape_source=source, layers=rows,
                       heads=head_names, head_note=head_note,
                       total_params=sum(r.param_count or 0 for r in rows),
                       trainable_params=sum(_trainable(r) for r in rows),
                       unknown_params=[r.name for r in rows if r.param_count is None], notes=notes)
    if weights_path is not None:
        _add_weights(report, net, net_shapes, weights_path, phase)
    return report


def _add_weights(report: NetReport, net: Message, net_shapes, weights_path, phase: str) -> None:
    the_plan = graft.plan(caffemodels.read_layers(weights_path), net, net_shapes, phase=phase)
    by_name = {lp.name: lp for lp in the_plan.layers}
    for row in report.layers:
        if row.name in by_name:
            row.weights, row.weights_detail = by_name[row.name].state, by_name[row.name].detail
            _complete_from_source(row, by_name[row.name])
    report.total_params = sum(r.param_count or 0 for r in report.layers)
    report.trainable_params = sum(_trainable(r) for r in report.layers)
    report.unknown_params = [r.name for r in report.layers if r.param_count is None]
    report.weights = the_plan.as_dict() | {"path": str(weights_path)}
    report.weights.pop("layers")


def _complete_from_source(row: LayerRow, layer_plan) -> None:
    """Dimensions the net leaves unknown (an LMDB not built yet) are the source's when its blob is copied."""
    if row.params is None or all(None not in shape for shape in row.params):
        return
    completed = []
    for shape, blob_plan in zip(row.params, layer_plan.blobs):
        source = graft.source_dims(blob_plan.source, len(shape)) if blob_plan.action == "copy" else None
        completed.append(source if None in shape and source else shape)
    row.params = completed
    row.param_count = _count(completed)


# ---- the weights-file report -----------------------------------------------------------------------------------
def inspect_weights(path: Path | str) -> WeightsReport:
    """What a caffemodel holds, read layer by layer without building a net or reading the values."""
    rows, problems, formats, seen = [], [], [], set()
    with caffemodels.Caffemodel(path) as model:
        for record in model.layers():
            rows.append({"name": record.name, "type": record.type, "format": record.format,
                         "shapes": [list(b.shape) for b in record.blobs],
                         "dtypes": [b.dtype for b in record.blobs],
                         "count": sum(b.shape_count for b in record.blobs), "bytes": record.span[1] - record.span[0]})
            problems += _blob_problems(record)
            if record.name in seen:
                problems.append(f"{record.name}: the name appears more than once (Caffe copies each in turn)")
            seen.add(record.name)
            formats += [record.format] if record.format not in formats else []
        return WeightsReport(path=str(path), net_name=model.name, format="+".join(formats),
                             file_size=model.size, layers=rows, total_params=sum(r["count"] for r in rows),
                             problems=problems)


def _blob_problems(record: caffemodels.LayerRecord) -> list[str]:
    problems = []
    for i, blob in enumerate(record.blobs):
        if blob.count >= 0 and blob.count != blob.shape_count:
            problems.append(f"{record.name}: blob {i} has shape {list(blob.shape)} ({blob.shape_count} values) but "
                            f"stores {blob.count} values; Caffe refuses it")
    return problems


def looks_like_weights(path: Path | str) -> bool:
    """Whether a path names a caffemodel rather than a prototxt (by extension, else by content)."""
    name = str(path).lower()
    if name.endswith((".caffemodel", ".caffemodel.h5")):
        return True
    if name.endswith((".prototxt", ".pt", ".txt")):
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    return b"\x00" in head or not head.decode("utf-8", "ignore").isprintable() and b"{" not in head


def inspect_path(target: Path | str, weights_path: Path | str | None = None, *, phase: str = "TRAIN",
                 no_pycaffe: bool = False, caffe: str | None = None) -> NetReport | WeightsReport:
    """What `caffetune inspect` shows: a .caffemodel's listing, or a net's report (its shapes from the real Caffe
    when pycaffe is installed and not refused, else inferred)."""
    if looks_like_weights(target):
        return inspect_weights(target)
    use_pycaffe = not no_pycaffe and environment_has_pycaffe(caffe)
    return inspect_net(target, weights_path, phase=phase, use_pycaffe=use_pycaffe, caffe=caffe)


def shape_text(shape) -> str:
    if shape is None:
        return "?"
    return "x".join("?" if d is None else str(d) for d in shape) if shape else "scalar"


def format_count(count: int | None) -> str:
    return "?" if count is None else f"{count:,}"


def size_text(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size:,} B"


def environment_has_pycaffe(caffe: str | None = None) -> bool:
    """Whether a Caffe with pycaffe is installed (shapes from the real Caffe)."""
    try:
        return caffe_tools.find_caffe(caffe).pycaffe_dir is not None
    except CaffetuneError:
        return False

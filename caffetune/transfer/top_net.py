"""The trainable top as a net of its own, fed from the feature cache; and full-net caffemodels from its snapshots.

The top net is an HDF5Data layer per phase (the cut blobs and the label, batch sizes as the original data layers)
followed by every layer of the original net that is not in the trunk, unchanged but for blob names HDF5 cannot
carry ('/' becomes '_'). `caffe train` trains it with the user's solver pointed at it and `-weights` the original
caffemodel: Caffe copies the top's layers by name and ignores the trunk's ("Ignoring source layer").

A top snapshot holds the top's layers only. `assemble` writes the full net's caffemodel: every trunk blob copied
byte for byte from the original weights (graft's copy) and the trained layers' blobs from the snapshot, so the
original train_val and deploy load it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from google.protobuf.message import Message

from caffetune.errors import NetError, RunError
from caffetune.model import caffemodels, schema
from caffetune.model import layers as L
from caffetune.surgery.net_edits import copy
from caffetune.transfer import graft
from caffetune.transfer.trunk_cut import Cut

FEATURE_LAYER = "cached_features"


def _phase_value(layer: Message, phase: str) -> int:
    enum = layer.DESCRIPTOR.fields_by_name["include"].message_type.fields_by_name["phase"].enum_type
    return enum.values_by_name[phase].number


def feature_layer(template: Message, phase: str, tops: list[str], source: Path, batch: int) -> Message:
    layer = type(template)()
    layer.name = FEATURE_LAYER
    layer.type = "HDF5Data"
    layer.top.extend(tops)
    layer.include.add().phase = _phase_value(layer, phase)
    layer.hdf5_data_param.source = str(source)
    layer.hdf5_data_param.batch_size = batch
    return layer


def build(net: Message, cut: Cut, sources: dict[str, Path], names: dict[str, dict[str, str]],
          batches: dict[str, int]) -> Message:
    """The top net. `sources`: phase -> HDF5 list file; `names`: phase -> {cut blob: dataset name}."""
    if L.is_v1(net):
        raise NetError("--cache-features needs a net in the current `layer {}` format", fix="upgrade the net first "
                       "(caffetune rewrite --upgrade) or run without --cache-features")
    result = copy(net)
    result.ClearField("layer")
    renames = {blob: name for phase_names in names.values() for blob, name in phase_names.items() if blob != name}
    for phase in cut.phases:
        result.layer.append(feature_layer(net.layer[0], phase, list(names[phase].values()), sources[phase],
                                          batches[phase]))
    for layer in net.layer:
        if layer.name not in cut.top or (L.type_name(layer) in L.DATA_TYPES and not len(layer.bottom)):
            continue
        piece = copy(layer)
        runs = cut.top[layer.name]
        if set(runs) != L.phases(layer) or len(runs) == 1:
            piece.ClearField("include")
            piece.ClearField("exclude")
            if len(runs) == 1:
                piece.include.add().phase = _phase_value(piece, runs[0])
        for repeated in (piece.bottom, piece.top):
            repeated[:] = [renames.get(blob, blob) for blob in repeated]
        result.layer.append(piece)
    return result


def top_solver(solver: Message, net_path: Path) -> Message:
    """The user's solver (iterations, lr policy, test interval, snapshots as they are) training the top net."""
    for name in ("train_net", "train_net_param", "net_param", "test_net_param"):
        if solver.HasField(name) if name != "test_net_param" else len(solver.test_net_param):
            raise RunError(f"--cache-features needs the solver's net in one file (net: ...); it uses {name}",
                           fix="write train and test in one train_val.prototxt named by `net:`, or run without "
                               "--cache-features")
    if len(solver.test_net):
        raise RunError("--cache-features needs the solver's net in one file (net: ...); it uses test_net",
                       fix="write train and test in one train_val.prototxt, or run without --cache-features")
    if solver.snapshot_format == solver.HDF5:
        raise RunError("--cache-features writes full-net caffemodels from BINARYPROTO snapshots; the solver asks "
                       "for HDF5 snapshots", fix="drop snapshot_format: HDF5, or run without --cache-features")
    result = type(solver)()
    result.CopyFrom(solver)
    result.net = str(net_path)
    return result


# --- full-net caffemodels --------------------------------------------------------------------------------------------
def is_top_only(path: Path, cut: Cut) -> bool:
    """Whether a caffemodel lacks the trunk (a snapshot of the top net not yet assembled)."""
    names = {record.name for record in caffemodels.read_layers(path)}
    return cut.frozen[0] not in names


def trained_blobs(snapshot: Path, layer_names: list[str]) -> dict[str, list[np.ndarray]]:
    with caffemodels.Caffemodel(snapshot) as model:
        return {record.name: [model.array(blob, copy=True) for blob in record.blobs]
                for record in model.layers() if record.name in layer_names and record.blobs}


def assemble(weights: Path, full_net: Path, snapshot: Path, output: Path, cut: Cut) -> graft.Report:
    """`output`: the full net's caffemodel, the trunk from `weights` (bytes copied) and the trained layers from
    the top `snapshot` (`output` may be `snapshot` itself: it is read first, then replaced atomically)."""
    fitted = trained_blobs(snapshot, cut.trainable)
    missing = [name for name in cut.trainable if name not in fitted]
    if missing:
        raise RunError(f"the top snapshot has no blobs for {', '.join(missing)}", where=str(snapshot),
                       fix="the snapshot is not one of this run's top net")
    return graft.graft(weights, full_net, output, fitted=fitted)


def check_trunk_weights(weights: Path, net: Message, cut: Cut) -> None:
    """Every frozen trunk layer must come from the weights: one left to its filler would be random at every run."""
    names = {record.name for record in caffemodels.read_layers(weights)}
    missing = [name for name in cut.frozen if name not in names]
    if missing:
        raise NetError(f"the frozen layer {missing[0]} has no weights in {Path(weights).name} (it would stay at "
                       f"its random filler values){f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}",
                       where=missing[0], fix="give it weights (caffetune graft --fill writes them), unfreeze it, "
                                             "or run without --cache-features")


def schema_has_hdf5() -> bool:
    return "hdf5_data_param" in schema.current().LayerParameter.DESCRIPTOR.fields_by_name

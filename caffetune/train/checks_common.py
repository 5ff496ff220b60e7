"""What every preflight check module shares: the levels, the run being checked (`Run`), and where-strings.

Levels: an ERROR means caffe would crash or the run cannot learn, so it does not start; a WARNING is very likely a
mistake, the run starts anyway (`caffetune run --strict` turns warnings into errors).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import Message

from caffetune.errors import Problem
from caffetune.model import layers

ERROR, WARNING = "error", "warning"


def error(what: str, where: str, fix: str, why: str = "") -> Problem:
    return Problem(what, where, fix, why, ERROR)


def warning(what: str, where: str, fix: str, why: str = "") -> Problem:
    return Problem(what, where, fix, why, WARNING)


@dataclass
class Run:
    """Everything a check may look at. `scans`: (net file, layer name, phase) -> DataScan of that data layer."""

    nets: dict[str, Message]
    roles: dict[str, str] = field(default_factory=dict)      # net file -> "net", "train_net" or "test_net"
    solver: Message | None = None
    weights: list[Path] = field(default_factory=list)
    pretrained: dict = field(default_factory=dict)            # layer name -> BlobRefs (later weights files win)
    scans: dict = field(default_factory=dict)
    param_shapes: dict = field(default_factory=dict)          # "file:PHASE" -> layer -> blob shapes (pycaffe)
    loss_blobs: dict = field(default_factory=dict)            # "file:PHASE" -> blobs with a loss weight (pycaffe)

    def role(self, name: str) -> str:
        return self.roles.get(name, "net")

    def phases(self, name: str) -> list[str]:
        """The phases caffe builds a net file in."""
        return {"train_net": ["TRAIN"], "test_net": ["TEST"]}.get(self.role(name), ["TRAIN", "TEST"])

    def layers_in(self, name: str, phase: str) -> list[Message]:
        return [layer for layer in layers.all_layers(self.nets[name]) if phase in layers.phases(layer)]

    def scan_for(self, name: str, phase: str):
        """The DataScan of the labelled data layer `name` reads in `phase` (None when unknown)."""
        for (net_name, _layer, scan_phase), scan in self.scans.items():
            if net_name == name and scan_phase == phase and scan is not None:
                return scan
        return None


def layer_where(name: str, layer: Message) -> str:
    """"train_val.prototxt: layer fc (TEST)" - which file, which layer, and the phases it runs in."""
    return f"{name}: layer {layer.name} ({'/'.join(sorted(layers.phases(layer)))})"


def batch_size(layer: Message) -> int | None:
    """The batch a data layer produces (Data, ImageData, HDF5Data, MemoryData, WindowData; Input's first dim)."""
    if layers.type_name(layer) == "Input":
        shapes = layer.input_param.shape
        return shapes[0].dim[0] if shapes and shapes[0].dim else None
    params = layers.param_message(layer)
    if params is not None and "batch_size" in params.DESCRIPTOR.fields_by_name:
        return params.batch_size or None
    return None


def plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")

"""Where a net splits into a frozen trunk and a trainable top (for `run --cache-features`).

The trunk is every layer, in net order, that
  - has no learnable blob, or whose blobs all have lr_mult 0 (BatchNorm: `use_global_stats: true`, since Caffe
    masks its statistics from the solver anyway and updates them in the TRAIN forward pass otherwise),
  - reads only blobs the data layer or other trunk layers produced,
  - is deterministic (not Dropout, not a Python layer), and
  - feeds something: a loss, an Accuracy, or any layer whose output no later layer reads is an output of the net
    and stays in the top, so that the top prints what the full net prints.
The cut blobs are the blobs the top reads from the data layer or the trunk (the label among them). A blob that a
trunk layer changes in place after a top layer has read it would be cached with the wrong value: such a layer goes
to the top instead. Each phase has its own cut; a layer's TEST membership follows its TRAIN membership.

Dropout never joins the trunk, so a Dropout at the cut simply runs in the top net (same distribution of masks;
Caffe's random stream differs, so masks are not bit-identical). Frozen layers after a Dropout run in the top.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf.message import Message

from caffetune.errors import NetError
from caffetune.model import layers as L

PHASES = ("TRAIN", "TEST")
FEATURE_SOURCE_TYPES = ("Data", "ImageData")        # what the feature pass can read with Caffe's own layer
RANDOM_TYPES = frozenset({"Dropout", "Python"})     # never cached: their output is not a function of the input
OUTPUT_TYPES = frozenset({"Accuracy", "Silence"})


@dataclass
class PhaseCut:
    phase: str
    data_layer: Message                               # the phase's Data/ImageData layer
    trunk: list[str]                                  # trunk layer names of this phase, in net order
    blobs: list[str]                                  # the cut: blobs the top reads from the data layer / trunk

    def as_dict(self) -> dict:
        return {"data_layer": self.data_layer.name, "trunk_layers": len(self.trunk), "blobs": self.blobs}


@dataclass
class Cut:
    phases: dict[str, PhaseCut]
    frozen: list[str]                                 # trunk layers with blobs (their weights never change)
    top: dict[str, list[str]]                         # top layer name -> phases it runs in, in the top net
    trainable: list[str]                              # top layers with a blob the solver updates
    notes: list[str] = field(default_factory=list)

    @property
    def trunk(self) -> list[str]:
        return self.phases["TRAIN"].trunk

    def as_dict(self) -> dict:
        return {"phases": {name: cut.as_dict() for name, cut in self.phases.items()}, "frozen": self.frozen,
                "top": list(self.top), "trainable": self.trainable, "notes": self.notes}


# --- single layers ------------------------------------------------------------------------------------------------
def is_frozen(layer: Message, phase: str) -> bool:
    """Whether the solver never changes the layer's blobs and its output is a function of its input alone."""
    kind = L.type_name(layer)
    if kind in RANDOM_TYPES:
        return False
    if kind == "BatchNorm":
        params = layer.batch_norm_param
        return params.use_global_stats if params.HasField("use_global_stats") else phase == "TEST"
    if L.learnable_blob_count(layer) == 0:
        return True
    return all(mult == 0 for mult in L.lr_mults(layer))


def is_output_layer(layer: Message) -> bool:
    kind = L.type_name(layer)
    weights = list(getattr(layer, "loss_weight", []))
    return kind.endswith("Loss") or kind in OUTPUT_TYPES or any(w != 0 for w in weights)


def is_data_layer(layer: Message) -> bool:
    return L.type_name(layer) in L.DATA_TYPES and not len(layer.bottom)


def phase_layers(net: Message, phase: str) -> list[Message]:
    return [layer for layer in L.all_layers(net) if phase in L.phases(layer)]


def _read_later(layers: list[Message]) -> list[set[str]]:
    """For each position, the blobs some later layer reads."""
    later: list[set[str]] = [set() for _ in layers]
    seen: set[str] = set()
    for index in range(len(layers) - 1, -1, -1):
        later[index] = set(seen)
        seen.update(layers[index].bottom)
    return later


# --- a phase --------------------------------------------------------------------------------------------------------
def _data_layer(layers: list[Message], phase: str) -> Message:
    found = [layer for layer in layers if is_data_layer(layer)]
    if len(found) != 1 or L.type_name(found[0]) not in FEATURE_SOURCE_TYPES:
        kinds = ", ".join(f"{item.name} ({L.type_name(item)})" for item in found) or "none"
        raise NetError(f"caching features needs one Data or ImageData layer in the {phase} phase; it has {kinds}",
                       fix="run without --cache-features, or give the net one Data/ImageData layer per phase")
    return found[0]


def phase_cut(net: Message, phase: str, allowed: set[str] | None = None) -> PhaseCut:
    """The trunk and the cut of one phase. `allowed`: only these layers may join the trunk (TEST follows TRAIN)."""
    layers = phase_layers(net, phase)
    data = _data_layer(layers, phase)
    data_index = next(i for i, layer in enumerate(layers) if layer.name == data.name and is_data_layer(layer))
    later = _read_later(layers)
    from_trunk: dict[str, bool] = {}
    read_by_top: set[str] = set()
    trunk, cut = [], []
    for index, layer in enumerate(layers):
        if is_data_layer(layer):
            from_trunk.update({top: index == data_index for top in layer.top})
            continue
        feeds = any(top in later[index] for top in layer.top)
        eligible = (all(from_trunk.get(blob, False) for blob in layer.bottom) and is_frozen(layer, phase)
                    and not is_output_layer(layer) and feeds and (allowed is None or layer.name in allowed)
                    and not any(top in read_by_top for top in layer.top))
        if eligible:
            trunk.append(layer.name)
        else:
            for blob in layer.bottom:
                if from_trunk.get(blob) and blob not in cut:
                    cut.append(blob)
                read_by_top.add(blob)
        from_trunk.update({top: eligible for top in layer.top})
    return PhaseCut(phase, data, trunk, cut)


def find_cut(net: Message) -> Cut:
    """The frozen trunk and the cut blobs of a train_val net; NetError says why there is nothing to cache."""
    L.check_not_mixed(net)
    train = phase_cut(net, "TRAIN")
    test = phase_cut(net, "TEST", allowed=set(train.trunk)) if phase_layers(net, "TEST") and any(
        is_data_layer(layer) for layer in phase_layers(net, "TEST")) else None
    by_name = {layer.name: layer for layer in L.all_layers(net)}
    frozen = [name for name in train.trunk if L.learnable_blob_count(by_name[name])]
    if not frozen:
        raise NetError("no layer with weights is frozen before the trainable part: there is nothing to cache",
                       fix="freeze the backbone (`caffetune rewrite --freeze backbone` sets lr_mult 0 and BatchNorm "
                           "use_global_stats), or run without --cache-features")
    cuts = {"TRAIN": train} | ({"TEST": test} if test else {})
    top: dict[str, list[str]] = {}
    for layer in L.all_layers(net):
        if is_data_layer(layer):
            continue
        runs = [p for p in PHASES if p in L.phases(layer) and p in cuts and layer.name not in cuts[p].trunk]
        if runs:
            top.setdefault(layer.name, runs)
    trainable = [name for name in top if L.learnable_blob_count(by_name[name])
                 and not is_frozen(by_name[name], "TRAIN")]
    if not trainable:
        raise NetError("every layer with weights is frozen: there is nothing to train",
                       fix="give the new head lr_mult > 0")
    notes = [f"{name} runs in the top net (Dropout draws a new mask every pass; it is never cached)"
             for name in top if L.type_name(by_name[name]) == "Dropout"]
    frozen_top = [name for name in top if L.learnable_blob_count(by_name[name]) and name not in trainable]
    if frozen_top:
        notes.append(f"frozen layers after the cut run in the top net every iteration: {', '.join(frozen_top)}")
    return Cut(cuts, frozen, top, trainable, notes)

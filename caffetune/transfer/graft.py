"""Graft pretrained weights onto a new net: copy every blob whose layer name and shape match, report the rest.

Chainer's copy_model idiom for Caffe. The matching is Caffe's own (Net::CopyTrainedLayersFrom): a source layer
pairs with the net's layer of the same name (or the name `--map` gives it); blobs are compared with Blob::ShapeEquals,
so legacy 4-D blobs of old caffemodels match. Where Caffe would abort (blob count or shape mismatch), graft copies
what matches and initialises the rest with numpy versions of Caffe's fillers; layers with nothing to copy are left
out of the file so that Caffe fills them itself (or filled here with `fill_new=True`). Copied blobs are written
byte for byte from the source file, so they are bit-identical and never pass through Python floats.

`keep_classes` carries the rows of classes the new head keeps: old class i becomes new class j.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf.message import Message

from caffetune import files
from caffetune.errors import NetError
from caffetune.model import caffemodels, prototxt, schema, shapes
from caffetune.model import layers as L
from caffetune.transfer.fillers import initial_blob

COPIED, PARTIAL, SCRATCH, MISMATCHED = "copied", "partial", "scratch", "mismatched"


@dataclass
class BlobPlan:
    index: int
    target: tuple | None               # the net's shape (None dims: unknown, taken from the source)
    action: str                        # "copy", "rows" (keep-classes), "fill", or "leave" (Caffe fills it)
    source: caffemodels.BlobRef | None = None
    note: str = ""


@dataclass
class LayerPlan:
    name: str                          # the layer in the new net
    source: str | None                 # the source layer it pairs with
    state: str                         # copied / partial / scratch / mismatched
    blobs: list[BlobPlan] = field(default_factory=list)
    detail: str = ""

    @property
    def written(self) -> bool:
        """Whether the layer goes into the file by default: something in it comes from the source."""
        return any(blob.action in ("copy", "rows") for blob in self.blobs)


@dataclass
class Plan:
    layers: list[LayerPlan]
    unused: list[str]                  # source layers the net has no layer for ("Ignoring source layer")
    problems: list[str] = field(default_factory=list)

    def names(self, state: str) -> list[str]:
        return [layer.name for layer in self.layers if layer.state == state]

    def as_dict(self) -> dict:
        return {"copied": self.names(COPIED), "partial": self.names(PARTIAL), "scratch": self.names(SCRATCH),
                "mismatched": {layer.name: layer.detail for layer in self.layers if layer.state == MISMATCHED},
                "unused": self.unused, "problems": self.problems,
                "layers": [{"name": lp.name, "source": lp.source, "state": lp.state, "detail": lp.detail,
                            "blobs": [{"index": b.index, "target": b.target, "action": b.action, "note": b.note,
                                       "source": list(b.source.shape) if b.source else None} for b in lp.blobs]}
                           for lp in self.layers]}


# ---- parsing the options ---------------------------------------------------------------------------------------
def parse_map(items: list[str]) -> dict[str, str]:
    """`--map old=new` entries -> {new name: old name}."""
    mapping = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise NetError(f"--map {item!r} is not OLD=NEW", fix="write --map fc8=fc8_flickr (source name = new name)")
        mapping[new] = old
    return mapping


def parse_keep_classes(text: str) -> list[tuple[int, int]]:
    """`old:new,old:new,...` -> [(old, new), ...]."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        old, sep, new = item.partition(":")
        if not sep or not old.strip().isdigit() or not new.strip().isdigit():
            raise NetError(f"--keep-classes entry {item!r} is not OLD_INDEX:NEW_INDEX",
                           fix="write e.g. --keep-classes 281:0,285:1 (class 281 of the old head becomes class 0)")
        pairs.append((int(old), int(new)))
    _check_unique(pairs)
    return pairs


def _check_unique(pairs: list[tuple[int, int]]) -> None:
    news = [new for _, new in pairs]
    duplicated = sorted({n for n in news if news.count(n) > 1})
    if duplicated:
        raise NetError(f"--keep-classes gives new class {duplicated[0]} more than one old class",
                       fix="map each new class index from exactly one old class")


def keep_classes_from_labels(old_labels: Path | str, new_labels: Path | str) -> list[tuple[int, int]]:
    """Pairs (old index, new index) of the classes whose label (one per line, as in synset_words.txt) both
    files share; a label matches on the whole line or on its first word (the synset id)."""
    old_lines = [line.strip() for line in prototxt.read_text(old_labels).splitlines()]
    index: dict[str, int] = {}
    for i, line in enumerate(old_lines):
        if line:
            index.setdefault(line.lower(), i)
            index.setdefault(line.split()[0].lower(), i)
    pairs = []
    for new, line in enumerate(prototxt.read_text(new_labels).splitlines()):
        line = line.strip()
        old = index.get(line.lower()) if line else None
        if old is None and line:
            old = index.get(line.split()[0].lower())
        if old is not None:
            pairs.append((old, new))
    if not pairs:
        raise NetError("the two label files share no class", where=str(new_labels),
                       fix="list one class per line, spelled as in the old model's labels")
    return pairs


# ---- planning --------------------------------------------------------------------------------------------------
def _net_layers(net: Message) -> dict[str, Message]:
    """The net's layers by name, first occurrence (train_val nets repeat data layers per phase)."""
    named: dict[str, Message] = {}
    for layer in L.all_layers(net):
        named.setdefault(layer.name, layer)
    return named


def _phase_names(net: Message, phase: str | None) -> set[str]:
    """The layer names Caffe's net has in `phase` (both phases when None), with the Split layers it inserts."""
    phases = [phase] if phase else ["TRAIN", "TEST"]
    names = {layer.name for layer in L.all_layers(net) if phase is None or phase in L.phases(layer)}
    if len(net.input):
        names.add("input")  # Caffe's UpgradeNetInput turns net-level inputs into an Input layer named "input"
    return names.union(*(split_layer_names(net, p) for p in phases))


def split_layer_names(net: Message, phase: str) -> set[str]:
    """Names of the Split layers Caffe inserts where a blob feeds several layers (insert_splits.cpp). Net::ToProto
    saves them into caffemodels, and Caffe does not ignore them when the new net splits the same blob."""
    last_top = {blob: (-1, "input", 0, blob) for blob in net.input}  # Caffe turns net inputs into an "input" layer
    uses: dict[tuple, int] = {}
    for index, layer in enumerate(L.all_layers(net)):
        if phase not in L.phases(layer):
            continue
        for blob in layer.bottom:
            if blob in last_top:
                uses[last_top[blob]] = uses.get(last_top[blob], 0) + 1
        for j, blob in enumerate(layer.top):
            last_top[blob] = (index, layer.name, j, blob)
        for j, weight in enumerate(list(getattr(layer, "loss_weight", []))[:len(layer.top)]):
            if weight:  # a top used as a loss counts as one more use
                uses[last_top[layer.top[j]]] = uses.get(last_top[layer.top[j]], 0) + 1
    return {f"{blob}_{name}_{j}_split" for (_, name, j, blob), count in uses.items() if count > 1}


def source_dims(blob: caffemodels.BlobRef, rank: int) -> tuple | None:
    """The source blob's shape at the target's rank (a legacy 4-D blob drops its leading 1s), or None."""
    shape = tuple(blob.shape)
    if blob.legacy and len(shape) > rank:
        if any(d != 1 for d in shape[:len(shape) - rank]):
            return None
        shape = shape[len(shape) - rank:]
    return shape if len(shape) == rank else None


def _shape_equal(blob: caffemodels.BlobRef, target: tuple | None) -> bool:
    """Blob::ShapeEquals, where an unknown target dimension accepts the source's."""
    if target is None:
        return True
    if None not in target:
        return caffemodels.shape_matches(blob, target)
    source = source_dims(blob, len(target))
    return source is not None and all(t is None or t == s for s, t in zip(source, target))


def _class_axis(layer: Message, index: int) -> int:
    """Axis of the class (output) dimension in the layer's blob `index`."""
    if index == 0 and L.type_name(layer) == "InnerProduct" and layer.inner_product_param.transpose:
        return 1
    return 0


def _rows_compatible(blob: caffemodels.BlobRef, target: tuple | None, axis: int) -> bool:
    """Whether the blobs differ only in the class axis (the head of a net with another class count)."""
    if target is None or None in target:
        return False
    source = source_dims(blob, len(target))
    return source is not None and all(s == t for i, (s, t) in enumerate(zip(source, target)) if i != axis)


def _plan_blobs(layer: Message, targets: list, source: caffemodels.LayerRecord, keep: list | None) -> list[BlobPlan]:
    plans = []
    for i, target in enumerate(targets):
        blob = source.blobs[i] if i < len(source.blobs) else None
        if blob is None:
            plans.append(BlobPlan(i, target, "fill", note="the source layer has no such blob"))
        elif _shape_equal(blob, target):
            unknown = target is None or None in target
            plans.append(BlobPlan(i, target, "copy", blob, "net shape not fully known; source shape taken"
                                  if unknown else ""))
        elif keep and _rows_compatible(blob, target, _class_axis(layer, i)):
            plans.append(BlobPlan(i, target, "rows", blob, f"{len(keep)} class row(s) kept"))
        else:
            plans.append(BlobPlan(i, target, "fill", blob, f"shape {_fmt(blob.shape)} in the source, "
                                                           f"{_fmt(target)} in the net"))
    return plans


def _fmt(shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")" if shape is not None else "(?)"


def _plan_layer(layer: Message, targets: list | None, source: caffemodels.LayerRecord | None, keep) -> LayerPlan:
    if targets is None:
        targets = [None] * (len(source.blobs) if source else L.learnable_blob_count(layer))
    if source is None:
        return LayerPlan(layer.name, None, SCRATCH, [BlobPlan(i, t, "leave") for i, t in enumerate(targets)])
    plans = _plan_blobs(layer, targets, source, keep)
    if len(source.blobs) != len(targets):  # e.g. bias_term changed: Caffe aborts, graft copies what still fits
        detail = f"{len(source.blobs)} blob(s) in the source, {len(targets)} in the net"
        return LayerPlan(layer.name, source.name, MISMATCHED, plans, detail)
    if all(p.action == "copy" for p in plans):
        assumed = [p for p in plans if p.note]
        detail = ("the net's shape is not fully known (its data source does not exist yet?): copied with the "
                  f"source's shape {_fmt(assumed[0].source.shape)}" if assumed else "")
        return LayerPlan(layer.name, source.name, COPIED, plans, detail)
    notes = "; ".join(f"blob {p.index}: {p.note}" for p in plans if p.action != "copy")
    state = PARTIAL if any(p.action == "rows" for p in plans) else MISMATCHED
    return LayerPlan(layer.name, source.name, state, plans, notes)


def plan(records: list[caffemodels.LayerRecord], net: Message, net_shapes: shapes.NetShapes, *,
         mapping: dict[str, str] | None = None, keep: list[tuple[int, int]] | None = None,
         phase: str | None = None) -> Plan:
    """What grafting `records` (a caffemodel's layers) onto `net` does, layer by layer, as Caffe would match them.

    `mapping` is {new name: old name}; `phase` restricts the net to one phase (as `caffe train` builds it)."""
    mapping = mapping or {}
    by_name = {record.name: record for record in records}
    names = _phase_names(net, phase)
    layer_plans = []
    for name, layer in _net_layers(net).items():
        if name not in names:
            continue
        source = by_name.get(mapping.get(name, name))
        if L.learnable_blob_count(layer) == 0 and not (source and source.blobs):
            continue
        targets = net_shapes.params.get(name) if name in net_shapes.params else None
        layer_plans.append(_plan_layer(layer, targets, source, keep))
    used = {lp.source for lp in layer_plans} | {mapping.get(n, n) for n in names}
    unused = [record.name for record in records if record.name not in used]
    result = Plan(layer_plans, unused)
    if keep and not any(lp.state == PARTIAL for lp in layer_plans):
        result.problems.append("--keep-classes applies to no layer: no layer pairs with a source layer whose blobs "
                               "differ only in the class count (if the head was renamed, pass --map OLD=NEW)")
    return result


def kept_rows(source: np.ndarray, target_shape: tuple, axis: int, keep: list[tuple[int, int]],
              initial: np.ndarray) -> np.ndarray:
    """The new head's blob: `initial`, with slice new_index taken from the source's slice old_index on `axis`."""
    result = np.array(initial, dtype=np.float32, copy=True)
    source = source.reshape(tuple(source.shape)[-len(target_shape):]) if source.ndim != len(target_shape) else source
    for old, new in keep:
        if old >= source.shape[axis] or new >= target_shape[axis]:
            raise NetError(f"--keep-classes {old}:{new} is out of range: the source head has {source.shape[axis]} "
                           f"classes, the new one {target_shape[axis]}",
                           fix="use 0-based class indices below those counts")
        index_new = [slice(None)] * len(target_shape)
        index_old = [slice(None)] * len(target_shape)
        index_new[axis], index_old[axis] = new, old
        result[tuple(index_new)] = source[tuple(index_old)]
    return result


# ---- writing ---------------------------------------------------------------------------------------------------
@dataclass
class Report:
    plan: Plan
    output: str
    written_layers: list[str]
    filled: list[str]                  # "layer[blob]" initialised by caffetune's fillers
    left_to_caffe: list[str]           # layers left out: Caffe fills them when it builds the net
    bytes_written: int = 0
    fitted: list[str] = field(default_factory=list)    # layers whose blobs the caller computed (headfit)

    def as_dict(self) -> dict:
        return self.plan.as_dict() | {"output": self.output, "written_layers": self.written_layers,
                                      "filled": self.filled, "left_to_caffe": self.left_to_caffe,
                                      "fitted": self.fitted, "bytes_written": self.bytes_written}


def _layer_header(layer: Message) -> bytes:
    """The layer's definition without blobs, in the current format (as Net::ToProto writes it)."""
    if L.is_v1_layer(layer):
        header = schema.current().LayerParameter(name=layer.name, type=L.type_name(layer))
        header.bottom.extend(layer.bottom)
        header.top.extend(layer.top)
    else:
        header = type(layer)()
        header.CopyFrom(layer)
        header.ClearField("blobs")
    return header.SerializeToString()


def _resolve_blobs(layer: Message, lp: LayerPlan, model: caffemodels.Caffemodel, keep, rng, fill_new: bool):
    """Each blob to write: ("range", start, end) of the source file, or ("array", values) to encode."""
    if not lp.written and not fill_new:
        return []
    pieces = []
    for bp in lp.blobs:
        if bp.action == "copy":
            pieces.append(("range", *bp.source.span))
            continue
        if bp.target is None or None in bp.target:
            raise NetError(f"cannot initialise blob {bp.index} of layer {lp.name}: its shape is not known",
                           where=lp.name, fix="give the net an Input layer or build its LMDB first, so that "
                                              "shapes can be inferred")
        initial = initial_blob(layer, bp.index, bp.target, rng)
        if bp.action == "rows":
            initial = kept_rows(model.array(bp.source), bp.target, _class_axis(layer, bp.index), keep, initial)
        pieces.append(("array", np.ascontiguousarray(initial, dtype="<f4")))
    return pieces


def _piece_size(piece) -> int:
    if piece[0] == "range":
        size = piece[2] - piece[1]
    else:
        size = len(caffemodels.blob_header(piece[1].shape)) + piece[1].nbytes
    return len(caffemodels.length_prefix(caffemodels.number_of("LayerParameter", "blobs"), size)) + size


def _write_layer(handle, header: bytes, pieces, model: caffemodels.Caffemodel) -> int:
    blobs_number = caffemodels.number_of("LayerParameter", "blobs")
    total = len(header) + sum(_piece_size(p) for p in pieces)
    opening = caffemodels.length_prefix(caffemodels.number_of("NetParameter", "layer"), total)
    handle.write(opening + header)
    for piece in pieces:
        if piece[0] == "range":
            handle.write(caffemodels.length_prefix(blobs_number, piece[2] - piece[1]))
            caffemodels.copy_range(model, piece[1], piece[2], handle)
        else:  # the header, then the values straight from the array's memory (no bytes copy of a big blob)
            header = caffemodels.blob_header(piece[1].shape)
            handle.write(caffemodels.length_prefix(blobs_number, len(header) + piece[1].nbytes) + header)
            handle.write(memoryview(piece[1]).cast("B"))
    return len(opening) + total


def _fitted_pieces(lp: LayerPlan, arrays: list[np.ndarray]) -> list:
    """The caller's blobs for a layer, checked against the net's shapes."""
    targets = [bp.target for bp in lp.blobs]
    if len(arrays) != len(targets) or any(t is not None and None not in t and tuple(a.shape) != tuple(t)
                                          for a, t in zip(arrays, targets)):
        raise NetError(f"layer {lp.name}: the given blobs {[tuple(a.shape) for a in arrays]} do not fit the net's "
                       f"{[_fmt(t) for t in targets]}", where=lp.name, fix="compute them for this net")
    return [("array", np.ascontiguousarray(a, dtype="<f4")) for a in arrays]


def graft(source: Path | str, net_path: Path | str, output: Path | str, *, mapping: dict[str, str] | None = None,
          keep: list[tuple[int, int]] | None = None, fill_new: bool = False, seed: int = 0,
          fitted: dict[str, list[np.ndarray]] | None = None,
          progress: Callable[[str], None] | None = None) -> Report:
    """Write `output`, a caffemodel for the net at `net_path` with the matching blobs of `source` copied.

    `fitted` gives a layer's blobs outright (a head fitted by `headfit`); they replace whatever the source has."""
    fitted = fitted or {}
    progress = progress or (lambda message: None)
    net = prototxt.load(net_path)
    L.check_not_mixed(net, str(net_path))
    if Path(output).resolve() == Path(source).resolve():
        raise NetError("the output would overwrite the source caffemodel", where=str(output),
                       fix="write the grafted weights to a new file with -o")
    net_shapes = shapes.infer_all(net, base_dir=Path(net_path).parent)
    rng = np.random.default_rng(seed)
    with caffemodels.Caffemodel(source) as model:
        records = list(model.layers())
        the_plan = plan(records, net, net_shapes, mapping=mapping, keep=keep)
        if keep and the_plan.problems:
            raise NetError(the_plan.problems[0], where=str(net_path), fix="pass --map OLD_HEAD=NEW_HEAD")
        _check_mapping(mapping or {}, records, net)
        unknown = sorted(set(fitted) - {lp.name for lp in the_plan.layers})
        if unknown:
            raise NetError(f"no learnable layer {unknown[0]} in the net to write fitted blobs to", where=unknown[0],
                           fix="name a layer of the net")
        if not fill_new and not any(lp.written for lp in the_plan.layers):
            raise NetError("no blob of the source fits the net: nothing to graft", where=str(source),
                           fix="check that SRC is the model the net was derived from; --map OLD=NEW pairs renamed "
                               "layers, --fill writes an initialised caffemodel anyway")
        report = Report(the_plan, str(output), [], [], [])
        layers_by_name = _net_layers(net)
        with files.atomic_output(output) as handle:
            name = net.name.encode()
            handle.write(caffemodels.length_prefix(caffemodels.number_of("NetParameter", "name"), len(name)) + name)
            report.bytes_written += len(name)
            for lp in the_plan.layers:
                layer = layers_by_name[lp.name]
                if lp.name in fitted:
                    pieces = _fitted_pieces(lp, fitted[lp.name])
                    report.bytes_written += _write_layer(handle, _layer_header(layer), pieces, model)
                    report.written_layers.append(lp.name)
                    report.fitted.append(lp.name)
                    continue
                pieces = _resolve_blobs(layer, lp, model, keep, rng, fill_new)
                if not pieces and lp.blobs:
                    report.left_to_caffe.append(lp.name)
                    continue
                report.bytes_written += _write_layer(handle, _layer_header(layer), pieces, model)
                report.written_layers.append(lp.name)
                report.filled += [f"{lp.name}[{bp.index}]" for bp in lp.blobs if bp.action != "copy"]
                progress(f"{lp.state:>10}  {lp.name}")
    return report


def _check_mapping(mapping: dict[str, str], records, net: Message) -> None:
    names = {record.name for record in records}
    net_names = set(_net_layers(net))
    for new, old in mapping.items():
        if old not in names:
            raise NetError(f"--map {old}={new}: the source caffemodel has no layer {old}", where=old,
                           fix=f"source layers: {', '.join(sorted(names)[:12])}")
        if new not in net_names:
            raise NetError(f"--map {old}={new}: the net has no layer {new}", where=new,
                           fix="give the new net's layer name on the right of =")


"""Applying a class-count analysis (class_layers) to a net: every class-dependent layer and setting changed together.

    net, renames, lines = class_rewrite.apply(net, analysis, classes=7, rename=namer, class_weights=())

Each class layer is renamed (`rename(old) -> new`, as heads are, so `-weights` does not copy the old class weights
into it) and gets `multiple x N` outputs; a convolution group equal to its width follows it. A fixed upsampling
Deconvolution (lr_mult 0, FCN's upscore) without a weight filler would start at zero once renamed: it gets
Caffe's bilinear filler and one group per class, the per-class interpolation FCN's own surgery sets. Settings
are set to `multiple x N`; per-class `class_weighting` lists need `class_weights` (N values). `lines` is the plan:
one line per change, with its reason.
"""
from __future__ import annotations

from collections.abc import Callable

from google.protobuf.message import Message

from caffetune.errors import NetError
from caffetune.model import layers
from caffetune.surgery import net_edits
from caffetune.surgery.class_layers import COUNT_KEY, Analysis, ClassLayer, Setting


def count_line(analysis: Analysis, classes: int) -> str:
    what = f"{classes} outputs"
    if analysis.background:
        what += f" = {classes - 1} object classes + background"
    old = f"{analysis.count}" + (" (background included)" if analysis.background else "")
    return f"class count ({analysis.task}): {old} -> {what}"


def _layer(net: Message, name: str) -> Message:
    for layer in layers.all_layers(net):
        if layer.name == name:
            return layer
    raise NetError(f"the net has no layer named {name}", where=name)


def _resize(net: Message, entry: ClassLayer, new_name: str, count: int, classes: int,
            lines: list[str]) -> Message:
    size = entry.new_size(classes)
    net = net_edits.set_num_output(net, new_name, size)
    layer = _layer(net, new_name)
    params = layers.param_message(layer)
    rename = f" (renamed {new_name})" if new_name != entry.name else ""
    lines.append(f"{entry.name}{rename}: {entry.type} num_output {_change(entry.num_output, size)}: {entry.reason}")
    if entry.group > 1:
        if entry.group != entry.num_output and entry.group % count:
            raise NetError(f"{entry.name}: group {entry.group} is not tied to the {count} classes", where=entry.name,
                           fix="edit the net by hand; caffetune will not guess")
        group = size if entry.group == entry.num_output else entry.group // count * classes
        params.group = group
        lines.append(f"{entry.name}: group {_change(entry.group, group)} (one group per class map)")
    elif entry.fixed and entry.type == "Deconvolution" and not params.HasField("weight_filler"):
        params.group = size
        params.weight_filler.type = "bilinear"
        lines.append(f"{entry.name}: fixed upsampling (lr_mult 0) with no filler would start at zero once renamed: "
                     f"weight_filler bilinear, group {size} (per-class interpolation)")
    return net


def _change(old, new) -> str:
    return f"{old} (unchanged)" if old == new else f"{old} -> {new}"


def _set_path(message: Message, path: tuple, value) -> None:
    for step in path[:-2]:
        message = message[step] if isinstance(step, int) else getattr(message, step)
    last, before = path[-1], path[-2]
    if isinstance(last, int):
        getattr(message, before)[last] = value
    else:
        setattr(message if isinstance(before, int) else getattr(message, before), last, value)


def _apply_setting(net: Message, setting: Setting, classes: int, class_weights: tuple[float, ...],
                   lines: list[str]) -> Message:
    result = net_edits.copy(net)
    layer = _layer(result, setting.layer)
    if setting.path[-1] == "class_weighting":
        if not class_weights and len(setting.old) == classes:
            lines.append(f"{setting.layer}: class_weighting kept ({classes} values, the class count is unchanged; "
                         f"pass --class-weights to set yours)")
            return result
        if len(class_weights) != classes:
            raise NetError(f"{setting.layer} weighs its loss per class ({len(setting.old)} class_weighting values "
                           f"for the old classes); they cannot be resized meaningfully", where=setting.layer,
                           fix=f"pass --class-weights with {classes} comma-separated weights (e.g. median-frequency "
                               f"balancing of your labels)" if not class_weights else
                           f"give --class-weights exactly {classes} values (got {len(class_weights)})")
        layer.loss_param.class_weighting[:] = list(class_weights)
        lines.append(f"{setting.layer}: class_weighting ({len(setting.old)} values) -> the {classes} given with "
                     f"--class-weights: {setting.reason}")
        return result
    new = setting.multiple * classes
    if setting.path[-1] == "param_str":
        text = layer.python_param.param_str
        match = COUNT_KEY.search(text)
        layer.python_param.param_str = text[:match.start("value")] + str(new) + text[match.end("value"):]
    else:
        _set_path(layer, setting.path, new)
    field = ".".join(str(step) for step in setting.path)
    lines.append(f"{setting.layer}: {field} {_change(setting.old, new)}: {setting.reason}")
    return result


def _rename_and_resize(net: Message, entry: ClassLayer, rename: Callable[[str], str], count: int, classes: int,
                       lines: list[str], renames: dict[str, str]) -> Message:
    new = rename(entry.name)
    net = net_edits.rename_layer(net, entry.name, new)
    renames[entry.name] = new
    return _resize(net, entry, new, count, classes, lines)


def apply(net: Message, analysis: Analysis, classes: int, rename: Callable[[str], str],
          class_weights: tuple[float, ...] = ()) -> tuple[Message, dict[str, str], list[str]]:
    """(edited net, renames old -> new, plan lines); the caller's net is not changed."""
    lines = [count_line(analysis, classes)]
    renames: dict[str, str] = {}
    for setting in analysis.settings:
        net = _apply_setting(net, setting, classes, class_weights, lines)
    for entry in analysis.layers + analysis.label_layers:
        net = _rename_and_resize(net, entry, rename, analysis.count, classes, lines, renames)
    lines += [f"kept {line}" for line in analysis.kept]
    return net, renames, lines


def apply_label_layers(net: Message, entries: list[ClassLayer], settings: list[Setting], count: int, classes: int,
                       rename: Callable[[str], str], class_weights: tuple[float, ...] = ()) \
        -> tuple[Message, dict[str, str], list[str]]:
    """The class-count extras of a plain classifier (center loss centres, class_weighting)."""
    lines: list[str] = []
    renames: dict[str, str] = {}
    for setting in settings:
        net = _apply_setting(net, setting, classes, class_weights, lines)
    for entry in entries:
        net = _rename_and_resize(net, entry, rename, count, classes, lines, renames)
    return net, renames, lines

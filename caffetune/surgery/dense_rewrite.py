"""`rewrite` for detection and segmentation nets (SSD, Faster R-CNN, R-FCN, FCN, SegNet), and the class-count
extras of classifiers (center-loss centres, per-class loss weights).

    result = dense_rewrite.rewrite_net(text, original, net, analysis, options, path=..., solver_net_path=...)

The net is rewritten as it is: a train net stays a train net, a deploy net a deploy net (no train_val or deploy
is derived: their data and output layers are the fork's own). Every class-dependent layer and setting found by
class_layers is changed together (class_rewrite), the new learnable layers get the learning-rate plan of new
heads, fixed upsampling layers stay fixed, and the plan lists every change with its reason.
"""
from __future__ import annotations

from collections.abc import Callable

from google.protobuf.message import Message

from caffetune.model import layers
from caffetune.model.heads import Head
from caffetune.surgery import (
    class_rewrite,
    class_settings,
    derive,
    lr_policy,
    net_edits,
)
from caffetune.surgery import rewrite as rw
from caffetune.surgery.class_layers import Analysis


def _heads(net: Message, analysis: Analysis) -> list[Head]:
    entries = layers.all_layers(net)
    return [Head(name=entry.name, index=entry.index, type=entry.type, num_output=entry.num_output,
                 top=entries[entry.index].top[0] if entries[entry.index].top else "", reason=entry.reason)
            for entry in analysis.layers]


def _init_fillers(net: Message, analysis: Analysis, renames: dict[str, str], notes: list[str]) -> Message:
    for entry in analysis.layers:
        if entry.fixed:
            continue
        net, note = net_edits.ensure_fillers(net, renames[entry.name])
        if note:
            notes.append(note)
    return net


def _data(net: Message, options: rw.Options) -> Message:
    data = options.data
    if any((data.train_source, data.val_source, data.batch_size, data.val_batch_size, data.mean_file,
            data.mean_value, data.crop_size)):
        return net_edits.set_data_layers(net, data)
    return net


def rewrite_net(text: str, original: Message, net: Message, analysis: Analysis, options: rw.Options, *,
                path: str, solver_net_path: str | None = None,
                progress: Callable[[str], None] | None = None) -> rw.Result:
    """Rewrite a detection/segmentation net for options.classes classes (nothing is written)."""
    say = progress or (lambda line: None)
    edited, renames, lines = class_rewrite.apply(net, analysis, options.classes,
                                                 lambda old: rw.new_head_name(old, options), options.class_weights)
    say(lines[0])
    notes = rw._check_weights(list(renames.values()), renames, options.weights) + lines
    edited, top_k_notes = net_edits.fix_accuracy_top_k(edited, options.classes)
    notes += top_k_notes
    deploy = derive.is_deploy(net)
    plan = lr_policy.Plan()
    if not deploy:
        edited = _init_fillers(edited, analysis, renames, notes)
        edited = _data(edited, options)
        new_layers = {renames[entry.name] for entry in analysis.layers if not entry.fixed}
        plan = lr_policy.plan(edited, rw._policy(options, new_layers))
        edited = lr_policy.apply(edited, plan)
    fixed = [renames[entry.name] for entry in analysis.layers if entry.fixed]
    if fixed:
        notes.append(f"{', '.join(fixed)}: fixed (lr_mult 0) upsampling, kept fixed")
    role = rw.DEPLOY if deploy else rw.TRAIN_VAL
    notes.append(f"{rw.TRAIN_VAL if deploy else rw.DEPLOY}: not derived for a {analysis.task} net (its data and "
                 f"output layers are the model's own); rewrite that file the same way")
    result = rw.Result(role, layers.is_v1(net), _heads(net, analysis), renames, plan, notes)
    result.outputs[role] = rw._render(role, text, original, edited, path, notes)
    if options.solver and not deploy:
        result.outputs[rw.SOLVER] = rw._solver_output(edited, options, solver_net_path, notes)
    return result


def classifier_extras(net: Message, found: list[Head], options: rw.Options, notes: list[str]) -> Message:
    """Center-loss style layers (one learned entry per class, read with the label) and per-class loss weights of
    a classifier follow its new class count; the layers are renamed like heads."""
    counts = {head.num_output for head in found}
    if len(counts) != 1:
        return net
    count = counts.pop()
    entries = class_settings.label_layers(net, count, {head.index for head in found})
    settings = class_settings.class_weightings(net, count)
    if not entries and not settings:
        return net
    edited, _, lines = class_rewrite.apply_label_layers(net, entries, settings, count, options.classes,
                                                        lambda old: rw.new_head_name(old, options),
                                                        options.class_weights)
    notes += lines
    return edited

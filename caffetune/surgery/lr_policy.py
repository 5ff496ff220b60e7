"""Learning-rate policy: which layers train, how fast, and which are frozen - computed as a plan, then applied.

    plan = lr_policy.plan(net, Policy(new_layers={"fc8_flickr"}, freeze="backbone"))
    net2 = lr_policy.apply(net, plan)

Rules (Caffe's own constraints included): new layers get `new_lr_mult` (10 for weights, 20 for biases, decay 1/0
as in the Flickr Style example); frozen layers get lr_mult 0 and decay_mult 0; `backbone_lr_mult` becomes the weight
lr_mult of the other layers (their biases keep their ratio, e.g. 2x), so a policy applied twice changes nothing;
BatchNorm's three statistics blobs always have lr_mult 0 (Caffe refuses anything else) and a frozen BatchNorm gets
`use_global_stats: true`; a layer never gets more `param` blocks than it has blobs.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field

from google.protobuf.message import Message

from caffetune.errors import NetError
from caffetune.model import layers

FROZEN, NEW, FINE_TUNED = "frozen", "new", "fine-tuned"


def layer_states(net: Message) -> dict[str, str]:
    """For each layer with learnable blobs: "frozen" (all lr_mult 0), "new" (boosted weight lr_mult > 1) or
    "fine-tuned". A BatchNorm layer counts as frozen when it uses global statistics."""
    states = {}
    for layer in layers.all_layers(net):
        if layers.learnable_blob_count(layer) == 0:
            continue
        if layers.type_name(layer) == "BatchNorm":
            params = layers.param_message(layer)    # None under a fork schema without batch_norm_param
            frozen = params is not None and "use_global_stats" in params.DESCRIPTOR.fields_by_name and \
                params.HasField("use_global_stats") and params.use_global_stats
            states[layer.name] = FROZEN if frozen else FINE_TUNED
            continue
        mults = layers.lr_mults(layer)
        if all(m == 0 for m in mults):
            states[layer.name] = FROZEN
        elif mults and mults[0] > 1:
            states[layer.name] = NEW
        else:
            states[layer.name] = FINE_TUNED
    return states


@dataclass(frozen=True)
class Policy:
    new_layers: frozenset[str] = frozenset()      # names of the (renamed) heads
    new_lr_mult: tuple[float, float] = (10.0, 20.0)
    freeze: str | None = None                     # "backbone": every learnable layer except the new ones
    freeze_through: str | None = None             # freeze every layer up to and including this one
    backbone_lr_mult: float | None = None         # weight lr_mult of the layers that stay trainable (bias keeps ratio)


@dataclass
class LayerPlan:
    name: str
    type: str
    state: str                                    # frozen / new / fine-tuned
    lr_mult: list[float]
    decay_mult: list[float]
    use_global_stats: bool | None = None          # set on frozen BatchNorm layers
    changed: bool = False
    note: str = ""


@dataclass
class Plan:
    layers: list[LayerPlan] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"layers": [asdict(entry) for entry in self.layers]}

    def by_name(self) -> dict[str, LayerPlan]:
        return {entry.name: entry for entry in self.layers}


def _frozen_names(net: Message, policy: Policy) -> set[str]:
    entries = layers.all_layers(net)
    names = [layer.name for layer in entries]
    frozen: set[str] = set()
    if policy.freeze_through:
        if policy.freeze_through not in names:
            close = difflib.get_close_matches(policy.freeze_through, names, n=4, cutoff=0.5)
            learnable = [layer.name for layer in entries if layers.learnable_blob_count(layer)]
            raise NetError(f"--freeze-through {policy.freeze_through}: the net has no layer of that name",
                           fix=f"did you mean {', '.join(close)}?" if close else
                           f"use a layer name, e.g. {', '.join(learnable[:8])}")
        stop = names.index(policy.freeze_through)
        frozen |= set(names[: stop + 1])
    if policy.freeze == "backbone":
        frozen |= set(names)
    elif policy.freeze not in (None, ""):
        raise NetError(f"--freeze {policy.freeze}: unknown choice", fix="use --freeze backbone, or --freeze-through "
                                                                      "LAYER")
    return frozen - set(policy.new_layers)


def _written_specs(layer: Message) -> int:
    return len(layer.blobs_lr) if layers.is_v1_layer(layer) else len(layer.param)


def _plan_batch_norm(layer: Message, frozen: bool) -> LayerPlan:
    written = _written_specs(layer)
    current_lr = layers.lr_mults(layer)[:written]
    global_stats = True if frozen else None
    changed = any(m != 0 for m in current_lr) or written > 3 or (
        frozen and not (layer.batch_norm_param.HasField("use_global_stats")
                        and layer.batch_norm_param.use_global_stats))
    note = "statistics blobs keep lr_mult 0 (Caffe refuses others)"
    return LayerPlan(layer.name, "BatchNorm", FROZEN if frozen else FINE_TUNED, [0.0] * min(written, 3),
                     [0.0] * min(written, 3) if written else [], global_stats, changed, note)


def _backbone_mults(current: list[float], backbone: float | None) -> list[float]:
    """The weight lr_mult becomes `backbone`, the other blobs keep their ratio to it (bias 2x stays 2x), so that
    applying the same policy twice changes nothing."""
    if backbone is None:
        return list(current)
    reference = current[0] if current and current[0] > 0 else None
    if reference is None:
        return [backbone] * len(current)
    return [backbone * m / reference for m in current]


def _plan_layer(layer: Message, policy: Policy, frozen: bool) -> LayerPlan:
    count = layers.learnable_blob_count(layer)
    kind = layers.type_name(layer)
    current_lr, current_decay = layers.lr_mults(layer), layers.decay_mults(layer)
    if layer.name in policy.new_layers:
        weights, bias = policy.new_lr_mult
        lr, decay, state = ([weights, bias] + [bias] * count)[:count], ([1.0, 0.0] + [0.0] * count)[:count], NEW
    elif frozen:
        lr, decay, state = [0.0] * count, [0.0] * count, FROZEN
    else:
        lr, decay, state = _backbone_mults(current_lr, policy.backbone_lr_mult), list(current_decay), FINE_TUNED
    changed = lr != current_lr or decay != current_decay or _written_specs(layer) > count
    return LayerPlan(layer.name, kind, state, lr, decay, None, changed)


def plan(net: Message, policy: Policy) -> Plan:
    """The learning-rate plan for every layer with learnable blobs (nothing is changed yet)."""
    frozen = _frozen_names(net, policy)
    result = Plan()
    for layer in layers.all_layers(net):
        if layers.learnable_blob_count(layer) == 0:
            continue
        if layers.type_name(layer) == "BatchNorm":
            result.layers.append(_plan_batch_norm(layer, layer.name in frozen))
        else:
            result.layers.append(_plan_layer(layer, policy, layer.name in frozen))
    return result


def _apply_v2(layer: Message, entry: LayerPlan) -> None:
    del layer.param[len(entry.lr_mult):]
    for index, (lr, decay) in enumerate(zip(entry.lr_mult, entry.decay_mult)):
        spec = layer.param[index] if index < len(layer.param) else layer.param.add()
        spec.lr_mult, spec.decay_mult = lr, decay


def _apply_v1(layer: Message, entry: LayerPlan) -> None:
    layer.blobs_lr[:] = entry.lr_mult
    layer.weight_decay[:] = entry.decay_mult


def apply(net: Message, the_plan: Plan) -> Message:
    """A copy of `net` with the plan's multipliers written (`param {}` blocks, or V1 blobs_lr/weight_decay)."""
    result = type(net)()
    result.CopyFrom(net)
    planned = the_plan.by_name()
    for layer in layers.all_layers(result):
        entry = planned.get(layer.name)
        if entry is None or not entry.changed:
            continue
        if entry.use_global_stats:
            layer.batch_norm_param.use_global_stats = True
        (_apply_v1 if layers.is_v1_layer(layer) else _apply_v2)(layer, entry)
    return result

"""The search space of `caffetune sweep`: `--param NAME=SPEC` parsed, sampled by an Optuna trial, and applied to
copies of the solver and the nets.

    space = sweep_space.parse(["base_lr=log:1e-4:1e-1", "freeze_through=choice:conv3,conv5,none"])
    values = space.suggest(trial)                                   # {"base_lr": 0.0031, "freeze_through": "conv5"}
    solver = sweep_space.apply_solver(base_solver, values)          # a copy
    net = sweep_space.net_transform(values)(train_val)              # a copy

SPEC is `log:LOW:HIGH` (a float, log-uniform), `uniform:LOW:HIGH` (a float), `int:LOW:HIGH` (an integer, both ends
included) or `choice:A,B,...`. Parameters:

- solver fields: base_lr, momentum, weight_decay, lr_policy, gamma, stepsize, max_iter (types read from the schema);
- batch_size: the batch of the data layer(s) that run in the TRAIN phase only;
- freeze_through (a layer name or `none`), backbone_lr_mult, new_lr_mult: rewrite's learning-rate policy
  (surgery/lr_policy), the new layers being those with a boosted lr_mult (else the classifier heads);
- fit_head, cache_features: `choice:true,false` run options.
"""
from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from caffetune.errors import SweepError
from caffetune.model import heads as heads_module
from caffetune.model import layers, schema
from caffetune.surgery import lr_policy

SOLVER_PARAMS = ("base_lr", "momentum", "weight_decay", "lr_policy", "gamma", "stepsize", "max_iter")
POLICY_PARAMS = ("freeze_through", "backbone_lr_mult", "new_lr_mult")
RUN_PARAMS = ("fit_head", "cache_features")
NET_PARAMS = ("batch_size",) + POLICY_PARAMS
KINDS = ("log", "uniform", "int", "choice")
NO_FREEZE = "none"
FEATURE_CACHE_MODULE = "caffetune.transfer.feature_cache"
# Caffe's SGDSolver::GetLearningRate: the policies, and the solver fields each one reads.
LR_POLICY_FIELDS = {"fixed": (), "step": ("gamma", "stepsize"), "exp": ("gamma",), "inv": ("gamma", "power"),
                    "multistep": ("gamma", "stepvalue"), "poly": ("power",), "sigmoid": ("gamma", "stepsize")}
# name -> (smallest, largest) value that makes sense; None: unbounded.
_BOUNDS = {"base_lr": (0.0, None), "momentum": (0.0, 1.0), "weight_decay": (0.0, None), "gamma": (0.0, None),
           "stepsize": (1, None), "max_iter": (1, None), "batch_size": (1, None), "backbone_lr_mult": (0.0, None),
           "new_lr_mult": (0.0, None)}
_FLOAT_TYPES = (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE)
_INT_TYPES = (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT32,
              FieldDescriptor.CPPTYPE_UINT64)
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")
_EXAMPLE = "base_lr=log:1e-4:1e-1, momentum=uniform:0.8:0.99, stepsize=int:100:1000, freeze_through=choice:conv3,none"


def feature_cache_available() -> bool:
    """Whether this caffetune has the feature cache that the `cache_features` parameter turns on."""
    return importlib.util.find_spec(FEATURE_CACHE_MODULE) is not None


def value_type(name: str) -> type:
    """float, int, str or bool: what a parameter's values are (solver fields: from the schema's descriptor)."""
    if name in SOLVER_PARAMS:
        fields = schema.current().SolverParameter.DESCRIPTOR.fields_by_name
        if name not in fields:
            raise SweepError(f"--param {name}: this Caffe schema's SolverParameter has no field {name}",
                             fix=f"use one of: {', '.join(n for n in SOLVER_PARAMS if n in fields)}")
        cpp = fields[name].cpp_type
        return float if cpp in _FLOAT_TYPES else int if cpp in _INT_TYPES else str
    return {"batch_size": int, "freeze_through": str, "backbone_lr_mult": float, "new_lr_mult": float,
            "fit_head": bool, "cache_features": bool}[name]


def _known() -> tuple[str, ...]:
    return SOLVER_PARAMS + NET_PARAMS + RUN_PARAMS


@dataclass(frozen=True)
class Param:
    """One dimension of the search: `name=kind:...`."""

    name: str
    kind: str                                  # log, uniform, int or choice
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple = ()

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.kind == "choice":
            return optuna.distributions.CategoricalDistribution(self.choices)
        if self.kind == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high))
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.kind == "log")

    def spec(self) -> str:
        """The canonical `name=kind:...` text (stored with the study, compared when a sweep is continued)."""
        if self.kind == "choice":
            return f"{self.name}=choice:{','.join(_text(c) for c in self.choices)}"
        return f"{self.name}={self.kind}:{_text(self.low)}:{_text(self.high)}"


def _text(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else format(value, "g") \
        if isinstance(value, float) else str(value)


def _convert(name: str, text: str, kind: type, where: str):
    text = text.strip()
    try:
        if kind is bool:
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        value = kind(text)
    except ValueError:
        raise SweepError(f"--param {name}: {text!r} is not a{'n' if kind is int else ''} "
                         f"{'boolean' if kind is bool else kind.__name__}", where=where,
                         fix="true or false" if kind is bool else f"e.g. {_EXAMPLE}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise SweepError(f"--param {name}: {text} is not a finite number", where=where, fix=f"e.g. {_EXAMPLE}")
    _check_bounds(name, value, where)
    return value


def _check_bounds(name: str, value, where: str) -> None:
    if name == "lr_policy" and value not in LR_POLICY_FIELDS:
        raise SweepError(f"--param lr_policy: Caffe has no learning-rate policy {value!r}", where=where,
                         fix=f"use some of: {', '.join(LR_POLICY_FIELDS)}")
    low, high = _BOUNDS.get(name, (None, None))
    if (low is not None and value < low) or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise SweepError(f"--param {name}: {value} is out of range (must be {span})", where=where,
                         fix=f"give {name} values {span}")


def parse_param(text: str) -> Param:
    """`NAME=SPEC` -> Param; a clear SweepError for anything else."""
    name, equals, spec = text.partition("=")
    name = name.strip()
    if not equals or not name:
        raise SweepError(f"--param {text!r}: expected NAME=SPEC", where=text, fix=f"e.g. {_EXAMPLE}")
    if name not in _known():
        raise SweepError(f"--param {name}: not a parameter caffetune sweeps", where=text,
                         fix=f"use one of: {', '.join(_known())}")
    if name == "cache_features" and not feature_cache_available():
        raise SweepError("--param cache_features: this caffetune has no feature cache "
                         f"({FEATURE_CACHE_MODULE} is missing)", where=text, fix="leave out cache_features")
    kind, _, rest = spec.partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        raise SweepError(f"--param {name}: unknown kind {kind!r}", where=text,
                         fix="SPEC is log:LOW:HIGH, uniform:LOW:HIGH, int:LOW:HIGH or choice:A,B,...")
    vtype = value_type(name)
    if kind == "choice":
        choices = tuple(dict.fromkeys(_convert(name, part, vtype, text) for part in rest.split(",") if part.strip()))
        if not choices:
            raise SweepError(f"--param {name}: choice needs at least one value", where=text,
                             fix=f"e.g. {name}=choice:A,B")
        return Param(name, kind, choices=choices)
    return _range_param(name, kind, rest, vtype, text)


def _range_param(name: str, kind: str, rest: str, vtype: type, text: str) -> Param:
    allowed = {float: ("log", "uniform"), int: ("int",)}.get(vtype, ())
    if kind not in allowed:
        what = {float: "a number", int: "an integer", str: "a name", bool: "true or false"}[vtype]
        options = " or ".join(f"{k}:LOW:HIGH" for k in allowed) + (" or " if allowed else "") + "choice:A,B,..."
        raise SweepError(f"--param {name}: {name} is {what}, so {kind}:... does not apply", where=text,
                         fix=f"use {options}")
    ends = rest.split(":")
    if len(ends) != 2:
        raise SweepError(f"--param {name}: {kind} needs LOW:HIGH", where=text, fix=f"e.g. {name}={kind}:1:10")
    low, high = (_convert(name, end, vtype, text) for end in ends)
    if low > high:
        raise SweepError(f"--param {name}: LOW {low} is above HIGH {high}", where=text, fix="swap them")
    if kind == "log" and low <= 0:
        raise SweepError(f"--param {name}: log:LOW:HIGH needs LOW > 0 (it is {low})", where=text,
                         fix=f"use uniform:{_text(low)}:{_text(high)}, or a positive LOW")
    return Param(name, kind, low, high)


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...] = ()

    def names(self) -> list[str]:
        return [param.name for param in self.params]

    def specs(self) -> list[str]:
        return [param.spec() for param in self.params]

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {param.name: param.distribution() for param in self.params}

    def suggest(self, trial: optuna.Trial) -> dict:
        """The trial's values, one per parameter (an enqueued or retried trial gets its fixed values back)."""
        values = {}
        for param in self.params:
            if param.kind == "choice":
                values[param.name] = trial.suggest_categorical(param.name, list(param.choices))
            elif param.kind == "int":
                values[param.name] = trial.suggest_int(param.name, int(param.low), int(param.high))
            else:
                values[param.name] = trial.suggest_float(param.name, param.low, param.high, log=param.kind == "log")
        return values

    def choices_of(self, name: str) -> tuple:
        return next((p.choices for p in self.params if p.name == name and p.kind == "choice"), ())


def parse(texts: list[str]) -> SearchSpace:
    """Every `--param`, in order; a parameter given twice is refused."""
    params = [parse_param(text) for text in texts]
    seen: set[str] = set()
    for param in params:
        if param.name in seen:
            raise SweepError(f"--param {param.name} is given twice", fix="give each parameter once")
        seen.add(param.name)
    if not params:
        raise SweepError("no --param given: nothing to search", fix=f"e.g. --param {_EXAMPLE.split(', ')[0]}")
    return SearchSpace(tuple(params))


def describe(values: dict) -> str:
    return " ".join(f"{name}={_text(value)}" for name, value in values.items())


# --- applying a trial's values ------------------------------------------------------------------------------------
def apply_solver(solver: Message, values: dict) -> Message:
    """A copy of the solver with the trial's solver fields set."""
    result = type(solver)()
    result.CopyFrom(solver)
    for name, value in values.items():
        if name in SOLVER_PARAMS:
            setattr(result, name, value)
    return result


def preflight_solver(solver: Message, space: SearchSpace, first: dict | None = None) -> Message:
    """The solver the sweep's one preflight checks: the base solver with a value of each swept solver field (the
    first --try's, else the first choice or the low end), so that the solver checks see a solver a trial runs (a
    base_lr or max_iter the base solver leaves unset but the sweep sets is no error). Every lr_policy choice's
    fields are checked by check_solver."""
    values = {}
    for param in space.params:
        if param.name in SOLVER_PARAMS:
            values[param.name] = (first or {}).get(param.name,
                                                   param.choices[0] if param.kind == "choice" else param.low)
    return apply_solver(solver, values)


def check_solver(solver: Message, space: SearchSpace) -> None:
    """Every learning-rate policy the sweep can pick must find the fields it reads (in the solver or the space)."""
    policies = space.choices_of("lr_policy") or (solver.lr_policy,)
    problems = []
    for policy in policies:
        for needed in LR_POLICY_FIELDS.get(policy, ()):
            given = needed in space.names() or (
                len(getattr(solver, needed)) > 0 if needed == "stepvalue" else solver.HasField(needed))
            if not given:
                problems.append(f"lr_policy {policy!r} needs {needed}")
    if problems:
        raise SweepError(f"the solver cannot run every trial: {'; '.join(problems)}", where="solver",
                         fix="set those fields in the solver, or sweep them with --param")


def train_data_layers(net: Message) -> list[Message]:
    """The data layers that run in the TRAIN phase only and have a batch_size (their batch is the TRAIN batch)."""
    found = []
    for layer in layers.all_layers(net):
        params = layers.param_message(layer)
        if layers.phases(layer) == {"TRAIN"} and params is not None and "batch_size" in \
                params.DESCRIPTOR.fields_by_name:
            found.append(layer)
    return found


def set_train_batch(net: Message, batch: int) -> Message:
    result = type(net)()
    result.CopyFrom(net)
    for layer in train_data_layers(result):
        layers.param_message(layer).batch_size = batch
    return result


def new_layers(net: Message) -> set[str]:
    """The layers the policy treats as new: those with a boosted lr_mult (as rewrite writes them), else the heads."""
    boosted = {name for name, state in lr_policy.layer_states(net).items() if state == lr_policy.NEW}
    return boosted or {head.name for head in heads_module.find_heads(net)}


def unfreeze(net: Message, keep: set[str]) -> Message:
    """A copy where every frozen layer (all lr_mult 0, not BatchNorm, not in `keep`) trains again with the usual
    multipliers: weights lr 1 decay 1, the other blobs lr 2 decay 0. The sweep's freeze_through then decides."""
    entries = []
    for layer in layers.all_layers(net):
        count = layers.learnable_blob_count(layer)
        if not count or layer.name in keep or layers.type_name(layer) == "BatchNorm":
            continue
        if all(mult == 0 for mult in layers.lr_mults(layer)):
            entries.append(lr_policy.LayerPlan(layer.name, layers.type_name(layer), lr_policy.FINE_TUNED,
                                               [1.0] + [2.0] * (count - 1), [1.0] + [0.0] * (count - 1),
                                               changed=True))
    return lr_policy.apply(net, lr_policy.Plan(entries))


def _head_mults(net: Message, names: set[str]) -> tuple[float, float]:
    for layer in layers.all_layers(net):
        if layer.name in names:
            mults = layers.lr_mults(layer) or [1.0]
            return mults[0], mults[1] if len(mults) > 1 else mults[0]
    return lr_policy.Policy().new_lr_mult


def apply_policy(net: Message, values: dict) -> Message:
    """A copy of the net with the trial's freeze point and multipliers (lr_policy.plan + apply)."""
    if not any(name in values for name in POLICY_PARAMS) or not any(
            layers.learnable_blob_count(layer) for layer in layers.all_layers(net)):
        return net
    new = new_layers(net)
    if "freeze_through" in values:
        net = unfreeze(net, new)
    freeze = values.get("freeze_through")
    new_mult = (values["new_lr_mult"], 2 * values["new_lr_mult"]) if "new_lr_mult" in values \
        else _head_mults(net, new)
    policy = lr_policy.Policy(new_layers=frozenset(new), new_lr_mult=new_mult,
                              freeze_through=None if freeze in (None, NO_FREEZE) else freeze,
                              backbone_lr_mult=values.get("backbone_lr_mult"))
    return lr_policy.apply(net, lr_policy.plan(net, policy))


def net_transform(values: dict) -> Callable[[Message], Message]:
    """The edit of each net of a trial: the TRAIN batch size, then the learning-rate policy."""
    def transform(net: Message) -> Message:
        if "batch_size" in values:
            net = set_train_batch(net, values["batch_size"])
        return apply_policy(net, values)
    return transform


def check_nets(nets: dict[str, Message], space: SearchSpace) -> None:
    """Refuse a space the nets cannot take before any trial runs: freeze points that are no layer, a batch size
    with no TRAIN-only data layer to set it on."""
    names = {layer.name for net in nets.values() for layer in layers.all_layers(net)}
    missing = [c for c in space.choices_of("freeze_through") if c != NO_FREEZE and c not in names]
    if missing:
        learnable = [layer.name for net in nets.values() for layer in layers.all_layers(net)
                     if layers.learnable_blob_count(layer)]
        raise SweepError(f"--param freeze_through: the net has no layer {', '.join(missing)}",
                         fix=f"use layer names (e.g. {', '.join(dict.fromkeys(learnable[:8]))}) or none")
    if "batch_size" in space.names() and not any(train_data_layers(net) for net in nets.values()):
        raise SweepError("--param batch_size: the net has no data layer that runs in the TRAIN phase only",
                         fix="give the training data layer `include { phase: TRAIN }`")
    if any(name in space.names() for name in POLICY_PARAMS):
        for net in nets.values():
            if any(layers.learnable_blob_count(layer) for layer in layers.all_layers(net)):
                new_layers(net)   # raises NetError when the net has no head to keep trainable


def parse_fixed(text: str, space: SearchSpace) -> dict:
    """`--try base_lr=0.01,freeze_through=none`: a trial to run first, its values inside the space."""
    by_name = {param.name: param for param in space.params}
    values = {}
    for part in (p for p in text.split(",") if p.strip()):
        name, equals, raw = part.partition("=")
        name = name.strip()
        if not equals or name not in by_name:
            raise SweepError(f"--try {text}: {name or part!r} is not one of the swept parameters", where=text,
                             fix=f"NAME=VALUE,... with NAME among {', '.join(by_name)}")
        param = by_name[name]
        value = _convert(name, raw, value_type(name), text)
        inside = value in param.choices if param.kind == "choice" else param.low <= value <= param.high
        if not inside:
            raise SweepError(f"--try {name}={raw}: outside the space ({param.spec()})", where=text,
                             fix="try a value the --param allows")
        values[name] = value
    return values

"""Solver rewriting: point a solver at the new net and size its schedule from the dataset and --epochs.

    solver = solver.rewrite(solver.template(), SolverOptions(net="train_val.prototxt", epochs=10,
                                                              train_size=5000, val_size=1000, train_batch=32,
                                                              val_batch=16))

With dataset sizes: test_iter covers the validation set once, test_interval is one epoch; with --epochs, max_iter
is that many epochs and a "step" policy steps every third of the run (lowered for fine-tuning, as in Caffe's Flickr
Style example). Explicit values (--base-lr, --stepsize, --max-iter, ...) win.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from google.protobuf.message import Message

from caffetune.data import lmdb_reader
from caffetune.errors import DatasetError, NetError
from caffetune.model import prototxt
from caffetune.surgery.net_edits import copy

_NET_FIELDS = ("net", "net_param", "train_net", "train_net_param", "test_net", "test_net_param")


@dataclass(frozen=True)
class SolverOptions:
    net: str | None = None
    base_lr: float | None = None
    lr_policy: str | None = None
    stepsize: int | None = None
    gamma: float | None = None
    max_iter: int | None = None
    epochs: float | None = None
    train_size: int | None = None
    val_size: int | None = None
    train_batch: int | None = None
    val_batch: int | None = None
    test_interval: int | None = None
    snapshot: int | None = None
    snapshot_prefix: str | None = None
    solver_mode: str | None = None        # "CPU" or "GPU"
    random_seed: int | None = None        # fillers, dropout, mirror and shuffle draws repeat from run to run


def template_text(name: str = "solver.prototxt") -> str:
    """A template shipped in caffetune.templates."""
    return resources.files("caffetune.templates").joinpath(name).read_text()


def dataset_size(source: str | None) -> int | None:
    """Entries in an LMDB directory or lines in an image list; None when the source does not exist (yet)."""
    if not source:
        return None
    path = Path(source)
    if path.is_dir():
        return lmdb_reader.entry_count(path)
    if path.is_file():
        try:
            return sum(1 for line in path.read_text().splitlines() if line.strip())
        except UnicodeDecodeError:
            raise DatasetError(f"{path} is not a text image list", where=str(path),
                               fix="point the source at an LMDB folder or a list of 'image label' lines") from None
    return None


def iterations_per_epoch(size: int, batch: int) -> int:
    return max(1, math.ceil(size / batch))


def schedule(options: SolverOptions) -> dict:
    """The solver fields computable from the options (only those that are known)."""
    fields: dict = {}
    epoch = None
    if options.train_size and options.train_batch:
        epoch = iterations_per_epoch(options.train_size, options.train_batch)
    if options.val_size and options.val_batch:
        fields["test_iter"] = iterations_per_epoch(options.val_size, options.val_batch)
    if options.test_interval or epoch:
        fields["test_interval"] = options.test_interval or epoch
    if options.max_iter:
        fields["max_iter"] = options.max_iter
    elif options.epochs and epoch:
        fields["max_iter"] = max(1, round(options.epochs * epoch))
    elif options.epochs:
        raise NetError("--epochs needs the training set size", fix="pass --train-size N, or a --train-source that "
                                                                   "exists (its entries are counted)")
    if options.stepsize:
        fields["stepsize"] = options.stepsize
    elif "max_iter" in fields and (options.epochs or options.max_iter):
        fields["stepsize"] = max(1, fields["max_iter"] // 3)
    for name in ("base_lr", "lr_policy", "gamma", "snapshot", "snapshot_prefix", "random_seed"):
        if getattr(options, name) is not None:
            fields[name] = getattr(options, name)
    if options.solver_mode:
        fields["solver_mode"] = options.solver_mode.upper()
    return fields


def rewrite(solver: Message, options: SolverOptions) -> Message:
    """A copy of `solver` pointing at `options.net`, with the computed schedule."""
    result = copy(solver)
    if options.net:
        for name in _NET_FIELDS:
            result.ClearField(name)
        result.net = options.net
    fields = schedule(options)
    if "test_iter" in fields:
        result.test_iter[:] = [fields.pop("test_iter")]
    policy = fields.get("lr_policy") or result.lr_policy
    if policy != "step" and options.stepsize is None:
        fields.pop("stepsize", None)   # only the "step" policy reads stepsize
    for name, value in fields.items():
        if name == "solver_mode":
            value = result.DESCRIPTOR.fields_by_name["solver_mode"].enum_type.values_by_name[value].number
        setattr(result, name, value)
    if result.snapshot and not result.snapshot_prefix:
        result.snapshot_prefix = "snapshot"
    return result


def load_solver(path: str | None) -> tuple[str, str]:
    """(text, path label) of a solver file, or of the shipped template when `path` is None or "template"."""
    if path in (None, "template"):
        return template_text(), "template:solver.prototxt"
    return prototxt.read_text(path), str(path)

"""`caffetune rewrite`: turn a pretrained model's net into one that fine-tunes on N classes (plan -> apply -> text).

Library entry points (the CLI only wires options to these):

    from caffetune.surgery import rewrite
    from caffetune.surgery.net_edits import DataOptions
    options = rewrite.Options(classes=20, name="flickr", freeze="backbone",
                              data=DataOptions(train_source="train_lmdb", val_source="val_lmdb", batch_size=32))
    result = rewrite.rewrite_text(text, options, path="deploy.prototxt")       # pure: text in, texts out
    result = rewrite.rewrite_files("deploy.prototxt", options, output="out/")  # also writes the files
    result.outputs["train_val"].text, result.outputs["deploy"].text, result.plan, result.notes

`rewrite_files(net_path, options, output=None, in_place=False, write=True, progress=None)`: `output` is a
directory (train_val.prototxt, deploy.prototxt, solver.prototxt are written there) or a `.prototxt` file (only the
train_val net is written); `in_place` overwrites the input with the net of its own kind; `write=False` computes
without writing (for --diff, --check, --json). `progress` is called with one line of text per step.

A train_val input yields train_val + deploy; a deploy-only input (Input layer or `input:` fields, no loss) yields a
train_val with Data layers, SoftmaxWithLoss and Accuracy, and the deploy net with the same renamed head. The texts
keep the input's comments, order and layout (see textedit); when that cannot be done faithfully the canonical text
is written instead and a note says so.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from google.protobuf.message import Message

from caffetune import files
from caffetune.errors import NetError
from caffetune.model import comments, layers, prototxt, textedit, upgrade
from caffetune.model import heads as heads_module
from caffetune.model.heads import Head
from caffetune.surgery import derive, lr_policy, net_edits
from caffetune.surgery import solver as solvers
from caffetune.surgery.net_edits import DataOptions

TRAIN_VAL, DEPLOY, SOLVER = "train_val", "deploy", "solver"


@dataclass(frozen=True)
class Options:
    classes: int
    name: str | None = None                           # suffix: fc8 -> fc8_<name>
    renames: tuple[tuple[str, str], ...] = ()          # explicit old=new
    heads: tuple[str, ...] = ()                        # --head overrides
    weights: str | None = None                         # refuse new names present in this .caffemodel
    new_lr_mult: tuple[float, float] = (10.0, 20.0)
    freeze: str | None = None
    freeze_through: str | None = None
    backbone_lr_mult: float | None = None
    upgrade: bool = False                              # write V1 nets in the current format
    data: DataOptions = DataOptions()
    solver: str | None = None                          # a solver path, "template", or None for no solver
    solver_options: solvers.SolverOptions = solvers.SolverOptions()
    class_weights: tuple[float, ...] = ()              # per-class loss weights (SegNet's class_weighting), N values


@dataclass
class Output:
    role: str
    text: str
    original: str            # the text this output was edited from
    source: str              # where that text came from
    canonical: bool = False  # the layout could not be kept


@dataclass
class Result:
    input_kind: str                                    # "train_val" or "deploy"
    v1: bool
    heads: list[Head]
    renames: dict[str, str]
    plan: lr_policy.Plan
    notes: list[str] = field(default_factory=list)
    outputs: dict[str, Output] = field(default_factory=dict)
    written: dict[str, str] = field(default_factory=dict)   # role -> path

    def as_dict(self) -> dict:
        return {"input_kind": self.input_kind, "v1": self.v1, "heads": [asdict(h) for h in self.heads],
                "renames": self.renames, "plan": self.plan.as_dict(), "notes": self.notes,
                "outputs": {role: {"canonical": out.canonical, "changed": out.text != out.original}
                            for role, out in self.outputs.items()},
                "written": self.written}


    def _before(self, role: str) -> tuple[str | None, str]:
        """(the text an output replaces, its label): the file on disk when there is one, else the input."""
        output, target = self.outputs[role], self.written.get(role)
        if target and Path(target).is_file():
            return Path(target).read_text(), target
        return (None if target else output.original), output.source

    def would_change(self) -> list[str]:
        """The files a write would change (`rewrite --check`): the targets whose text differs, or the input when
        nothing is written and its own rewrite differs."""
        changed = []
        for role, output in self.outputs.items():
            target = self.written.get(role)
            before, _ = self._before(role)
            if before != output.text and (target or role == self.input_kind):
                changed.append(target or output.source)
        return changed

    def diff(self) -> str:
        """A unified diff of every output against what it replaces (`rewrite --diff`)."""
        chunks = []
        for role, output in self.outputs.items():
            target = self.written.get(role)
            before, label = self._before(role)
            before = output.original if before is None else before
            chunks += difflib.unified_diff(before.splitlines(True), output.text.splitlines(True), fromfile=label,
                                           tofile=target or f"{role}.prototxt")
        return "".join(chunks)


def new_head_name(old: str, options: Options) -> str:
    explicit = dict(options.renames)
    if old in explicit:
        return explicit[old]
    if options.name:
        return old if old.endswith(f"_{options.name}") else f"{old}_{options.name}"
    return old


def _check_weights(new_names: list[str], renames: dict[str, str], weights_path: str | None) -> list[str]:
    if not weights_path:
        return []
    from caffetune.model.caffemodels import layer_shapes

    stored = layer_shapes(weights_path)
    clashes = [name for name in new_names if name in stored]
    if clashes:
        raise NetError(f"new head name(s) {', '.join(clashes)} exist in the weights file, so Caffe would copy the "
                       f"old {', '.join(str(stored[c]) for c in clashes)}-shaped weights into them",
                       where=weights_path, fix="choose another name with --name or --rename OLD=NEW")
    kept = [old for old, new in renames.items() if old == new and old in stored]
    return [f"{old}: keeps its name, so Caffe copies its pretrained weights (shape mismatch if the class count "
            f"changed); rename it with --name or --rename" for old in kept]


def _edit_heads(net: Message, found: list[Head], options: Options) -> tuple[Message, dict[str, str], list[str]]:
    """Rename and resize each head; returns (net, renames old -> new, notes)."""
    names = {head.name for head in found}
    unknown = [old for old, new in options.renames if old not in names and new not in names]  # new: done already
    if unknown:
        raise NetError(f"--rename {', '.join(unknown)}: not a classifier head (heads: "
                       f"{', '.join(head.name for head in found)})", where=unknown[0],
                       fix="rename heads only, or name the layer as a head with --head")
    renames, notes = {}, []
    for head in found:
        new = new_head_name(head.name, options)
        renames[head.name] = new
        net = net_edits.rename_layer(net, head.name, new)
        net = net_edits.set_num_output(net, new, options.classes)
        net = _resize_score_reshapes(net, head, options.classes, notes)
    return net, renames, notes


def _resize_score_reshapes(net: Message, head: Head, classes: int, notes: list[str]) -> Message:
    """Reshape layers between a head and its consumers that spell out the class count (a segment consensus such
    as TSN's `dim: [-1, 1, 3, 101]`) follow the new class count."""
    result = net_edits.copy(net)
    for layer in layers.all_layers(result):
        if layer.name not in head.path or layers.type_name(layer) != "Reshape":
            continue
        dims = layer.reshape_param.shape.dim
        if head.num_output in dims and head.num_output != classes:
            dims[:] = [classes if dim == head.num_output else dim for dim in dims]
            notes.append(f"{layer.name}: reshapes {head.name}'s scores; its class dimension is now {classes}")
    return result


def _init_new_heads(net: Message, renames: dict[str, str], notes: list[str]) -> Message:
    for new in renames.values():
        net, note = net_edits.ensure_fillers(net, new)
        if note:
            notes.append(note)
    return net


def _render(role: str, original_text: str, original: Message, target: Message, source: str,
            notes: list[str]) -> Output:
    text = textedit.render(original_text, original, target)
    if text is None:
        notes.append(f"{role}: the layout of {source} could not be kept; wrote canonical prototxt")
        return Output(role, comments.canonical(original_text, target), original_text, source, canonical=True)
    return Output(role, text, original_text, source)


def _policy(options: Options, new_layers: set[str]) -> lr_policy.Policy:
    return lr_policy.Policy(new_layers=frozenset(new_layers), new_lr_mult=options.new_lr_mult, freeze=options.freeze,
                            freeze_through=options.freeze_through, backbone_lr_mult=options.backbone_lr_mult)


def _batch_sizes(net: Message) -> tuple[int | None, int | None]:
    train = val = None
    for layer in layers.all_layers(net):
        kind = layers.type_name(layer)
        if kind not in layers.SOURCE_DATA_TYPES:
            continue
        batch = layer.data_param.batch_size if kind == "Data" else layer.image_data_param.batch_size
        if "TRAIN" in layers.phases(layer) and train is None:
            train = batch
        if "TEST" in layers.phases(layer) and val is None:
            val = batch
    return train, val


def _solver_output(train_val: Message, options: Options, net_path: str | None, notes: list[str]) -> Output:
    text, source = solvers.load_solver(options.solver)
    original = prototxt.parse(text, "SolverParameter", path=source)
    train_batch, val_batch = _batch_sizes(train_val)
    given = options.solver_options
    sizes = dict(train_size=given.train_size or solvers.dataset_size(options.data.train_source),
                 val_size=given.val_size or solvers.dataset_size(options.data.val_source),
                 train_batch=given.train_batch or train_batch, val_batch=given.val_batch or val_batch)
    chosen = replace(given, net=net_path or given.net, **sizes)
    target = solvers.rewrite(original, chosen)
    for name, value in solvers.schedule(chosen).items():
        notes.append(f"solver: {name} = {value}")
    return _render(SOLVER, text, original, target, source, notes)


def _derive_deploy(train_val: Message, new_heads: list[Head], notes: list[str]) -> Message | None:
    try:
        return derive.deploy_from_train_val(train_val, new_heads)
    except NetError as error:
        notes.append(f"deploy: not written: {error.what}" + (f" ({error.fix})" if error.fix else ""))
        return None


def _parse_net(original: Message, path: str, options: Options) -> Message:
    layers.check_not_mixed(original, where=path)
    if not layers.all_layers(original):
        raise NetError("the net has no layers", where=path, fix="pass a net prototxt (train_val or deploy)")
    return net_edits.upgrade_v1(original) if options.upgrade else net_edits.copy(original)


def _finish_train_val(train_val: Message, renames: dict[str, str], options: Options,
                      notes: list[str]) -> tuple[Message, lr_policy.Plan]:
    """Fillers for the new heads, accuracy top_k, data layers, then the learning-rate plan applied."""
    train_val = _init_new_heads(train_val, renames, notes)
    train_val, top_k_notes = net_edits.fix_accuracy_top_k(train_val, options.classes)
    notes += top_k_notes
    train_val = net_edits.set_data_layers(train_val, options.data)
    plan = lr_policy.plan(train_val, _policy(options, set(renames.values())))
    return lr_policy.apply(train_val, plan), plan


def _from_deploy(edited: Message, renames: dict[str, str], options: Options, notes: list[str]):
    """(train_val, deploy, plan) for a deploy-only input whose heads are renamed."""
    heads = heads_module.find_heads(edited, names=list(renames.values()))
    train_val = derive.train_val_from_deploy(edited, heads, options.classes, options.data)
    if not (options.data.mean_file or options.data.mean_value):
        notes.append("train_val: no mean given; pass --mean-value or --mean-file matching the pretrained model")
    train_val, plan = _finish_train_val(train_val, renames, options, notes)
    return train_val, edited, plan


def _from_train_val(edited: Message, renames: dict[str, str], options: Options, notes: list[str]):
    """(train_val, deploy or None, plan) for a train_val input whose heads are renamed."""
    train_val, plan = _finish_train_val(edited, renames, options, notes)
    heads = heads_module.find_heads(train_val, names=list(renames.values()))
    return train_val, _derive_deploy(train_val, heads, notes), plan


def rewrite_text(text: str, options: Options, *, path: str = "<text>", solver_net_path: str | None = None,
                 progress: Callable[[str], None] | None = None) -> Result:
    """Rewrite one net's text; returns the plan, notes and the output texts (nothing is written)."""
    say = progress or (lambda line: None)
    if options.classes < 1:
        raise NetError(f"--classes {options.classes}: need at least 1 class")
    text, original, upgrade_notes = upgrade.read_net(text, path)   # V0 nets upgraded, mis-keyed layers read
    net = _parse_net(original, path, options)
    deploy_input = derive.is_deploy(net)
    from caffetune.surgery import class_layers, dense_rewrite  # they import this module

    analysis = class_layers.analyze(net, tuple(options.heads))  # detection/segmentation: every class layer
    if analysis is not None:
        result = dense_rewrite.rewrite_net(text, original, net, analysis, options, path=path,
                                           solver_net_path=solver_net_path, progress=progress)
        result.notes[:0] = upgrade_notes
        return result
    found = heads_module.find_heads(net, names=list(options.heads) or None)
    say(f"heads: {', '.join(f'{h.name} ({h.type}, {h.num_output} outputs)' for h in found)}")
    edited, renames, notes = _edit_heads(net, found, options)
    edited = dense_rewrite.classifier_extras(edited, found, options, notes)   # center loss, class_weighting
    notes = upgrade_notes + _check_weights(list(renames.values()), renames, options.weights) + notes
    if deploy_input:
        say("deploy-only net: building its train_val (Data layers, SoftmaxWithLoss, Accuracy)")
    train_val, deploy_net, plan = (_from_deploy if deploy_input else _from_train_val)(edited, renames, options,
                                                                                     notes)
    result = Result(DEPLOY if deploy_input else TRAIN_VAL, layers.is_v1(net), found, renames, plan, notes)
    result.outputs[TRAIN_VAL] = _render(TRAIN_VAL, text, original, train_val, path, notes)
    if deploy_net is not None:
        result.outputs[DEPLOY] = _render(DEPLOY, text, original, deploy_net, path, notes)
    if options.solver:
        result.outputs[SOLVER] = _solver_output(train_val, options, solver_net_path, notes)
    return result


def output_paths(net_path: Path, result_roles: list[str], input_kind: str, output: str | None, in_place: bool,
                 solver_path: str | None) -> dict[str, Path]:
    """Where each output goes; never the input unless in_place."""
    if in_place:
        if input_kind == DEPLOY and TRAIN_VAL in result_roles:
            raise NetError(f"--in-place: {net_path} is a deploy net; its train_val is a new file",
                           fix="write the outputs with -o DIRECTORY")
        paths = {input_kind: net_path}
        if solver_path and solver_path != "template" and SOLVER in result_roles:
            paths[SOLVER] = Path(solver_path)
        return paths
    if output is None:
        return {}
    target = Path(output)
    if target.suffix == ".prototxt" and not target.is_dir():
        if SOLVER in result_roles or (input_kind == DEPLOY and TRAIN_VAL in result_roles):
            raise NetError(f"-o {output}: several files are written ({', '.join(result_roles)})",
                           fix="give -o a directory")
        paths = {TRAIN_VAL if TRAIN_VAL in result_roles else result_roles[0]: target}
    else:
        paths = {role: target / f"{role}.prototxt" for role in result_roles}
    for path in paths.values():
        if path.resolve() == net_path.resolve():
            raise NetError(f"-o would overwrite the input {net_path}", where=str(path),
                           fix="choose another output, or pass --in-place to overwrite the input on purpose")
    return paths


def rewrite_files(net_path: Path | str, options: Options, output: str | None = None, in_place: bool = False,
                  write: bool = True, progress: Callable[[str], None] | None = None) -> Result:
    """Rewrite a net file (and solver); write the outputs unless `write` is False."""
    net_path = Path(net_path)
    text = prototxt.read_text(net_path)
    solver_net = None
    if options.solver and output is not None and not Path(output).suffix == ".prototxt":
        solver_net = str(Path(output) / f"{TRAIN_VAL}.prototxt")
        if options.solver_options.snapshot_prefix is None:
            prefix = str(Path(output) / (options.name or "finetune"))
            options = replace(options, solver_options=replace(options.solver_options, snapshot_prefix=prefix))
    elif options.solver and in_place:
        solver_net = str(net_path)
    result = rewrite_text(text, options, path=str(net_path), solver_net_path=solver_net, progress=progress)
    paths = output_paths(net_path, list(result.outputs), result.input_kind, output, in_place, options.solver)
    skipped = [role for role in result.outputs if role not in paths]
    if paths and skipped:
        result.notes.append(f"not written: {', '.join(skipped)} (give -o a directory to write every output)")
    for role, path in paths.items():
        if write:
            files.write_atomic(path, result.outputs[role].text)
            if progress:
                progress(f"wrote {path}")
        result.written[role] = str(path)
    return result

"""Preflight checks of the nets themselves: layers caffe would reject late, and settings under which nothing learns.

- Accuracy top_k above the class count;
- a layer defined once per phase (include TRAIN / include TEST) whose blobs differ: caffe shares the trained blobs
  with the test net by layer name and stops at the first test pass;
- Python layers whose module or class cannot be imported by caffe's own Python (checked in a subprocess);
- every learnable layer frozen (lr_mult 0 everywhere): nothing can learn;
- BatchNorm computing batch statistics on batches of one image.
"""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from google.protobuf.message import Message

from caffetune.errors import Problem
from caffetune.model import heads as heads_module
from caffetune.model import layers, shapes
from caffetune.model.caffe_tools import CaffeInstall
from caffetune.train.checks_common import Run, batch_size, error, layer_where, plural, warning


def check_accuracy_top_k(net: Message, name: str) -> list[Problem]:
    """Accuracy's top_k may not exceed the class count of the scores it reads."""
    classes = {consumer: head for head in heads_module.traced_heads(net) for consumer in head.consumers}
    problems = []
    for layer in layers.all_layers(net):
        head = classes.get(layer.name)
        if layers.type_name(layer) != "Accuracy" or head is None:
            continue
        top_k = layer.accuracy_param.top_k
        if top_k > head.num_output:
            problems.append(error(f"Accuracy layer {layer.name} has top_k {top_k} but {head.name} scores only "
                                  f"{head.num_output} classes", layer_where(name, layer),
                                  f"set accuracy_param.top_k <= {head.num_output} (or drop the top-{top_k} "
                                  "accuracy layer)",
                                  "caffe stops with `top_k must be less than or equal to the number of classes`"))
    return problems


# --- one layer name, two definitions ------------------------------------------------------------------------------
def _definitions(run: Run, phase: str) -> dict[str, tuple[str, Message]]:
    """Layer name -> (net file, layer) of the learnable layers caffe builds in `phase`."""
    found = {}
    for name in run.nets:
        if phase in run.phases(name):
            for layer in run.layers_in(name, phase):
                if layers.learnable_blob_count(layer):
                    found.setdefault(layer.name, (name, layer))
    return found


def _blobs_text(layer: Message, count: int) -> str:
    params = layers.param_message(layer)
    details = []
    if params is not None and "num_output" in params.DESCRIPTOR.fields_by_name:
        details.append(f"num_output {params.num_output}")
    if params is not None and "bias_term" in params.DESCRIPTOR.fields_by_name:
        details.append(f"bias_term {str(params.bias_term).lower()}")
    return f"{count} blob(s)" + (f": {', '.join(details)}" if details else "")


def check_phase_definitions(run: Run) -> list[Problem]:
    """Caffe's test nets take the TRAIN net's blobs by layer name (Net::ShareTrainedLayersWith): same-named layers
    must agree in blob count and shapes. Shapes come from the pycaffe builds when they ran (run.param_shapes)."""
    train, test = _definitions(run, "TRAIN"), _definitions(run, "TEST")
    problems = []
    for layer_name, (test_file, test_layer) in test.items():
        if layer_name not in train:
            continue
        train_file, train_layer = train[layer_name]
        counts = layers.learnable_blob_count(train_layer), layers.learnable_blob_count(test_layer)
        train_shapes = run.param_shapes.get(f"{train_file}:TRAIN", {}).get(layer_name)
        test_shapes = run.param_shapes.get(f"{test_file}:TEST", {}).get(layer_name)
        if counts[0] != counts[1]:
            detail = (f"{_blobs_text(train_layer, counts[0])} in TRAIN, {_blobs_text(test_layer, counts[1])} in "
                      "TEST")
            crash = f"`Incompatible number of blobs for layer {layer_name}`"
        elif train_shapes is not None and test_shapes is not None and train_shapes != test_shapes:
            detail = f"blob shapes {train_shapes} in TRAIN, {test_shapes} in TEST"
            crash = f"`Cannot share param ... weights from layer '{layer_name}'; shape mismatch`"
        elif layers.num_output(train_layer) != layers.num_output(test_layer):
            detail = f"num_output {layers.num_output(train_layer)} in TRAIN, {layers.num_output(test_layer)} in TEST"
            crash = f"`Cannot share param 0 weights from layer '{layer_name}'; shape mismatch`"
        else:
            continue
        where = (f"{train_file}: layer {layer_name} (TRAIN and TEST)" if test_file == train_file
                 else f"{train_file}: layer {layer_name} (TRAIN), {test_file} (TEST)")
        problems.append(error(f"layer {layer_name} differs between the phases: {detail}", where,
                              "define the layer once, without `include { phase }`, or make both definitions "
                              "alike (num_output, bias_term, kernel, input size)",
                              f"caffe gives the test net the trained blobs by layer name, and stops at the first "
                              f"test pass with {crash}"))
    return problems


# --- Python layers --------------------------------------------------------------------------------------------------
_PROBE = textwrap.dedent("""
    import importlib, json, sys, traceback
    sys.path[:] = [p for p in sys.path if p not in ("", ".")]   # caffe's embedded Python has no script folder
    result = []
    for module_name, class_name in json.loads(sys.argv[1]):
        entry = {"module": module_name, "layer": class_name, "error": None, "file": None, "at": None}
        try:
            module = importlib.import_module(module_name)
            entry["file"] = getattr(module, "__file__", None)
            if not hasattr(module, class_name):
                entry["error"] = f"module {module_name} has no attribute {class_name!r}"
        except BaseException as failure:  # noqa: BLE001 - report whatever the user's module raises
            entry["error"] = f"{type(failure).__name__}: {failure}".strip().splitlines()[0]
            frames = [f for f in traceback.extract_tb(failure.__traceback__) if "importlib" not in f.filename]
            if frames:
                entry["at"] = f"{frames[-1].filename}:{frames[-1].lineno}"
        result.append(entry)
    print(json.dumps({"layers": result, "path": sys.path, "python": sys.executable}))
""")


@functools.lru_cache(maxsize=4)
def embedded_python(binary: Path) -> str:
    """The Python interpreter matching the libpython the caffe binary embeds (its Python layers import in it, with
    that interpreter's site-packages, not a virtualenv's); this Python when it cannot be told."""
    try:
        listing = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30,
                                 check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return sys.executable
    match = re.search(r"libpython(\d+\.\d+)\S*\s+=>\s+(\S+)", listing)
    if not match:
        return sys.executable
    candidate = Path(match.group(2)).resolve().parent.parent / "bin" / f"python{match.group(1)}"
    return str(candidate) if candidate.is_file() else sys.executable


def python_layers(run: Run) -> list[tuple[str, Message]]:
    return [(name, layer) for name, net in run.nets.items() for layer in layers.all_layers(net)
            if layers.type_name(layer) == "Python"]


def check_python_layers(run: Run, install: CaffeInstall) -> list[Problem]:
    """Import each Python layer's module and find its class, as caffe will: in a subprocess of caffe's Python, with
    the environment caffe gets (PYTHONPATH: pycaffe's folder and yours; not the current folder)."""
    found = python_layers(run)
    if not found:
        return []
    wanted = sorted({(layer.python_param.module, layer.python_param.layer) for _name, layer in found})
    python = embedded_python(install.binary)
    with tempfile.TemporaryDirectory(prefix="caffetune-pylayer-") as folder:
        try:
            result = subprocess.run([python, "-c", _PROBE, json.dumps(wanted)], env=install.env(), cwd=folder,
                                    capture_output=True, text=True, timeout=120, check=False)
        except subprocess.TimeoutExpired:
            return [warning("importing the Python layers' modules took more than 120 s", found[0][0],
                            "check what the modules do at import time")]
    if result.returncode != 0 or not result.stdout.strip():
        return [error(f"could not try the Python layers' imports with {python}: "
                      f"{(result.stderr.strip().splitlines() or ['no output'])[-1]}", found[0][0],
                      "check that this Python runs, or run with --no-preflight")]
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    failures = {(entry["module"], entry["layer"]): entry for entry in probe["layers"] if entry["error"]}
    user_path = os.environ.get("PYTHONPATH")
    searched = (f"PYTHONPATH={user_path}" if user_path else "PYTHONPATH unset") + \
        f", then pycaffe's folder and the site-packages of {probe['python']}"
    problems = []
    for name, layer in found:
        entry = failures.get((layer.python_param.module, layer.python_param.layer))
        if entry:
            problems.append(_python_problem(name, layer, entry, searched, probe["python"]))
    return problems


def _python_problem(name: str, layer: Message, entry: dict, searched: str, python: str) -> Problem:
    module, class_name = entry["module"], entry["layer"]
    if entry["file"] and "has no attribute" in entry["error"]:
        return error(f"Python layer {layer.name}: {entry['file']} defines no class {class_name}",
                     layer_where(name, layer), f"set python_param.layer to the class's name in {entry['file']}",
                     "caffe aborts building the net with an AttributeError")
    if "No module named" in entry["error"] and f"'{module.split('.')[0]}'" in entry["error"]:
        return error(f"Python layer {layer.name}: module {module} is not found on caffe's Python path",
                     layer_where(name, layer),
                     f"put {module}.py in a folder and add that folder to PYTHONPATH (export PYTHONPATH=/that/folder"
                     ":$PYTHONPATH); caffe does not look in the current folder",
                     f"caffe aborts building the net with only `error_already_set`; searched: {searched}")
    at = f" at {entry['at']}" if entry["at"] else ""
    return error(f"Python layer {layer.name}: importing module {module} fails{at}: {entry['error']}",
                 layer_where(name, layer),
                 "fix the import error in the module (it runs in caffe's Python, " + python + ", whose packages "
                 "may differ from this virtualenv's: add the folders it needs to PYTHONPATH)",
                 "caffe aborts building the net with only `error_already_set`")


# --- can anything learn? --------------------------------------------------------------------------------------------
def check_frozen(run: Run) -> list[Problem]:
    """Every learnable layer of the training net(s) has lr_mult 0 (BatchNorm's statistics are not learned)."""
    problems = []
    for name, net in run.nets.items():
        if "TRAIN" not in run.phases(name):
            continue
        learnable = [layer for layer in run.layers_in(name, "TRAIN")
                     if layers.learnable_blob_count(layer) and layers.type_name(layer) != "BatchNorm"]
        if learnable and not any(mult > 0 for layer in learnable for mult in layers.lr_mults(layer)):
            head_names = [head.name for head in heads_module.traced_heads(net)] or [learnable[-1].name]
            field_name = "blobs_lr" if layers.is_v1(net) else "param { lr_mult }"
            problems.append(error(
                f"every learnable layer of the TRAIN net is frozen ({field_name} 0 on all "
                f"{len(learnable)} of them, the head(s) {', '.join(head_names)} too)", name,
                f"give the new head(s) a learning rate: {field_name} 10 for weights and 20 for biases "
                "(`caffetune rewrite --freeze backbone` freezes only the backbone)",
                "caffe trains on but no weight ever changes: the run learns nothing"))
    return problems


def _uses_batch_statistics(layer: Message, phase: str) -> bool:
    """Caffe's BatchNormLayer: use_global_stats defaults to (phase == TEST) unless set."""
    params = layer.batch_norm_param
    return not params.use_global_stats if params.HasField("use_global_stats") else phase == "TRAIN"


def _phase_batch(run: Run, name: str, phase: str) -> int | None:
    sizes = [batch_size(layer) for layer in run.layers_in(name, phase) if layers.type_name(layer) in
             layers.DATA_TYPES]
    sizes = [size for size in sizes if size]
    return min(sizes) if sizes else None


def check_batch_norm(run: Run) -> list[Problem]:
    """BatchNorm normalising by the statistics of a batch of one: on 1x1 inputs (after an InnerProduct) its output
    is exactly zero; on feature maps each image is normalised by its own statistics, unlike at test time. One
    finding per net, phase and kind, naming the layers."""
    problems = []
    for name, net in run.nets.items():
        if layers.is_v1(net):
            continue
        for phase in run.phases(name):
            if _phase_batch(run, name, phase) != 1:
                continue
            batch_norms = [layer for layer in run.layers_in(name, phase)
                           if layers.type_name(layer) == "BatchNorm" and _uses_batch_statistics(layer, phase)]
            if not batch_norms:
                continue
            inferred = shapes.infer(net, phase)
            zeroed, per_image = [], []
            for layer in batch_norms:
                shape = inferred.blobs.get(layer.bottom[0]) if layer.bottom else None
                (zeroed if _is_1x1(shape) else per_image).append(layer)
            problems += _batch_norm_problems(name, phase, zeroed, per_image)
    return problems


def _is_1x1(shape) -> bool:
    """A (N, C) or (N, C, 1, 1) blob: one value per channel and image."""
    return shape is not None and len(shape) >= 2 and all(dim == 1 for dim in shape[2:])


def _names(found: list[Message]) -> str:
    shown = ", ".join(layer.name for layer in found[:4])
    return shown + (f" and {len(found) - 4} more" if len(found) > 4 else "")


def _verb(found: list) -> str:
    return "computes" if len(found) == 1 else "compute"


def _batch_norm_problems(name: str, phase: str, zeroed: list, per_image: list) -> list[Problem]:
    fix = (f"use a {phase} batch_size of at least 2 (8 or more for stable statistics), or freeze these layers with "
           "batch_norm_param { use_global_stats: true } (and lr_mult: 0 on their three param blocks)")
    setting = f"use_global_stats false, or unset, which means false in {phase}"
    problems = []
    if zeroed:
        problems.append(error(
            f"{plural(len(zeroed), 'BatchNorm layer')} ({_names(zeroed)}) {_verb(zeroed)} batch statistics ({setting}) "
            "over a batch of 1 on a 1x1 input", f"{name}: layer {zeroed[0].name} ({phase})", fix,
            "each channel's mean over one value is that value, so the layer outputs all zeros: nothing after it "
            "can learn"))
    if per_image:
        problems.append(warning(
            f"{plural(len(per_image), 'BatchNorm layer')} ({_names(per_image)}) {_verb(per_image)} batch statistics "
            f"({setting}) over a batch of 1", f"{name}: layer {per_image[0].name} ({phase})", fix,
            "each image is normalised by its own statistics, which differ from the running averages used at test "
            "time, and the running averages are computed from single images"))
    return problems

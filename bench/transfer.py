"""The seed experiment of `make transfer-bench`: fine-tuning against training from scratch, on real data.

1. A small CNN (LeNet-shaped) learns Fashion-MNIST classes 0-4 (T-shirt/top, Trouser, Pullover, Dress, Coat) from
   random init, 1000 images per class: `caffetune run`.
2. `caffetune rewrite` gives it a new 5-class head for classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot), and
   the same net and solver are trained three times on 5-9 (100 images per class):
   - from scratch: random init (the net's fillers);
   - fine-tuned: `caffetune run --weights SOURCE` (every layer but the renamed head copied; the head from its filler);
   - fine-tuned from the fitted head: `caffetune run --weights SOURCE --fit-head` (the head first fitted as a linear
     probe on the source net's features of the 500 training images, then the same fine-tuning).
   The same 1,000 val images (200 per class; test_iter x batch covers them exactly once) are scored before training
   and after every iteration, so the counts are not quantised by the test interval.
3. Printed: each run's curve, the check that each fine-tuned run copied what it should (caffe's "Ignoring source
   layer" lines), and the iterations each arm needs to reach several targets (the first test pass at or above it;
   median over seeds) with their ratio to scratch. The fitted head's feature pass is not free: it is converted to
   iterations of compute with `caffe time` (forward batches x forward ms / forward-backward ms) and added; the bound
   that counts each forward batch as a whole iteration is printed too. The goal: fine-tuning needs at most a
   quarter of scratch's iterations at the main target.

What differs between the arms: only the initial weights (the source net's, the fitted head, or the fillers). All
train the same rewritten net (new head `ip2_target` at lr_mult 10/20, the rest at 1) with the same solver, data,
seeds and target. TRANSFER_FREEZE=backbone or TRANSFER_BACKBONE_LR_MULT=x give the fine-tuned arms rewrite's staged
policy instead (then their net differs from scratch's in those lr_mults only).

Environment: TRANSFER_TARGET (0.90), TRANSFER_SEEDS (5), TRANSFER_TRAIN (100 images per class of 5-9),
TRANSFER_ITER (100 iterations per target run), TRANSFER_BASE_LR (0.01), TRANSFER_LR_MULT (the new head's lr_mult,
"10,20"), TRANSFER_FREEZE, TRANSFER_BACKBONE_LR_MULT, TRANSFER_OUT (keep the runs there; default: a temporary
folder, removed afterwards).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from caffetune import files
from caffetune.data import dataset, imagelist
from caffetune.data.datum import ImageOptions
from caffetune.demo import fashion_mnist
from caffetune.model import caffe_tools, prototxt
from caffetune.surgery import rewrite
from caffetune.surgery.net_edits import DataOptions
from caffetune.surgery.solver import SolverOptions
from caffetune.train import runner

TARGET = float(os.environ.get("TRANSFER_TARGET", "0.90"))
SEEDS = [int(s) for s in range(int(os.environ.get("TRANSFER_SEEDS", "5")))]
SOURCE_CLASSES, TARGET_CLASSES = range(0, 5), range(5, 10)
SOURCE_PER_CLASS = 1000
TARGET_TRAIN = int(os.environ.get("TRANSFER_TRAIN", "100"))  # per class: the new task has little data, as is usual
TARGET_VAL = 200                                            # per class, scored at each test pass
SOURCE_ITER, TEST_EVERY = 600, 1
TARGET_ITER = int(os.environ.get("TRANSFER_ITER", "100"))
BASE_LR = float(os.environ.get("TRANSFER_BASE_LR", "0.01"))    # the target runs' solver (Caffe's LeNet value)
NEW_LR_MULT = tuple(float(v) for v in os.environ.get("TRANSFER_LR_MULT", "10,20").split(","))
FREEZE = os.environ.get("TRANSFER_FREEZE") or None                 # "backbone": the fine-tuned arm only
BACKBONE_LR_MULT = float(os.environ["TRANSFER_BACKBONE_LR_MULT"]) if os.environ.get("TRANSFER_BACKBONE_LR_MULT") \
    else None
CURVE_AT = (0, 1, 2, 5, 10, 20, 50)
HEAD = "ip2"

NET = """name: "fashion_lenet"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.00390625 } data_param { source: "train_lmdb" backend: LMDB batch_size: 64 } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { scale: 0.00390625 } data_param { source: "val_lmdb" backend: LMDB batch_size: 100 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 20 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 50 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
  inner_product_param { num_output: 500 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy" include { phase: TEST } }
"""
SOLVER = """net: "train_val.prototxt"
test_iter: 10
test_interval: 100
test_initialization: false
base_lr: 0.01
momentum: 0.9
weight_decay: 0.0005
lr_policy: "fixed"
display: 50
max_iter: 600
snapshot_prefix: "lenet"
solver_mode: CPU
random_seed: 0
"""


def say(line: str) -> None:
    print(line, flush=True)


def build_images(root: Path, name: str, classes, per_class: int, val_fraction: float) -> Path:
    """Fashion-MNIST classes -> class folders of PNGs -> build-lmdb (grey, 28x28): root/<name>/data."""
    images = fashion_mnist.export(root / name / "images", "train", per_class, classes)
    data = root / name / "data"
    dataset.build(imagelist.load(images.path), data,
                  dataset.BuildOptions(image=ImageOptions(gray=True), val_fraction=val_fraction, overwrite=True,
                                       workers=1))     # 28x28 PNGs: worker processes cost more than they save
    return data


def train_source_net(root: Path, data: Path) -> Path:
    """Step 1: the small CNN on classes 0-4, from random init; returns its final weights."""
    model = root / "source"
    net = NET.replace('"train_lmdb"', f'"{data / "train_lmdb"}"').replace('"val_lmdb"', f'"{data / "val_lmdb"}"')
    files.write_atomic(model / "train_val.prototxt", net)
    files.write_atomic(model / "solver.prototxt", SOLVER.replace('"train_val.prototxt"',
                                                                     f'"{model / "train_val.prototxt"}"'))
    result = runner.start(runner.RunOptions(solver=model / "solver.prototxt", name="source", runs_root=root / "runs",
                                            max_iter=SOURCE_ITER, keep_best=False))
    accuracy = last_accuracy(result.records)
    say(f"source net (classes 0-4, {SOURCE_ITER} iterations from random init): val accuracy {accuracy:.4f}")
    return result.snapshot


def rewrite_for_target(root: Path, data: Path, source_weights: Path, folder: str = "target",
                       freeze: str | None = None, backbone_lr_mult: float | None = None) -> Path:
    """Step 2: `caffetune rewrite` the source net for classes 5-9: new 5-class head `ip2_target`, new data."""
    options = rewrite.Options(classes=5, name="target", weights=str(source_weights), new_lr_mult=NEW_LR_MULT,
                              freeze=freeze, backbone_lr_mult=backbone_lr_mult,
                              data=DataOptions(train_source=str(data / "train_lmdb"),
                                               val_source=str(data / "val_lmdb")),
                              solver=str(root / "source" / "solver.prototxt"),
                              solver_options=SolverOptions(max_iter=TARGET_ITER, test_interval=TEST_EVERY,
                                                           lr_policy="fixed", base_lr=BASE_LR))
    rewrite.rewrite_files(root / "source" / "train_val.prototxt", options, output=str(root / folder))
    return root / folder / "solver.prototxt"


def with_seed(solver: Path, seed: int) -> Path:
    """A copy of the solver with another random_seed (the fillers of the new head and of a scratch net)."""
    message = prototxt.load(solver, "SolverParameter")
    message.random_seed = seed
    message.test_initialization = True      # score before the first iteration too (a fitted head is ready then)
    path = solver.with_name(f"solver_seed{seed}.prototxt")
    files.write_atomic(path, prototxt.format(message))
    return path


def last_accuracy(records) -> float:
    tests = [r for r in records if r.phase == "test" and "accuracy" in r.values]
    return tests[-1].values["accuracy"] if tests else float("nan")


def iterations_to(records, target: float) -> int | None:
    """The iteration of the first test pass whose accuracy reaches `target`."""
    for record in records:
        if record.phase == "test" and record.values.get("accuracy", 0.0) >= target:
            return record.iteration
    return None


def accuracies(records) -> dict[int, float]:
    return {r.iteration: r.values["accuracy"] for r in records if r.phase == "test" and "accuracy" in r.values}


def curve_summary(records) -> str:
    """Val accuracy after a few iteration counts, the final one and the best one."""
    curve = accuracies(records)
    if not curve:
        return "no test pass"
    points = " ".join(f"{at}:{curve[at]:.3f}" for at in CURVE_AT if at in curve)
    return f"{points} final:{curve[max(curve)]:.3f} best:{max(curve.values()):.3f}"


def ignored_layers(run_dir: Path) -> set[str]:
    """Layers of the .caffemodel that caffe did not copy (its "Ignoring source layer X" lines)."""
    log = (run_dir / "caffe.log").read_text(errors="replace")
    return set(re.findall(r"Ignoring source layer (\S+)", log))


def train_target(root: Path, solver: Path, weights: list[Path], name: str, fit_head: bool = False) -> runner.RunResult:
    return runner.start(runner.RunOptions(solver=solver, weights=weights, name=name, runs_root=root / "runs",
                                          keep_best=False, fit_head=fit_head))


def median_or_none(values: list[int | None]) -> float | None:
    """Median where a run that never reached the target counts as infinitely slow (None)."""
    ordered = sorted(values, key=lambda v: float("inf") if v is None else v)
    middle = ordered[len(ordered) // 2]
    if len(ordered) % 2 or middle is None:
        return middle
    before = ordered[len(ordered) // 2 - 1]
    return None if before is None else (before + middle) / 2


def caffe_time(net: Path) -> tuple[float, float]:
    """(forward ms, forward-backward ms) of one training batch, as `caffe time` measures them."""
    binary = caffe_tools.find_caffe()
    result = caffe_tools.run_quiet([str(binary.binary), "time", f"-model={net}", "-iterations=20"],
                                 env=binary.env(), cwd=net.parent)
    text = result.stdout + result.stderr
    forward = re.search(r"Average Forward pass: ([0-9.]+) ms", text)
    both = re.search(r"Average Forward-Backward: ([0-9.]+) ms", text)
    if result.returncode != 0 or not forward or not both:
        raise SystemExit(f"caffe time failed on {net}:\n{text[-2000:]}")
    return float(forward.group(1)), float(both.group(1))


def check_copied(run: runner.RunResult, expected: set[str], arm: str) -> None:
    """Caffe's "Ignoring source layer" lines name exactly the layers the arm should not copy."""
    skipped = ignored_layers(run.run_dir)
    if skipped != expected:
        raise SystemExit(f"{arm} run {run.run_dir}: caffe ignored {sorted(skipped)} of the weights, expected "
                         f"{sorted(expected) or 'none'}")


def print_table(arms: dict[str, list], extra: dict[str, float]) -> float | None:
    """Iterations to each target per arm (median over seeds), and the ratio of each fine-tuned arm to scratch.
    `extra`: iterations of compute an arm spends before its first SGD step (the fitted head's feature pass)."""
    say(f"  {'target':>6}  {'scratch':>8}  {'fine-tuned':>10}  {'ratio':>6}  {'fit-head':>8}  {'+features':>10}  "
        f"{'ratio':>6}")
    headline = None
    for target in sorted({0.80, 0.85, 0.88, TARGET, 0.92}):
        scratch, tuned, fitted = (median_or_none([iterations_to(r, target) for r in arms[name]])
                                  for name in ("scratch", "finetune", "fit-head"))
        with_features = None if fitted is None else fitted + extra["fit-head"]
        cells = [show(scratch), show(tuned), ratio_text(tuned, scratch), show(fitted),
                 "-" if with_features is None else f"{with_features:.1f}", ratio_text(with_features, scratch)]
        say(f"  {target:6.0%}  {cells[0]:>8}  {cells[1]:>10}  {cells[2]:>6}  {cells[3]:>8}  {cells[4]:>10}  "
            f"{cells[5]:>6}" + ("   <- the target" if target == TARGET else ""))
        if target == TARGET and with_features is not None:
            headline = with_features / (scratch if scratch is not None else TARGET_ITER)
    return headline


def show(value: float | None) -> str:
    return f">{TARGET_ITER}" if value is None else f"{value:g}"


def ratio_text(tuned: float | None, scratch: float | None) -> str:
    if tuned is None:
        return "-"
    return f"{'<=' if scratch is None else ''}{tuned / (scratch if scratch is not None else TARGET_ITER):.3f}"


def main() -> int:
    started = time.perf_counter()
    root = Path(os.environ.get("TRANSFER_OUT") or tempfile.mkdtemp(prefix="caffetune-transfer-"))
    try:
        say(f"data: Fashion-MNIST classes 0-4 ({SOURCE_PER_CLASS}/class) and 5-9 ({TARGET_TRAIN}/class to train, "
            f"{TARGET_VAL}/class to score) in {root}")
        source_data = build_images(root, "source", SOURCE_CLASSES, SOURCE_PER_CLASS, 0.1)
        target_data = build_images(root, "target", TARGET_CLASSES, TARGET_TRAIN + TARGET_VAL,
                                   TARGET_VAL / (TARGET_TRAIN + TARGET_VAL))
        source_weights = train_source_net(root, source_data)
        solver = rewrite_for_target(root, target_data, source_weights)
        staged = FREEZE is not None or BACKBONE_LR_MULT is not None
        tuned_solver = rewrite_for_target(root, target_data, source_weights, "target-finetune", FREEZE,
                                          BACKBONE_LR_MULT) if staged else solver
        arms: dict[str, list] = {"scratch": [], "finetune": [], "fit-head": []}
        fit_report: dict = {}
        for seed in SEEDS:
            fresh = train_target(root, with_seed(solver, seed), [], f"scratch-seed{seed}")
            tuned = train_target(root, with_seed(tuned_solver, seed), [source_weights], f"finetune-seed{seed}")
            fitted = train_target(root, with_seed(tuned_solver, seed), [source_weights], f"fit-head-seed{seed}",
                                  fit_head=True)
            check_copied(tuned, {HEAD}, "fine-tuned")
            check_copied(fitted, set(), "fit-head")
            fit_report = json.loads((fitted.run_dir / runner.FIT_REPORT).read_text())
            for name, run in (("scratch", fresh), ("finetune", tuned), ("fit-head", fitted)):
                arms[name].append(run.records)
            say(f"seed {seed}: iterations to {TARGET:.0%}: from scratch {iterations_to(fresh.records, TARGET)}, "
                f"fine-tuned {iterations_to(tuned.records, TARGET)}, fine-tuned from the fitted head "
                f"{iterations_to(fitted.records, TARGET)} (fine-tuned copied every source layer but {HEAD}; "
                f"fit-head copied all, its {HEAD}_target fitted)")
            for label, run in (("from scratch", fresh), ("fine-tuned", tuned), ("fit-head", fitted)):
                say(f"  {label:>12} val accuracy after {curve_summary(run.records)}")
        forward_ms, both_ms = caffe_time(solver.parent / "train_val.prototxt")
        feature_batches, train_batch = fit_report["forward_batches"], fit_report["batch_size"]
        feature_cost = feature_batches * forward_ms / both_ms
        policy = (f"new head lr_mult {NEW_LR_MULT[0]:g}/{NEW_LR_MULT[1]:g}, the rest 1" if not staged else
                  f"new head lr_mult {NEW_LR_MULT[0]:g}/{NEW_LR_MULT[1]:g}; fine-tuned backbone "
                  f"{'frozen' if FREEZE else f'lr_mult {BACKBONE_LR_MULT:g}'}, scratch backbone 1")
        say(f"\nclasses 5-9, {TARGET_TRAIN} train images/class, the same net and solver (base_lr {BASE_LR:g}, "
            f"{policy}, batch {train_batch}, {TARGET_ITER} iterations, the same {TARGET_VAL * 5} val images scored "
            f"before training and after every iteration); median of {len(SEEDS)} seed(s). Iterations to reach each "
            f"target: from scratch, fine-tuned (caffetune run --weights SOURCE), and fine-tuned from the fitted head "
            f"(caffetune run --weights SOURCE --fit-head), whose feature pass over the {TARGET_TRAIN * 5} training "
            f"images ({feature_batches} forward batches of {train_batch}) costs {feature_cost:.2f} iterations of "
            f"compute (caffe time: forward {forward_ms:.2f} ms, forward-backward {both_ms:.2f} ms per batch) and is "
            f"added in +features:")
        ratio = print_table(arms, {"fit-head": feature_cost})
        finals = {name: sorted(last_accuracy(r) for r in runs)[len(runs) // 2] for name, runs in arms.items()}
        say(f"median final val accuracy after {TARGET_ITER} iterations: " +
            ", ".join(f"{name} {value:.3f}" for name, value in finals.items()))
        verdict = "fine-tuning did not reach it" if ratio is None else (
            f"{ratio:.3f}: {'met' if ratio <= 0.25 else 'NOT met'}")
        say(f"fine-tuned (fitted head, feature pass counted) / scratch iterations to {TARGET:.0%} val accuracy "
            f"(goal: at most 0.25): {verdict}")
        fitted_alone = median_or_none([iterations_to(r, TARGET) for r in arms["fit-head"]])
        if fitted_alone is not None:
            bound = (fitted_alone + feature_batches) / (median_or_none([iterations_to(r, TARGET)
                                                                        for r in arms["scratch"]]) or TARGET_ITER)
            say(f"counting each forward batch of the feature pass as a whole training iteration instead: {bound:.3f}")
        say(f"total time {time.perf_counter() - started:.0f} s")
        return 0
    finally:
        if not os.environ.get("TRANSFER_OUT"):
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

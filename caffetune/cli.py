"""caffetune's command line: parse arguments, call the library, print, exit. The only module that prints or exits."""
from __future__ import annotations

import json
import sys

import click
from rich.console import Console

from . import __version__, schema
from .errors import CaffetuneError

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
    from .doctor import diagnose

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

# --- build-lmdb, inspect-lmdb (issue 4) -------------------------------------------------------------------------

# --- run, plot, eval (issue 5) ----------------------------------------------------------------------------------
class RunView:
    """The live progress bar of `caffetune run` (iteration / max_iter, loss, lr, last test accuracy, ETA), fed by
    the runner's callback; notices are printed above it."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  acc {task.fields[acc]}"),
                            TextColumn("ETA {task.fields[eta]}"), console=err, transient=False)
        self.task = None

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()

    def __call__(self, item) -> None:
        import time

        from .runner import Notice

        if isinstance(item, Notice):
            self.bar.console.print(f"[yellow]warning:[/yellow] {item.text}" if item.level == "warning" else item.text)
            return
        number = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
        fields = {"loss": number(item.loss, ".4g"), "lr": number(item.lr, ".3g"),
                  "acc": number(item.test_accuracy, ".4f"),
                  "eta": "-" if item.eta is None else time.strftime("%H:%M:%S", time.gmtime(item.eta))}
        if self.task is None:
            self.task = self.bar.add_task("train", total=item.max_iter, **fields)
        self.bar.update(self.task, total=item.max_iter, completed=item.iteration, **fields)

    def stage(self, name: str) -> None:
        self.task = None
        self.bar.console.print(f"[bold]{name}[/bold]")


def _print_run_result(result) -> None:
    out.print(f"{result.status} at iteration {result.iteration}: {result.run_dir}")
    if result.snapshot:
        out.print(f"  snapshot: {result.snapshot}")
    if result.best:
        out.print(f"  best: {result.best} (accuracy {result.best_accuracy:.4f})")
    if result.status == "interrupted":
        out.print(f"  continue with: caffetune run --resume {result.run_dir}")


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
@click.pass_obj
def run(obj: Context, solver, weights, snapshot, name, runs_dir, gpu, strict_gpu, resume_dir, max_iter, early_stop,
        no_best, no_preflight, stages, unfreeze_from, stage1_iter, stage2_iter, stage2_lr_factor, heads) -> None:
    """Check, then train with the real `caffe train` in runs/NAME/, with live progress, metrics and plots."""
    from pathlib import Path

    from . import runner

    weights = [w for item in weights for w in item.split(",") if w]
    if resume_dir:
        with RunView() as view:
            result = runner.resume(resume_dir, callback=view)
        _print_run_result(result)
        sys.exit(130 if result.status == "interrupted" else 0)
    if not solver:
        raise click.UsageError("give --solver (or --resume runs/NAME)")
    options = runner.RunOptions(solver=Path(solver), weights=[Path(w) for w in weights],
                                snapshot=Path(snapshot) if snapshot else None, name=name, runs_root=Path(runs_dir),
                                gpu=gpu, strict_gpu=strict_gpu, caffe=obj.caffe, keep_best=not no_best,
                                early_stop=early_stop, max_iter=max_iter, preflight=not no_preflight)
    with RunView() as view:
        if stages:
            from . import stages as two_stage

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

    from . import logparse, plots

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
    from . import evaluate

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

"""Training commands: run (check, then `caffe train` with live progress), plot (curves of any caffe log)."""
from __future__ import annotations

import sys

import click

from caffetune.cli.app import Context, cli
from caffetune.cli.exit_codes import ExitCode
from caffetune.cli.output import RunView, out


def _print_run_results(results) -> None:
    from caffetune.train import session

    for result in results:
        out.print(f"{result.status} at iteration {result.iteration}: {result.run_dir}")
        if result.snapshot:
            out.print(f"  snapshot: {result.snapshot}")
        if result.best:
            out.print(f"  best: {result.best} (accuracy {result.best_accuracy:.4f})")
        if result.status == "interrupted":
            out.print(f"  continue with: caffetune run --resume {session.resume_target(result)}")


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
@click.option("--strict", is_flag=True, help="preflight warnings (likely mistakes) stop the run like errors")
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
@click.option("--cache-features/--no-cache-features", default=None,
              help="forward the frozen trunk once and train the top on its cached outputs (default: on when that "
                   "is exact; --cache-features refuses with the reason otherwise; see docs/feature-cache.md)")
@click.option("--cache-crops", type=click.IntRange(min=1), default=None, metavar="K",
              help="with a random TRAIN crop: cache K crops per image and pick one per image per epoch (an "
                   "approximation of Caffe's crops; turns the cache on)")
@click.pass_obj
def run(obj: Context, solver, weights, snapshot, name, runs_dir, gpu, strict_gpu, resume_dir, max_iter, early_stop,
        no_best, no_preflight, strict, stages, unfreeze_from, stage1_iter, stage2_iter, stage2_lr_factor, heads,
        fit_head, cache_features, cache_crops) -> None:
    """Check, then train with the real `caffe train` in runs/NAME/, with live progress, metrics and plots."""
    from pathlib import Path

    from caffetune.train import runner, session
    from caffetune.train.stages import StagePlan

    if not (solver or resume_dir):
        raise click.UsageError("give --solver (or --resume runs/NAME)")
    options = plan = None
    if not resume_dir:
        weights = [w for item in weights for w in item.split(",") if w]
        options = runner.RunOptions(solver=Path(solver), weights=[Path(w) for w in weights],
                                    snapshot=Path(snapshot) if snapshot else None, name=name,
                                    runs_root=Path(runs_dir), gpu=gpu, strict_gpu=strict_gpu, caffe=obj.caffe,
                                    keep_best=not no_best, early_stop=early_stop, max_iter=max_iter,
                                    preflight=not no_preflight, strict=strict, fit_head=fit_head,
                                    cache_features=True if cache_crops and cache_features is None
                                    else cache_features, cache_crops=cache_crops or 0)
        plan = StagePlan(unfreeze_from=unfreeze_from, stage1_iter=stage1_iter, stage2_iter=stage2_iter,
                         lr_factor=stage2_lr_factor, heads=list(heads)) if stages else None
    with RunView() as view:
        results = session.start_or_resume(view, resume_dir=resume_dir, options=options, plan=plan)
    _print_run_results(results)
    sys.exit(ExitCode.INTERRUPTED if results[-1].status == "interrupted" else ExitCode.OK)


@cli.command()
@click.argument("log", type=click.Path(dir_okay=False, exists=True))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="PNG to write (default: LOG.png)")
def plot(log: str, output: str | None) -> None:
    """Draw loss, accuracy and learning rate against iterations from any caffe training log."""
    from caffetune.train import plots

    path, records = plots.plot_log(log, output)
    out.print(f"{path}: {sum(r.phase == 'train' for r in records)} train and "
              f"{sum(r.phase == 'test' for r in records)} test records")

"""`caffetune sweep`: a hyperparameter search over real fine-tuning runs (Optuna), and `--show NAME` of its results."""
from __future__ import annotations

import sys

import click

from caffetune.cli.app import Context, cli
from caffetune.cli.exit_codes import ExitCode
from caffetune.cli.output import RunView, out, print_json, print_wide, rich_table

PARAM_HELP = ("NAME=SPEC to search (repeat): SPEC is log:LOW:HIGH, uniform:LOW:HIGH, int:LOW:HIGH or choice:A,B,...; "
              "NAME is a solver field (base_lr, momentum, weight_decay, lr_policy, gamma, stepsize, max_iter), "
              "batch_size (the TRAIN batch), freeze_through (a layer or none), backbone_lr_mult, new_lr_mult, "
              "fit_head or cache_features")


class SweepView:
    """A line per trial started and finished, and the run's progress bar for the running trial."""

    def __init__(self, view: RunView):
        self.view = view

    def __call__(self, item) -> None:
        from caffetune.train import sweep, sweep_space
        from caffetune.train.events import Notice
        from caffetune.train.logparse import Record

        if isinstance(item, sweep.TrialStarted):
            self.view.task, self.view.name = None, f"trial {item.number}"
            self.view.say(f"trial {item.number}: {sweep_space.describe(item.values)}  ({item.run_dir})")
        elif isinstance(item, sweep.TrialFinished):
            value = "" if item.value is None else f" {item.value:.4g}"
            note = f" ({item.note})" if item.note else ""
            self.view.say(f"trial {item.number}: {item.state.lower()}{value} after {item.iterations} "
                          f"iterations{note}")
        elif isinstance(item, Notice) and item.text.startswith("run directory "):
            return   # the trial's line says it
        elif not isinstance(item, Record):
            self.view(item)


def _sigterm_as_ctrl_c() -> list:
    """SIGTERM (a batch system preempting the worker) stops the running trial as Ctrl-C does: caffe snapshots, the
    trial's values are queued again. Returns a list that gets an entry when it happened."""
    import os
    import signal

    seen: list = []

    def handle(signum, _frame) -> None:
        seen.append(signum)
        os.kill(os.getpid(), signal.SIGINT)

    signal.signal(signal.SIGTERM, handle)
    return seen


def _show(name: str, storage: str | None, runs_dir: str, as_json: bool) -> None:
    from pathlib import Path

    from caffetune.train import sweep_results

    study = sweep_results.load(name, storage, Path(runs_dir))
    root = Path(runs_dir) / name
    if root.is_dir():
        sweep_results.write_outputs(study, root, plots=True)
    if as_json:
        print_json(sweep_results.as_json(study))
        return
    header, rows = sweep_results.table(study)
    data = sweep_results.as_json(study)
    best = data["best"]
    footer = f"best: trial {best['number']}" if best else "no completed trial yet"
    print_wide(rich_table(f"sweep {name} ({data['direction']} {data['metric']})",
                          [(h, footer if i == 0 else "", "right" if i in (0, 3, 4, 5) else "left")
                           for i, h in enumerate(header)], rows))
    if best and root.is_dir():
        out.print(f"best: trial {best['number']} {best['value']:.4g} ({best['run']}); {root / 'best.json'}, "
                  f"{root / 'sweep.csv'}, {root / 'history.png'}, {root / 'importance.png'}")


@cli.command()
@click.option("--solver", type=click.Path(dir_okay=False, exists=True), help="the solver every trial starts from")
@click.option("--weights", multiple=True, help="pretrained .caffemodel(s) to fine-tune from (repeat, or commas)")
@click.option("--name", help="the sweep: runs/NAME/ and the study's name (several workers share it)")
@click.option("--trials", type=click.IntRange(min=1), help="finished trials the study should hold (all workers)")
@click.option("--param", "params", multiple=True, metavar="NAME=SPEC", help=PARAM_HELP)
@click.option("--try", "tries", multiple=True, metavar="NAME=VALUE,...",
              help="a trial to run first with these values (repeat); e.g. the solver's own base_lr")
@click.option("--storage", help="the study's storage URL (default: sqlite:///RUNS_DIR/NAME/study.db); "
                                "postgresql://USER:PASSWORD@HOST/DB to share it between machines")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False))
@click.option("--metric", default="accuracy", show_default=True,
              help="the test output to optimise (default: the main accuracy); e.g. loss")
@click.option("--direction", type=click.Choice(["maximize", "minimize"]),
              help="default: minimize a loss, maximize anything else")
@click.option("--prune/--no-prune", default=True, show_default=True,
              help="stop hopeless trials early (median pruner; caffe snapshots and stops)")
@click.option("--prune-startup", type=click.IntRange(min=0), default=3, show_default=True,
              help="finished trials before any trial is pruned")
@click.option("--prune-warmup", type=click.IntRange(min=0), default=0, show_default=True,
              help="iterations of a trial before it can be pruned")
@click.option("--seed", type=int, help="the sampler's seed (give each worker its own)")
@click.option("--heartbeat", type=click.IntRange(min=1), default=60, show_default=True,
              help="seconds between heartbeats; a trial silent for twice that is failed and queued again")
@click.option("--gpu", help="GPU ids for caffe's -gpu (0, 0,1 or all)")
@click.option("--strict-gpu", is_flag=True, help="fail instead of falling back to the CPU")
@click.option("--early-stop", type=int, help="stop a trial after N test passes without a better accuracy")
@click.option("--fit-head", is_flag=True, help="every trial fits the new head(s) first (see `caffetune fit-head`)")
@click.option("--cache-features/--no-cache-features", default=None,
              help="train every trial's top on cached trunk features (default: when exact, as `caffetune run`)")
@click.option("--no-preflight", is_flag=True, help="skip the checks of the base net before the first trial")
@click.option("--show", "show_name", metavar="NAME", help="print the trials of sweep NAME, write its files, exit")
@click.option("--json", "as_json", is_flag=True, help="--show: print JSON")
@click.pass_obj
def sweep(obj: Context, solver, weights, name, trials, params, tries, storage, runs_dir, metric, direction, prune,
          prune_startup, prune_warmup, seed, heartbeat, gpu, strict_gpu, early_stop, fit_head, cache_features,
          no_preflight, show_name, as_json) -> None:
    """Search hyperparameters over real fine-tuning runs (each trial a `caffetune run` in RUNS_DIR/NAME/trial-N)."""
    import logging
    from pathlib import Path

    import optuna

    from caffetune.train import sweep as sweeping
    from caffetune.train import sweep_space, sweep_storage

    optuna.logging.set_verbosity(logging.ERROR)   # the sweep prints its own line for every trial
    if show_name:
        _show(show_name, storage, runs_dir, as_json)
        return
    missing = [flag for flag, value in (("--solver", solver), ("--name", name), ("--trials", trials),
                                        ("--param", params)) if not value]
    if missing:
        raise click.UsageError(f"give {', '.join(missing)} (or --show NAME)")
    space = sweep_space.parse(list(params))
    options = sweeping.SweepOptions(
        solver=Path(solver), name=name, space=space, trials=trials,
        weights=[Path(w) for item in weights for w in item.split(",") if w], storage=storage,
        runs_root=Path(runs_dir), metric=metric, direction=direction, prune=prune, prune_startup=prune_startup,
        prune_warmup=prune_warmup, seed=seed, heartbeat=heartbeat,
        enqueue=[sweep_space.parse_fixed(text, space) for text in tries], gpu=gpu, strict_gpu=strict_gpu,
        caffe=obj.caffe, early_stop=early_stop, fit_head=fit_head, cache_features=cache_features,
        preflight=not no_preflight)
    terminated = _sigterm_as_ctrl_c()
    try:
        with RunView() as view:
            result = sweeping.run(options, callback=SweepView(view))
    except sweeping.SweepInterrupted as error:
        click.echo(f"interrupted: {error.what}; run the same command again to continue", err=True)
        sys.exit(ExitCode.TERMINATED if terminated else ExitCode.INTERRUPTED)
    ran = ", ".join(str(n) for n in result.ran) or "none"
    running = f", {result.running} running in other workers" if result.running else ""
    out.print(f"{result.finished} of {trials} trials finished in {name}{running} (this process ran: {ran})")
    if result.best:
        out.print(f"best: trial {result.best['number']} {metric} {result.best['value']:.4g} "
                  f"({sweep_space.describe(result.best['params'])})")
        out.print(f"  {result.best['run']}")
        if result.best.get("weights"):
            out.print(f"  {result.best['weights']}")
    where = f" --storage {sweep_storage.safe_url(storage)}" if storage else ""
    out.print(f"table: caffetune sweep --show {name}{where}")

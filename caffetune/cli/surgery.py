"""`caffetune rewrite`: new heads, learning-rate policy, data layers and solver for fine-tuning."""
from __future__ import annotations

import sys

import click

from caffetune.cli import types
from caffetune.cli.app import cli
from caffetune.cli.exit_codes import ExitCode
from caffetune.cli.output import err, out, print_columns, print_json


def _print_plan(result, to) -> None:
    for old, new in result.renames.items():
        to.print(f"head {old} -> {new}" if old != new else f"head {old} (name kept)")
    fmt = lambda values: " ".join(f"{v:g}" for v in values) or "-"  # noqa: E731
    print_columns([("layer", "type", "state", "lr_mult", "decay_mult", "change")] + [
        (e.name, e.type, e.state, fmt(e.lr_mult), fmt(e.decay_mult),
         " ".join(filter(None, ["changed" if e.changed else "", "use_global_stats" if e.use_global_stats else ""])))
        for e in result.plan.layers], to=to)
    for note in result.notes:
        to.print(f"note: {note}", markup=False)


@cli.command()
@click.argument("net", type=click.Path(dir_okay=False))
@click.option("--classes", type=click.IntRange(min=1), required=True, help="class count of the new dataset")
@click.option("--name", help="suffix for renamed heads: --name flickr turns fc8 into fc8_flickr")
@click.option("--rename", multiple=True, type=types.RENAME, help="rename a head explicitly (repeatable)")
@click.option("--head", "heads", multiple=True, metavar="NAME", help="the head layer(s), overriding detection")
@click.option("--weights", type=click.Path(dir_okay=False), help="pretrained .caffemodel: refuse new names in it")
@click.option("--new-lr-mult", default="10,20", show_default=True, type=types.LR_MULTS,
              help="lr_mult of the new layers' weights and biases (bias defaults to twice W)")
@click.option("--freeze", type=click.Choice(["backbone"]), help="freeze every layer except the new heads")
@click.option("--freeze-through", metavar="LAYER", help="freeze every layer up to and including LAYER")
@click.option("--backbone-lr-mult", type=float,
              help="weight lr_mult of the layers that stay trainable; biases keep their ratio (e.g. 0.1)")
@click.option("--class-weights", type=types.CLASS_WEIGHTS,
              help="per-class loss weights, one per class (replaces a class_weighting list, e.g. SegNet's)")
@click.option("--upgrade", is_flag=True, help="write a legacy V1 net (layers {}) in the current format")
@click.option("--train-source", help="training LMDB directory or ImageData list file")
@click.option("--val-source", help="validation LMDB directory or ImageData list file")
@click.option("--batch-size", type=click.IntRange(min=1), help="batch size of the TRAIN data layer (and TEST)")
@click.option("--val-batch-size", type=click.IntRange(min=1), help="batch size of the TEST data layer")
@click.option("--mean-file", help="mean .binaryproto for the data layers")
@click.option("--mean-value", type=types.MEAN_VALUES, help="per-channel mean values for the data layers")
@click.option("--crop-size", type=click.IntRange(min=1), help="crop size of the data layers")
@click.option("--mirror/--no-mirror", default=None, help="random left-right flips of the TRAIN images (default: as "
              "the net has it; a train_val derived from a deploy net mirrors)")
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
@click.option("--random-seed", type=click.IntRange(min=0),
              help="seed of caffe's random draws (fillers, dropout, mirror): a run repeats exactly")
@click.option("-o", "--output", metavar="PATH", help="output file, or directory for several nets")
@click.option("--in-place", is_flag=True, help="overwrite the input net (and --solver file)")
@click.option("--diff", "show_diff", is_flag=True, help="print a unified diff instead of writing")
@click.option("--check", is_flag=True, help="write nothing; exit 1 when the outputs would change")
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
def rewrite(net, classes, name, rename, heads, weights, new_lr_mult, freeze, freeze_through, backbone_lr_mult,
            class_weights, upgrade, train_source, val_source, batch_size, val_batch_size, mean_file, mean_value,
            crop_size, mirror, solver, epochs, train_size, val_size, base_lr, lr_policy, stepsize, gamma, max_iter,
            test_interval, snapshot, snapshot_prefix, solver_mode, random_seed, output, in_place, show_diff, check,
            as_json) -> None:
    """Replace the classifier head(s) of NET for CLASSES classes and set the learning-rate policy."""
    from caffetune.surgery.net_edits import DataOptions
    from caffetune.surgery.rewrite import Options, rewrite_files
    from caffetune.surgery.solver import SolverOptions

    if not (output or in_place or show_diff or check or as_json):
        raise click.UsageError("say where to write: -o PATH, --in-place, or preview with --diff, --check or --json")
    if output and in_place:
        raise click.UsageError("-o and --in-place exclude each other")
    options = Options(
        classes=classes, name=name, renames=tuple(rename), heads=heads, weights=weights,
        new_lr_mult=(new_lr_mult[0], new_lr_mult[1] if len(new_lr_mult) == 2 else 2 * new_lr_mult[0]),
        freeze=freeze, freeze_through=freeze_through, backbone_lr_mult=backbone_lr_mult, upgrade=upgrade,
        class_weights=class_weights or (),
        data=DataOptions(train_source=train_source, val_source=val_source, batch_size=batch_size,
                         val_batch_size=val_batch_size, mean_file=mean_file, mean_value=mean_value or (),
                         crop_size=crop_size, mirror=mirror),
        solver=solver, solver_options=SolverOptions(
            base_lr=base_lr, lr_policy=lr_policy, stepsize=stepsize, gamma=gamma, max_iter=max_iter, epochs=epochs,
            test_interval=test_interval, train_size=train_size, val_size=val_size, snapshot=snapshot,
            snapshot_prefix=snapshot_prefix, solver_mode=solver_mode, random_seed=random_seed))
    progress = (lambda line: err.print(line)) if not as_json else None
    result = rewrite_files(net, options, output=output, in_place=in_place, write=not (show_diff or check),
                           progress=progress)
    if as_json:
        print_json(result.as_dict())
    else:
        _print_plan(result, err if show_diff else out)
    if show_diff:
        click.echo(result.diff(), nl=False)
    if check:
        changed = result.would_change()
        for path in changed:
            err.print(f"would change {path}")
        if changed:
            sys.exit(ExitCode.WOULD_CHANGE)

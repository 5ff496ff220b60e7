"""Weight transfer commands: graft (copy what matches into a new net's caffemodel), fit-head (linear probe)."""
from __future__ import annotations

import click

from caffetune.cli import types
from caffetune.cli.app import Context, cli
from caffetune.cli.output import name_list, out, print_json

_STATE_COLOURS = (("copied", "green"), ("partial", "cyan"), ("mismatched", "red"), ("scratch", "yellow"))


def _print_graft(report, output: str) -> None:
    plan = report.plan
    for state, colour in _STATE_COLOURS:
        names = plan.names(state)
        if names:
            out.print(f"[{colour}]{state:>10}[/{colour}] ({len(names)}): {name_list(names)}")
    for layer_plan in plan.layers:
        if layer_plan.detail:
            out.print(f"{'':>10}  {layer_plan.name}: {layer_plan.detail}", markup=False)
    if plan.unused:
        out.print(f"{'unused':>10} ({len(plan.unused)}): {name_list(plan.unused)}")
    if report.left_to_caffe:
        out.print(f"left for Caffe to fill: {', '.join(report.left_to_caffe)}")
    if report.filled:
        out.print(f"initialised by fillers: {', '.join(report.filled)}")
    out.print(f"wrote {output} ({report.bytes_written:,} bytes)")


@cli.command("graft")
@click.option("--from", "source", required=True, type=click.Path(exists=True, dir_okay=False),
              help="the pretrained .caffemodel to copy from")
@click.option("--net", "net_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="the new net (.prototxt) the weights are for")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="the .caffemodel to write")
@click.option("--map", "renames", multiple=True, type=types.RENAME,
              help="copy source layer OLD into the net's layer NEW (repeatable)")
@click.option("--keep-classes", type=types.CLASS_PAIRS,
              help="carry the head's rows: old class OLD becomes new class NEW")
@click.option("--labels", nargs=2, type=click.Path(exists=True, dir_okay=False), metavar="OLD.txt NEW.txt",
              help="keep the classes both label files name (one label per line)")
@click.option("--fill", "fill_new", is_flag=True,
              help="also write the layers with nothing to copy, initialised by their fillers (default: leave them "
                   "out so Caffe fills them)")
@click.option("--seed", type=int, default=0, show_default=True, help="random seed of the fillers")
@click.option("--overwrite", is_flag=True, help="replace OUTPUT if it exists")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
def graft_command(source: str, net_path: str, output: str, renames: tuple[tuple[str, str], ...],
                  keep_classes: list | None, labels: tuple[str, str] | None, fill_new: bool, seed: int,
                  overwrite: bool, as_json: bool) -> None:
    """Write a caffemodel for a new net: copy every blob whose layer name and shape match, report the rest."""
    from caffetune import files
    from caffetune.transfer import graft

    if keep_classes and labels:
        raise click.UsageError("give either --keep-classes or --labels, not both")
    files.refuse_existing(output, overwrite)
    keep = keep_classes or (graft.keep_classes_from_labels(*labels) if labels else None)
    report = graft.graft(source, net_path, output, mapping={new: old for old, new in renames}, keep=keep,
                         fill_new=fill_new, seed=seed)
    if as_json:
        print_json(report.as_dict())
    else:
        _print_graft(report, output)


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
@click.option("--overwrite", is_flag=True, help="replace OUTPUT if it exists")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
@click.pass_obj
def fit_head_command(obj: Context, net: str, weights: str, output: str, heads: tuple[str, ...], l2: float,
                     max_images: int | None, overwrite: bool, as_json: bool) -> None:
    """Fit the net's new head(s) on the pretrained features of its training set, to fine-tune from."""
    from caffetune import files
    from caffetune.transfer import head_fit

    files.refuse_existing(output, overwrite)
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

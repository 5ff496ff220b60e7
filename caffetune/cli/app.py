"""The `caffetune` group, the options every command shares, and `main` (errors -> one message and a named exit).

Every subcommand is a `Command`: it accepts the global `--proto` and `--caffe` after its name too
(`caffetune inspect net.prototxt --proto ssd.proto`), turns the old spellings of renamed flags into the current
ones with a deprecation note, and selects the schema before its body runs.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import click

from caffetune import __version__
from caffetune.cli.exit_codes import ExitCode, for_error
from caffetune.errors import CaffetuneError

PROTO_HELP = "caffe.proto to parse nets with (a fork's, e.g. SSD); default: the pinned Caffe's."
CAFFE_HELP = "the caffe binary to use (default search: CAFFE_ROOT, PATH, the make caffe cache)."

# Old spelling -> current one. Accepted (hidden) for one release, with a note on stderr.
DEPRECATED_FLAGS = {"--force": "--overwrite", "--fresh": "--overwrite", "--mean": "--mean-file",
                    "--mean-values": "--mean-value"}


@dataclass
class Context:
    """Options shared by every subcommand (given before or after its name)."""

    proto: str | None = None
    caffe: str | None = None


def _set_shared(ctx: click.Context, param: click.Parameter, value) -> None:
    if value is not None:
        setattr(ctx.ensure_object(Context), param.name, value)


class Command(click.Command):
    """A subcommand with the shared options, deprecated flag spellings, and the schema selected before it runs.
    `needs_schema=False` for a command that must work without one (doctor reports a missing schema)."""

    def __init__(self, *args, needs_schema: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.needs_schema = needs_schema
        self.params += [click.Option(["--proto"], type=click.Path(dir_okay=False), expose_value=False,
                                     callback=_set_shared, help=PROTO_HELP),
                        click.Option(["--caffe"], type=click.Path(dir_okay=False), expose_value=False,
                                     callback=_set_shared, help=CAFFE_HELP)]
        own = {name for param in self.params for name in param.opts}
        self.aliases = {old: new for old, new in DEPRECATED_FLAGS.items() if new in own and old not in own}

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, self._current_spellings(args))

    def _current_spellings(self, args: list[str]) -> list[str]:
        renamed = []
        for index, arg in enumerate(args):
            if arg == "--":
                return renamed + args[index:]
            name, sep, value = arg.partition("=")
            if name in self.aliases:
                click.echo(f"note: {name} is deprecated and will be removed; use {self.aliases[name]}", err=True)
                arg = self.aliases[name] + sep + value
            renamed.append(arg)
        return renamed

    def invoke(self, ctx: click.Context):
        if self.needs_schema:
            from caffetune.model import schema  # noqa: PLC0415 - keeps `caffetune --help` fast

            schema.use(ctx.ensure_object(Context).proto)
        return super().invoke(ctx)


class Group(click.Group):
    command_class = Command


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="caffetune")
@click.option("--proto", envvar="CAFFETUNE_PROTO", type=click.Path(dir_okay=False), help=PROTO_HELP)
@click.option("--caffe", envvar="CAFFE_BIN", type=click.Path(dir_okay=False), help=CAFFE_HELP)
@click.pass_context
def cli(ctx: click.Context, proto: str | None, caffe: str | None) -> None:
    """Fine-tune pretrained Caffe models on new image datasets."""
    ctx.obj = Context(proto=proto, caffe=caffe)


def main() -> None:
    try:
        cli.main(standalone_mode=False, prog_name="caffetune")
    except CaffetuneError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(for_error(error))
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(ExitCode.INTERRUPTED)

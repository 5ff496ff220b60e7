"""caffetune's command line: the only package that prints or exits. A command body parses its options (click,
with the value types of `types`), calls the library, prints (`output`) and exits with a named code
(`exit_codes`). One module per group of commands; `app` holds the group, the shared options and `main`."""
from caffetune.cli import data, demo, report, surgery, sweep, train, transfer  # noqa: F401 - registers the commands
from caffetune.cli.app import cli, main

__all__ = ["cli", "main"]

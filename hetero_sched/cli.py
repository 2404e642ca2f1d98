"""`hetero-sched` — the command line.

Every command turns a :class:`~hetero_sched.errors.UserError` into one line on stderr and exit
status 2 (the same status click uses for bad flags); no traceback for bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from hetero_sched.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Schedule and simulate disaggregated LLM inference on heterogeneous accelerators.",
)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)

"""Rendering for people (rich tables, on stdout) and machines (JSON)."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.table import Table

# Messages are not hard-wrapped and tables get room when piped: logs get whole lines.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
# Progress lines go to stderr, so stdout stays machine-readable.
status = Console(stderr=True)


def print_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def key_value_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def verdict(passed: bool | None) -> str:
    return {True: "[green]passed[/green]", False: "[red]failed[/red]", None: "-"}[passed]

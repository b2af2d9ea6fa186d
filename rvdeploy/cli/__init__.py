"""The ``rvdeploy`` command line: each command parses its options, calls one pipeline function
(:mod:`rvdeploy.pipeline`) and renders the result."""

from __future__ import annotations

import os
import sys
import warnings

import click

from rvdeploy import __version__
from rvdeploy.cli.bench_command import bench
from rvdeploy.cli.model_commands import export, fuse, info, verify
from rvdeploy.cli.precision_commands import build_engine, eval_command, quantize
from rvdeploy.errors import INPUT_EXIT, INTERNAL_ERROR_EXIT, RvdeployError, RvdeployWarning, first_line


def _one_line(message: str) -> str:
    """``message`` with control characters escaped: it names untrusted things (tensor keys, file names)
    that may hold a newline or a form feed, and an error is one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning) -> None:
    """rvdeploy's own warnings as one line on stderr; anything else as Python shows it."""
    if issubclass(category, RvdeployWarning):
        click.echo(f"warning: {_one_line(str(message))}", err=True)
    else:
        _default(message, category, filename, lineno, file, line)


class RvdeployGroup(click.Group):
    """Turns every failure, usage errors included, into one line on stderr and a non-zero exit status,
    and every rvdeploy warning into one line too."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        shown_before, warnings.showwarning = warnings.showwarning, _show_warning
        try:
            result = super().main(*args, **kwargs)
        except click.ClickException as exc:  # usage errors: bad option values, missing arguments
            click.echo(f"error: {_one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(INPUT_EXIT)
        finally:
            warnings.showwarning = shown_before
        sys.exit(result if isinstance(result, int) else 0)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RvdeployError as exc:
            click.echo(f"error: {_one_line(str(exc))}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:  # a bug: still one line, with a way to see the traceback
            if os.environ.get("RVDEPLOY_DEBUG"):
                raise
            click.echo(
                f"internal error: {type(exc).__name__}: {first_line(exc)} (set RVDEPLOY_DEBUG=1 for the traceback)",
                err=True,
            )
            ctx.exit(INTERNAL_ERROR_EXIT)


@click.group(cls=RvdeployGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rvdeploy")
def main() -> None:
    """RepVGG from training checkpoint to fast inference."""


for command in (fuse, info, export, verify, quantize, eval_command, build_engine, bench):
    main.add_command(command)

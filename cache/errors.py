"""How every command-line entry point reports a user's mistake: one line, no traceback."""
from __future__ import annotations

import functools
import sys

import click

from cache.format import UserError


def report_user_errors(interrupt_hint: str = "interrupted"):
    """Decorator: UserError -> 'error: message' on stderr and exit status 1;
    Ctrl-C -> `interrupt_hint` on stderr and exit status 130."""
    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except UserError as exc:
                click.echo(f"error: {exc}", err=True)
                sys.exit(1)
            except KeyboardInterrupt:
                click.echo(interrupt_hint, err=True)
                sys.exit(130)
        return wrapper
    return decorate

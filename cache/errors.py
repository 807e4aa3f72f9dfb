"""A user's mistake and how every command reports it: one line, no traceback.

Every layer (dataprep, cache, loaders, training) raises `UserError`; only the command-line
entry points catch it, through `report_user_errors`. Nothing heavy is imported here.
"""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A mistake in what the user gave us: shown as one line, exit status non-zero, no traceback."""


def report_user_errors(interrupt_hint: str = "interrupted"):
    """Decorator: UserError -> 'error: message' on stderr and exit status 1;
    Ctrl-C -> `interrupt_hint` on stderr and exit status 130."""
    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except UserError as exc:
                print(f"error: {exc}", file=sys.stderr)
                sys.exit(1)
            except KeyboardInterrupt:
                print(interrupt_hint, file=sys.stderr)
                sys.exit(130)
        return wrapper
    return decorate

"""A user's mistake and how every command reports it: one line, no traceback.

Every layer (dataprep, cache, loaders, training) raises `UserError`; only the command-line
entry points catch it, through `report_user_errors`. Nothing heavy is imported here.
"""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A mistake in what the user gave us: shown as one line, exit status non-zero, no traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`), raised where the command is, as Ctrl-C is: the same
    clean-ups run and the same hint is printed."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _quiet_shutdown() -> None:
    """An interrupt abandons work in flight on purpose (zarr's event loop thread may hold a
    pending read): the interpreter's teardown then reports it ("Task was destroyed but it is
    pending!", "Exception ignored in ...", a never-awaited coroutine). Those lines would follow
    the one line the user gets, so they are silenced; nothing of ours is left to report."""
    import logging
    import warnings

    logging.getLogger("asyncio").disabled = True
    sys.unraisablehook = lambda unraisable: None
    warnings.simplefilter("ignore")


def report_user_errors(interrupt_hint: str = "interrupted"):
    """Decorator: UserError -> 'error: message' on stderr and exit status 1;
    Ctrl-C -> `interrupt_hint` on stderr and exit status 130; SIGTERM, where the command has
    no handler of its own (train checkpoints on it) -> the same hint and exit status 143."""
    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            import signal
            import threading

            previous = None
            if (threading.current_thread() is threading.main_thread()
                    and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
                previous = signal.signal(signal.SIGTERM, _raise_terminated)
            try:
                return command(*args, **kwargs)
            except UserError as exc:
                print(f"error: {exc}", file=sys.stderr)
                sys.exit(1)
            except KeyboardInterrupt as exc:
                print(interrupt_hint, file=sys.stderr)
                _quiet_shutdown()
                sys.exit(143 if isinstance(exc, Terminated) else 130)
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)
        return wrapper
    return decorate

"""Shared plumbing for command-line entry points: user mistakes become one line and exit 2."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from typing import Callable, NoReturn, ParamSpec, TypeVar

from megamoe.errors import ConfigError, UserError

P = ParamSpec("P")
R = TypeVar("R")

USER_ERROR_EXIT = 2


def exit_on_user_error(main: Callable[P, R]) -> Callable[P, R]:
    """Run ``main``; print a ConfigError/UserError as ``error: ...`` and exit 2 instead of a traceback."""

    @functools.wraps(main)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return main(*args, **kwargs)
        except (ConfigError, UserError) as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(USER_ERROR_EXIT)

    return wrapper


def _exit_code(exc: SystemExit) -> int:
    """The status ``sys.exit(code)`` would end the process with (a text is printed, status 1)."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1


def exit_with(main: Callable[[], object], unsafe_to_finalize: Callable[[], bool]) -> NoReturn:
    """Run ``main`` and end the process with its exit status.

    While ``unsafe_to_finalize()`` says a daemon thread is still inside native code (a checkpoint
    writer given up mid-write), the process ends with ``os._exit`` once stdout and stderr are
    flushed. Python's shutdown would stop that thread with ``pthread_exit``, whose unwinding
    through C++ frames aborts the process ("terminate called without an active exception",
    SIGABRT): the launcher would see a crash instead of the status the run chose (130 for Ctrl-C,
    1 for a stall), and the error line could be lost with the unflushed output.
    """
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:
        if not unsafe_to_finalize():
            raise
        traceback.print_exc()
        code = 1
    if unsafe_to_finalize():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

"""Shared plumbing for command-line entry points: user mistakes become one line and exit 2."""

from __future__ import annotations

import functools
import sys
from typing import Callable, ParamSpec, TypeVar

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

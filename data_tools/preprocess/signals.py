"""Stopping on Ctrl-C or a batch system's SIGTERM: the signals, held or turned into KeyboardInterrupt."""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back until the block ends: a worker forked meanwhile inherits the hold,
    so the parent's handler (copied by fork) can never run in it."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


class StopSignals:
    """Within: SIGINT (Ctrl-C) and SIGTERM (a batch system's kill) raise KeyboardInterrupt. The
    first one wins and later ones are ignored, so that the cleanup it starts runs to the end."""

    def __enter__(self) -> "StopSignals":
        self.received = signal.SIGINT  # a KeyboardInterrupt raised any other way counts as Ctrl-C
        self._previous = {s: signal.signal(s, self._stop) for s in STOP_SIGNALS}
        return self

    def _stop(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum)
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process that the signal ended."""
        return 128 + self.received

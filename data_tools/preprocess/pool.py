"""An ordered process pool: a function over items in worker processes, results in input order.

It knows nothing of what the items are: :mod:`.pipeline` hands it chunks and a tokenizing function.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import threading
import traceback
from collections import deque
from multiprocessing.connection import Connection
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TypeVar

from data_tools.preprocess.signals import STOP_SIGNALS, stop_signals_held
from megamoe.errors import UserError

IN_FLIGHT_PER_WORKER = 4  # queued chunks per worker: enough that one slow chunk does not idle the others

T = TypeVar("T")
R = TypeVar("R")

def _serve(fn: Callable[[T], R], initializer: Callable[..., None], initargs: tuple,
           tasks: Connection, results: Connection, parent_ends: list[Connection]) -> None:
    """A worker's life: items in, ``(result, None)`` or ``(None, exception)`` out, until the parent goes.

    Ctrl-C signals the whole process group: workers ignore SIGINT and leave stopping to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    for conn in parent_ends:  # so that the parent's end, even by kill -9, closes the pipes and ends this process
        conn.close()
    initializer(*initargs)
    with contextlib.suppress(EOFError, BrokenPipeError):  # the parent is gone
        while True:
            results.send(_call(fn, tasks.recv()))


def _call(fn: Callable[[T], R], item: T) -> tuple[Optional[R], Optional[Exception]]:
    try:
        return fn(item), None
    except Exception as exc:  # the parent raises it; the note keeps where it happened
        exc.add_note(f"in worker process {os.getpid()}:\n{traceback.format_exc()}")
        return None, exc


def _send_all(outbox: queue.SimpleQueue, tasks: Connection) -> None:
    """Send the items put in ``outbox`` until None comes, or the worker is gone."""
    with tasks, contextlib.suppress(BrokenPipeError):
        while (item := outbox.get()) is not None:
            tasks.send(item)


class _Worker:
    """A worker process, and a thread of this process that sends it items.

    Every worker has pipes of its own (multiprocessing.Pool's workers share queues, with locks a
    worker can die holding), so stopping workers at any moment cannot leave this process waiting.
    Items go out on a thread because a send waits until the worker takes the item, and the worker
    may first wait for this process to take a result."""

    def __init__(self, fn: Callable[[T], R], initializer: Callable[..., None], initargs: tuple,
                 others: Sequence["_Worker"]) -> None:
        task_end, self._tasks = multiprocessing.Pipe(duplex=False)
        self._results, result_end = multiprocessing.Pipe(duplex=False)
        parent_ends = [conn for worker in (*others, self) for conn in (worker._tasks, worker._results)]
        self._process = multiprocessing.Process(
            target=_serve, args=(fn, initializer, initargs, task_end, result_end, parent_ends), daemon=True)
        self._process.start()
        task_end.close()
        result_end.close()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=_send_all, args=(self._outbox, self._tasks), daemon=True)
        self._sender.start()

    def submit(self, item: Any) -> None:
        self._outbox.put(item)

    def result(self) -> Any:
        """The result of the oldest item submitted (its exception is raised here)."""
        try:
            value, exc = self._results.recv()
        except EOFError:
            raise self._died() from None
        if exc is not None:
            raise exc
        return value

    def _died(self) -> UserError:
        self._process.join(timeout=5)
        code = self._process.exitcode
        killed = code is not None and code < 0
        how = f"killed by signal {-code}: {signal.strsignal(-code)}" if killed else f"exit code {code}"
        return UserError(f"worker process {self._process.pid} stopped unexpectedly ({how}); "
                         f"if the machine ran out of memory, use fewer --workers")

    def stop(self) -> None:
        self._process.kill()
        self._process.join()
        self._outbox.put(None)  # ends the sender if it waits for an item; one in a send has its pipe broken
        self._sender.join()
        self._results.close()


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int,
                initializer: Callable[..., None], initargs: tuple) -> Iterator[R]:
    """``fn`` over ``items`` in ``workers`` processes, results in input order.

    Item i goes to worker i % workers, at most IN_FLIGHT_PER_WORKER per worker ahead of the
    result being collected, so memory stays bounded (``Pool.imap`` would read the whole input
    ahead). Closing the generator kills the workers. One worker runs in this process.
    """
    if workers == 1:
        initializer(*initargs)
        yield from map(fn, items)
        return
    pool: list[_Worker] = []
    try:
        with stop_signals_held():  # a Ctrl-C meanwhile arrives once every worker is in the pool, to be stopped
            for _ in range(workers):
                pool.append(_Worker(fn, initializer, initargs, pool))
        pending: deque[_Worker] = deque()
        for i, item in enumerate(items):
            if len(pending) == IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().result()
            pool[i % workers].submit(item)
            pending.append(pool[i % workers])
        while pending:
            yield pending.popleft().result()
    finally:
        for worker in pool:
            worker.stop()

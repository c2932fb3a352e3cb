"""Writing a run's outputs: one dataset per key and a rejects file, all renamed into place at the end."""

from __future__ import annotations

import contextlib
import errno
import os
from typing import IO, Iterator, Optional

import numpy as np

from data_tools.preprocess.encoder import Encoded
from data_tools.preprocess.summary import Summary
from megamoe.data.indexed import IndexedDatasetBuilder
from megamoe.errors import naming, write_error


def output_prefix(prefix: str, key: str) -> str:
    """Megatron-LM's naming: ``{prefix}_{key}_document``."""
    return f"{prefix}_{key}_document"


def rejects_file_path(prefix: str) -> str:
    """Where --skip-bad-docs writes the documents it skipped."""
    return f"{prefix}.rejects.jsonl"


def _write(builders: list[IndexedDatasetBuilder], enc: Encoded) -> None:
    for builder, tokens, lengths in zip(builders, enc.tokens, enc.lengths):
        builder.add_documents(tokens, lengths)


def remove_if_present(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


class WriteFailed(Exception):
    """Writing the outputs failed (a read-only place, a full disk); the temporaries are removed.

    The pipeline reports it only once the workers are gone too: they hold the files open (fork
    copied the descriptors), so until then removing them frees no space."""

    def __init__(self, error: OSError, needed_bytes: Optional[int]) -> None:
        super().__init__(error, needed_bytes)
        self.error, self.needed_bytes = error, needed_bytes

    def message(self) -> str:
        """One line for the failed write, with the fix that fits it."""
        full = self.error.errno in (errno.ENOSPC, errno.EDQUOT)
        fix = "free some space or choose another --output-prefix" if full else "choose a writable --output-prefix"
        return write_error(self.error, fix, self.needed_bytes)


class Outputs:
    """What a run writes: one dataset per key, and a rejects file if it rejects documents.

    Everything stays under temporary names until :meth:`commit`; any failure removes it all, and
    a failed write raises WriteFailed."""

    def __init__(self, summary: Summary, dtype: np.dtype) -> None:
        self._summary = summary  # the run so far: it sizes the output, should the disk fill
        self._itemsize = dtype.itemsize
        self._rejects_tmp = summary.rejects_path + ".tmp"
        self._rejects: Optional[IO[str]] = None  # opened at the first rejected document
        self._builders: list[IndexedDatasetBuilder] = []
        with self._writing():
            for prefix in summary.outputs:
                self._builders.append(IndexedDatasetBuilder(prefix, dtype))

    def write(self, enc: Encoded) -> None:
        with self._writing():
            if enc.rejects:
                with naming(self._rejects_tmp):
                    self._rejects_file().writelines(r.to_json() + "\n" for r in enc.rejects)
            _write(self._builders, enc)

    def _rejects_file(self) -> IO[str]:
        if self._rejects is None:
            self._rejects = open(self._rejects_tmp, "w", encoding="utf-8")
        return self._rejects

    def commit(self) -> None:
        """Move everything into place. A rejects file stays only if this run rejected documents:
        one that an earlier run left on this prefix would pass for this run's."""
        with self._writing():
            if self._rejects is not None:
                with naming(self._rejects_tmp):
                    self._rejects.close()  # first: a full disk may show only when it flushes
            for builder in self._builders:
                builder.finalize()
            if self._rejects is None:
                remove_if_present(self._summary.rejects_path)
            else:
                os.replace(self._rejects_tmp, self._summary.rejects_path)

    def abort(self) -> None:
        """Remove every temporary file; files of earlier runs stay as they were."""
        for builder in self._builders:
            builder.abort()
        if self._rejects is not None:
            with contextlib.suppress(OSError):  # flushing onto a full disk fails; the file goes all the same
                self._rejects.close()
            remove_if_present(self._rejects_tmp)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """On any failure remove the temporaries; a failed write becomes WriteFailed."""
        try:
            yield
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError):
                raise WriteFailed(exc, self._summary.expected_bytes(self._itemsize)) from exc
            raise

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException], tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

"""Real faults for tests: a full disk and a read-only directory.

Both are tmpfs mounts, so the code under test meets the errors the kernel itself gives. Mounting
needs root (as in the test container); as any other user a read-only directory is chmod 0o555
instead (root ignores file permissions). Where a mount is needed but not permitted, the test is
skipped, saying why; full_disk_writes injects ENOSPC in-process for those machines.

    with small_filesystem(tmp_path / "disk", 64 << 10) as disk:   # writes past 64 KiB: ENOSPC
        ...
    with read_only_dir(tmp_path / "ro") as ro:                    # EROFS as root, else EACCES
        ...
    full_disk_writes(monkeypatch, some_module, room_bytes=4096)   # in-process, anywhere: ENOSPC
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import subprocess
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

import pytest


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True)


@contextlib.contextmanager
def _tmpfs(path: Path, options: str) -> Iterator[Path]:
    """``path`` (created) with a fresh tmpfs mounted on it, unmounted on exit; skips where mounting fails."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        mounted = _run("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path))
    except FileNotFoundError:
        pytest.skip("no mount command here, so no tmpfs to fill or make read-only")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        unmounted = _run("umount", str(path))
        assert unmounted.returncode == 0, f"umount {path}: {unmounted.stderr.strip()} (a file left open?)"


def small_filesystem(path: Path, size_bytes: int) -> contextlib.AbstractContextManager[Path]:
    """``path`` as an empty filesystem of ``size_bytes`` (rounded up to whole pages): writing
    more fails with ENOSPC."""
    return _tmpfs(path, f"size={size_bytes}")


@contextlib.contextmanager
def read_only_dir(path: Path) -> Iterator[Path]:
    """``path`` as an empty directory where nothing can be created: a read-only tmpfs as root
    (EROFS), a directory with mode 0o555 as any other user (EACCES)."""
    if os.geteuid() == 0:
        with _tmpfs(path, "ro") as mounted:
            yield mounted
        return
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)


class _OnFullDisk:
    """A file open for writing whose writes fail with ENOSPC, naming no file, once ``room`` runs out."""

    def __init__(self, file: IO, room: list[int]) -> None:
        self._file, self._room = file, room

    def write(self, data: Any) -> int:
        size = len(data) if isinstance(data, str) else memoryview(data).nbytes
        if size > self._room[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room[0] -= size
        return self._file.write(data)

    def writelines(self, lines: Iterable[Any]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> "_OnFullDisk":
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def full_disk_writes(monkeypatch: pytest.MonkeyPatch, module: Any, room_bytes: int) -> None:
    """Files that ``module`` opens for writing (through the builtin ``open``) share ``room_bytes``
    bytes (characters, in text mode); then writes fail with ENOSPC as on a full disk. For where
    small_filesystem cannot mount."""
    room = [room_bytes]

    def open_on_full_disk(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        opened = builtins.open(file, mode, *args, **kwargs)
        return _OnFullDisk(opened, room) if set(mode) & set("wax+") else opened

    monkeypatch.setattr(module, "open", open_on_full_disk, raising=False)

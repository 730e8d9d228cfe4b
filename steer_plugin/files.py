"""Opening a file the server was pointed at (a config entry, an admin load, a loader's own files): one rule.

- The path is resolved (links followed) once, then the resolved path is opened with O_NOFOLLOW, so what is
  opened is what was checked: a link swapped in afterwards is refused, never followed somewhere else.
- O_NONBLOCK: opening a named pipe (or a device) returns at once instead of waiting for a writer; the fstat
  check then refuses anything that is not a regular file.
- Reads are bounded: a file larger than its limit is refused before anything is read.
- Inside `confined(roots)` (runtime loads through the admin API), the opened file must lie under one of the
  roots: checked on the resolved path before opening and on the kernel's name of the open descriptor after, so
  a folder whose files are links to elsewhere, or a loader option like `../../x`, cannot reach outside them.

Every refusal is a `FileRefused` naming the file (status 403 for a file outside the roots, 400 otherwise).
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import BinaryIO

MiB = 1 << 20
MAX_JSON_BYTES = 64 * MiB  # SAE configs, vector .json files
MAX_LABELS_BYTES = 512 * MiB  # a labels file (65k features with contexts is well under this)
MAX_EXPLANATIONS_BYTES = 1024 * MiB  # one explanation file, after gzip decompression
MAX_VECTOR_BYTES = 1024 * MiB  # a steering-vector file

_ROOTS: ContextVar[tuple[str, ...] | None] = ContextVar("steer_plugin_allowed_roots", default=None)
_FD_DIR = "/proc/self/fd"


class FileRefused(ValueError):
    """A file the server will not open: not a regular file, too large, outside the allowed roots, or a path
    that cannot name a file (a NUL byte). `status` is the HTTP status an admin load answers with."""

    def __init__(self, path: object, reason: str, status: int = 400):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason
        self.status = status

    def __reduce__(self):  # picklable with its fields (it may cross a process boundary)
        return FileRefused, (self.path, self.reason, self.status)


def real_path(path: str | os.PathLike) -> str:
    """The path with every link resolved; FileRefused for a path no file can have."""
    try:
        return os.path.realpath(os.fspath(path))
    except (ValueError, TypeError):  # "embedded null byte"
        raise FileRefused(repr(os.fspath(path)), "is not a valid path (it holds a NUL byte)") from None


def under(real: str, roots: Sequence[str]) -> bool:
    """Whether the resolved path `real` is one of `roots` or lies below one of them."""
    return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


@contextmanager
def confined(roots: Sequence[str]) -> Iterator[None]:
    """Within it (this thread or task), every file opened through this module must lie under `roots`."""
    token = _ROOTS.set(tuple(real_path(root) for root in roots))
    try:
        yield
    finally:
        _ROOTS.reset(token)


def check_allowed(path: str | os.PathLike) -> str:
    """The resolved path, if it may be opened under the roots in force (FileRefused, 403, otherwise)."""
    real = real_path(path)
    roots = _ROOTS.get()
    if roots is not None and not under(real, roots):
        raise FileRefused(path, "is not under an allowed root (runtime.roots)", 403)
    return real


def open_regular(path: str | os.PathLike, max_bytes: int | None) -> BinaryIO:
    """`path` opened for reading, binary, after the checks in the module docstring. OSError (file missing,
    unreadable) as `open` raises it; FileRefused for what the rules refuse."""
    real = check_allowed(path)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == 40:  # ELOOP: the resolved path became a link since it was resolved
            raise FileRefused(path, "changed into a symbolic link while being opened") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileRefused(path, "is not a regular file")
        if max_bytes is not None and info.st_size > max_bytes:
            raise FileRefused(path, f"is larger than the {max_bytes // MiB} MiB this file may have")
        roots = _ROOTS.get()
        if roots is not None and os.path.isdir(_FD_DIR):
            opened = os.readlink(f"{_FD_DIR}/{fd}")  # the kernel's name of what was opened: no race
            if not under(opened, roots):
                raise FileRefused(path, "is not under an allowed root (runtime.roots)", 403)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The whole file, at most `max_bytes` of it (FileRefused beyond: it may grow after the size check)."""
    with open_regular(path, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileRefused(path, f"is larger than the {max_bytes // MiB} MiB this file may have")
    return data


@contextmanager
def regular_path(path: str | os.PathLike, max_bytes: int | None = None) -> Iterator[str]:
    """A path naming exactly the file `open_regular` checked and opened (its descriptor's /proc entry), for
    libraries that take a path (safetensors, torch.load); the descriptor stays open while it is used."""
    with open_regular(path, max_bytes) as f:
        fd_path = f"{_FD_DIR}/{f.fileno()}"
        yield fd_path if os.path.isdir(_FD_DIR) else real_path(path)


class BoundedReader(io.RawIOBase):
    """A stream that refuses to yield more than `max_bytes` (a gzip stream's decompressed size)."""

    def __init__(self, raw: BinaryIO, max_bytes: int, path: object, *also_close: BinaryIO):
        self.raw, self.left, self.path, self.max_bytes = raw, max_bytes, path, max_bytes
        self.also_close = also_close  # e.g. the file under a GzipFile, which does not close it

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self.raw.read(min(len(view), self.left + 1))
        self.left -= len(data)
        if self.left < 0:
            raise FileRefused(
                self.path, f"holds more than the {self.max_bytes // MiB} MiB this file may have"
            )
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        for stream in (self.raw, *self.also_close):
            stream.close()
        super().close()

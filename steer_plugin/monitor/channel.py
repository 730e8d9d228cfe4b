"""Side channel from the workers to the API server: one JSON-lines file of records (request/records.py) per observed request.

The workers append a line per observed token right after the forward that computed it, before the token is
sampled, so by the time the API server streams a token its features are on disk. Files are named by a
random correlation id and live in a private run dir (0700) that the first process of a server creates
(`ensure_private_run_dir`, from the plugin's entry point) and its children inherit through
STEER_PLUGIN_RUN_DIR; the creating process removes it at exit.

Only the API server creates a request's file (before the request reaches the engine) and removes it when
the response ends, however it ends; workers append only to a file that exists. So a worker step that lands
after a client disconnected, or a request vLLM rejected, leaves nothing behind.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

from steer_plugin.request.records import Record, record_from_json

RUN_DIR_ENV = "STEER_PLUGIN_RUN_DIR"
_OWNER_ENV = "STEER_PLUGIN_RUN_DIR_OWNER"  # pid of the process that removes the run dir at exit


def ensure_private_run_dir() -> Path:
    """The run dir of this server: inherited from the parent process, or created here (mode 0700)."""
    existing = os.environ.get(RUN_DIR_ENV)
    if existing:
        return Path(existing)
    path = Path(tempfile.mkdtemp(prefix="steer-plugin-run-"))  # mkdtemp: 0700, unique
    os.environ[RUN_DIR_ENV] = str(path)
    os.environ[_OWNER_ENV] = str(os.getpid())
    atexit.register(remove_run_dir)
    return path


def remove_run_dir() -> None:
    """Delete the run dir if this process created it (children inherit the variable, not the duty)."""
    path = os.environ.get(RUN_DIR_ENV)
    if path and os.environ.get(_OWNER_ENV) == str(os.getpid()):
        shutil.rmtree(path, ignore_errors=True)


def run_dir() -> Path:
    return ensure_private_run_dir()


def _path(cid: str) -> Path:
    if not (cid.isascii() and cid.isalnum() and len(cid) <= 64):
        raise ValueError("bad correlation id")
    return run_dir() / f"{cid}.jsonl"


def create(cid: str) -> None:
    """API server: open the request's channel (before the request is handed to the engine)."""
    fd = os.open(_path(cid), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)


# Never O_CREAT (see the module docstring); never through a link, never waiting on a pipe: a channel file is a
# regular file the API server created, or it is not one (another process of the user replaced it).
_APPEND = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NOT_OURS = (errno.ENOENT, errno.ELOOP, errno.ENXIO)


def _open_regular(path: Path, flags: int) -> int | None:
    """A descriptor of the channel file, or None when it is gone or is not a regular file."""
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno in _NOT_OURS:
            return None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def append(cid: str, records: list[Record]) -> bool:
    """Worker: append records to an open channel; False when the API server has already closed it."""
    fd = _open_regular(_path(cid), _APPEND)
    if fd is None:
        return False
    with os.fdopen(fd, "a") as f:
        f.write("".join(json.dumps(r.to_json(), separators=(",", ":")) + "\n" for r in records))
    return True


class ChannelReader:
    """Incremental reader of one request's records."""

    def __init__(self, cid: str):
        self.path = _path(cid)
        self.offset = 0

    def read_new(self) -> list[Record]:
        fd = _open_regular(self.path, _READ)
        if fd is None:
            return []
        with os.fdopen(fd, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next read
        self.offset += len(complete)
        return [record_from_json(json.loads(line)) for line in complete.splitlines() if line]

    def remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

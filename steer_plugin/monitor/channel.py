"""Side channel from the workers to the API server: one JSON-lines file per observed request.

The workers append a line per observed token right after the forward that computed it, before the token is
sampled, so by the time the API server streams a token its features are on disk. Files live in
STEER_PLUGIN_RUN_DIR (set by steer-serve; a fixed folder under the temp dir otherwise) and are named by a
random correlation id, so several servers on one machine do not collide.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

RUN_DIR_ENV = "STEER_PLUGIN_RUN_DIR"


def run_dir() -> Path:
    path = Path(os.environ.get(RUN_DIR_ENV) or Path(tempfile.gettempdir()) / "steer_plugin_run")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _path(cid: str) -> Path:
    if not cid.isalnum():
        raise ValueError(f"bad correlation id {cid!r}")
    return run_dir() / f"{cid}.jsonl"


def append(cid: str, records: list[dict]) -> None:
    with open(_path(cid), "a") as f:
        f.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))


class ChannelReader:
    """Incremental reader of one request's records."""

    def __init__(self, cid: str):
        self.path = _path(cid)
        self.offset = 0

    def read_new(self) -> list[dict]:
        try:
            with open(self.path) as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind("\n") + 1]  # a line still being written waits for the next read
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line]

    def remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

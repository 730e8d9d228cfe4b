"""Loaded by every Python process that tools/request_path.py starts (it puts this folder first on PYTHONPATH):
records, per function of the source files under STEER_PATH_TRACE_ROOTS, the last time (CLOCK_MONOTONIC, one
clock for all the machine's processes) it was entered, and writes that table to STEER_PATH_TRACE_DIR/<pid>.json
twice a second. A development tool: the runtime never loads it."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

_DIR = os.environ.get("STEER_PATH_TRACE_DIR")
_ROOTS = tuple(r for r in os.environ.get("STEER_PATH_TRACE_ROOTS", "").split(os.pathsep) if r)
_ours: dict[object, bool] = {}  # code object -> its file is under one of the roots
_last: dict[object, float] = {}  # our code object -> last entry into it


def _profile(frame, event, arg):
    if event != "call":  # also fires when a generator or coroutine resumes
        return
    code = frame.f_code
    ours = _ours.get(code)
    if ours is None:
        ours = _ours[code] = code.co_filename.startswith(_ROOTS)
    if ours:
        _last[code] = time.monotonic()


def _dump_forever() -> None:
    path = os.path.join(_DIR, f"{os.getpid()}.json")
    while True:
        time.sleep(0.5)
        try:
            with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:  # vLLM renames its processes
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(path + ".tmp", "w") as f:
                last = {f"{c.co_filename}:{c.co_qualname}": t for c, t in list(_last.items())}
                json.dump({"pid": os.getpid(), "cmdline": cmdline, "last": last}, f)
            os.replace(path + ".tmp", path)
        except Exception:  # a tool must never take the traced process down
            pass


def _start() -> None:
    _last.clear()
    sys.setprofile(_profile)
    threading.setprofile(_profile)
    threading.Thread(target=_dump_forever, name="steer-path-trace", daemon=True).start()


if _DIR and _ROOTS:
    _start()
    os.register_at_fork(after_in_child=_start)  # threads do not survive fork

"""Monitoring sink: one structured JSON line per monitored request."""

from __future__ import annotations

import json
import logging
import threading
import time
from logging.handlers import RotatingFileHandler

from steer_plugin.config import MonitoringConfig
from steer_plugin.request.records import TokenRecord

monitor_logger = logging.getLogger("steer_plugin.monitor")
_file_lock = threading.Lock()


def summarise(records: list[TokenRecord], sae_id: str, labels: dict[int, str], top_k: int) -> list[dict]:
    """The strongest features of a request over its observed tokens (attention sinks left out): max activation
    and token count."""
    best: dict[int, list] = {}
    for r in records:
        if r.sae != sae_id or r.sink:
            continue
        for index, act in r.top:
            entry = best.setdefault(index, [0.0, 0])
            entry[0] = max(entry[0], act)
            entry[1] += 1
    ranked = sorted(best.items(), key=lambda kv: -kv[1][0])[:top_k]
    return [
        {"index": i, "max_activation": round(v, 4), "tokens": n, "label": labels.get(i)}
        for i, (v, n) in ranked
    ]


def write(config: MonitoringConfig, record: dict) -> None:
    line = json.dumps({"ts": round(time.time(), 3), **record}, separators=(",", ":"))
    if config.sink == "file":
        with _file_lock:
            _file_sink(config).emit(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))
    else:
        monitor_logger.info(line)


_sinks: dict[tuple[str, int, int], logging.Handler] = {}


def _file_sink(config: MonitoringConfig) -> logging.Handler:
    """The file sink: the standard library's RotatingFileHandler, so the file never grows past
    `monitoring.max_bytes` (renamed to `.1`, `.2`, ... up to `monitoring.backup_count` files, the oldest
    dropped); `max_bytes` 0 turns rotation off. One handler per path, opened on first use."""
    key = (config.path, config.max_bytes, config.backup_count)
    handler = _sinks.get(key)
    if handler is None:
        handler = RotatingFileHandler(
            config.path, maxBytes=config.max_bytes, backupCount=config.backup_count, encoding="utf-8"
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
        _sinks[key] = handler
    return handler

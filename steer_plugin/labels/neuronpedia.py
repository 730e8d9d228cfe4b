"""Neuronpedia explanation exports, read as a feature's explanations.

Two layouts, as Neuronpedia publishes them, in `.json`, `.jsonl` or either gzipped (`.json.gz`, `.jsonl.gz`),
one file or a folder of them (every such file in it, by name; other files are ignored):

- explanation objects, the bulk export (`.../explanations/batch-N.jsonl.gz`, or a JSON array from the export
  button): `{"modelId": "gemma-2-2b", "layer": "20-gemmascope-res-16k", "index": "1234",
  "description": "references to bridges", "explanationModelName": "gpt-4o-mini", "typeName": "oai_token-act-pair",
  ...}`;
- feature objects, the API's `/api/feature/{model}/{source}/{index}` (one per file, an array of them, or one per
  line): `{"modelId", "layer", "index", "maxActApprox", "explanations": [{"description", ...}], ...}`.

Checks (a failure is a ConfigError naming the config key, the file and the line or item):
- every item is an object with an integer `index` (a number or a decimal string) and a string `description`;
  `modelId`, `layer`, `explanationModelName`, `typeName` are strings or null when present;
- entries whose `modelId`/`layer` name another SAE than the config's `neuronpedia_id` are skipped and counted in
  the log; a file none of whose entries is for this SAE is refused, and so is one naming several SAEs when the
  config gives no `neuronpedia_id` to choose from;
- an index of this SAE at or above its number of features is refused (the file is for an SAE of another width);
- empty descriptions are skipped and counted; the same description by the same explainer is kept once.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, NamedTuple

from steer_plugin.config import ConfigError
from steer_plugin.files import MAX_EXPLANATIONS_BYTES, BoundedReader, FileRefused, open_regular

logger = logging.getLogger("steer_plugin")

SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
_INDEX = re.compile(r"[0-9]{1,10}")


class Explanation(NamedTuple):
    """One explanation of a feature, as served by the search."""

    description: str
    model: str | None  # the explainer (`explanationModelName`), e.g. gpt-4o-mini
    type_name: str | None  # Neuronpedia's `typeName`, e.g. oai_token-act-pair

    def to_json(self) -> dict:
        return {
            "description": self.description,
            "source": "neuronpedia",
            "model": self.model,
            "type": self.type_name,
        }


class Explanations(NamedTuple):
    """What one SAE's explanation files hold for it."""

    by_index: dict[int, tuple[Explanation, ...]]
    max_activations: dict[int, float]  # a feature object's `maxActApprox`, when it gives one
    files: tuple[str, ...]
    skipped_other_sae: int  # entries for another model/source
    skipped_empty: int  # entries with an empty description

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.by_index.values())


class _Entry(NamedTuple):
    where: str  # file and line/item, for errors
    model_id: str | None
    source: str | None
    index: int
    description: str | None  # None: a feature object without explanations (its maxActApprox only)
    explainer: str | None
    type_name: str | None
    max_act: float | None


def explanation_files(path: str | os.PathLike, key: str) -> list[Path]:
    """The files `path` names: itself, or every export file in the folder, sorted by name."""
    root = Path(path)
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(SUFFIXES))
        if not files:
            raise ConfigError(f"{key}: no {'/'.join(SUFFIXES)} file in the folder {root}")
        return files
    if not root.exists():
        raise ConfigError(f"{key}: explanations file not found: {root}")
    if not root.name.endswith(SUFFIXES):
        raise ConfigError(f"{key}: {root} is not a {'/'.join(SUFFIXES)} file")
    return [root]


def _open(path: Path) -> IO[str]:
    """The file as text, read through steer_plugin.files (a regular file, bounded, under the roots in force);
    a gzip file's decompressed size is bounded too."""
    raw = open_regular(path, MAX_EXPLANATIONS_BYTES)
    stream = raw if not path.name.endswith(".gz") else gzip.GzipFile(fileobj=raw, mode="rb")
    bounded = io.BufferedReader(BoundedReader(stream, MAX_EXPLANATIONS_BYTES, path, raw))
    return io.TextIOWrapper(bounded, encoding="utf-8")


def _documents(path: Path, key: str) -> Iterator[tuple[str, object]]:
    """(where, top-level item) of one file: each line of a JSONL file, each element of a JSON array, or the
    JSON object itself."""
    try:
        with _open(path) as f:
            if path.name.endswith((".jsonl", ".jsonl.gz")):
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield f"{path} line {n}", json.loads(line)
                        except json.JSONDecodeError as err:
                            raise ConfigError(f"{key}: {path} line {n} is not valid JSON: {err}") from None
                return
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{key}: {path} is not valid JSON: {err}") from None
    except FileRefused as err:
        raise ConfigError(f"{key}: {err}", status=err.status) from None
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as err:
        raise ConfigError(f"{key}: cannot read {path}: {err}") from None
    if isinstance(data, list):
        for i, item in enumerate(data):
            yield f"{path} item [{i}]", item
    else:
        yield str(path), data


def _string(item: dict, field: str, where: str, key: str) -> str | None:
    value = item.get(field)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{key}: {where}: `{field}` must be a string, got {type(value).__name__}")
    return value


def _index(item: dict, where: str, key: str) -> int:
    value = item.get("index")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and _INDEX.fullmatch(value):
        return int(value)
    raise ConfigError(f"{key}: {where}: `index` must be a non-negative integer, got {value!r}")


def _entries(where: str, item: object, key: str) -> Iterator[_Entry]:
    if not isinstance(item, dict):
        raise ConfigError(
            f"{key}: {where}: expected a Neuronpedia explanation or feature object, got {type(item).__name__}"
        )
    model_id, source = _string(item, "modelId", where, key), _string(item, "layer", where, key)
    index = _index(item, where, key)
    if "explanations" in item:  # a feature object
        explanations = item["explanations"]
        if not isinstance(explanations, list):
            raise ConfigError(f"{key}: {where}: `explanations` must be a list")
        max_act = item.get("maxActApprox")
        if max_act is not None and (isinstance(max_act, bool) or not isinstance(max_act, (int, float))):
            raise ConfigError(f"{key}: {where}: `maxActApprox` must be a number, got {max_act!r}")
        if not explanations and max_act is not None:
            yield _Entry(where, model_id, source, index, None, None, None, float(max_act))
        for j, sub in enumerate(explanations):
            at = f"{where} explanations[{j}]"
            if not isinstance(sub, dict):
                raise ConfigError(f"{key}: {at}: expected an object, got {type(sub).__name__}")
            inner = (_string(sub, "modelId", at, key), _string(sub, "layer", at, key))
            if (
                "index" in sub
                and _index(sub, at, key) != index
                or any(v is not None and v != outer for v, outer in zip(inner, (model_id, source)))
            ):
                raise ConfigError(f"{key}: {at}: names another feature than its feature object")
            yield _entry(at, sub, model_id, source, index, max_act, key)
        return
    if "description" not in item:
        raise ConfigError(
            f"{key}: {where}: neither `description` (an explanation) nor `explanations` (a feature)"
        )
    yield _entry(where, item, model_id, source, index, None, key)


def _entry(where, item, model_id, source, index, max_act, key) -> _Entry:
    description = item.get("description")
    if not isinstance(description, str):
        raise ConfigError(f"{key}: {where}: `description` must be a string, got {type(description).__name__}")
    return _Entry(
        where,
        model_id,
        source,
        index,
        " ".join(description.split()),
        _string(item, "explanationModelName", where, key),
        _string(item, "typeName", where, key),
        float(max_act) if max_act is not None else None,
    )


def load_explanations(
    path: str | os.PathLike, *, key: str, d_sae: int, neuronpedia_id: str | None
) -> Explanations:
    """The explanations `path` (a file or folder) holds for one SAE; `key` names the config entry in errors."""
    files = explanation_files(path, key)
    entries = [
        e for file in files for where, item in _documents(file, key) for e in _entries(where, item, key)
    ]
    named = sorted(
        {f"{e.model_id}/{e.source}" for e in entries if e.model_id is not None or e.source is not None}
    )
    if neuronpedia_id is None and len(named) > 1:
        raise ConfigError(
            f"{key}: {path} holds explanations of several SAEs ({', '.join(named)}); "
            "set the SAE's `neuronpedia_id` to choose one"
        )
    want = tuple(neuronpedia_id.split("/", 1)) if neuronpedia_id and "/" in neuronpedia_id else None
    kept, other = [], 0
    for e in entries:
        if want is not None and any(v is not None and v != w for v, w in zip((e.model_id, e.source), want)):
            other += 1
        else:
            kept.append(e)
    if entries and not kept:
        raise ConfigError(
            f"{key}: none of the {len(entries)} explanations in {path} is for {neuronpedia_id} "
            f"(it holds {', '.join(named)})"
        )
    by_index: dict[int, dict[tuple[str, str | None], Explanation]] = {}
    maxima: dict[int, float] = {}
    empty = 0
    for e in kept:
        if e.index >= d_sae:
            raise ConfigError(
                f"{key}: {e.where}: index {e.index} is out of range (the SAE has {d_sae} features)"
            )
        if e.max_act is not None:
            maxima[e.index] = e.max_act
        if e.description is None:
            continue
        if not e.description:
            empty += 1
            continue
        by_index.setdefault(e.index, {}).setdefault(
            (e.description, e.explainer), Explanation(e.description, e.explainer, e.type_name)
        )
    result = Explanations(
        {i: tuple(v.values()) for i, v in sorted(by_index.items())},
        maxima,
        tuple(str(f) for f in files),
        other,
        empty,
    )
    logger.info(
        "%s: %d explanations of %d features from %d file(s) at %s; skipped %d for other SAEs, %d empty",
        key,
        result.count,
        len(result.by_index),
        len(files),
        path,
        other,
        empty,
    )
    return result

"""One fit end to end, in the API process: check the body, tokenize and bound the texts, read each text's
residual at the layer through the engine (reading.py, a few at a time, a log line every LOG_EVERY texts),
pool, fit (estimate.py, in a thread), save under the first runtime root, and register the result through the
admin's runtime load (admin.py: staged on every worker, rolled back if one fails). A fit whose load fails
removes what it saved. One fit runs at a time."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from steer_plugin.admin import Admin, Broadcast
from steer_plugin.fitting.bodies import parse_probe_fit, parse_vector_fit, save_name
from steer_plugin.fitting.estimate import fit_probe, mean_difference, pool
from steer_plugin.fitting.reading import CallEngine, read_residuals
from steer_plugin.request.schema import SpecError

logger = logging.getLogger("steer_plugin")

MAX_TOTAL_TOKENS = 65536  # of all a fit's texts together
MAX_TEXT_TOKENS = 4096
CONCURRENCY = 8  # texts read at once (the engine batches them)
LOG_EVERY = 32

Tokenize = Callable[
    [str, str], Awaitable[list[int]]
]  # (text, its field) -> token ids, as completions read it


class Engine(NamedTuple):
    """What a fit needs of the running server (the adapter's routes build it per request)."""

    tokenize: Tokenize
    call: CallEngine
    broadcast: Broadcast
    max_model_len: int | None


class Fitter:
    def __init__(self, admin: Admin, sink_positions: int, model_layers: Callable[[], int | None]):
        self.admin = admin
        self.sink_positions = sink_positions
        self.model_layers = model_layers
        self._busy = False

    def _check_layer(self, layer: int, vector: bool) -> None:
        layers = self.model_layers()
        if layers is not None and layer >= layers:
            raise SpecError("layer", f"the model has {layers} decoder layers (0..{layers - 1})")
        if vector and not self.admin.runtime.reserves(layer):
            raise SpecError(
                "layer", f"layer {layer} has no reserved rows; runtime.layers = {self.admin.runtime.layers}"
            )
        if not self.admin.reads(layer):
            raise SpecError(
                "layer",
                f"the workers capture nothing after layer {layer}: fit at a layer with an SAE or a probe, or "
                f"reserved (runtime.layers = {self.admin.runtime.layers})",
            )

    def _target(self, kind: str, source_id: str, name: str) -> Path:
        if self.admin.sources.source(kind, source_id) is not None:
            raise SpecError("id", f"{kind} {source_id!r} is already loaded", 409)
        target = self.admin.roots[0] / name
        if target.exists() or target.is_symlink():
            raise SpecError("save_to", f"{name!r} already exists under the runtime root", 409)
        return target

    async def _pooled(
        self, texts: list[tuple[str, str]], layer: int, pooling: str, engine: Engine, model, what: str
    ) -> np.ndarray:
        """[n, d] pooled residuals of `texts` ((text, field) pairs) at `layer`."""
        started = time.monotonic()
        limit = (
            MAX_TEXT_TOKENS
            if engine.max_model_len is None
            else min(MAX_TEXT_TOKENS, engine.max_model_len - 1)
        )
        gate = asyncio.Semaphore(CONCURRENCY)

        async def tokenized(text: str, field: str) -> list[int]:
            async with gate:
                ids = await engine.tokenize(text, field)
            if not 1 <= len(ids) <= limit:
                raise SpecError(field, f"has {len(ids)} tokens; 1 to {limit} here")
            return ids

        ids = await asyncio.gather(*(tokenized(text, field) for text, field in texts))
        total = sum(map(len, ids))
        if total > MAX_TOTAL_TOKENS:
            raise SpecError(texts[0][1].split("[")[0], f"{total} tokens in all; at most {MAX_TOTAL_TOKENS}")
        done = 0

        async def read(token_ids: list[int], field: str) -> np.ndarray:
            nonlocal done
            async with gate:
                rows = await read_residuals(engine.call, token_ids, (layer,), model, field)
            done += 1
            if done % LOG_EVERY == 0 or done == len(texts):
                logger.info(
                    "steer_plugin: fit of %s: read %d/%d texts (%d tokens) in %.1f s",
                    what,
                    done,
                    len(texts),
                    total,
                    time.monotonic() - started,
                )
            return pool(rows[layer], pooling, self.sink_positions)

        return np.stack(await asyncio.gather(*(read(i, f) for i, (_, f) in zip(ids, texts))))

    async def _one_at_a_time(self, job: Awaitable[dict]) -> dict:
        if self._busy:
            job.close()
            raise SpecError("body", "another fit is running; retry when it is done", 409)
        self._busy = True
        try:
            return await job
        finally:
            self._busy = False

    async def fit_probe(self, data: object, engine: Engine) -> dict:
        """POST /v1/steering/probes:fit: the fitted probe's figures, where it was saved, and its description."""
        task = parse_probe_fit(data)
        body = task.body
        await self.admin.current(engine.broadcast)  # what other API processes loaded counts too
        self._check_layer(body.layer, vector=False)
        target = self._target("probe", body.id, save_name(body.save_to, body.id))
        return await self._one_at_a_time(self._fit_probe(task, target, engine))

    async def _fit_probe(self, task, target: Path, engine: Engine) -> dict:
        from steer_plugin.probes.format import ProbeMeta, save_probe

        body, labels = task.body, task.labels
        texts = [(e.text, f"examples[{i}].text") for i, e in enumerate(body.examples)]
        x = await self._pooled(texts, body.layer, body.pooling, engine, body.model, f"probe {body.id}")
        fit = await asyncio.to_thread(fit_probe, x, np.array(task.targets), labels, body.held_out)
        classes = (labels[1],) if len(labels) == 2 else labels
        meta = ProbeMeta(body.layer, classes, "sigmoid")
        await asyncio.to_thread(save_probe, target, meta, _tensor(fit.weight), _tensor(fit.bias))
        described = await self._register(target, "probe", {"id": body.id, "path": str(target)}, engine)
        logger.info(
            "steer_plugin: fitted probe %s at layer %d on %d texts: held-out AUROC %s, accuracy %.3f",
            body.id,
            body.layer,
            len(texts),
            "n/a" if fit.auroc is None else f"{fit.auroc:.4f}",
            fit.accuracy,
        )
        return {
            "object": "probe.fit",
            "id": body.id,
            "layer": body.layer,
            "labels": list(classes),
            "pooling": body.pooling,
            "examples": len(texts),
            "train": len(fit.train),
            "held_out": len(fit.held_out),
            "held_out_indices": list(fit.held_out),
            "auroc": fit.auroc,
            "auroc_by_label": fit.auroc_by_label,
            "accuracy": fit.accuracy,
            "path": str(target),
            "probe": described,
        }

    async def fit_vector(self, data: object, engine: Engine) -> dict:
        """POST /v1/steering/vectors:fit: the difference of means of the pairs, unit norm, loaded as a vector."""
        body = parse_vector_fit(data)
        await self.admin.current(engine.broadcast)
        self._check_layer(body.layer, vector=True)
        target = self._target("vector", body.id, save_name(body.save_to, body.id, ".safetensors"))
        return await self._one_at_a_time(self._fit_vector(body, target, engine))

    async def _fit_vector(self, body, target: Path, engine: Engine) -> dict:
        from safetensors.torch import save_file

        texts = [(p.positive, f"pairs[{i}].positive") for i, p in enumerate(body.pairs)]
        texts += [(p.negative, f"pairs[{i}].negative") for i, p in enumerate(body.pairs)]
        x = await self._pooled(texts, body.layer, body.pooling, engine, body.model, f"vector {body.id}")
        n = len(body.pairs)
        fit = mean_difference(x[:n], x[n:])
        await asyncio.to_thread(save_file, {"vector": _tensor(fit.vector)}, str(target))
        source = {"id": body.id, "path": str(target), "layer": body.layer}
        described = await self._register(target, "vector", source, engine)
        logger.info(
            "steer_plugin: fitted vector %s at layer %d on %d pairs (norm of the difference %.4g)",
            body.id,
            body.layer,
            n,
            fit.norm,
        )
        return {
            "object": "vector.fit",
            "id": body.id,
            "layer": body.layer,
            "pooling": body.pooling,
            "pairs": n,
            "norm": fit.norm,
            "path": str(target),
            "vector": described,
        }

    async def _register(self, target: Path, kind: str, source: dict, engine: Engine) -> dict:
        try:
            return await self.admin.load(kind, source, engine.broadcast)
        except BaseException:
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
            raise


def _tensor(values: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))

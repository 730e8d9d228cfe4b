"""The worker-side steering engine, independent of the inference server.

An adapter builds one `Steerer` per worker after the model is loaded and before it is compiled, inserts
`torch.ops.steer_plugin.steer_residual` after each steered decoder layer, and calls `prepare(batch)` before
every forward with the batch layout (which request owns which token rows, at which positions).
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import numpy as np
import torch

from steer_plugin.catalog import LoadedAssets, LoadedSAE, load_assets
from steer_plugin.config import SteerConfig
from steer_plugin.engine import op as steer_op
from steer_plugin.engine.bank import LayerBank, build_layer_bank
from steer_plugin.engine.captures import StepReads, plan_reads
from steer_plugin.engine.load_registry import configured_ids
from steer_plugin.engine.observe import Observer
from steer_plugin.engine.plans import compile_ops
from steer_plugin.engine.probing import ProbeReader
from steer_plugin.engine.requests import InlineRows, RequestTable
from steer_plugin.engine.residuals import write_residuals
from steer_plugin.engine.runtime_loads import LoadTarget, RuntimeLoads
from steer_plugin.engine.selftest import check_probes, probe_plans
from steer_plugin.engine.slots import Newcomer, SlotPlanner
from steer_plugin.engine.step import StepMetadata
from steer_plugin.engine.tables import OP_NAMES, LayerPlan, LayerTables
from steer_plugin.messages import WorkerStats
from steer_plugin.monitor import transport
from steer_plugin.request.wire import ObservePlan, RequestPlan

logger = logging.getLogger("steer_plugin")


class BatchView(NamedTuple):
    """The flattened batch of one forward, as the adapter reads it from the server's runner."""

    req_ids: list[str]
    query_start: np.ndarray  # [R + 1]: request i owns token rows query_start[i]:query_start[i+1]
    num_computed: np.ndarray  # [R]: position of each request's first token in this step
    num_prompt: np.ndarray  # [R]
    wires: list[str | None]  # [R]: SamplingParams.extra_args[WIRE_KEY] (a signed RequestPlan) or None


class Steerer:
    """Banks and tables for the layers this worker owns, plus the per-request plan cache."""

    def __init__(
        self,
        config: SteerConfig,
        owned_layers: range,
        device: torch.device,
        model_dtype: torch.dtype,
        max_tokens: int,
        d_model: int,
        max_seqs: int = 256,
        pp_rank: int = 0,
        tp_rank: int = 0,
    ):
        started = time.perf_counter()
        self.config = config
        self.device = device
        self.max_ops = config.limits.max_ops_per_layer
        self.assets: LoadedAssets = load_assets(
            config, d_model=d_model, layers=owned_layers, explanations=False
        )  # explanations serve discovery in the API process only
        self.d_model = d_model
        runtime = config.runtime
        reserved_layers = {layer for layer in owned_layers if runtime is not None and runtime.reserves(layer)}
        self.banks: dict[int, LayerBank] = {}
        for layer in sorted(self.assets.layers() | reserved_layers):
            saes = [(s.id, s.sae) for s in self.assets.saes.values() if s.layer == layer]
            vectors = [(v.id, v.vector) for v in self.assets.vectors.values() if v.layer == layer]
            dtype = self._bank_dtype(model_dtype)
            self.banks[layer] = build_layer_bank(
                layer,
                saes,
                vectors,
                device,
                dtype,
                self._scratch_rows(max_seqs),
                d_model,
                reserved_rows=runtime.rows_per_layer if layer in reserved_layers else 0,
            )
        self.step = StepMetadata(max_tokens, max_seqs, device)
        self.tables = {
            layer: LayerTables(bank, max_seqs, self.max_ops, self._working_set_rows(bank, max_seqs), device)
            for layer, bank in self.banks.items()
        }
        read_layers = {s.layer for s in self.assets.saes.values()} | reserved_layers
        read_layers |= {p.meta.layer for p in self.assets.probes.values()}
        self.runtimes = {
            layer: steer_op.LayerRuntime(self.tables[layer], self.step, observable=layer in read_layers)
            for layer in self.banks
        }
        self.requests = RequestTable(self._reject, self._free_rows)  # per-request state, one record each
        self._reads = StepReads()  # this step's observed rows, by what reads them
        self.slots = SlotPlanner(self.step, self.tables)  # reports to prepare(), never calls back
        self.observer = Observer(
            {s.id: self.sae_view(s) for s in self.assets.saes.values()},
            write=tp_rank == 0,
            sink_positions=config.monitoring.sink_positions,
        )  # TP ranks compute the same
        self.prober = ProbeReader(
            self.assets.probes,
            device,
            write=tp_rank == 0,
            sink_positions=config.monitoring.sink_positions,
        )
        self.runtime_loads = RuntimeLoads(
            LoadTarget(
                runtime=config.runtime,
                d_model=d_model,
                banks=self.banks,
                tables=self.tables,
                assets=self.assets,
                observer=self.observer,
                step=self.step,
                release_slots=self.release_slots,
                sae_view=self.sae_view,
                source_gone=self._source_gone,
                prober=self.prober,
                read_layers=frozenset(layer for layer, rt in self.runtimes.items() if rt.observable),
                configured=configured_ids(config),
            )
        )
        self.features_applied: dict[str, int] = {}
        self.rejected_messages: dict[str, int] = {}  # messages dropped in this worker, by kind
        self.step_errors = 0  # steps whose steering or observation failed (run unsteered instead)
        self.ranks = {"pp": pp_rank, "tp": tp_rank}
        self.bank_bytes = sum(b.nbytes() for b in self.banks.values())
        self.table_bytes = sum(t.nbytes() for t in self.tables.values()) + sum(
            rt.capture.numel() * 4 for rt in self.runtimes.values()
        )
        logger.info(
            "steer_plugin: %d SAE(s), %d vector(s) on layers %s; banks %.1f MiB, tables %.1f MiB on %s (%.1fs)",
            len(self.assets.saes),
            len(self.assets.vectors),
            sorted(self.banks),
            self.bank_bytes / 2**20,
            self.table_bytes / 2**20,
            device,
            time.perf_counter() - started,
        )

    def sae_view(self, loaded: LoadedSAE):
        """The SAE for reading features, its big matrices rebound to views of its bank rows (no second copy)."""
        bank = self.banks[loaded.layer]
        entry = bank.entries[("feature", loaded.id)]
        sae = loaded.sae
        sae.W_dec = bank.dec[entry.offset : entry.offset + entry.size]  # [d_sae, d]
        sae.W_enc = bank.enc[entry.offset : entry.offset + entry.size].t()  # [d, d_sae] view
        for name in ("b_enc", "b_dec", "threshold", "b_gate", "b_mag", "r_mag"):
            if getattr(sae, name) is not None:
                setattr(sae, name, getattr(sae, name).to(device=bank.dec.device, dtype=bank.dec.dtype))
        return sae

    def _working_set_rows(self, bank: LayerBank, max_seqs: int) -> int:
        """Every slot's every op fits unless the operator asked for fewer (a smaller graph-captured GEMM)."""
        wanted = self.config.limits.working_set_rows or max_seqs * self.max_ops
        return max(1, min(wanted, bank.num_rows))

    def _scratch_rows(self, max_seqs: int) -> int:
        """Rows for inline vectors at each layer: every running request may hold its maximum."""
        policy = self.config.policy
        return max_seqs * policy.max_inline_vectors if policy.allow_inline_vectors else 0

    def _bank_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        requested = {s.dtype for s in self.config.saes} - {"auto"}
        return getattr(torch, sorted(requested)[0]) if requested else model_dtype

    @property
    def layers(self) -> list[int]:
        return sorted(self.banks)

    def activate(self) -> None:
        """Make this steerer the one the op reads (one engine per process)."""
        steer_op.LAYERS.clear()
        steer_op.LAYERS.update(self.runtimes)

    # --- per-request plans ---------------------------------------------------------------------------------

    def _compile_plan(self, req_id: str, plan: RequestPlan, inline_rows: InlineRows) -> dict[int, LayerPlan]:
        """The request's ops as rows of this worker's banks and coefficients, per layer it owns (the scratch rows
        its inline vectors take are appended to `inline_rows`: the request table gives them back)."""
        plans = compile_ops(self.banks, plan.ops, inline_rows)
        for o in plan.ops:
            if o.kind == "feature":
                self.features_applied[o.source] = self.features_applied.get(o.source, 0) + 1
        return plans

    def plan_of(self, wire: object, req_id: str | None = None) -> RequestPlan | None:
        """The decoded plan of a wire message, decoded once per process whoever asks (requests.RequestTable)."""
        return self.requests.plan_of(wire, req_id)

    def plan_for(self, req_id: str, wire: object) -> dict[int, LayerPlan]:
        """The request's ops compiled for the layers this worker owns (bank rows, coefficients)."""
        return self.requests.layer_plans(req_id, wire, self._compile_plan)

    def observe_for(self, req_id: str, wire: object) -> ObservePlan | None:
        """What to read for the request, narrowed to the SAEs this worker has (other stages read the rest)."""
        return self.requests.observation(req_id, wire, self._narrowed)

    def _narrowed(self, spec: ObservePlan) -> ObservePlan:
        saes = self.observer.saes
        return spec._replace(
            saes=tuple(s for s in spec.saes if s in saes),
            watch=tuple(w for w in spec.watch if w.sae in saes and w.index < saes[w.sae].d_sae),
            stats=tuple(s for s in spec.stats if s in saes),
            abort=tuple(a for a in spec.abort if a.sae in saes and a.index < saes[a.sae].d_sae),
            probes=tuple(p for p in spec.probes if p in self.prober.probes),
            probe_abort=tuple(a for a in spec.probe_abort if a.probe in self.prober.probes),
            residuals=tuple(x for x in spec.residuals if x in self.runtimes and self.runtimes[x].observable),
        )

    def _source_gone(self, source_id: str) -> None:
        """A source was unloaded at runtime: its metric series goes, and every cached plan (they name bank rows)."""
        self.features_applied.pop(source_id, None)
        self.drop_plans()

    def drop_plans(self) -> None:
        """Forget every compiled plan (they name bank rows): requests entering a slot again compile afresh."""
        self.requests.drop_compiled()

    def _free_rows(self, rows: InlineRows) -> None:
        for layer, row in rows:
            self.banks[layer].free_scratch(row)

    def _reject(self, what: str, req_id: str, err: Exception) -> None:
        self.rejected_messages[what] = self.rejected_messages.get(what, 0) + 1
        logger.error("steer_plugin: ignoring %s message of request %s: %s", what, req_id, err)

    def _plan_captures(self, batch: BatchView) -> None:
        """Which token rows to copy out this step, per layer, for observed requests (fresh every step)."""
        if not any(w and self.observe_for(r, w) is not None for r, w in zip(batch.req_ids, batch.wires)):
            self._reads = StepReads()  # none observed: only what is observed pays for the observation path
            return
        layout = (batch.req_ids, batch.wires, batch.query_start, batch.num_computed, batch.num_prompt)
        self._reads = plan_reads(layout, self.observe_for, self.prober.layer_of)
        for layer, rows in self._reads.rows_by_layer(lambda sae_id: self.assets.saes[sae_id].layer).items():
            self.runtimes[layer].capture_rows = rows

    def after_forward(self) -> list[int]:
        """Read the features of this step's observed tokens (outside the model forward and any graph); returns
        the batch positions of the requests whose abort_when fired: the runner's adapter makes each one's sampled
        token its end-of-sequence token, so it ends right there, before the token the crossing residual would
        have predicted."""
        reads = self._reads
        if not (reads.observed or reads.probed or reads.residuals):
            self.disarm()
            return []  # nothing observed: nothing to read, nothing posted to send
        try:
            fired = []
            if reads.probed:
                captures = {g.layer: self.runtimes[g.layer].capture for g in reads.probed}
                fired = self.prober.collect(reads.probed, captures, self.observer.saes)
            if reads.residuals:
                captures = {g.layer: self.runtimes[g.layer].capture for g in reads.residuals}
                write_residuals(reads.residuals, captures, self.prober.write)
            if not reads.observed:
                return fired
            captures = {
                s: self.runtimes[self.assets.saes[s].layer].capture
                for s in {g.sae_id for g in reads.observed}
            }
            hits = self.observer.collect(reads.observed, captures)
            return sorted({h.req_index for h in hits} | set(fired))
        finally:
            transport.flush()  # the step's records: one message per API process
            self.disarm()

    def disarm(self) -> None:
        """Until the next prepare(), the op steers and captures nothing: forwards that skip preparation
        (warm-up, profile and dummy runs, idle data-parallel ranks) never read this step's rows."""
        self._reads = StepReads()
        self.step.disarm()
        for rt in self.runtimes.values():
            rt.capture_rows = None

    def prepare_or_disarm(self, batch_view) -> None:
        """prepare(batch_view()) for the coming forward; on any error, log it, count it and run the step
        unsteered and unobserved (a steering problem must never take the engine down)."""
        try:
            self.prepare(batch_view())
        except Exception:
            self.step_errors += 1
            logger.exception("steer_plugin: steering preparation failed; this step runs unsteered")
            self.clear()
            self.disarm()

    def after_forward_safely(self) -> list[int]:
        """after_forward; on any error, log it, count it and drop this step's observations (no abort)."""
        try:
            return self.after_forward()
        except Exception:
            self.step_errors += 1
            logger.exception(
                "steer_plugin: reading observed features failed; observations of this step dropped"
            )
            return []

    def stats(self) -> WorkerStats:
        """Cumulative worker figures, pulled by the API server for /metrics."""
        steered = {name: 0 for name in OP_NAMES if name != "selftest"}
        for tables in self.tables.values():
            for name, count in tables.counts_by_op().items():
                if name in steered:
                    steered[name] += count
        observed = self.observer.snapshot()
        return WorkerStats(
            steered_tokens=steered,
            features_applied=dict(self.features_applied),
            op_seconds=sum(rt.seconds for rt in self.runtimes.values()),
            sae_bytes={sid: self.banks[s.layer].feature_bytes(sid) for sid, s in self.assets.saes.items()},
            bank_bytes=self.bank_bytes,
            rejected_messages=dict(self.rejected_messages),
            step_errors=self.step_errors,
            pp_rank=self.ranks["pp"],
            tp_rank=self.ranks["tp"],
            l0=observed.l0,
            reconstruction_error=observed.reconstruction_error,
            tokens_observed=observed.tokens_observed,
            observation_dropped=transport.dropped(),
        )

    # --- per step ------------------------------------------------------------------------------------------

    def prepare(self, batch: BatchView) -> int:
        """Write this step's token metadata; returns the number of token rows that belong to steered requests.

        One way, as vLLM's punica wrapper updates its metadata: the slot planner reports which requests leave
        and enter, this compiles the plans of those entering, the planner writes them and the step."""
        changes = self.slots.diff(batch.req_ids, batch.wires)
        if not changes.steady:
            self.release_slots(changes.leaving)  # before any plan is made: a plan may reuse what these free
            self._admit(batch, changes.entering)
        steered = self.slots.write(batch.req_ids, batch.wires, batch.query_start, batch.num_computed)
        self.runtime_loads.release_retired()
        self._plan_captures(batch)
        self.requests.prune(batch.req_ids, batch.wires, self.step.slot_of)
        return steered

    def _admit(self, batch: BatchView, entering: list[int]) -> None:
        """Slots for the requests entering the batch that steer a layer of this worker: all at once, or, if they
        do not fit together, one at a time, each compiled afresh (backing out freed the inline rows its plan
        named). One that does not fit alone is counted and runs unsteered."""
        newcomers = []
        for i in entering:
            plans = self.plan_for(batch.req_ids[i], batch.wires[i])
            if plans:
                newcomers.append(Newcomer(batch.req_ids[i], batch.wires[i], int(batch.num_prompt[i]), plans))
        backed_out = self.slots.admit(newcomers)
        for n in backed_out:
            self.requests.released(n.req_id)
        for n in backed_out:
            taken = self.slots.take(n.req_id, n.wire, n.prompt_len, self.plan_for(n.req_id, n.wire))
            if taken.refused is not None:
                self.requests.released(n.req_id)
                self._reject("capacity", n.req_id, taken.refused)

    def release_slots(self, req_ids: list[str]) -> None:
        """Give these requests' slots back (their rows emptied): their inline rows are free again and their plans
        compiled afresh if they come back (also between steps: a runtime unload)."""
        for req_id in self.slots.release_many(req_ids):
            self.requests.released(req_id)

    def clear(self) -> None:
        """Back to "no steering" on every row and slot, on the host and the device."""
        for req_id in self.slots.clear():
            self.requests.released(req_id)
        self.disarm()

    # --- start-up self-test ------------------------------------------------------------------------------

    def self_test(self, run_decode_step) -> None:
        """Steer row 0 of a one-token decode step along each bank's self-test row; check the op fired.

        `run_decode_step()` must run one forward of one token through the model exactly as the server runs
        decode steps (same compile mode, same graphs). Raises selftest.SelfTestError otherwise.
        """
        value = 2.0
        self.clear()
        taken = self.slots.take("steer_plugin-self-test", "self-test", 1, probe_plans(self.banks, value))
        if taken.refused is not None:  # the op will not fire: check_probes says so
            self._reject("capacity", "steer_plugin-self-test", taken.refused)
        self.step.write(np.array([taken.slot]), np.array([0, 1]), np.array([1]))
        for rt in self.runtimes.values():
            rt.probe.fill_(float("nan"))
        try:
            run_decode_step()
        finally:
            self.clear()
        check_probes(self.runtimes, value)
        logger.info("steer_plugin: self-test passed on layers %s (op fired on a decode step)", self.layers)

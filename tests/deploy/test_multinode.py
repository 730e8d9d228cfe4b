"""deploy/k8s/multinode: one server spanning several pods, a LeaderWorkerSet (kubernetes-sigs/lws) running vLLM's
multiprocessing multi-node launch (the leader serves with `--nnodes N --node-rank 0 --master-addr LEADER`, the
other pods run `--node-rank I --headless`), checked offline like the rest of deploy/k8s:

- the LeaderWorkerSet validates strictly against the LWS CRD's schema, vendored from a release
  (tests/deploy/schemas/, crd.py), and passes the rules LWS's admission webhook adds; its pod templates validate
  against the Kubernetes schemas (kubernetes-validate, strict) the pods LWS creates must pass; broken copies of it
  fail (the check is not vacuous);
- it is the single-node server of deploy/k8s/base split across pods: same image, flags, steering config, models
  volume and environment, with the multi-node flags and environment added (the signing key from a Secret on every
  pod, the observation address on the leader), GPUs = tensor x pipeline parallel, and vLLM's own parser reads every
  pod's flags as the kubelet expands them;
- the Service and the PodMonitor reach the leaders only, the generated ConfigMap's hashed name reaches both
  templates (`kubectl kustomize`, when kubectl is installed).

Not checked here: a cluster with the LWS controller, pods on two GPU nodes, NCCL between them.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from . import crd
from .test_deploy_kit import (
    HEALTH,
    K8S,
    PORT,
    _container,
    _flag,
    _kustomize,
    _one,
    _validate_k8s,
    _without,
    _yaml,
)

MULTINODE = K8S / "multinode"
LWS_SCHEMA = "leaderworkerset-v0.10.0.json"
LWS_ENV = ("LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX")  # LWS sets them in every container
MULTI_NODE_FLAGS = ("--nnodes", "--node-rank", "--master-addr")
PARALLEL_FLAGS = ("--tensor-parallel-size", "--pipeline-parallel-size")
WIRE_KEY = "STEER_PLUGIN_WIRE_KEY"
OBSERVE_HOST = "STEER_PLUGIN_OBSERVE_HOST"


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return _kustomize(MULTINODE)


def _lws(resources: list[dict]) -> dict:
    return _one(resources, "LeaderWorkerSet")


def _templates(lws: dict) -> dict[str, dict]:
    group = lws["spec"]["leaderWorkerTemplate"]
    return {"leader": group["leaderTemplate"], "worker": group["workerTemplate"]}


def _pod_container(template: dict) -> dict:
    (container,) = template["spec"]["containers"]
    return container


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _deployment() -> dict:
    return _one(_kustomize(K8S / "base"), "Deployment")


# --- the LWS CRD schema ------------------------------------------------------------------------------------------


def test_the_vendored_lws_schema_says_where_it_came_from():
    vendored = crd.vendored(LWS_SCHEMA)
    source = vendored["_source"]
    release = LWS_SCHEMA.removeprefix("leaderworkerset-").removesuffix(".json")
    assert source["release"] == release and f"/lws/blob/{release}/config/crd/bases/" in source["url"]
    assert re.fullmatch(r"[0-9a-f]{40}", source["commit"]) and re.fullmatch(r"[0-9a-f]{64}", source["sha256"])
    assert (vendored["group"], vendored["kind"], list(vendored["versions"])) == (
        "leaderworkerset.x-k8s.io",
        "LeaderWorkerSet",
        ["v1"],
    )


def test_multinode_manifests_validate_against_the_lws_crd_and_kubernetes_schemas(rendered):
    assert sorted(r["kind"] for r in rendered) == [
        "ConfigMap",
        "LeaderWorkerSet",
        "PersistentVolumeClaim",
        "Service",
    ], "the multinode kustomization is base's objects without the Deployment, plus the LeaderWorkerSet"
    lws = _lws(rendered)
    errors = crd.errors(lws, LWS_SCHEMA)
    # The pods LWS makes from the templates must pass the cluster's own Pod validation.
    for role, template in _templates(lws).items():
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"{lws['metadata']['name']}-{role}"},
            "template": template,
        }
        errors += _validate_k8s(pod_template)
    errors += [e for r in rendered if r["kind"] != "LeaderWorkerSet" for e in _validate_k8s(r)]
    assert not errors, "\n".join(errors)


def _set(path: str, value):
    def mutate(lws: dict) -> None:
        *parents, last = path.split(".")
        node = lws
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


_DELETE = object()
_GROUP = "spec.leaderWorkerTemplate"
_WORKER = f"{_GROUP}.workerTemplate.spec.containers.0"


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (
            _set(f"{_GROUP}.sise", 2),
            "spec.leaderWorkerTemplate: Additional properties are not allowed ('sise'",
        ),
        (_set(f"{_GROUP}.size", "2"), "spec.leaderWorkerTemplate.size: '2' is not of type 'integer'"),
        (_set(f"{_GROUP}.restartPolicy", "Always"), "spec.leaderWorkerTemplate.restartPolicy: 'Always'"),
        (_set(f"{_GROUP}.workerTemplate", _DELETE), "'workerTemplate' is a required property"),
        (_set("spec.startupPolicy", "LeaderStarted"), "spec.startupPolicy: 'LeaderStarted' is not one of"),
        (_set("spec.replicas", -1), "spec.replicas: -1 is less than the minimum of 0"),
        (_set("spec.rolloutStrategy.type", "Recreate"), "spec.rolloutStrategy.type: 'Recreate'"),
        (_set(f"{_WORKER}.argz", []), "containers.0: Additional properties are not allowed ('argz'"),
        (
            _set(f"{_WORKER}.env.0.valueFrom", {"secretKeyRef": {"name": "s", "key": "k", "optionl": True}}),
            "optionl",
        ),
        (
            _set(f"{_GROUP}.leaderTemplate.spec.containers.0.ports.0.containerPort", "8000"),
            "containerPort: '8000'",
        ),
        (
            _set(f"{_GROUP}.leaderTemplate.metadata.label", {}),
            "leaderTemplate.metadata: Additional properties",
        ),
        (_set("metadata.name", "Steer_VLLM"), "metadata.name: 'Steer_VLLM' does not match"),
        (_set("apiVersion", "leaderworkerset.x-k8s.io/v2"), "is not leaderworkerset-v0.10.0.json's"),
    ],
)
def test_the_lws_schema_check_fails_a_broken_manifest(rendered, mutate, where):
    """Not vacuous: each of these breaks the manifest as the API server would refuse it, and the check says where."""
    broken = copy.deepcopy(_lws(rendered))
    mutate(broken)
    errors = crd.errors(broken, LWS_SCHEMA)
    assert any(where in e for e in errors), errors


def _int_or_percent(value, size: int) -> int:
    if isinstance(value, str):
        match = re.fullmatch(r"(\d+)%", value)
        assert match and int(match[1]) <= 100, f"{value}: must be an integer or a percentage up to 100%"
        return int(match[1]) * size // 100
    assert isinstance(value, int) and value >= 0, value
    return value


def test_the_lws_passes_the_lws_admission_webhook(rendered):
    """What LWS's webhook refuses beyond the schema (pkg/webhooks/leaderworkerset_webhook.go, generalValidate, at
    the vendored release): replicas within [0, 1000000], size >= 1, replicas x size within int32, maxSurge and
    maxUnavailable integers or percentages up to 100% and not both 0, no subgroup settings (left out here)."""
    spec = _lws(rendered)["spec"]
    replicas, size = spec.get("replicas", 1), spec["leaderWorkerTemplate"].get("size", 1)
    assert 0 <= replicas <= 1_000_000 and size >= 1 and replicas * size <= 2**31 - 1
    rolling = spec.get("rolloutStrategy", {}).get("rollingUpdateConfiguration", {})
    surge = _int_or_percent(rolling.get("maxSurge", 0), replicas)
    unavailable = _int_or_percent(rolling.get("maxUnavailable", 1), replicas)
    assert surge or unavailable, "maxUnavailable must not be 0 when maxSurge is 0"
    assert "subGroupPolicy" not in spec["leaderWorkerTemplate"]


# --- the group -----------------------------------------------------------------------------------------------


def test_the_group_starts_restarts_and_is_reached_as_one_server(rendered):
    lws = _lws(rendered)
    name = lws["metadata"]["name"]
    spec = lws["spec"]
    # LWS names its headless Service (the pods' DNS, LWS_LEADER_ADDRESS) after the set, and reuses a Service
    # already there: the client Service must have another name. Both are DNS-1035 labels.
    services = [r["metadata"]["name"] for r in rendered if r["kind"] == "Service"]
    assert name not in services and all(
        re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", n) for n in [name, *services]
    )
    # Workers start with the leader (LeaderReady would wait for ever: the leader is ready once they joined), and
    # a pod that restarts restarts its group (vLLM does not take a worker back).
    assert spec.get("startupPolicy", "LeaderCreated") == "LeaderCreated"
    assert spec["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert spec["leaderWorkerTemplate"]["size"] >= 2, "a group of one pod is the Deployment's job (base/)"
    templates = _templates(lws)
    for role, template in templates.items():
        container = _pod_container(template)
        assert "command" not in container, f"{role}: the image's ENTRYPOINT (steer-serve) must run"
        assert not set(LWS_ENV) & set(_env(container)), f"{role}: LWS sets {LWS_ENV}; a value here would win"
    leader_labels = templates["leader"]["metadata"]["labels"]
    worker_labels = templates["worker"]["metadata"]["labels"]
    # The Service and the PodMonitor reach the leaders (which serve HTTP and /metrics), never the workers.
    service = _one(rendered, "Service")
    assert service["spec"]["selector"].items() <= leader_labels.items()
    assert not service["spec"]["selector"].items() <= worker_labels.items()
    assert service["spec"]["ports"] == [{"name": "http", "port": PORT, "targetPort": "http"}]
    monitor = _yaml(K8S / "podmonitor.yaml")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= leader_labels.items()
    assert leader_labels[monitor["spec"]["jobLabel"]] == "steer-vllm"  # the job the rules and dashboard use
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in _pod_container(templates["leader"])["ports"]}
    worker = _pod_container(templates["worker"])
    assert not worker.get("ports") and not {"startupProbe", "readinessProbe", "livenessProbe"} & set(worker)
    annotations = templates["leader"]["metadata"]["annotations"]
    assert (
        annotations["prometheus.io/port"] == str(PORT)
        and "annotations" not in templates["worker"]["metadata"]
    )


def test_the_group_is_the_single_node_server_split_across_pods(rendered):
    """Image, flags, steering config, volumes, environment and (leader) probes and ports of base/'s Deployment."""
    deployment = _deployment()
    server = _container(deployment)
    pod = deployment["spec"]["template"]["spec"]
    for role, template in _templates(_lws(rendered)).items():
        container = _pod_container(template)
        for key in ("image", "imagePullPolicy", "volumeMounts"):
            assert container[key] == server[key], f"{role}: {key} differs from base/deployment.yaml"
        assert template["spec"]["volumes"] == pod["volumes"], (
            f"{role}: volumes differ from base/deployment.yaml"
        )
        assert template["spec"]["terminationGracePeriodSeconds"] == pod["terminationGracePeriodSeconds"]
        env = _env(container)
        for name, entry in _env(server).items():
            assert env.get(name) == entry, f"{role}: env {name} differs from base/deployment.yaml"
        for key in ("requests", "limits"):
            want = {k: v for k, v in server["resources"][key].items() if k != "nvidia.com/gpu"}
            got = {k: v for k, v in container["resources"][key].items() if k != "nvidia.com/gpu"}
            assert got == want, f"{role}: resources.{key} differ from base/deployment.yaml"
    leader = _pod_container(_templates(_lws(rendered))["leader"])
    assert leader["ports"] == server["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert leader[probe] == server[probe] and leader[probe]["httpGet"]["path"] == HEALTH, probe


def test_every_pod_gets_the_signing_key_and_the_leader_its_observation_address(rendered):
    """Processes on other nodes do not inherit the leader's signing key: every pod reads the same one from a
    Secret (never a literal). The API process binds its observation inbox on the pod's IP, so that workers on
    other pods can reach it; vLLM's own address for the other nodes is the pod IP too."""
    pod_ip = {"fieldRef": {"fieldPath": "status.podIP"}}
    refs = []
    for role, template in _templates(_lws(rendered)).items():
        env = _env(_pod_container(template))
        key = env.get(WIRE_KEY)
        assert key and "value" not in key, f"{role}: {WIRE_KEY} must come from a Secret"
        ref = key["valueFrom"]["secretKeyRef"]
        assert not ref.get("optional"), f"{role}: a pod without the key must not start"
        refs.append((ref["name"], ref["key"]))
        assert env["VLLM_HOST_IP"]["valueFrom"] == pod_ip, role
        if role == "leader":
            assert env[OBSERVE_HOST]["valueFrom"] == pod_ip
    assert len(set(refs)) == 1, f"the pods of a group read different keys: {refs}"


def _pod_args(lws: dict) -> dict[str, list[str]]:
    return {role: _pod_container(t)["args"] for role, t in _templates(lws).items()}


def test_the_pods_run_one_server_with_vllms_multi_node_flags(rendered):
    lws = _lws(rendered)
    args = _pod_args(lws)
    leader, worker = args["leader"], args["worker"]
    assert all(isinstance(a, str) for a in leader + worker), "every argument must be a string (quote numbers)"
    # The leader runs the single-node server's flags, plus the multi-node ones; parallel sizes are its own.
    single = _container(_deployment())["args"]
    strip = (*MULTI_NODE_FLAGS, *PARALLEL_FLAGS)
    plain = leader
    for flag in strip:
        plain = _without(plain, flag)
    for flag in PARALLEL_FLAGS:
        single = _without(single, flag)
    assert plain == single, "the leader's server flags differ from base/deployment.yaml's"
    assert _flag(leader, "--node-rank") == "0" and "--headless" not in leader
    assert _flag(leader, "--master-addr") == "$(LWS_LEADER_ADDRESS)"
    size = lws["spec"]["leaderWorkerTemplate"]["size"]
    assert _flag(leader, "--nnodes") in ("$(LWS_GROUP_SIZE)", str(size))
    # Every other pod: the same flags (each pod builds its vLLM config from its own), its index, --headless.
    assert _without(worker, "--headless") == [
        "$(LWS_WORKER_INDEX)" if a == "0" and leader[i - 1] == "--node-rank" else a
        for i, a in enumerate(leader)
    ]
    assert worker.count("--headless") == 1
    # GPUs: every pod as many, requested and limited; the group's = tensor x pipeline parallel (vLLM: --nnodes
    # divides the world size; each node runs world / nnodes workers, one per GPU).
    tp = int(_flag(leader, "--tensor-parallel-size") or 1)
    pp = int(_flag(leader, "--pipeline-parallel-size") or 1)
    gpus = {
        role: (
            _pod_container(t)["resources"]["requests"]["nvidia.com/gpu"],
            _pod_container(t)["resources"]["limits"]["nvidia.com/gpu"],
        )
        for role, t in _templates(lws).items()
    }
    ((per_pod, limit),) = set(gpus.values())
    assert per_pod == limit and per_pod * size == tp * pp, (
        f"{size} pods x {per_pod} GPUs != TP {tp} x PP {pp}"
    )


def _expanded(args: list[str], env: dict[str, str]) -> list[str]:
    """`$(VAR)` as the kubelet expands it in a container's args (an unknown one stays as written)."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), a) for a in args]


_VLLM_PARSE = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
try:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
except ImportError:
    from vllm.entrypoints.openai.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser

out = []
for argv in json.loads(sys.argv[1]):
    a = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    out.append({k: getattr(a, k) for k in ("nnodes", "node_rank", "master_addr", "headless", "tensor_parallel_size",
                                          "pipeline_parallel_size", "model", "port")})
print(json.dumps(out))
"""


def test_vllm_reads_every_pods_flags(rendered, tmp_path):
    """vLLM's own parser, on each pod's flags as the kubelet expands them with the values LWS sets (group size,
    the pod's index, the leader's DNS name) and as steer-serve passes them on."""
    pytest.importorskip("vllm")
    from steer_adapters.vllm.api.launcher import MIDDLEWARE
    from steer_adapters.vllm.worker.extension import EXTENSION_PATH

    lws = _lws(rendered)
    name, size = lws["metadata"]["name"], lws["spec"]["leaderWorkerTemplate"]["size"]
    args = _pod_args(lws)
    argvs = []
    for index in range(size):
        env = {
            "LWS_GROUP_SIZE": str(size),
            "LWS_WORKER_INDEX": str(index),
            "LWS_LEADER_ADDRESS": f"{name}-0.{name}.ns",
        }
        argv = _expanded(_without(args["leader" if index == 0 else "worker"], "--steer-config"), env)
        assert "$(" not in " ".join(argv), argv
        argvs.append([*argv, "--middleware", MIDDLEWARE, "--worker-extension-cls", EXTENSION_PATH])
    proc = subprocess.run(
        [sys.executable, "-c", _VLLM_PARSE, json.dumps(argvs)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env={**os.environ, "VLLM_CONFIGURE_LOGGING": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [p["node_rank"] for p in parsed] == list(range(size))
    assert [p["headless"] for p in parsed] == [False] + [True] * (size - 1)
    assert {(p["nnodes"], p["master_addr"], p["model"], p["port"]) for p in parsed} == {
        (size, f"{name}-0.{name}.ns", _flag(args["leader"], "--model"), PORT)
    }
    world = parsed[0]["tensor_parallel_size"] * parsed[0]["pipeline_parallel_size"]
    assert world % size == 0, "vLLM: --nnodes must divide the world size (tensor x pipeline parallel)"


def test_multinode_kustomize_build():
    """`kubectl kustomize` renders the same objects; the generated ConfigMap's hashed name reaches both templates
    (kustomizeconfig.yaml: kustomize does not know where a LeaderWorkerSet names a ConfigMap)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (the Python render above still ran)")
    proc = subprocess.run([kubectl, "kustomize", str(MULTINODE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rendered = [d for d in yaml.safe_load_all(proc.stdout) if d]
    ours = _kustomize(MULTINODE)
    assert sorted((r["kind"], r["metadata"]["name"]) for r in rendered if r["kind"] != "ConfigMap") == sorted(
        (r["kind"], r["metadata"]["name"]) for r in ours if r["kind"] != "ConfigMap"
    )
    config_map = _one(rendered, "ConfigMap")
    assert re.fullmatch(r"steer-config-[a-z0-9]{10}", config_map["metadata"]["name"])
    assert config_map["data"] == _one(ours, "ConfigMap")["data"]
    lws = _lws(rendered)
    for role, template in _templates(lws).items():
        volumes = [v.get("configMap") for v in template["spec"]["volumes"]]
        assert {"name": config_map["metadata"]["name"]} in volumes, f"{role}: not the generated ConfigMap"
    assert _one(rendered, "Service")["spec"]["selector"] == _one(ours, "Service")["spec"]["selector"]
    errors = crd.errors(lws, LWS_SCHEMA) + [e for r in rendered if r is not lws for e in _validate_k8s(r)]
    assert not errors, "\n".join(errors)

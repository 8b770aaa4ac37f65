"""The Helm chart (deploy/helm/apar) rendered with Helm's own engine, and the container images' files.

Rendering and linting go through `helm-python-sdk` (Helm's Go SDK behind a C ABI: no helm binary); every
rendered manifest of a built-in kind is checked against the Kubernetes 1.30 OpenAPI schemas in strict mode
(`kubernetes-validate`). The CRD kinds it has no schema for (ServiceMonitor, PrometheusRule, ScaledObject)
are checked field by field instead.
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import helm_python as helm  # helm-python-sdk, kubernetes-validate, pyyaml: pip install -e '.[test]'
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "apar"
DOCKER = ROOT / "deploy" / "docker"
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "apar", "llm"

# Kinds kubernetes-validate has no schema for: each is checked by its own test below.
CRD_KINDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "ScaledObject": "keda.sh/v1alpha1",
}

# Every optional part on (HPA and KEDA exclude each other: KEDA gets its own "all on" set).
ALL_ON = {
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "autoscaling": {"enabled": True},
    "podDisruptionBudget": {"enabled": True},
    "networkPolicy": {"enabled": True,
                      "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]},
    "dashboard": {"enabled": True},
    "tests": {"enabled": True},
}
ALL_ON_KEDA = {**ALL_ON, "autoscaling": {"enabled": False}, "keda": {"enabled": True}}
ALL_ON_EXTERNAL = {
    **ALL_ON,
    "autoscaling": {"enabled": True, "metricType": "External"},
    "model": {"source": "pvc"},
    "redis": {"enabled": False, "external": {"url": "rediss://default@redis.example.com:6380/2",
                                            "existingSecret": "redis-auth", "passwordKey": "pw"}},
    "router": {"discovery": "kvmanager"},
    "imagePullSecrets": ["regcred"],
}

# TLS on the public APIs, mutual TLS inside, API keys, limits: everything from Secrets.
SECURE = {
    **ALL_ON,
    "tls": {"public": {"secretName": "router-tls"},
            "internal": {"secretName": "internal-tls", "caSecretName": "internal-ca", "serverName": "apar-internal"}},
    "auth": {"apiKeys": {"secretName": "api-keys", "key": "keys.txt"}},
    "router": {"limits": {"maxRequestBytes": 1048576, "maxPromptTokens": 4096, "maxTokens": 2048,
                          "maxStreamsPerKey": 16, "rateLimit": 2.5, "rateBurst": 10}},
    "redis": {"auth": {"existingSecret": "redis-auth"}},
}

# Three KV manager shards, the router finding workers through them.
SHARDED = {**ALL_ON_EXTERNAL, "kvmanager": {"shards": 3}}

MODES = {"defaults": {}, "all-on": ALL_ON, "all-on-keda": ALL_ON_KEDA, "all-on-external": ALL_ON_EXTERNAL,
         "secure": SECURE, "sharded": SHARDED}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(str(CHART)) as c:
        yield c


def render(chart, values: dict | None = None) -> list[dict]:
    """The rendered manifests (NOTES.txt left out) as dicts."""
    out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__template"] = path
                docs.append(doc)
    return docs


def strip(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "__template"}


def by_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {[d['metadata']['name'] for d in by_kind(docs, kind)]}"
    return found[0]


def container(pod_owner: dict, name: str) -> dict:
    spec = pod_owner["spec"]["template"]["spec"] if pod_owner["kind"] != "Pod" else pod_owner["spec"]
    return next(c for c in spec["containers"] if c["name"] == name)


@pytest.fixture(scope="module")
def rendered(chart):
    return {mode: render(chart, values) for mode, values in MODES.items()}


# ---------------------------------------------------------------- rendering, lint, Kubernetes schemas

def test_default_render_kinds(rendered):
    kinds = sorted(d["kind"] for d in rendered["defaults"])
    assert kinds == sorted(["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Deployment",
                            "StatefulSet", "StatefulSet", "Service", "Service", "Service", "Service", "Service", "Pod",
                            "NetworkPolicy", "NetworkPolicy", "NetworkPolicy", "NetworkPolicy", "Secret", "Secret"])


def test_all_on_render_kinds(rendered):
    kinds = {d["kind"] for d in rendered["all-on"]}
    assert {"ServiceMonitor", "PrometheusRule", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "NetworkPolicy", "ConfigMap"} <= kinds
    assert "ScaledObject" not in kinds
    assert {d["kind"] for d in rendered["all-on-keda"]} >= {"ScaledObject"}
    assert "HorizontalPodAutoscaler" not in {d["kind"] for d in rendered["all-on-keda"]}
    assert len(by_kind(rendered["all-on"], "ServiceMonitor")) == 3
    assert len(by_kind(rendered["all-on"], "PodDisruptionBudget")) == 3
    assert len(by_kind(rendered["all-on"], "NetworkPolicy")) == 4


@pytest.mark.parametrize("mode", list(MODES))
def test_manifests_valid_for_kubernetes_1_30(rendered, mode):
    checked = 0
    for doc in rendered[mode]:
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(strip(doc), KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['__template']}: {doc['kind']} {doc['metadata']['name']}: "
                        f"{'.'.join(map(str, exc.path))}: {exc.message}")
        checked += 1
    assert checked >= 13


@pytest.mark.parametrize("mode", list(MODES))
def test_names_and_labels(rendered, mode):
    for doc in rendered[mode]:
        meta = doc["metadata"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["name"]) and len(meta["name"]) <= 63
        assert meta["namespace"] == NAMESPACE
        labels = meta["labels"]
        assert labels["app.kubernetes.io/name"] == "apar"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


@pytest.mark.parametrize("mode", list(MODES))
def test_lint_strict_clean(mode):
    report = helm.lint(str(CHART), MODES[mode], strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def test_kube_version_floor(chart):
    assert chart.metadata["apiVersion"] == "v2"
    assert chart.metadata["kubeVersion"] == ">=1.27.0-0"


# ---------------------------------------------------------------- schema

@pytest.mark.parametrize("values, needle", [
    ({"router": {"replica": 2}}, "replica"),
    ({"worker": {"gpu": {"resource": "nvidia.com/gpu"}}}, "resource"),
    ({"servicemonitor": {"enabled": True}}, "servicemonitor"),
    ({"redis": {"external": {"URL": "redis://x:6379/0"}}}, "URL"),
])
def test_schema_refuses_misspelled_values(chart, values, needle):
    with pytest.raises(helm.HelmError, match=needle):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize("values", [
    {"router": {"replicas": "two"}},
    {"worker": {"gpu": {"count": 1.5}}},
    {"serviceMonitor": {"enabled": "yes"}},
    {"router": {"ports": {"grpc": 70000}}},
    {"model": {"source": "s3"}},
    {"router": {"discovery": "dns"}},
    {"kvmanager": {"shards": 0}},
    {"kvmanager": {"shards": "two"}},
    {"worker": {"tolerations": [{"key": "a", "operator": "Maybe"}]}},
])
def test_schema_refuses_wrong_types_and_values(chart, values):
    with pytest.raises(helm.HelmError):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    with pytest.raises(helm.HelmError):
        chart.validate_schema(values)


def test_schema_is_strict_at_every_object_level():
    schema = json.loads((CHART / "values.schema.json").read_text())
    passthrough = []

    def walk(node, where):
        if not isinstance(node, dict):
            return
        if node.get("type") == "object":
            if "properties" in node:
                assert node.get("additionalProperties") is False, f"{where} accepts unknown keys"
            elif isinstance(node.get("additionalProperties"), dict):
                pass  # a map (labels, nodeSelector, resources.requests): its values are typed
            else:
                passthrough.append(where)
        for key, child in node.get("properties", {}).items():
            walk(child, f"{where}.{key}")
        for key in ("items", "additionalProperties"):
            walk(node.get(key), f"{where}[{key}]")

    walk(schema, "values")
    # Only Kubernetes API objects pass through unchecked (affinity terms, env valueFrom, peers, behavior).
    assert all(re.search(r"(Affinity|valueFrom|routerFrom|metricsFrom|behavior|claims|global)", p)
               for p in passthrough), passthrough


def test_every_value_has_a_doc_comment():
    """helm-docs style: every key in values.yaml has a `# --` comment above it (continuation lines allowed)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z_][\w.-]*):", line)
        if not m or line.lstrip().startswith("-"):
            continue
        indent = len(m.group(1))
        parent = next((p for p in reversed(lines[:i]) if p.strip() and not p.strip().startswith("#")
                       and len(p) - len(p.lstrip()) < indent), "")
        if parent.lstrip().startswith("- "):
            continue  # a field of a list item (a toleration), not a value of its own
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --"):
            j -= 1
        if j < 0 or not lines[j].strip().startswith("# --"):
            missing.append(f"{i + 1}: {line.strip()}")
    assert not missing, missing


def test_default_values_match_schema(chart):
    chart.validate_schema(chart.values)
    assert chart.schema is not None


# ---------------------------------------------------------------- optional parts: on when asked, off by default

OPTIONAL = {
    "serviceMonitor": ({"serviceMonitor": {"enabled": True}}, "ServiceMonitor"),
    "prometheusRule": ({"prometheusRule": {"enabled": True}}, "PrometheusRule"),
    "autoscaling": ({"autoscaling": {"enabled": True}}, "HorizontalPodAutoscaler"),
    "keda": ({"keda": {"enabled": True}}, "ScaledObject"),
    "podDisruptionBudget": ({"podDisruptionBudget": {"enabled": True}}, "PodDisruptionBudget"),
}


@pytest.mark.parametrize("part", list(OPTIONAL))
def test_optional_part_on_and_off(chart, rendered, part):
    values, kind = OPTIONAL[part]
    assert not by_kind(rendered["defaults"], kind), f"{kind} rendered by default"
    assert by_kind(render(chart, values), kind), f"{kind} missing with {values}"
    off = {key: {**value, "enabled": False} for key, value in values.items()}
    assert not by_kind(render(chart, off), kind)


def test_dashboard_configmap_on_by_default_and_off(chart, rendered):
    cm = one(rendered["defaults"], "ConfigMap", "apar-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    files = sorted(p.name for p in (CHART / "dashboards").glob("*.json"))
    assert files and sorted(cm["data"]) == files
    for name, text in cm["data"].items():
        assert json.loads(text) == json.loads((CHART / "dashboards" / name).read_text())
    assert not by_kind(render(chart, {"dashboard": {"enabled": False}}), "ConfigMap")


def test_helm_test_pod_checks_router_health(chart, rendered):
    pod = one(rendered["defaults"], "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = "\n".join(container(pod, "health")["command"])
    assert 'host = "apar-router"' in script and '{host}:50051' in script and '{host}:8000/health' in script
    assert "HealthStub" in script and "SERVING" in script
    assert not by_kind(render(chart, {"tests": {"enabled": False}}), "Pod")


def test_autoscaling_and_keda_refuse_to_run_together(chart):
    with pytest.raises(helm.HelmError, match="enable one"):
        chart.render({"autoscaling": {"enabled": True}, "keda": {"enabled": True}}, name=RELEASE,
                     namespace=NAMESPACE)


# ---------------------------------------------------------------- workers

def test_worker_pod_spec(rendered):
    sts = one(rendered["defaults"], "StatefulSet", "apar-worker")
    spec = sts["spec"]["template"]["spec"]
    worker = container(sts, "worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in worker["volumeMounts"]
    port = next(p["containerPort"] for p in worker["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker[probe]["grpc"]["port"] == port, probe
    startup = worker["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    args = worker["args"]
    assert args[0] == "worker"
    assert "--kvmanager=apar-kvmanager:50071" in args
    assert "--served-model-name=demo" in args  # the model_name label, the router's too
    assert f"--advertise=$(POD_IP):{port}" in args and "--worker-id=$(POD_NAME)" in args
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in worker["env"] if "valueFrom" in e}
    assert env == {"POD_IP": "status.podIP", "POD_NAME": "metadata.name"}


def test_worker_headless_service_has_grpc_port(rendered):
    svc = one(rendered["defaults"], "Service", "apar-worker")
    assert svc["spec"]["clusterIP"] == "None"
    assert any(p["name"] == "grpc" and p["port"] == 50061 for p in svc["spec"]["ports"])
    sts = one(rendered["defaults"], "StatefulSet", "apar-worker")
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()


def test_worker_gpu_resource_name_configurable_and_cpu_workers(chart):
    docs = render(chart, {"worker": {"gpu": {"resourceName": "amd.com/gpu", "count": 2},
                                     "nodeSelector": {"pool": "gpu"},
                                     "affinity": {"nodeAffinity": {}}}})
    sts = one(docs, "StatefulSet", "apar-worker")
    assert container(sts, "worker")["resources"]["limits"]["amd.com/gpu"] == 2
    assert sts["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "gpu"}
    cpu = render(chart, {"worker": {"gpu": {"count": 0}, "device": "cpu"}})
    limits = container(one(cpu, "StatefulSet", "apar-worker"), "worker")["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits


@pytest.mark.parametrize("values, claim", [
    ({"model": {"source": "pvc"}}, "apar-model"),
    ({"model": {"source": "existingClaim", "existingClaim": "llama-weights"}}, "llama-weights"),
    ({}, None),
])
def test_model_sources(chart, values, claim):
    docs = render(chart, values)
    for kind, name, cname in (("StatefulSet", "apar-worker", "worker"), ("Deployment", "apar-router", "router")):
        owner = one(docs, kind, name)
        volume = next(v for v in owner["spec"]["template"]["spec"]["volumes"] if v["name"] == "model")
        inits = owner["spec"]["template"]["spec"].get("initContainers", [])
        if claim:
            assert volume["persistentVolumeClaim"]["claimName"] == claim
            assert not inits
        else:
            assert "emptyDir" in volume
            assert inits[0]["command"][:2] == ["apar", "demo-model"]
            # The router needs only the tokenizer: one training step writes the same one.
            assert ("--steps" in inits[0]["command"]) == (cname == "router")
            assert {"name": "model", "mountPath": "/models"} in inits[0]["volumeMounts"]
        assert "--model=/models/demo" in container(owner, cname)["args"]
    pvcs = by_kind(docs, "PersistentVolumeClaim")
    assert [p["metadata"]["name"] for p in pvcs] == (["apar-model"] if claim == "apar-model" else [])


def test_existing_claim_is_required(chart):
    with pytest.raises(helm.HelmError, match="existingClaim"):
        chart.render({"model": {"source": "existingClaim"}}, name=RELEASE, namespace=NAMESPACE)


# ---------------------------------------------------------------- router, RBAC

def test_router_discovery_args_and_ports(rendered):
    dep = one(rendered["defaults"], "Deployment", "apar-router")
    router = container(dep, "router")
    args = router["args"]
    assert args[0] == "router"
    for arg in ("--discovery=kubernetes", "--worker-service=apar-worker", "--worker-port-name=grpc",
                "--worker-namespace=llm", "--model=/models/demo", "--served-model-name=demo",
                "--port=50051", "--http-port=8000", "--metrics-port=9100", "--host=0.0.0.0"):
        assert arg in args
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert router[probe]["grpc"]["port"] == 50051
    svc = one(rendered["defaults"], "Service", "apar-router")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"grpc": 50051, "http": 8000}
    metrics = one(rendered["defaults"], "Service", "apar-router-metrics")  # never on the public Service
    assert metrics["spec"]["type"] == "ClusterIP" and metrics["spec"]["selector"] == svc["spec"]["selector"]
    assert {p["name"]: p["port"] for p in metrics["spec"]["ports"]} == {"metrics": 9100}


@pytest.mark.parametrize("mode", ["defaults", "all-on-external", "secure", "sharded"])
def test_container_args_parse_with_the_real_cli(rendered, mode):
    """Every apar container's args (after Kubernetes' $(VAR) expansion) are accepted by `apar`'s own parser."""
    from apar.cli import build_parser

    expand = {"$(POD_IP)": "10.1.2.3", "$(POD_NAME)": "apar-worker-0", "$(REDIS_PASSWORD)": "secret"}
    parsed = {}
    for doc in rendered[mode]:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        spec = doc["spec"]["template"]["spec"]
        for c in spec["containers"] + spec.get("initContainers", []):
            argv = c.get("args") or c.get("command", [])[1:]
            if c["image"].startswith("redis"):
                continue
            for var, value in expand.items():
                argv = [a.replace(var, value) for a in argv]
            try:
                parsed[c["name"]] = build_parser().parse_args(argv)
            except SystemExit:
                pytest.fail(f"apar refuses the {c['name']} container's args: {argv}")
    assert {"router", "worker", "kvmanager"} <= set(parsed)
    assert (parsed["router"].host, parsed["router"].port, parsed["router"].http_port) == ("0.0.0.0", 50051, 8000)
    assert parsed["worker"].advertise == "10.1.2.3:50061" and parsed["worker"].worker_id == "apar-worker-0"
    assert parsed["kvmanager"].port == 50071 and parsed["kvmanager"].redis.startswith("redis")
    if mode == "defaults":
        assert (parsed["router"].discovery, parsed["router"].worker_service) == ("kubernetes", "apar-worker")
        assert parsed["model"].command == "demo-model"
    if mode == "secure":
        r = parsed["router"]
        assert (r.tls_cert, r.api_key_file, r.rate_limit, r.max_streams_per_key) == (
            "/etc/apar/tls/public/tls.crt", "/etc/apar/auth/keys.txt", 2.5, 16)
        assert r.internal_tls_server_name == parsed["worker"].tls_server_name == "apar-internal"
        assert parsed["worker"].tls_ca == parsed["kvmanager"].tls_ca == r.internal_tls_ca


def test_rbac_objects_match(rendered):
    docs = rendered["defaults"]
    dep = one(docs, "Deployment", "apar-router")
    account = dep["spec"]["template"]["spec"]["serviceAccountName"]
    assert one(docs, "ServiceAccount")["metadata"]["name"] == account
    role = one(docs, "Role")
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}]
    binding = one(docs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]


def test_router_kvmanager_discovery_needs_no_rbac(rendered):
    docs = rendered["all-on-external"]
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    args = container(one(docs, "Deployment", "apar-router"), "router")["args"]
    assert "--kvmanager=apar-kvmanager:50071" in args and not any(a.startswith("--discovery") for a in args)


# ---------------------------------------------------------------- KV manager, Redis

def test_kvmanager_and_in_release_redis(rendered):
    docs = rendered["defaults"]
    kv = container(one(docs, "Deployment", "apar-kvmanager"), "kvmanager")
    assert "--redis=redis://apar-redis:6379/0" in kv["args"]
    assert kv["readinessProbe"]["grpc"] == {"port": 50071, "service": "apar.v1.KVManager"}
    assert kv["livenessProbe"]["grpc"] == {"port": 50071}
    redis = one(docs, "StatefulSet", "apar-redis")
    args = container(redis, "redis")["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    tag = container(redis, "redis")["image"].split(":", 1)[1]
    assert re.match(r"^\d+\.\d+\.\d+", tag)


def test_kvmanager_shards_each_own_pods_prefix_and_share_of_the_workers(rendered):
    from services.kvmanager.shards import parse_shards, shard_for

    docs = rendered["sharded"]
    names = [f"apar-kvmanager-{i}" for i in range(3)]
    deployments = [one(docs, "Deployment", n) for n in names]
    assert not [d for d in docs if d["kind"] in ("Deployment", "Service") and d["metadata"]["name"] == "apar-kvmanager"]
    prefixes = [next(a for a in container(d, "kvmanager")["args"] if a.startswith("--prefix=")) for d in deployments]
    assert prefixes == ["--prefix=apar:s0:", "--prefix=apar:s1:", "--prefix=apar:s2:"]
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in deployments]
    owners = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for name, labels in zip(names, pods):
        svc = one(docs, "Service", name)
        selector = svc["spec"]["selector"]
        assert [d["metadata"]["name"] for d in owners
                if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()] == [name]
        dep = one(docs, "Deployment", name)
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Workers and router are given every shard; the worker ids the StatefulSet gives pick all three.
    spec = ",".join(f"{n}:50071" for n in names)
    for kind, name, c in (("StatefulSet", "apar-worker", "worker"), ("Deployment", "apar-router", "router")):
        assert f"--kvmanager={spec}" in container(one(docs, kind, name), c)["args"]
    assert {shard_for(f"apar-worker-{i}", parse_shards(spec)) for i in range(16)} == {f"{n}:50071" for n in names}
    # One ServiceMonitor, one disruption budget and the Redis rule cover every shard.
    monitor = next(m for m in by_kind(docs, "ServiceMonitor") if m["metadata"]["name"] == "apar-kvmanager")
    assert all(monitor["spec"]["selector"]["matchLabels"].items() <= one(docs, "Service", n)["metadata"][
        "labels"].items() for n in names)
    pdb = next(p for p in by_kind(docs, "PodDisruptionBudget") if p["metadata"]["name"] == "apar-kvmanager")
    assert all(pdb["spec"]["selector"]["matchLabels"].items() <= labels.items() for labels in pods)
    rule = next(r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]
                if r["alert"] == "AparRedisErrors")
    job = re.search(r'job=~"([^"]+)"', rule["expr"]).group(1)
    assert all(re.fullmatch(job, n) for n in names + ["apar-kvmanager"]) and not re.fullmatch(job, "apar-worker")


def test_external_redis_password_from_secret(rendered):
    docs = rendered["all-on-external"]
    assert not [d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "apar-redis"]
    kv = container(one(docs, "Deployment", "apar-kvmanager"), "kvmanager")
    # the password reaches the KV manager in its environment, never in its args (ps, logs)
    assert "--redis=rediss://default@redis.example.com:6380/2" in kv["args"]
    assert not any("PASSWORD" in a for a in kv["args"])
    env = next(e for e in kv["env"] if e["name"] == "APAR_REDIS_PASSWORD")
    assert env["valueFrom"]["secretKeyRef"] == {"name": "redis-auth", "key": "pw"}
    assert not any("REDIS_PASSWORD" in str(d) for d in docs if d["kind"] == "Secret")


def test_in_release_redis_password(chart, rendered):
    docs = render(chart, {"redis": {"auth": {"existingSecret": "r"}}})
    kv = container(one(docs, "Deployment", "apar-kvmanager"), "kvmanager")
    assert "--redis=redis://apar-redis:6379/0" in kv["args"]
    env = next(e for e in kv["env"] if e["name"] == "APAR_REDIS_PASSWORD")
    assert env["valueFrom"]["secretKeyRef"] == {"name": "r", "key": "password"}
    sts = one(docs, "StatefulSet", "apar-redis")
    redis, init = container(sts, "redis"), sts["spec"]["template"]["spec"]["initContainers"][0]
    assert redis["args"][0] == "/etc/redis-auth/auth.conf" and "env" not in redis  # read from a file
    assert init["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "r", "key": "password"}
    assert not by_kind([d for d in docs if d["metadata"]["name"] == "apar-redis-auth"], "Secret")
    # by default the chart makes the password, kept in a Secret of its own
    secret = one(rendered["defaults"], "Secret", "apar-redis-auth")
    assert len(base64.b64decode(secret["data"]["password"])) == 64
    kv = container(one(rendered["defaults"], "Deployment", "apar-kvmanager"), "kvmanager")
    assert next(e for e in kv["env"] if e["name"] == "APAR_REDIS_PASSWORD")["valueFrom"]["secretKeyRef"] == \
        {"name": "apar-redis-auth", "key": "password"}
    off = render(chart, {"redis": {"auth": {"enabled": False}}})
    assert "initContainers" not in one(off, "StatefulSet", "apar-redis")["spec"]["template"]["spec"]
    assert not [d for d in off if d["kind"] == "Secret" and "redis" in d["metadata"]["name"]]


def test_external_redis_needs_url(chart):
    with pytest.raises(helm.HelmError, match="external.url"):
        chart.render({"redis": {"enabled": False}}, name=RELEASE, namespace=NAMESPACE)


# ---------------------------------------------------------------- security, images

@pytest.mark.parametrize("mode", list(MODES))
def test_pods_run_as_non_root_read_only_no_capabilities(rendered, mode):
    for doc in rendered[mode]:
        if doc["kind"] not in ("Deployment", "StatefulSet", "Pod"):
            continue
        spec = doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert c["imagePullPolicy"] == "IfNotPresent"
            assert not c["image"].endswith(":latest") and ":" in c["image"]
        if doc["metadata"]["labels"]["app.kubernetes.io/component"] in ("router", "worker", "kvmanager"):
            mounts = {m["mountPath"] for c in spec["containers"] for m in c["volumeMounts"]}
            assert {"/tmp", "/cache"} <= mounts


def test_images_per_component(chart):
    docs = render(chart, {"router": {"image": {"repository": "reg/apar-cpu", "tag": "1.2.3"}},
                          "worker": {"image": {"repository": "reg/apar-cuda", "tag": "1.2.4"}},
                          "imagePullSecrets": ["regcred"]})
    assert container(one(docs, "Deployment", "apar-router"), "router")["image"] == "reg/apar-cpu:1.2.3"
    assert container(one(docs, "StatefulSet", "apar-worker"), "worker")["image"] == "reg/apar-cuda:1.2.4"
    assert container(one(docs, "Deployment", "apar-kvmanager"), "kvmanager")["image"] == "apar-serve-cpu:0.1.0"
    for kind, name in (("Deployment", "apar-router"), ("StatefulSet", "apar-worker")):
        assert one(docs, kind, name)["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]


# ---------------------------------------------------------------- CRD kinds, checked by hand

def test_service_monitors(rendered):
    monitors = by_kind(rendered["all-on"], "ServiceMonitor")
    services = {s["metadata"]["name"]: s for s in by_kind(rendered["all-on"], "Service")}
    components = set()
    for sm in monitors:
        assert sm["apiVersion"] == CRD_KINDS["ServiceMonitor"]
        assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert sm["spec"]["endpoints"][0]["port"] == "metrics"
        assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        selector = sm["spec"]["selector"]["matchLabels"]
        matched = [s for s in services.values() if selector.items() <= s["metadata"]["labels"].items()
                   and any(p["name"] == "metrics" for p in s["spec"]["ports"])]
        assert len(matched) == 1
        components.add(selector["app.kubernetes.io/component"])
    assert components == {"router", "worker", "kvmanager"}


def test_prometheus_rule_alerts(rendered):
    rule = one(rendered["all-on"], "PrometheusRule")
    assert rule["apiVersion"] == CRD_KINDS["PrometheusRule"]
    rules = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"AparQueueGrowing", "AparKVCacheNearlyFull", "AparWorkerDown", "AparRedisErrors"} <= set(rules)
    assert "apar_num_requests_waiting" in rules["AparQueueGrowing"]["expr"]
    assert "apar_kv_cache_usage_perc" in rules["AparKVCacheNearlyFull"]["expr"]
    assert "> 0.95" in rules["AparKVCacheNearlyFull"]["expr"]
    assert 'job="apar-worker"' in rules["AparWorkerDown"]["expr"]
    assert "apar_redis_errors_total" in rules["AparRedisErrors"]["expr"]
    for r in rules.values():
        assert r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"]
        assert r["expr"].count("{") == r["expr"].count("}")
        assert "{{ $" in r["annotations"]["description"] or "{{" not in r["annotations"]["description"]


def test_hpa_on_waiting_requests(rendered):
    hpa = one(rendered["all-on"], "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "apar-worker"}
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "apar_num_requests_waiting"
    external = one(rendered["all-on-external"], "HorizontalPodAutoscaler")["spec"]["metrics"][0]
    assert external["type"] == "External" and external["external"]["metric"]["name"] == "apar_num_requests_waiting"
    # The autoscaler owns the replica count.
    assert "replicas" not in one(rendered["all-on"], "StatefulSet", "apar-worker")["spec"]


def test_keda_scaled_object(rendered):
    so = one(rendered["all-on-keda"], "ScaledObject")
    assert so["apiVersion"] == CRD_KINDS["ScaledObject"]
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "apar-worker"}
    trigger = so["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"].startswith("sum(apar_num_requests_waiting{")
    assert trigger["metadata"]["serverAddress"].startswith("http")
    assert isinstance(trigger["metadata"]["threshold"], str)
    assert so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]


def test_network_policies_on_by_default_exactly_the_needed_paths(chart, rendered):
    def peers(component):
        return [{"podSelector": {"matchLabels": {**release, "app.kubernetes.io/component": component}}}]

    release = {"app.kubernetes.io/name": "apar", "app.kubernetes.io/instance": RELEASE}
    monitoring = {"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}
    for mode in ("defaults", "all-on"):
        policies = {p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]: p
                    for p in by_kind(rendered[mode], "NetworkPolicy")}
        assert set(policies) == {"router", "worker", "kvmanager", "redis"}
        # the router's API ports: no `from`, reachable from anywhere
        router = policies["router"]["spec"]["ingress"]
        assert "from" not in router[0] and {p["port"] for p in router[0]["ports"]} == {50051, 8000}
        for component, port, sources in (("worker", 50061, ["router"]), ("kvmanager", 50071, ["worker", "router"])):
            rules = policies[component]["spec"]["ingress"]
            assert rules[0]["ports"] == [{"port": port, "protocol": "TCP"}]
            assert rules[0]["from"] == [peer for c in sources for peer in peers(c)]
        assert policies["redis"]["spec"]["ingress"][0]["from"] == peers("kvmanager")
        for component, port in (("router", 9100), ("worker", 9100), ("kvmanager", 9100)):
            rules = policies[component]["spec"]["ingress"]
            metrics = [r for r in rules if {"port": port, "protocol": "TCP"} in r["ports"]]
            # the metrics ports: from networkPolicy.metricsFrom only, and from nobody without it
            assert metrics == ([{"ports": [{"port": port, "protocol": "TCP"}], "from": [monitoring]}]
                               if mode == "all-on" else [])
    limited = render(chart, {"networkPolicy": {"routerFrom": [{"namespaceSelector": {}}]}})
    router = one(limited, "NetworkPolicy", "apar-router")["spec"]["ingress"][0]
    assert router["from"] == [{"namespaceSelector": {}}, *peers("test")]  # `helm test` still reaches it
    assert not by_kind(render(chart, {"networkPolicy": {"enabled": False}}), "NetworkPolicy")


def test_pod_disruption_budgets_select_their_pods(rendered):
    docs = rendered["all-on"]
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        owners = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
                  and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(owners) == 1 and pdb["spec"]["maxUnavailable"] == 1


def test_notes_say_how_to_reach_the_router(chart):
    notes = chart.render({}, name=RELEASE, namespace=NAMESPACE)["apar/templates/NOTES.txt"]
    assert "port-forward svc/apar-router 50051:50051 8000:8000" in notes
    assert "curl" in notes and "grpcurl -plaintext 127.0.0.1:50051" in notes


# ---------------------------------------------------------------- security: TLS, mutual TLS, API keys, limits

def _volumes(doc: dict) -> dict[str, dict]:
    spec = doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]
    return {v["name"]: v for v in spec.get("volumes", [])}


def _mounts(c: dict) -> dict[str, dict]:
    return {m["name"]: m for m in c.get("volumeMounts", [])}


def test_secure_router_args_mounts_and_probes(rendered):
    docs = rendered["secure"]
    dep = one(docs, "Deployment", "apar-router")
    router = container(dep, "router")
    args = router["args"]
    for arg in ("--tls-cert=/etc/apar/tls/public/tls.crt", "--tls-key=/etc/apar/tls/public/tls.key",
                "--api-key-file=/etc/apar/auth/keys.txt",
                "--internal-tls-cert=/etc/apar/tls/internal/tls.crt",
                "--internal-tls-key=/etc/apar/tls/internal/tls.key",
                "--internal-tls-ca=/etc/apar/tls/internal-ca/ca.crt", "--internal-tls-server-name=apar-internal",
                "--max-request-bytes=1048576", "--max-prompt-tokens=4096", "--max-tokens-limit=2048",
                "--max-streams-per-key=16", "--rate-limit=2.5", "--rate-burst=10"):
        assert arg in args, arg
    assert "--metrics-open" not in args
    volumes, mounts = _volumes(dep), _mounts(router)
    for name, secret, path in (("public-tls", "router-tls", "/etc/apar/tls/public"),
                               ("api-keys", "api-keys", "/etc/apar/auth"),
                               ("internal-tls", "internal-tls", "/etc/apar/tls/internal"),
                               ("internal-ca", "internal-ca", "/etc/apar/tls/internal-ca")):
        assert volumes[name]["secret"]["secretName"] == secret
        assert mounts[name]["mountPath"] == path and mounts[name]["readOnly"] is True
        assert "subPath" not in mounts[name]  # kubelet updates the files: the key file is re-read
    assert volumes["public-tls"]["secret"]["defaultMode"] == 0o440
    # gRPC probes cannot speak TLS: TCP connects on the gRPC port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert router[probe]["tcpSocket"] == {"port": 50051} and "grpc" not in router[probe], probe
    assert router["readinessProbe"]["periodSeconds"] == 5


@pytest.mark.parametrize("name, kind, component, service", [
    ("apar-worker", "StatefulSet", "worker", None),
    ("apar-kvmanager", "Deployment", "kvmanager", "apar.v1.KVManager"),
])
def test_secure_internal_services_mutual_tls_and_probes(rendered, name, kind, component, service):
    from services.healthcheck import build_parser

    doc = one(rendered["secure"], kind, name)
    c = container(doc, component)
    args = c["args"]
    assert "--tls-cert=/etc/apar/tls/internal/tls.crt" in args and "--tls-key=/etc/apar/tls/internal/tls.key" in args
    assert "--tls-ca=/etc/apar/tls/internal-ca/ca.crt" in args
    assert ("--tls-server-name=apar-internal" in args) == (component == "worker")  # the KV manager dials no one
    assert _volumes(doc)["internal-tls"]["secret"]["secretName"] == "internal-tls"
    assert _mounts(c)["internal-ca"]["mountPath"] == "/etc/apar/tls/internal-ca"
    port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["tcpSocket"] == {"port": port}, probe
    command = c["readinessProbe"]["exec"]["command"]
    assert command[:3] == ["python", "-m", "services.healthcheck"]
    check = build_parser().parse_args(command[3:])  # the probe's own flags, as the module parses them
    assert check.address == f"127.0.0.1:{port}" and check.service == (service or "")
    assert (check.tls_cert, check.tls_key, check.tls_ca, check.tls_server_name) == (
        "/etc/apar/tls/internal/tls.crt", "/etc/apar/tls/internal/tls.key", "/etc/apar/tls/internal-ca/ca.crt",
        "apar-internal")
    # the probe timing values still apply
    assert c["readinessProbe"]["periodSeconds"] == 5 and c["startupProbe"]["failureThreshold"] >= 60


def test_internal_ca_from_the_same_secret_by_default(chart):
    docs = render(chart, {"tls": {"internal": {"secretName": "internal-tls"}}})
    kv = container(one(docs, "Deployment", "apar-kvmanager"), "kvmanager")
    assert "--tls-ca=/etc/apar/tls/internal/ca.crt" in kv["args"] and "internal-ca" not in _mounts(kv)
    router = container(one(docs, "Deployment", "apar-router"), "router")
    assert "--internal-tls-ca=/etc/apar/tls/internal/ca.crt" in router["args"]
    assert "--tls-cert=/etc/apar/tls/public/tls.crt" not in router["args"]  # public TLS is its own choice
    assert router["readinessProbe"]["grpc"] == {"port": 50051}


def test_defaults_stay_plaintext_without_keys_but_share_a_cluster_token(rendered):
    docs = rendered["defaults"]
    for kind, name, component in (("Deployment", "apar-router", "router"), ("StatefulSet", "apar-worker", "worker"),
                                  ("Deployment", "apar-kvmanager", "kvmanager")):
        c = container(one(docs, kind, name), component)
        assert not any("tls" in a or "api-key" in a for a in c["args"]), c["args"]
        assert "--cluster-token-file=/etc/apar/cluster/token" in c["args"]
        assert "grpc" in c["readinessProbe"] and "/etc/apar/tls" not in str(c["volumeMounts"])
        assert {"name": "cluster-token", "mountPath": "/etc/apar/cluster", "readOnly": True} in c["volumeMounts"]
        volumes = one(docs, kind, name)["spec"]["template"]["spec"]["volumes"]
        assert {"name": "cluster-token", "secret": {"secretName": "apar-cluster-token", "defaultMode": 0o440}} in volumes
    args = container(one(docs, "Deployment", "apar-router"), "router")["args"]
    assert {"--max-request-bytes=4194304", "--max-prompt-tokens=32768", "--max-tokens-limit=16384",
            "--max-streams-per-key=256", "--rate-limit=0", "--rate-burst=0"} <= set(args)


def test_cluster_token_secret_made_by_the_chart_or_given(chart, rendered):
    secret = one(rendered["defaults"], "Secret", "apar-cluster-token")
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) == 64 and token.isalnum()
    again = one(render(chart), "Secret", "apar-cluster-token")
    assert again["data"]["token"] != secret["data"]["token"]  # random (an upgrade keeps the live one: lookup)
    given = render(chart, {"auth": {"clusterToken": {"existingSecret": "mine", "key": "t"}}})
    assert not [d for d in given if d["kind"] == "Secret" and d["metadata"]["name"] == "apar-cluster-token"]
    worker = one(given, "StatefulSet", "apar-worker")
    assert "--cluster-token-file=/etc/apar/cluster/t" in container(worker, "worker")["args"]
    assert {"name": "cluster-token", "secret": {"secretName": "mine", "defaultMode": 0o440}} in \
        worker["spec"]["template"]["spec"]["volumes"]
    off = render(chart, {"auth": {"clusterToken": {"enabled": False}}})
    assert not any("cluster-token" in str(d) for d in off if d["kind"] != "ConfigMap")


def test_api_keys_with_open_internal_services_are_refused(chart):
    keys = {"auth": {"apiKeys": {"secretName": "k"}, "clusterToken": {"enabled": False}}}
    with pytest.raises(helm.HelmError, match="internal services are open"):
        chart.render(keys, name=RELEASE, namespace=NAMESPACE, is_install=True)
    with pytest.raises(helm.HelmError, match="internal services are open"):  # a NetworkPolicy is not enough
        chart.render({**keys, "networkPolicy": {"enabled": True}}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    assert render(chart, {**keys, "tls": {"internal": {"secretName": "internal-tls"}}})
    assert render(chart, {"auth": {"apiKeys": {"secretName": "k"}}})  # the defaults: the cluster token


@pytest.mark.parametrize("mode", list(MODES))
def test_no_secret_on_any_command_line(rendered, mode):
    """No container takes a secret in its args or command: secrets come in files or the environment, and no
    arg expands an environment variable that holds one."""
    for doc in rendered[mode]:
        spec = doc.get("spec", {}).get("template", {}).get("spec") or (doc["spec"] if doc["kind"] == "Pod" else None)
        if not spec:
            continue
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            secret_vars = {e["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
            words = [str(w) for w in c.get("command", []) + c.get("args", [])]
            for word in words:
                assert not any(f"$({v})" in word for v in secret_vars), (doc["metadata"]["name"], word)
                assert not re.search(r"(?i)--requirepass|--api-key(=|$)|--redis-password(=|$)|://[^/@]*:[^/@]+@", word)
            for secret in (d for d in rendered[mode] if d["kind"] == "Secret"):
                for value in secret.get("data", {}).values():
                    assert base64.b64decode(value).decode() not in " ".join(words)


def test_network_policy_and_token_off_warn_in_notes(chart):
    def notes(values):
        out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        return next(text for path, text in out.items() if path.endswith("NOTES.txt"))

    text = notes({"networkPolicy": {"enabled": False}, "auth": {"clusterToken": {"enabled": False}},
                  "redis": {"auth": {"enabled": False}}})
    assert "WARNING" in text and "networkPolicy is off" in text and "auth.clusterToken is off" in text
    assert "Redis has no password" in text
    assert "networkPolicy is off" not in notes({}) and "auth.clusterToken is off" not in notes({})
    assert "keep Prometheus away" in notes({"serviceMonitor": {"enabled": True}})


def test_metrics_open_flag(chart):
    docs = render(chart, {"auth": {"apiKeys": {"secretName": "k"}, "metricsOpen": True}})
    assert "--metrics-open" in container(one(docs, "Deployment", "apar-router"), "router")["args"]


def test_secure_helm_test_pod_uses_tls_and_a_key(rendered):
    pod = one(rendered["secure"], "Pod")
    script = "\n".join(container(pod, "health")["command"])
    assert "grpc.secure_channel" in script and "https" in script and "Authorization" in script
    assert "/etc/apar/auth/keys.txt" in script and "HealthStub" in script
    volumes = _volumes(pod)
    items = {i["key"] for i in volumes["public-tls"]["secret"]["items"]}
    assert items == {"tls.crt", "ca.crt"}  # never the private key
    assert volumes["api-keys"]["secret"]["secretName"] == "api-keys"
    plain = "\n".join(container(one(rendered["defaults"], "Pod"), "health")["command"])
    assert "grpc.insecure_channel" in plain and "Authorization" not in plain


def test_secure_notes(chart):
    notes = chart.render(SECURE, name=RELEASE, namespace=NAMESPACE)["apar/templates/NOTES.txt"]
    assert "grpcurl -cacert CA.pem" in notes and "https://127.0.0.1:8000" in notes
    assert 'Authorization: Bearer $APAR_API_KEY' in notes and "-plaintext" not in notes


@pytest.mark.parametrize("values, needle", [
    ({"tls": {"public": {"secret": "x"}}}, "secret"),
    ({"tls": {"internal": {"ca": "x"}}}, "ca"),
    ({"auth": {"apiKey": "x"}}, "apiKey"),
    ({"router": {"limits": {"rps": 3}}}, "rps"),
])
def test_schema_refuses_misspelled_security_values(chart, values, needle):
    with pytest.raises(helm.HelmError, match=needle):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize("values", [
    {"router": {"limits": {"maxRequestBytes": 0}}},
    {"router": {"limits": {"rateLimit": -1}}},
    {"router": {"limits": {"maxStreamsPerKey": 1.5}}},
    {"tls": {"internal": {"serverName": "Not A Name"}}},
    {"auth": {"metricsOpen": "yes"}},
])
def test_schema_refuses_wrong_security_values(chart, values):
    with pytest.raises(helm.HelmError):
        chart.validate_schema(values)


# ---------------------------------------------------------------- Dockerfiles

def _from_lines(dockerfile: Path) -> list[str]:
    text = dockerfile.read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text.split("\nFROM ", 1)[0], re.MULTILINE))
    images = []
    for line in re.findall(r"^FROM\s+(.+)$", text, re.MULTILINE):
        image = line.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        images.append(image)
    return images


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_pinned_non_root(name):
    dockerfile = DOCKER / name
    text = dockerfile.read_text()
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\w+)", text, re.MULTILINE | re.IGNORECASE))
    external = [i for i in _from_lines(dockerfile) if i not in stages]
    assert external, "no base image"
    for image in external:
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", image
        assert re.match(r"^\d+\.\d+\.\d+", tag), f"{image}: not an exact version"
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] == "10001"
    assert re.search(r'^ENTRYPOINT \["apar"\]', text, re.MULTILINE)
    assert re.search(r"^ENV .*APAR_DATA=/app/data/alpaca_eval", text, re.MULTILINE | re.DOTALL)
    assert "torch==${TORCH_VERSION}" in text and re.search(r"^ARG TORCH_VERSION=\d+\.\d+\.\d+$", text, re.MULTILINE)
    assert "COPY data ./data" in text and "COPY proto ./proto" in text


def test_dockerignore():
    entries = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", "models", "bench-results", "**/__pycache__", "*.egg-info", ".pytest_cache", "*.whl"} <= entries
    assert not {"data", "data/", "proto", "apar", "services"} & entries


def test_redis_reads_its_password_from_the_file_the_init_container_writes(rendered, tmp_path):
    """The init container's script, run here with a password full of quoting traps; redis-server started
    with the container's args then takes that password, and it shows on no command line."""
    import shutil
    import subprocess

    import redis as redis_py

    from tests.faults import wait_until
    from tests.procs import free_port

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    sts = one(rendered["defaults"], "StatefulSet", "apar-redis")
    init = sts["spec"]["template"]["spec"]["initContainers"][0]
    script = init["command"][2].replace("/etc/redis-auth", str(tmp_path))
    password = 'p "w\\ord $HOME `x` \'q\' \\\\ end'
    subprocess.run(["sh", "-c", script], env={"REDIS_PASSWORD": password, "PATH": "/usr/bin:/bin"}, check=True)
    assert oct((tmp_path / "auth.conf").stat().st_mode & 0o777) == "0o600"
    args = [a.replace("/etc/redis-auth", str(tmp_path)) for a in container(sts, "redis")["args"]]
    port = free_port()
    args[args.index("--port") + 1], args[args.index("--dir") + 1] = str(port), str(tmp_path)
    proc = subprocess.Popen(["redis-server", *args, "--bind", "127.0.0.1", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis_py.Redis(host="127.0.0.1", port=port, password=password, socket_connect_timeout=0.5)
        assert wait_until(lambda: client.ping(), 10, "redis-server with the password", ignore=(redis_py.RedisError,))
        with pytest.raises(redis_py.AuthenticationError):
            redis_py.Redis(host="127.0.0.1", port=port, password="wrong").ping()
        assert "w\\ord" not in " ".join(args) + Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        client.close()
    finally:
        proc.kill()
        proc.wait(timeout=10)

"""The Helm chart's components: worker pods, the router and its RBAC, the KV manager and Redis, and the
CRD kinds with no Kubernetes schema (ServiceMonitor, PrometheusRule, ScaledObject) checked field by field."""
from __future__ import annotations

import base64
import re

import helm_python as helm  # helm-python-sdk, kubernetes-validate, pyyaml: pip install -e '.[test]'
import pytest

from tests.helm_render import (CRD_KINDS, NAMESPACE, RELEASE, by_kind, chart, container, one,
                               render, rendered)  # noqa: F401 (fixtures)


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


@pytest.mark.parametrize("mode", ["defaults", "all-on-external", "secure", "secure-roles", "sharded"])
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

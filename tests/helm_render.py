"""The Helm chart (deploy/helm/apar) rendered with Helm's own engine, and the container images' files.

Rendering and linting go through `helm-python-sdk` (Helm's Go SDK behind a C ABI: no helm binary); every
rendered manifest of a built-in kind is checked against the Kubernetes 1.30 OpenAPI schemas in strict mode
(`kubernetes-validate`). The CRD kinds it has no schema for (ServiceMonitor, PrometheusRule, ScaledObject)
are checked field by field instead.
"""
from __future__ import annotations

from pathlib import Path

import helm_python as helm  # helm-python-sdk, kubernetes-validate, pyyaml: pip install -e '.[test]'
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

# Mutual TLS with a certificate per role, the router finding workers through the KV manager.
SECURE_ROLES = {**SECURE, "router": {**SECURE["router"], "discovery": "kvmanager"},
                "tls": {"public": {"secretName": "router-tls"},
                        "internal": {"roles": {"router": {"secretName": "router-internal-tls"},
                                               "worker": {"secretName": "worker-internal-tls"},
                                               "kvmanager": {"secretName": "kvmanager-internal-tls"}}}}}

# Three KV manager shards, the router finding workers through them.
SHARDED = {**ALL_ON_EXTERNAL, "kvmanager": {"shards": 3}}

MODES = {"defaults": {}, "all-on": ALL_ON, "all-on-keda": ALL_ON_KEDA, "all-on-external": ALL_ON_EXTERNAL,
         "secure": SECURE, "secure-roles": SECURE_ROLES, "sharded": SHARDED}


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

"""The Helm chart (deploy/helm/apar) rendered with Helm's own engine: the kinds each mode renders, the
Kubernetes 1.30 schemas, lint, the values schema, and the optional parts on and off (tests/helm_render.py
says how it renders)."""
from __future__ import annotations

import json
import re

import helm_python as helm  # helm-python-sdk, kubernetes-validate, pyyaml: pip install -e '.[test]'
import kubernetes_validate
import pytest

from tests.helm_render import (CHART, CRD_KINDS, KUBE_VERSION, MODES, NAMESPACE, RELEASE, by_kind,
                               chart, container, one, render, rendered, strip)  # noqa: F401 (fixtures)


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

"""The Helm chart locked down: non-root pods and pinned images, TLS and mutual TLS, API keys, the
cluster token, limits, and no secret on any command line."""
from __future__ import annotations

import base64
import re
from pathlib import Path

import helm_python as helm  # helm-python-sdk, kubernetes-validate, pyyaml: pip install -e '.[test]'
import pytest

from tests.helm_render import (DOCKER, MODES, NAMESPACE, RELEASE, ROOT, SECURE, chart, container,
                               one, render, rendered)  # noqa: F401 (fixtures)


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
    import subprocess

    import redis as redis_py

    from tests.faults import wait_until
    from tests.procs import free_port, require

    require("redis-server")  # fails, never skips, without it
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

"""The chart's internal mutual TLS with a certificate per role (tls.internal.roles): each service mounts its
own Secret and gets the flags that make it answer only its callers' role and dial only the role it
expects (services/peer_names.py); half a setup is refused. Rendered offline (tests/helm_render.py)."""
from __future__ import annotations

import helm_python as helm  # helm-python-sdk, kubernetes-validate, pyyaml: pip install -e '.[test]'
import pytest

from tests.helm_render import NAMESPACE, RELEASE, chart, container, one, render  # noqa: F401 (fixtures)

ROLES = {"router": {"secretName": "router-tls"}, "worker": {"secretName": "worker-tls"},
         "kvmanager": {"secretName": "kvmanager-tls"}}
KEYS = {"apiKeys": {"secretName": "api-keys"}}
PODS = (("Deployment", "apar-router", "router"), ("StatefulSet", "apar-worker", "worker"),
        ("Deployment", "apar-kvmanager", "kvmanager"))


def _flag(args: list[str], name: str) -> str | None:
    return next((a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")), None)


def _parsed(argv: list[str]):
    from apar.cli import build_parser

    return build_parser().parse_args([a.replace("$(POD_IP)", "10.1.2.3").replace("$(POD_NAME)", "w-0")
                                      for a in argv])


@pytest.mark.parametrize("discovery", ["kvmanager", "kubernetes"])
def test_a_certificate_per_role_checks_every_callers_role(chart, discovery):
    docs = render(chart, {"tls": {"internal": {"roles": ROLES}}, "router": {"discovery": discovery}})
    for kind, name, component in PODS:
        doc = one(docs, kind, name)
        c = container(doc, component)
        volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
        assert volumes["internal-tls"]["secret"]["secretName"] == f"{component}-tls"  # its own certificate
        prefix = "--internal-tls" if component == "router" else "--tls"
        assert _flag(c["args"], f"{prefix}-cert") == "/etc/apar/tls/internal/tls.crt"
        assert _flag(c["args"], f"{prefix}-ca") == "/etc/apar/tls/internal/ca.crt"
        args = _parsed(c["args"])  # the real CLI takes them
        if component == "router":
            assert args.internal_tls_server_name == "apar-worker"  # it dials workers only
            assert args.internal_tls_kvmanager_name == ("apar-kvmanager" if discovery == "kvmanager" else None)
        elif component == "worker":
            assert (args.tls_server_name, args.tls_peer_names) == ("apar-kvmanager", "apar-router")
        else:
            assert args.tls_peer_names == "apar-worker,apar-router"
        if component != "router":  # the readiness check: its own certificate, checking its own name
            from services.healthcheck import build_parser

            check = build_parser().parse_args(c["readinessProbe"]["exec"]["command"][3:])
            assert check.tls_server_name == f"apar-{component}"
            assert c["livenessProbe"]["tcpSocket"]
    # with roles the API keys need no cluster token (the certificates authenticate every call)
    assert render(chart, {"tls": {"internal": {"roles": ROLES}}, "auth": {**KEYS, "clusterToken": {"enabled": False}}})


def test_one_shared_certificate_keeps_its_flags(chart):
    docs = render(chart, {"tls": {"internal": {"secretName": "internal-tls"}}, "router": {"discovery": "kvmanager"}})
    for kind, name, component in PODS:
        args = container(one(docs, kind, name), component)["args"]
        assert not any("peer-names" in a or "kvmanager-name" in a for a in args), args
    router = container(one(docs, "Deployment", "apar-router"), "router")["args"]
    worker = container(one(docs, "StatefulSet", "apar-worker"), "worker")["args"]
    assert _flag(router, "--internal-tls-server-name") == _flag(worker, "--tls-server-name") == "apar-internal"


@pytest.mark.parametrize("internal, needle", [
    ({"roles": {"router": {"secretName": "r"}, "worker": {"secretName": "w"}}}, "every role"),
    ({"roles": {"kvmanager": {"secretName": "k"}}}, "every role"),
    ({"secretName": "shared", "roles": ROLES}, "not both"),
    ({"roles": {**ROLES, "worker": {"secretName": "w", "name": "apar-router"}}}, "its own name"),
])
def test_half_a_role_setup_is_refused(chart, internal, needle):
    with pytest.raises(helm.HelmError, match=needle):
        chart.render({"tls": {"internal": internal}}, name=RELEASE, namespace=NAMESPACE, is_install=True)


def test_keys_without_any_internal_protection_are_refused_and_open_parts_are_named(chart):
    with pytest.raises(helm.HelmError, match="internal services are open"):
        chart.render({"auth": {**KEYS, "clusterToken": {"enabled": False}}}, name=RELEASE, namespace=NAMESPACE,
                     is_install=True)
    notes = chart.render({"tls": {"internal": {"roles": ROLES}}}, name=RELEASE, namespace=NAMESPACE,
                         is_install=True)
    text = next(v for k, v in notes.items() if k.endswith("NOTES.txt"))
    assert "tls.internal is off" not in text and "one certificate for every" not in text  # roles: internal TLS
    shared = chart.render({"tls": {"internal": {"secretName": "internal-tls"}}}, name=RELEASE,
                          namespace=NAMESPACE, is_install=True)
    assert "can act as any of them" in next(v for k, v in shared.items() if k.endswith("NOTES.txt"))
    text = next(v for k, v in chart.render({}, name=RELEASE, namespace=NAMESPACE, is_install=True).items()
                if k.endswith("NOTES.txt"))
    assert "tls.internal is off" in text and "auth.apiKeys is off" in text


def test_open_internal_services_are_said_so_on_their_command_lines(chart):
    """The services refuse to listen beyond loopback open (services/cluster_auth.py): a release with the
    cluster token off and no internal TLS (allowed without API keys, warned in NOTES) says so explicitly."""
    for values, expected in (({}, False), ({"auth": {"clusterToken": {"enabled": False}}}, True),
                             ({"auth": {"clusterToken": {"enabled": False}},
                               "tls": {"internal": {"secretName": "internal-tls"}}}, False),
                             ({"auth": {"clusterToken": {"enabled": False}}, "tls": {"internal": {"roles": ROLES}}},
                              False)):
        docs = render(chart, values)
        for kind, name, component in PODS:
            args = container(one(docs, kind, name), component)["args"]
            assert ("--allow-open-internal" in args) == expected, (values, component)

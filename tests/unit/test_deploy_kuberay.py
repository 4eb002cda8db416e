"""The KubeRay manifests under deploy/kuberay (issue 6) and their security properties (issue 7).

Static checks only: no network, no Kubernetes, no Ray cluster.
"""

from __future__ import annotations

import json
import os
import re
import shlex

import pytest
import yaml

from tests.support import (
    BASH, GATEWAY_PORT, KUBERAY, METRICS_PORT, NEURON_CORES, RAY_INTERNAL_PORTS, bash_syntax_ok, container_env,
)


@pytest.fixture(scope="module")
def kuberay_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(KUBERAY.read_text()) if d is not None]


@pytest.fixture(scope="module")
def raycluster(kuberay_docs) -> dict:
    (rc,) = [d for d in kuberay_docs if d["kind"] == "RayCluster"]
    return rc


def test_kuberay_documents(kuberay_docs):
    kinds = sorted(d["kind"] for d in kuberay_docs)
    assert kinds.count("RayCluster") == 1
    assert kinds.count("Service") >= 2
    # No secret values in the manifests: Secrets are created separately and only referenced.
    assert "Secret" not in kinds
    for doc in kuberay_docs:
        assert doc["apiVersion"] and doc["metadata"]["name"]


def test_raycluster_head(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1"
    head = raycluster["spec"]["headGroupSpec"]
    params = head["rayStartParams"]
    assert all(isinstance(v, str) for v in params.values())
    assert params["dashboard-host"] in ("$(MY_POD_IP)", "$MY_POD_IP")
    (container,) = head["template"]["spec"]["containers"]
    env = container_env(container)
    assert env["MY_POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    ports = {p["containerPort"] for p in container["ports"]}
    assert {GATEWAY_PORT, METRICS_PORT} <= ports
    # KubeRay's default head probes query localhost:8265, which a Pod-IP-bound dashboard does not serve.
    assert container["readinessProbe"]["httpGet"]["port"] == 8265
    assert container["livenessProbe"]


def _assert_token_auth(container_or_options: dict, where: str) -> None:
    env = container_env(container_or_options)
    assert env["RAY_AUTH_MODE"]["value"] == "token", where
    token = env["RAY_AUTH_TOKEN"]
    assert "value" not in token, f"{where}: token value inline"
    ref = token["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"], where


def test_raycluster_token_auth_everywhere(raycluster):
    spec = raycluster["spec"]
    (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
    _assert_token_auth(head, "head")
    secret_names = {container_env(head)["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]}
    for group in spec["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        _assert_token_auth(container, group["groupName"])
        secret_names.add(container_env(container)["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"])
    if spec.get("enableInTreeAutoscaling"):
        _assert_token_auth(spec["autoscalerOptions"], "autoscaler")
        secret_names.add(container_env(spec["autoscalerOptions"])["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"])
    assert len(secret_names) == 1, "every Ray process must use the same token"


def _rayparam_resources(value: str) -> dict:
    """The `resources` rayStartParam as `ray start` sees it after the shell has processed it."""
    (word,) = shlex.split(value)
    return json.loads(word)


def test_raycluster_workers_request_and_advertise_neuron_cores(raycluster):
    groups = raycluster["spec"]["workerGroupSpecs"]
    seen_instances = set()
    for group in groups:
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        limits = container["resources"]["limits"]
        cores = int(limits["aws.amazon.com/neuroncore"])
        assert cores > 0
        assert int(container["resources"]["requests"]["aws.amazon.com/neuroncore"]) == cores
        advertised = _rayparam_resources(group["rayStartParams"]["resources"])
        assert advertised == {"neuron_cores": cores}, group["groupName"]
        instance = spec["nodeSelector"]["node.kubernetes.io/instance-type"]
        assert NEURON_CORES[instance] == cores, group["groupName"]
        seen_instances.add(instance)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert seen_instances == set(NEURON_CORES)


def test_raycluster_head_starts_gateway(raycluster):
    (container,) = raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert "command" not in container, "KubeRay prepends `args` to its generated start command; keep command unset"
    (script,) = container["args"]
    # KubeRay generates no `ray start` at all when the user's command mentions it.
    assert not re.search(r"ray\s+start", script)
    assert "tpcluster serve" in script
    serve = shlex.split(script.split("tpcluster serve", 1)[1].split(";", 1)[0])
    opts = dict(zip(serve[::2], serve[1::2]))
    assert opts["--address"] == "auto"
    assert opts["--host"] == "0.0.0.0"
    assert opts["--port"] == str(GATEWAY_PORT)
    assert opts["--metrics-port"] == str(METRICS_PORT)
    assert opts["--auth-token-file"] and opts["--tls-cert"] and opts["--tls-key"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for flag in ("--auth-token-file", "--tls-cert", "--tls-key"):
        assert os.path.dirname(opts[flag]) in mounts, flag
    volumes = {v["name"]: v for v in raycluster["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]}
    assert all("secretName" in volumes[n]["secret"] for n in ("gateway-auth", "gateway-tls"))


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_raycluster_head_command_as_kuberay_builds_it_is_valid_bash(raycluster):
    head = raycluster["spec"]["headGroupSpec"]
    (container,) = head["template"]["spec"]["containers"]
    params = dict(head["rayStartParams"], block="true")
    flags = " ".join(f"--{k}" if v.lower() == "true" else f"--{k}={v}" for k, v in sorted(params.items()))
    # KubeRay: "<user args> && ulimit -n 65536; ray start --head <flags>", run by /bin/bash -lc.
    full = f" {container['args'][0]}  && ulimit -n 65536; ray start --head {flags}"
    ok, err = bash_syntax_ok(full)
    assert ok, err


def test_services_expose_only_the_gateway(kuberay_docs):
    services = {d["metadata"]["name"]: d["spec"] for d in kuberay_docs if d["kind"] == "Service"}
    external = {n: s for n, s in services.items() if s.get("type") in ("LoadBalancer", "NodePort")}
    assert len(external) == 1
    (gateway,) = external.values()
    assert gateway["type"] == "LoadBalancer"
    ports = {p["port"] for p in gateway["ports"]} | {p.get("targetPort") for p in gateway["ports"]}
    assert ports == {GATEWAY_PORT}
    assert gateway["selector"]["ray.io/node-type"] == "head"

    metrics = [s for s in services.values() if any(p["port"] == METRICS_PORT for p in s["ports"])]
    assert len(metrics) == 1 and metrics[0].get("type", "ClusterIP") == "ClusterIP"
    for spec in services.values():
        assert not {p["port"] for p in spec["ports"]} & RAY_INTERNAL_PORTS


def test_raycluster_head_service_stays_internal(raycluster):
    assert raycluster["spec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"


def test_network_policy_keeps_ray_ports_in_cluster(kuberay_docs, raycluster):
    policies = [d for d in kuberay_docs if d["kind"] == "NetworkPolicy"]
    assert len(policies) == 1
    spec = policies[0]["spec"]
    assert spec["podSelector"]["matchLabels"]["ray.io/cluster"] == raycluster["metadata"]["name"]
    for rule in spec["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        sources = rule.get("from")
        if not ports:
            # All ports: only from this RayCluster's own Pods.
            assert sources and all(
                s.get("podSelector", {}).get("matchLabels", {}).get("ray.io/cluster") == raycluster["metadata"]["name"]
                for s in sources
            ), rule
        else:
            assert not ports & RAY_INTERNAL_PORTS, rule
            assert ports <= {GATEWAY_PORT, METRICS_PORT}, rule

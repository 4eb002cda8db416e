"""The deployment files under deploy/ (issue 6) and their security properties (issue 7).

Static checks only: no network, no Ray cluster, no Docker. The launcher config is validated against the JSON
schema that the installed Ray ships (ray/autoscaler/ray-schema.json) and through Ray's own prepare_config /
validate_config, which is what `ray up` runs before it talks to AWS.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex

import pytest
import yaml

from tests.support import (
    BASH, DEPLOY, DOCKERFILE, EXPECTED_WORKER_TYPES, FORBIDDEN, GATEWAY_PORT, KUBERAY, LAUNCHER, METRICS_PORT,
    NEURON_CONSTRAINTS, NEURON_CORES, RAY_INTERNAL_PORTS, README, REPO_ROOT, bash_syntax_ok, yaml_files,
)


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


# --------------------------------------------------------------------------------------------- every file


def test_deploy_has_the_expected_files():
    for path in (LAUNCHER, KUBERAY, DOCKERFILE, README):
        assert path.is_file(), path
        assert path.stat().st_size > 0, path


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_files_parse(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} has no YAML document"
    assert all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize(
    "path", [*yaml_files(), DOCKERFILE], ids=lambda p: str(p.relative_to(DEPLOY))
)
def test_no_auth_disabled_and_no_public_dashboard(path):
    text = path.read_text()
    for pattern in FORBIDDEN:
        assert not pattern.search(text), f"{path}: {pattern.pattern}"


def test_readme_covers_up_check_submit_down_and_security():
    text = README.read_text()
    for needle in (
        "ray up deploy/aws/cluster.yaml",
        "ray down deploy/aws/cluster.yaml",
        "kubectl apply -f deploy/kuberay/",
        "kubectl delete -f deploy/kuberay/",
        "ray status",
        "tpcluster status --target",
        "tpcluster health --target",
        "tpcluster submit --model",
        "--auth-token-file",
        "--tls-cert",
        "--tls-key",
    ):
        assert needle in text, needle
    for port in (GATEWAY_PORT, METRICS_PORT, *RAY_INTERNAL_PORTS):
        assert str(port) in text


# --------------------------------------------------------------------------------------------- Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and line continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return out


def test_dockerfile_structure():
    instructions = _dockerfile_instructions()
    names = [name for name, _ in instructions]
    assert names[0] in ("FROM", "ARG"), names[0]
    assert "FROM" in names
    froms = [args for name, args in instructions if name == "FROM"]
    assert froms == ["ubuntu:22.04"] or all("neuron" in f for f in froms), froms

    exposed = {int(p.split("/")[0]) for name, args in instructions if name == "EXPOSE" for p in args.split()}
    assert GATEWAY_PORT in exposed and METRICS_PORT in exposed
    assert not exposed & RAY_INTERNAL_PORTS, exposed

    users = [args for name, args in instructions if name == "USER"]
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in ("root", "0")

    runs = " ".join(args for name, args in instructions if name == "RUN")
    assert "python3.11" in runs
    assert "aws-neuronx-runtime-lib" in runs and "aws-neuronx-collectives" in runs
    assert "https://pip.repos.neuron.amazonaws.com" in runs
    assert "torch-neuronx" in runs and "neuronx-cc" in runs
    assert '"ray[default]==2.60.*"' in runs
    assert "pip install -c /opt/neuron-constraints.txt /opt/tpcluster" in runs
    # The package is installed after the Neuron/Ray layers.
    run_list = [args for name, args in instructions if name == "RUN"]
    idx = {
        key: next(i for i, r in enumerate(run_list) if key in r)
        for key in ("torch-neuronx", "ray[default]", "/opt/tpcluster")
    }
    assert idx["torch-neuronx"] <= idx["ray[default]"] < idx["/opt/tpcluster"]


# --------------------------------------------------------------------------------------------- Neuron SDK's torch


def _constraints() -> dict[str, str]:
    """deploy/neuron-constraints.txt as {name: specifier}."""
    from packaging.requirements import Requirement

    reqs = [Requirement(line.split("#")[0]) for line in NEURON_CONSTRAINTS.read_text().splitlines()
            if line.split("#")[0].strip()]
    return {r.name.lower(): str(r.specifier) for r in reqs}


def _pyproject_torch():
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch,) = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    return torch.specifier


def test_neuron_constraints_pin_the_sdks_pytorch_xla_release():
    # torch-neuronx 2.9.0.2.15.32035 (PyTorch/XLA, inf2/trn1) with neuronx-cc 2.26.6360.0 (Neuron 2.31, the last
    # release shipping it; "PyTorch NeuronX 2.9.0.2.15.32035" in Neuron 2.33's component release notes). Unpinned,
    # `pip install torch-neuronx` may resolve to TorchNeuron (2.13.3.0 / 2.14.3.0: trn2/trn3 only) since 2.33.
    pins = _constraints()
    assert pins["torch-neuronx"] == "==2.9.0.2.15.32035"
    assert pins["neuronx-cc"] == "==2.26.6360.0"
    assert pins["torch"] == "==2.9.*" and pins["torch-xla"] == "==2.9.*"
    text = NEURON_CONSTRAINTS.read_text()
    assert "release-notes" in text and "readthedocs" in text  # the versions' sources are cited


def test_pyproject_torch_admits_the_sdks_torch_and_this_machines_cpu_build():
    spec = _pyproject_torch()
    for version in ("2.9.0", "2.9.1"):  # the Neuron SDK's torch for the xla path (torch-neuronx 2.9.*)
        assert spec.contains(version), (str(spec), version)
    assert spec.contains("2.13.0") and spec.contains("2.13.0+cpu", prereleases=False)  # Quick start, TorchNeuron 2.13
    # Nothing from 2.14 on: on the developers' machines the highest admitted release must be the CPU 2.13 build on
    # disk, not a multi-GB CUDA wheel.
    assert not spec.contains("2.14.0") and not spec.contains("2.14.1") and not spec.contains("2.15.0")
    # The constraints' torch and pyproject's range meet: installing tpcluster keeps the SDK's torch.
    constraint = _constraints()["torch"]
    assert constraint.startswith("==2.9.") and spec.contains(constraint.removeprefix("==").replace("*", "0"))


def _pip_installs(commands: list[str]) -> list[str]:
    return [c for c in commands if re.search(r"\bpip install\b", c) and not re.search(r"pip install -U pip\b", c)]


def test_dockerfile_never_lets_pip_replace_the_sdks_torch():
    instructions = _dockerfile_instructions()
    copy = next(i for i, (name, args) in enumerate(instructions)
                if name == "COPY" and args.split()[:1] == ["deploy/neuron-constraints.txt"])
    assert instructions[copy][1].split()[-1] == "/opt/neuron-constraints.txt"
    runs = [(i, args) for i, (name, args) in enumerate(instructions) if name == "RUN"]
    installs = [(i, part) for i, args in runs for part in args.split("&&") if part in _pip_installs([part])]
    assert installs, "no pip install in the Dockerfile"
    for i, part in installs:
        assert i > copy, f"pip install before the constraints file is in the image: {part}"
        assert "-c /opt/neuron-constraints.txt" in part, f"pip install without the SDK's constraints: {part}"
        assert not re.search(r"\s(-U|--upgrade|--force-reinstall|--no-deps)\b", part), part
    sdk = next(part for _, part in installs if "torch-neuronx" in part)
    assert "--extra-index-url=https://pip.repos.neuron.amazonaws.com" in sdk and "neuronx-cc" in sdk
    # and the build checks the result
    last = " ".join(args for _, args in runs if "/opt/tpcluster" in args)
    assert "v('torch').startswith('2.9.')" in last


def test_launcher_never_lets_pip_replace_the_sdks_torch(launcher):
    src = next(remote for remote, local in launcher["file_mounts"].items() if local == ".")
    installs = _pip_installs(launcher["setup_commands"])
    assert len(installs) >= 3
    for command in installs:
        assert f"-c {src}/deploy/neuron-constraints.txt" in command, command
        assert not re.search(r"\s(-U|--upgrade|--force-reinstall|--no-deps)\b", command), command


def test_dockerfile_copies_no_secrets_and_not_the_whole_context():
    instructions = _dockerfile_instructions()
    copies = [args for name, args in instructions if name in ("COPY", "ADD")]
    assert copies
    for args in copies:
        sources = args.split()[:-1]
        assert "." not in sources and "./" not in sources, f"COPY of the whole build context: {args}"
        assert not any(s.startswith((".venv", ".git", "~", "/")) for s in sources), args
    for name, args in instructions:
        if name in ("ENV", "ARG"):
            assert not re.search(r"TOKEN|SECRET|PASSWORD|KEY", args, re.I), f"{name} {args}"


# --------------------------------------------------------------------------------------------- ray up config


def _ray_schema() -> dict:
    import ray

    path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    assert os.path.isfile(path), path
    with open(path) as f:
        return json.load(f)


def test_launcher_validates_against_rays_shipped_schema(launcher):
    jsonschema = pytest.importorskip("jsonschema")
    schema = _ray_schema()
    jsonschema.validate(launcher, schema)  # raises ValidationError with the offending path


def test_launcher_passes_rays_own_prepare_and_validate(launcher):
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(launcher))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    assert prepared["provider"]["type"] == "aws"


def test_launcher_provider_and_auth(launcher):
    provider = launcher["provider"]
    assert provider["type"] == "aws"
    assert provider["region"] == "us-east-1"
    assert provider["availability_zone"].startswith("us-east-1")
    assert provider["cache_stopped_nodes"] is False
    assert launcher["auth"]["ssh_user"] == "ubuntu"
    assert launcher["cluster_name"]


def test_launcher_security_group_opens_only_the_gateway(launcher):
    rules = launcher["provider"]["security_group"]["IpPermissions"]
    opened = set()
    for rule in rules:
        assert rule["IpProtocol"] == "tcp"
        opened |= set(range(rule["FromPort"], rule["ToPort"] + 1))
    assert opened == {GATEWAY_PORT}
    assert not opened & RAY_INTERNAL_PORTS


def test_launcher_node_types_and_neuron_cores(launcher):
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert "neuron_cores" not in head["resources"]
    assert head["resources"].get("CPU", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(("inf", "trn"))

    workers = {name: t for name, t in types.items() if name != launcher["head_node_type"]}
    assert set(workers) == set(EXPECTED_WORKER_TYPES)
    for name, node_type in workers.items():
        instance = node_type["node_config"]["InstanceType"]
        assert instance == EXPECTED_WORKER_TYPES[name]
        assert node_type["resources"]["neuron_cores"] == NEURON_CORES[instance], name
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= launcher["max_workers"]
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= launcher["max_workers"]
    for node_type in types.values():
        assert node_type["node_config"]["ImageId"].startswith("ami-")


def test_launcher_setup_installs_neuron_ray_and_tpcluster(launcher):
    setup = "\n".join(launcher["setup_commands"])
    assert "apt.repos.neuron.amazonaws.com" in setup
    assert "aws-neuronx-runtime-lib" in setup and "aws-neuronx-collectives" in setup
    assert "--extra-index-url=https://pip.repos.neuron.amazonaws.com" in setup
    assert "torch-neuronx" in setup and "neuronx-cc" in setup
    assert '"ray[default]==2.60.*"' in setup
    assert "python3.11" in setup
    src = [remote for remote, local in launcher["file_mounts"].items() if local == "."]
    assert src and any(f"pip install -c {remote}/deploy/neuron-constraints.txt {remote}" in setup for remote in src)


def _ray_start_commands(commands: list[str]) -> list[str]:
    return [c for c in commands if re.search(r"\bray start\b", c)]


def test_launcher_keeps_token_auth_on(launcher):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = _ray_start_commands(launcher[key])
        assert len(starts) == 1, key
        (cmd,) = starts
        assert "RAY_AUTH_MODE=token" in cmd, key
        # The token comes from a file at run time, never as a literal value in the config.
        match = re.search(r'RAY_AUTH_TOKEN="\$\(cat ([^)]+)\)"', cmd)
        assert match, key
        token_file = match.group(1)
        assert any(token_file.startswith(remote) for remote in launcher["file_mounts"]), token_file
    everything = json.dumps(launcher)
    assert "RAY_AUTH_MODE=disabled" not in everything


def test_launcher_dashboard_on_private_address(launcher):
    (head_start,) = _ray_start_commands(launcher["head_start_ray_commands"])
    match = re.search(r"--dashboard-host[= ](\S+)", head_start)
    assert match, "the head must set --dashboard-host (Ray's default is localhost, KubeRay's 0.0.0.0)"
    host = match.group(1)
    assert "0.0.0.0" not in host
    assert "hostname -I" in head_start or "local-ipv4" in head_start
    assert "--head" in head_start and "--port=6379" in head_start


def test_launcher_head_starts_gateway_after_ray(launcher):
    commands = launcher["head_start_ray_commands"]
    start_idx = next(i for i, c in enumerate(commands) if re.search(r"\bray start\b", c))
    serve = [(i, c) for i, c in enumerate(commands) if "tpcluster serve" in c]
    assert len(serve) == 1
    idx, cmd = serve[0]
    assert idx > start_idx
    args = shlex.split(cmd.split("tpcluster serve", 1)[1].split("<", 1)[0])
    opts = dict(zip(args[::2], args[1::2]))
    assert opts["--address"] == "auto"
    assert opts["--host"] == "0.0.0.0"
    assert opts["--port"] == str(GATEWAY_PORT)
    assert opts["--metrics-port"] == str(METRICS_PORT)
    assert "=" in opts["--model"]
    assert opts["--auth-token-file"] and opts["--tls-cert"] and opts["--tls-key"]
    assert re.search(r"&\s*(echo|$)", cmd), "the gateway must run in the background"


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_launcher_commands_are_valid_bash(launcher):
    keys = [k for k in launcher if k.endswith("_commands")]
    assert "setup_commands" in keys
    for key in keys:
        for cmd in launcher[key]:
            ok, err = bash_syntax_ok(cmd)
            assert ok, f"{key}: {cmd!r}: {err}"


# --------------------------------------------------------------------------------------------- KubeRay

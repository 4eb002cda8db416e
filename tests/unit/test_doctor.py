"""`tpcluster doctor`: an honest report here (no Neuron), real checks on two rank processes, a pass/fail table and JSON."""

from __future__ import annotations

import json

import pytest

from actors import cli
from actors.commands import doctor


@pytest.mark.slow  # two rank processes and a TP=2 trace
def test_doctor_json_here_says_no_neuron_and_checks_the_cpu_backend(capsys):
    assert cli.main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backend"] == "cpu" and report["neuron_path"] is None and report["hardware_checked"] is False
    assert "torch-neuronx is not installed" in report["reason"]
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses == {
        "backend": "pass",
        "neuron devices": "skip",
        "cpu: collective across 2 rank processes": "pass",
        "cpu: TP=2 trace of a tiny model vs the whole model": "pass",
    }
    collective = next(c for c in report["checks"] if c["name"].startswith("cpu: collective"))
    assert "[3.0, 3.0, 3.0, 3.0]" in collective["detail"]
    assert report["ok"] is True


def test_doctor_table_names_what_it_checked_instead(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "run_ranks", lambda backend, timeout: {"collective": [3.0] * 4, "model": doctor.eager_reference()})
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "SKIP  neuron devices" in out and "no Neuron device or SDK here" in out
    assert "No Neuron hardware was checked on this machine" in out and "all checks passed" in out


def test_doctor_fails_loudly_when_a_rank_fails(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "run_ranks", lambda backend, timeout: {"error": "rank 1: RuntimeError: gloo timed out"})
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  cpu: collective across 2 rank processes" in out and "gloo timed out" in out
    assert "SOME CHECKS FAILED" in out


def test_doctor_with_the_sdk_but_no_device_says_so(monkeypatch):
    monkeypatch.setattr("cluster.trace.neuron.neuron_path", lambda installed=None: "xla")
    monkeypatch.setattr(doctor.glob, "glob", lambda pattern: [])
    calls = []
    monkeypatch.setattr(doctor, "run_ranks", lambda backend, timeout: calls.append(backend) or
                        {"collective": [3.0] * 4, "model": doctor.eager_reference()})
    report = doctor.diagnose(30.0)
    assert report["backend"] == "neuron" and "inf2/trn1" in report["reason"]
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses["neuron devices"] == "fail" and statuses["neuron: collective across 2 NeuronCores"] == "skip"
    assert calls == ["cpu"]  # nothing is run on a device that is not there
    assert report["ok"] is False and report["hardware_checked"] is False


def test_doctor_on_the_neuron_sdks_torch_skips_the_cpu_backend_and_says_why(monkeypatch):
    # The inf2/trn1 image: torch-neuronx 2.9 brings torch 2.9, which lacks the torch.export API the cpu backend
    # uses. The cpu checks are skipped (not failed), and the neuron trace is compared with the eager model instead.
    monkeypatch.setattr("cluster.trace.cpu.missing_export_support", lambda: ("torch.utils._pytree.TreeSpec.child",))
    monkeypatch.setattr("cluster.trace.neuron.neuron_path", lambda installed=None: "xla")
    monkeypatch.setattr(doctor.glob, "glob", lambda pattern: ["/dev/neuron0"])
    calls = []
    monkeypatch.setattr(doctor, "run_ranks", lambda backend, timeout: calls.append(backend) or
                        {"collective": [3.0] * 4, "model": doctor.eager_reference()})
    report = doctor.diagnose(30.0)
    assert calls == ["neuron"]
    checks = {c["name"]: c for c in report["checks"]}
    for name in ("cpu: collective across 2 rank processes", "cpu: TP=2 trace of a tiny model vs the whole model"):
        assert checks[name]["status"] == "skip"
        assert "torch 2.13" in checks[name]["detail"] and "TreeSpec.child" in checks[name]["detail"]
    compared = checks["neuron: TP=2 trace vs the cpu backend"]
    assert compared["status"] == "pass" and "vs the whole model, eager" in compared["detail"]
    assert report["ok"] is True and report["hardware_checked"] is True

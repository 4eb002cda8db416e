"""On a NeuronCore only (marked `neuron`, skipped where torch-neuronx is absent): the neuron backend end to end.

Two rank processes, one NeuronCore each, trace and run a collective and a tiny TP=2 model on the
neuron backend; the outputs must match the cpu backend's (bf16 matrix products: 2e-2).
"""

from __future__ import annotations

import pytest

from actors.commands import doctor

pytestmark = [pytest.mark.neuron, pytest.mark.slow]  # compiles for a NeuronCore: minutes


def test_neuron_collective_and_tp2_trace_match_the_cpu_backend():
    cpu = doctor.run_ranks("cpu", 120.0)
    neuron = doctor.run_ranks("neuron", 1800.0)
    assert "error" not in neuron, neuron.get("error")
    assert doctor._max_diff(neuron["collective"], [3.0] * 4) <= 1e-3
    assert doctor._max_diff(neuron["model"], cpu["model"]) <= doctor.NEURON_TOLERANCE


def test_doctor_reports_hardware_checked():
    report = doctor.diagnose(1800.0)
    assert report["backend"] == "neuron" and report["hardware_checked"] and report["ok"], doctor.format_table(report)

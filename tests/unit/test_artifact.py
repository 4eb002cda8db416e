"""Saved-model folders written and read without a cluster (TP=1 graphs traced in-process)."""

import json

import pytest
import torch

from cluster.coordinator import Exported, ModelState
from cluster.errors import ArtifactError
from cluster.rank import RankExport, collect_weights
from cluster.signature import signature_of
from cluster.trace import artifact
from cluster.trace.backends import CpuBackend
from tests.support import Block


def _exported(inline: bool) -> tuple[Exported, Block, torch.Tensor]:
    torch.manual_seed(2)
    model = Block().eval()
    ids = torch.randint(0, 32, (2, 5))
    backend = CpuBackend()
    weights = None if inline else collect_weights(model)
    graph = backend.trace(model, (ids,), weights)
    state = ModelState(1, "cpu", inline, [signature_of((ids,))], partition_dims={}, state_keys=sorted(model.state_dict()))
    return Exported(state, [RankExport([backend.dump(graph)], weights)]), model, ids


@pytest.mark.parametrize("inline", [True, False])
def test_round_trip(tmp_path, inline):
    exported, model, ids = _exported(inline)
    artifact.write(tmp_path / "m", exported)
    state, graphs, weights = artifact.read(tmp_path / "m")
    assert state.buckets == exported.state.buckets and state.inline_weights is inline
    backend = CpuBackend()
    call = backend.bind(backend.load(graphs[0][0], "g"), weights[0])
    torch.testing.assert_close(call(ids), model(ids))
    files = sorted(str(p.relative_to(tmp_path / "m")) for p in (tmp_path / "m").rglob("*") if p.is_file())
    assert ("weights/shared.safetensors" in files) is (not inline)


def test_replicated_weights_stored_once():
    a = {"shared": torch.ones(3), "own": torch.zeros(2)}
    b = {"shared": torch.ones(3), "own": torch.ones(2)}
    shared, own = artifact.split_replicated([a, b])
    assert list(shared) == ["shared"] and [list(o) for o in own] == [["own"], ["own"]]


@pytest.fixture
def saved(tmp_path):
    exported, _, _ = _exported(False)
    return artifact.write(tmp_path / "m", exported)


def test_tampered_truncated_and_missing_files_are_named(saved):
    weights = saved / "weights" / "shared.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-10])
    with pytest.raises(ArtifactError, match=r"shared.safetensors: \d+ bytes, the manifest says \d+: the file is truncated"):
        artifact.read(saved)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ArtifactError, match="shared.safetensors: checksum mismatch"):
        artifact.read(saved)
    weights.unlink()
    with pytest.raises(ArtifactError, match="shared.safetensors: missing"):
        artifact.read(saved)


def test_version_and_format_mismatches(saved):
    manifest_path = saved / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ArtifactError, match="format version 99, this tpcluster reads version 1"):
        artifact.read(saved)
    manifest_path.write_text(json.dumps({**manifest, "versions": {**manifest["versions"], "torch": "1.13.1"}}))
    with pytest.raises(ArtifactError, match="exported with torch 1.13.1.*retrace"):
        artifact.read(saved)
    manifest_path.write_text("{ truncated")
    with pytest.raises(ArtifactError, match="manifest.json: not valid JSON"):
        artifact.read(saved)
    manifest_path.unlink()
    with pytest.raises(ArtifactError, match="manifest.json: missing"):
        artifact.read(saved)


def test_extra_files_are_ignored(saved):
    (saved / "notes.txt").write_text("kept by the user")
    (saved / "graphs" / "stray.graph").write_bytes(b"junk")
    state, graphs, _ = artifact.read(saved)
    assert len(graphs) == 1


def test_graph_files_are_not_pickles(saved):
    backend = CpuBackend()
    with pytest.raises(ArtifactError, match="not a tpcluster cpu graph file"):
        backend.load(b"\x80\x04definitely a pickle", "evil.graph")

"""Saved-model folders written and read without a cluster (TP=1 graphs traced in-process)."""

import json

import pytest
import torch

from cluster.errors import ArtifactError
from cluster.rank import RankExport, collect_weights
from cluster.signature import signature_of
from cluster.trace import artifact
from cluster.trace.cpu import CpuBackend
from cluster.trace.state import Exported, ModelState
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


def _mapped_ranges(path: str) -> list[tuple[int, int]]:
    """The address ranges of this process that map the file at `path`."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == path:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def test_mapped_read_names_the_files_and_a_rank_reads_them(saved):
    """No tensor leaves the folder on a mapped read; the rank reads its files itself, into its own memory."""
    from cluster.rank import RankWorker

    state, graphs, files = artifact.read(saved, mapped=True)
    assert all(isinstance(f, artifact.WeightFile) for f in files[0])
    assert [f.path for f in files[0]] == [str((saved / "weights" / name).resolve())
                                          for name in ("shared.safetensors", "rank_00.safetensors")]
    _, _, read = artifact.read(saved)
    weights = artifact.load_weights(files[0], copy=False)
    assert weights.keys() == read[0].keys() and all(torch.equal(weights[k], read[0][k]) for k in weights)
    ranges = _mapped_ranges(files[0][0].path)  # a TP=1 model's weights are all shared
    assert weights and ranges and all(any(lo <= t.data_ptr() < hi for lo, hi in ranges) for t in weights.values())

    rank = RankWorker(0, 1)
    rank.load(state.backend, graphs[0], files[0], threads=0)
    held = rank._weights  # copied out of the mapping: anonymous memory, aligned for the kernels
    assert held.keys() == read[0].keys() and all(torch.equal(held[k], read[0][k]) for k in held)
    assert not any(any(lo <= t.data_ptr() < hi for lo, hi in _mapped_ranges(files[0][0].path)) for t in held.values())


def test_a_mapped_file_is_checked_where_it_is_opened(saved):
    state, graphs, files = artifact.read(saved, mapped=True)
    target = saved / "weights" / "shared.safetensors"
    data = target.read_bytes()
    target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size: only the digest tells
    with pytest.raises(ArtifactError, match="shared.safetensors: checksum mismatch"):
        artifact.load_weights(files[0])
    target.unlink()
    with pytest.raises(ArtifactError, match="shared.safetensors: missing, or not readable on this node.*same path on every node"):
        artifact.load_weights(files[0])
    with pytest.raises(ArtifactError, match="shared.safetensors: missing from the model folder"):
        artifact.read(saved, mapped=True)


def test_saving_again_leaves_a_mapped_file_as_it_was(tmp_path):
    """A folder saved over while a rank maps its files: the rank's bytes do not change under it."""
    exported, _, _ = _exported(False)
    folder = artifact.write(tmp_path / "m", exported)
    _, _, files = artifact.read(folder, mapped=True)
    weights = artifact.load_weights(files[0], copy=False)
    before = {k: v.clone() for k, v in weights.items()}
    changed = Exported(exported.state, [RankExport(exported.ranks[0].graphs,
                                                   {k: v + 1 for k, v in exported.ranks[0].weights.items()})])
    artifact.write(folder, changed)
    assert all(torch.equal(weights[k], before[k]) for k in weights)


def test_plan_shards_names_and_splits_as_write_does():
    digests = [{"graphs": ["g0", "g1"], "weights": {"norm": "n", "q": "q0", "emb": "e"}},
               {"graphs": ["g0", "g2"], "weights": {"norm": "n", "q": "q1", "emb": "e"}}]
    plan = artifact.plan_shards(digests)
    assert plan.graphs == [[artifact.graph_name(0, "g0"), artifact.graph_name(1, "g1")],
                           [artifact.graph_name(0, "g0"), artifact.graph_name(1, "g2")]]
    assert plan.writes == [{0: artifact.graph_name(0, "g0"), 1: artifact.graph_name(1, "g1")},
                           {1: artifact.graph_name(1, "g2")}]  # a graph both ranks hold is written once
    assert plan.shared == ["norm", "emb"]
    assert artifact.plan_shards([{"graphs": ["g"], "weights": None}]).shared == []


def test_a_rank_writes_the_same_folder_that_write_makes(saved, tmp_path):
    """The save where each rank writes its own files (Coordinator.save) gives the very files, names
    and manifest entries of `write` from the exported tensors."""
    from cluster.rank import RankWorker

    state, graphs, files = artifact.read(saved, mapped=True)
    rank = RankWorker(0, 1)
    rank.load(state.backend, graphs[0], files[0], threads=0)
    plan = artifact.plan_shards([rank.shard_digests()])
    out = tmp_path / "by-rank"
    written = rank.write_shard(str(out), plan.writes[0], plan.shared, True)
    ranks = [{"graphs": plan.graphs[0], "weights": "weights/rank_00.safetensors"}]
    artifact.write_manifest(out, state, ranks, "weights/shared.safetensors" if plan.shared else None, written)
    original, again = (json.loads((folder / "manifest.json").read_text()) for folder in (saved, out))
    assert again["files"] == original["files"] and again["ranks"] == original["ranks"]
    assert again["shared_weights"] == original["shared_weights"]
    for name in original["files"]:
        assert (out / name).read_bytes() == (saved / name).read_bytes()
    assert not list(out.rglob("*.tmp"))

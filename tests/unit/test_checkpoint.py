import pytest
import torch
from safetensors.torch import save_file

from cluster.errors import CheckpointError
from cluster.parallel_layers import load, save_sharded
from tests.unit.ranks import run_ranks
from tests.support import Block


@pytest.fixture
def whole():
    torch.manual_seed(1)
    model = Block().eval()
    return model, model.state_dict()


def _forward_after(tp, loader):
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(3))

    def body(rank):
        model = Block().eval()
        loader(model)
        with torch.no_grad():
            return model(ids)

    return run_ranks(tp, body), ids


@pytest.mark.parametrize("form", ["wrapped", "bare", "safetensors"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_whole_checkpoint_gives_each_rank_its_slice(tmp_path, whole, form, tp):
    model, state = whole
    if form == "wrapped":
        path = tmp_path / "ckpt.pt"
        torch.save({"model": state}, path)
    elif form == "bare":
        path = tmp_path / "ckpt.pt"
        torch.save(state, path)
    else:
        path = tmp_path / "ckpt.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    outputs, ids = _forward_after(tp, lambda m: load(path, m, sharded=False))
    for out in outputs:
        torch.testing.assert_close(out, model(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tp", [2, 4])
def test_sharded_checkpoint_folder(tmp_path, whole, tp):
    model, state = whole
    run_ranks(tp, lambda rank: save_sharded(state, Block(), tmp_path / "shards", tp) if rank == 0 else None)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [f"tp_rank_{r:02d}.safetensors" for r in range(tp)]
    outputs, ids = _forward_after(tp, lambda m: load(tmp_path / "shards", m, sharded=True))
    for out in outputs:
        torch.testing.assert_close(out, model(ids), atol=1e-5, rtol=1e-5)


def test_sharded_folder_with_rank_subfolders(tmp_path, whole):
    model, state = whole
    flat = tmp_path / "flat"
    run_ranks(2, lambda rank: save_sharded(state, Block(), flat, 2) if rank == 0 else None)
    nested = tmp_path / "nested"
    for rank in range(2):
        (nested / f"tp_rank_{rank:02d}_pp_rank_00").mkdir(parents=True)
        (flat / f"tp_rank_{rank:02d}.safetensors").rename(nested / f"tp_rank_{rank:02d}_pp_rank_00" / "checkpoint.safetensors")
    (nested / "README.txt").write_text("extra files are ignored")
    outputs, ids = _forward_after(2, lambda m: load(nested, m, sharded=True))
    torch.testing.assert_close(outputs[0], model(ids), atol=1e-5, rtol=1e-5)


def test_shard_count_must_match_tp_degree(tmp_path, whole):
    _, state = whole
    run_ranks(2, lambda rank: save_sharded(state, Block(), tmp_path / "s", 2) if rank == 0 else None)
    with pytest.raises(CheckpointError, match=r"shards for ranks \[0, 1\], but the model runs at tp_degree 4"):
        _forward_after(4, lambda m: load(tmp_path / "s", m, sharded=True))


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path, whole):
    _, state = whole
    broken = dict(state)
    del broken["up.weight"]
    broken["extra.weight"] = torch.zeros(1)
    broken["down.bias"] = torch.zeros(3)
    path = tmp_path / "broken.pt"
    torch.save(broken, path)
    with pytest.raises(CheckpointError) as info:
        _forward_after(1, lambda m: load(path, m))
    message = str(info.value)
    assert "missing keys [up.weight]" in message
    assert "unexpected keys [extra.weight]" in message
    assert "down.bias: checkpoint (3,) vs model (16,)" in message


def test_unreadable_inputs(tmp_path):
    model = Block()
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope.pt", model)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load(bad, model)
    torch.save({"model": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="no state dict"):
        load(tmp_path / "odd.pt", model)
    with pytest.raises(CheckpointError, match="not a folder"):
        load(tmp_path / "bad.pt", model, sharded=True)

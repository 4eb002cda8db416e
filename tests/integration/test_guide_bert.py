"""The guide's BERT example end to end on real rank actors (TP=2), and its autobucketing section."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import cluster
from cluster.errors import BucketError
from tests.integration import guide_bert as guide

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("guide")
    cwd = os.getcwd()
    os.chdir(path)
    reference = guide.save_checkpoint()
    yield path, reference
    os.chdir(cwd)


def _assert_matches(parallel_out, reference_out):
    assert isinstance(parallel_out, tuple)
    torch.testing.assert_close(parallel_out[0], reference_out[0], atol=1e-4, rtol=1e-4)
    assert torch.argmax(parallel_out[0]) == torch.argmax(reference_out[0])


def test_trace_save_and_load_in_a_fresh_cluster(ray_cluster, workdir):
    path, reference = workdir
    with torch.no_grad():
        expected = {name: reference(*inputs) for name, inputs in
                    {"paraphrase": guide.paraphrase, "not_paraphrase": guide.not_paraphrase}.items()}
    model = cluster.trace.parallel_model_trace(guide.get_model, guide.paraphrase, tp_degree=2, progress=False)
    try:
        _assert_matches(model(*guide.paraphrase), expected["paraphrase"])
        _assert_matches(model(*guide.not_paraphrase), expected["not_paraphrase"])
        cluster.trace.parallel_model_save(model, "tp_models")
    finally:
        model.close()

    # a new process, a new Ray cluster: nothing carries over but the folder
    script = textwrap.dedent("""
        import json, torch, cluster
        from tests.integration import guide_bert as guide
        cluster.init(neuron_cores=2)
        model = cluster.trace.parallel_model_load("tp_models")
        out = {n: model(*x)[0].tolist() for n, x in [("paraphrase", guide.paraphrase), ("not_paraphrase", guide.not_paraphrase)]}
        print("RESULT" + json.dumps(out))
        model.close()
        cluster.shutdown()
    """)
    env = {**os.environ, "PYTHONPATH": _repo_root()}
    run = subprocess.run([sys.executable, "-c", script], cwd=path, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.split("RESULT", 1)[1])
    for name, logits in loaded.items():
        _assert_matches((torch.tensor(logits),), expected[name])


def _repo_root():
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bucketed(ray_cluster, workdir):
    bucket_config = cluster.trace.BucketModelConfig(guide.get_bucket_kernel)  # was: torch_neuronx.BucketModelConfig
    model = cluster.trace.parallel_model_trace(
        guide.get_model, [guide.paraphrase, guide.paraphrase_long], inline_weights_to_neff=False,
        bucket_config=bucket_config, tp_degree=2, progress=False,
    )
    yield model
    model.close()


def test_autobucketing_takes_any_length_up_to_512(bucketed, workdir):
    _, reference = workdir
    model = bucketed
    assert model.info().trace_mode == ["once", "once"]
    generator = torch.Generator().manual_seed(0)
    for length in (1, 20, 128, 129, 300, 512):
        ids = torch.randint(1000, 20000, (1, length), generator=generator)
        inputs = (ids, torch.ones_like(ids), torch.zeros_like(ids))
        with torch.no_grad():
            expected = reference(*inputs)
        _assert_matches(model(*inputs), expected)
    too_long = torch.ones(1, 513, dtype=torch.long)
    with pytest.raises(BucketError, match=r"size 513 in dim 1, above the largest bucket \(int64\[1, 512\]"):
        model(too_long, too_long, too_long)
    _assert_matches(model(*guide.paraphrase), reference(*guide.paraphrase))  # still serving


def test_separated_artifact_holds_one_copy_of_each_weight(bucketed, workdir, tmp_path):
    from safetensors import safe_open

    from cluster.trace.artifact import tensor_bytes

    path, reference = workdir
    cluster.trace.parallel_model_save(bucketed, tmp_path / "separated")
    whole = sum(t.numel() * t.element_size() for t in reference.state_dict().values())
    stored = tensor_bytes(tmp_path / "separated")
    assert abs(stored - whole) / whole < 0.05, (stored, whole)
    with safe_open(str(tmp_path / "separated" / "weights" / "shared.safetensors"), "pt") as shared:
        shared_keys = set(shared.keys())
    rank_keys = []
    for rank in range(2):
        with safe_open(str(tmp_path / "separated" / "weights" / f"rank_{rank:02d}.safetensors"), "pt") as own:
            rank_keys.append(set(own.keys()))
    replicated = {"bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.output.LayerNorm.weight",
                  "bert.encoder.layer.0.attention.output.dense.bias", "classifier.weight"}
    assert replicated <= shared_keys and not replicated & (rank_keys[0] | rank_keys[1])
    assert "bert.encoder.layer.0.attention.self.query.weight" in rank_keys[0] & rank_keys[1]
    graphs = list((tmp_path / "separated" / "graphs").iterdir())
    assert len(graphs) == 2  # one graph per bucket, shared by both ranks
    for graph in graphs:
        with safe_open(str(graph), "pt") as handle:
            assert not [k for k in handle.keys() if k.startswith(("param/", "state/"))]  # no weights in graphs


def test_replace_weights_without_retracing(bucketed, workdir, tmp_path):
    _, reference = workdir
    generator = torch.Generator().manual_seed(1)
    new_state = {k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                 for k, v in reference.state_dict().items()}
    tuned = guide.cpu_model()
    tuned.load_state_dict(new_state)
    torch.save({"model": new_state}, tmp_path / "tuned.pt")

    wrong = {k: v for k, v in new_state.items() if k != "classifier.bias"}
    with pytest.raises(cluster.errors.CheckpointError, match=r"missing \['classifier.bias'\].*old weights keep serving"):
        cluster.trace.replace_weights(bucketed, wrong)
    _assert_matches(bucketed(*guide.paraphrase), reference(*guide.paraphrase))

    cluster.trace.replace_weights(bucketed, tmp_path / "tuned.pt")
    with torch.no_grad():
        for inputs in (guide.paraphrase, guide.paraphrase_long, guide.not_paraphrase):
            _assert_matches(bucketed(*inputs), tuned(*inputs))
    assert bucketed.info().trace_mode == ["once", "once"]
    cluster.trace.replace_weights(bucketed, reference.state_dict())  # put the fixture's weights back

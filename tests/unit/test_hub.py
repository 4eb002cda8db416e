"""Compiling Hugging Face checkpoints (cluster.models.hub) over in-process ranks (eager backend): every
architecture equals transformers at TP=1 and TP=2, and bad input fails before a rank starts."""

import json
import shutil

import pytest
import torch

from cluster.errors import ArtifactError, CheckpointError, ShardingError, UnsupportedModel
from cluster.generation import generate
from cluster.models.architectures import SUPPORTED, check_checkpoint, inspect_checkpoint
from cluster.models.hub import CompileOptions, checkpoint_digest, compile, is_checkpoint, trace_checkpoint
from tests.hf_checkpoints import (DECODERS, hf_encoder_output, hf_seq2seq_greedy, save_bert, save_classifier, save_decoder,
                                  save_sentence_transformer, save_t5)
from tests.support import hf_greedy, minilm_tokens

DECODER_OPTIONS = CompileOptions(batch_buckets=(1, 4), prompt_buckets=(16,), cache_buckets=(32, 64), verify_tokens=0)
ENCODER_OPTIONS = CompileOptions(batch_buckets=(4,), seq_buckets=(16,))
PROMPTS = [[5, 9, 17, 3, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [40, 41]]
TEXTS = ["The for statement is used to iterate", "tensor parallel ranks", "a third one"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    hf = {arch: save_decoder(root / arch, arch) for arch in DECODERS}
    hf["BertModel"] = save_bert(root / "BertModel")
    for arch, labels in (("BertForSequenceClassification", ("a", "b", "c")), ("RobertaForSequenceClassification", ("neg", "pos"))):
        hf[arch] = save_classifier(root / arch, arch, labels)
    save_sentence_transformer(root / "sentence-transformer", pooling="cls")
    hf["t5"], hf["t5-v1_1"] = save_t5(root / "t5"), save_t5(root / "t5-v1_1", gated=True, seed=1)
    return root, hf


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_decoders_generate_transformers_greedy_tokens(checkpoints, arch, tp):
    root, hf = checkpoints
    model, spec = trace_checkpoint(root / arch, tp, DECODER_OPTIONS, progress=False, backend="eager")
    with model:
        out = generate(model, PROMPTS, max_new_tokens=40)  # 12 + 40 tokens: crosses cache bucket 32 -> 64
    assert out.sequences == [hf_greedy(hf[arch], p, 40) for p in PROMPTS]
    assert spec.task == "generate" and spec.extra["architecture"] == arch


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("variant", ["t5", "t5-v1_1"])  # relu + tied embeddings; gated-gelu, untied
def test_t5_generates_transformers_greedy_tokens(checkpoints, variant, tp):
    """The encoder reads the prompt, the decoder generates: a batch of three prompts of different
    lengths, 40 tokens each (decoder caches cross bucket 32 -> 64), equal to transformers'."""
    root, hf = checkpoints
    model, spec = trace_checkpoint(root / variant, tp, DECODER_OPTIONS, progress=False, backend="eager")
    with model:
        out = generate(model, PROMPTS, max_new_tokens=40)
        layout = model.coordinator.info().decoder["layout"]
    assert out.sequences == [hf_seq2seq_greedy(hf[variant], p, 40) for p in PROMPTS]
    assert spec.task == "generate" and spec.extra["architecture"] == "T5ForConditionalGeneration"
    assert layout["verify_tokens"] == 0  # served target-only


def test_t5_checks_name_what_does_not_fit(checkpoints, tmp_path):
    root, _ = checkpoints
    info = inspect_checkpoint(root / "t5")
    assert info.task == "generate" and check_checkpoint(info, 2) > 0
    with pytest.raises(ShardingError, match="4 heads"):
        check_checkpoint(info, 3)
    shutil.copytree(root / "t5", tmp_path / "t5")
    config = json.loads((tmp_path / "t5" / "config.json").read_text())
    (tmp_path / "t5" / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "gated-tanh"}))
    with pytest.raises(UnsupportedModel, match="gated-tanh"):
        check_checkpoint(inspect_checkpoint(tmp_path / "t5"), 2)
    (tmp_path / "t5" / "config.json").write_text(json.dumps({**config, "d_ff": 256}))
    with pytest.raises(CheckpointError, match="DenseReluDense"):
        check_checkpoint(inspect_checkpoint(tmp_path / "t5"), 2)


def _rows(model, ids, mask, types):
    out = model(ids, mask, types)
    return (out[0] if isinstance(out, (tuple, list)) else out)[: len(ids)]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("arch", ["BertForSequenceClassification", "RobertaForSequenceClassification"])
def test_classifiers_give_transformers_logits_and_labels(checkpoints, arch, tp):
    root, hf = checkpoints
    ids, mask, types = minilm_tokens(TEXTS)
    types[1, 3:] = 1  # a text pair's second segment
    model, spec = trace_checkpoint(root / arch, tp, ENCODER_OPTIONS, progress=False, backend="eager")
    with model:
        logits = _rows(model, ids, mask, types)
    expected = hf_encoder_output(hf[arch], ids, mask, types if arch.startswith("Bert") else None)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert spec.task == "classify" and spec.labels == tuple(hf[arch].config.id2label[i] for i in range(len(spec.labels)))


@pytest.mark.parametrize("tp", [1, 2])
def test_embedders_equal_transformers_and_sentence_transformers(checkpoints, tp):
    from sentence_transformers import SentenceTransformer

    root, hf = checkpoints
    ids, mask, types = minilm_tokens(TEXTS)
    with trace_checkpoint(root / "BertModel", tp, ENCODER_OPTIONS, progress=False, backend="eager")[0] as model:
        torch.testing.assert_close(_rows(model, ids, mask, types), hf_encoder_output(hf["BertModel"], ids, mask, types, "mean"),
                                   atol=1e-4, rtol=0)
    folder = root / "sentence-transformer"
    with trace_checkpoint(folder, tp, ENCODER_OPTIONS, progress=False, backend="eager")[0] as model:
        expected = torch.from_numpy(SentenceTransformer(str(folder), device="cpu").encode(TEXTS))
        torch.testing.assert_close(_rows(model, ids, mask, types), expected, atol=1e-4, rtol=0)
    # a classifier's trunk embeds on request (--task embed)
    with trace_checkpoint(root / "BertForSequenceClassification", tp, CompileOptions(task="embed", batch_buckets=(4,), seq_buckets=(16,)),
                          progress=False, backend="eager")[0] as model:
        trunk = hf["BertForSequenceClassification"].bert
        with torch.no_grad():
            states = trunk(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        mean = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(_rows(model, ids, mask, types), mean, atol=1e-4, rtol=0)


@pytest.mark.parametrize("rope", [dict(rope_type="default", rope_theta=10000.0),
                                  dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
                                  dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=64)])
def test_rope_frequencies_equal_transformers(rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from cluster.models.llama import LlamaShape

    config = LlamaConfig(hidden_size=64, num_attention_heads=2, rope_parameters=rope)
    ours = LlamaShape.from_config(config).inv_freq()
    if rope["rope_type"] == "default":
        expected = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")
    torch.testing.assert_close(ours, expected)
    if rope["rope_type"] != "default":  # the scaling changes something
        assert not torch.allclose(ours, 1.0 / (rope["rope_theta"] ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32)))


def _edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture
def llama(checkpoints, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(checkpoints[0] / "LlamaForCausalLM", folder)
    return folder


def test_tasks_are_inferred_and_overridable(checkpoints):
    root, _ = checkpoints
    assert inspect_checkpoint(root / "Qwen2ForCausalLM").task == "generate"
    assert inspect_checkpoint(root / "sentence-transformer").task == "embed"
    assert inspect_checkpoint(root / "RobertaForSequenceClassification").task == "classify"
    assert inspect_checkpoint(root / "RobertaForSequenceClassification", "embed").task == "embed"
    with pytest.raises(UnsupportedModel, match="LlamaForCausalLM cannot serve task 'embed'; it serves generate"):
        inspect_checkpoint(root / "LlamaForCausalLM", "embed")
    assert is_checkpoint(root / "BertModel") and not is_checkpoint(root)


def test_an_unsupported_architecture_names_the_supported_ones(llama):
    _edit_config(llama, architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel is not supported; supported: " + ", ".join(SUPPORTED)):
        inspect_checkpoint(llama)


def test_unsupported_settings_are_refused(llama):
    _edit_config(llama, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(UnsupportedModel, match="rope type 'yarn' is not supported; supported: default, linear, llama3"):
        check_checkpoint(inspect_checkpoint(llama), 1, 64)
    _edit_config(llama, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, architectures=["MistralForCausalLM"],
                 model_type="mistral", sliding_window=32)
    with pytest.raises(UnsupportedModel, match="sliding_window 32 is below the largest cache bucket 64"):
        check_checkpoint(inspect_checkpoint(llama), 1, 64)


def test_heads_that_do_not_divide_say_so_with_the_numbers(checkpoints):
    info = inspect_checkpoint(checkpoints[0] / "LlamaForCausalLM")  # 4 heads, 2 KV heads
    with pytest.raises(ShardingError, match="at tp 4: 2 KV heads do not divide by 4"):
        check_checkpoint(info, 4)
    with pytest.raises(ShardingError, match="at tp 3: 4 attention heads, 128 intermediate_size, 2 KV heads, 4096 vocab_size"):
        check_checkpoint(info, 3)


def test_missing_or_truncated_weights_name_the_file(llama):
    weights = llama / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{weights}: truncated"):
        check_checkpoint(inspect_checkpoint(llama), 2)
    weights.unlink()
    with pytest.raises(CheckpointError, match="no weights found; expected one of model.safetensors"):
        check_checkpoint(inspect_checkpoint(llama), 2)
    (llama / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "lm_head.weight": "model-00001-of-00002.safetensors", "model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors: listed in model.safetensors.index.json but missing"):
        check_checkpoint(inspect_checkpoint(llama), 2)


def test_a_config_that_does_not_fit_the_weights_names_the_tensor(llama):
    _edit_config(llama, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.down_proj.weight: weights \(64, 128\) vs config \(64, 96\)"):
        check_checkpoint(inspect_checkpoint(llama), 2)


def test_sharded_and_bin_weights_load(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    root, hf = checkpoints
    model = AutoModelForCausalLM.from_pretrained(root / "Qwen2ForCausalLM")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    tokenizer = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    for name in tokenizer:
        shutil.copy(root / "Qwen2ForCausalLM" / name, tmp_path / "sharded")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    state = model.state_dict()
    state.pop("lm_head.weight")  # tied: the file leaves it out
    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    for name in ("config.json",) + tokenizer:
        shutil.copy(root / "Qwen2ForCausalLM" / name, tmp_path / "bin")
    for folder in ("sharded", "bin"):
        with trace_checkpoint(tmp_path / folder, 2, DECODER_OPTIONS, progress=False, backend="eager")[0] as traced:
            assert generate(traced, PROMPTS[:1], max_new_tokens=10).sequences == [hf_greedy(hf["Qwen2ForCausalLM"], PROMPTS[0], 10)]


def test_an_interrupted_compile_leaves_nothing_serve_would_load(llama, tmp_path, monkeypatch):
    import cluster.trace

    def interrupted_save(model, path):
        path.mkdir()
        (path / "manifest.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(cluster.trace, "parallel_model_save", interrupted_save)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        compile(llama, out, 1, DECODER_OPTIONS, progress=False, backend="eager")
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    out.mkdir()
    with pytest.raises(ArtifactError, match="already exists; pass force=True"):
        compile(llama, out, 1, DECODER_OPTIONS, progress=False, backend="eager")


def test_the_cache_key_follows_content_and_options(llama):
    key = checkpoint_digest(llama, 2, DECODER_OPTIONS)
    assert checkpoint_digest(llama, 2, DECODER_OPTIONS) == key
    assert checkpoint_digest(llama, 1, DECODER_OPTIONS) != key
    assert checkpoint_digest(llama, 2, CompileOptions(dtype="bfloat16")) != key
    (llama / "tokenizer_config.json").write_text((llama / "tokenizer_config.json").read_text() + " ")
    assert checkpoint_digest(llama, 2, DECODER_OPTIONS) != key


def test_compile_options_are_validated():
    with pytest.raises(ValueError, match="dtype must be one of"):
        CompileOptions(dtype="int8")
    with pytest.raises(ValueError, match="seq_buckets must be increasing"):
        CompileOptions(seq_buckets=(64, 32))


def test_the_compile_command_parses_buckets_and_the_summary_reads_well(tmp_path):
    import argparse

    from actors.commands import compile as command
    from cluster.models.hub import CompileSummary

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["src", "--out", "dst", "--batch-buckets", "1,4", "--cache-buckets", "128,256", "--tp", "1"])
    assert (args.batch_buckets, args.cache_buckets, args.tp, args.dtype) == ((1, 4), (128, 256), 1, "float32")
    with pytest.raises(SystemExit):
        parser.parse_args(["src", "--out", "dst", "--seq-buckets", "64,32"])
    summary = CompileSummary(folder=tmp_path / "out", source=tmp_path / "src", architecture="LlamaForCausalLM",
                             task="generate", tp_degree=2, dtype="float32", parameters=1_500_000, graphs=6,
                             buckets={"batch_buckets": [1, 4], "verify_tokens": 0}, seconds=12.0)
    text = summary.describe()
    assert "LlamaForCausalLM, task generate, tp 2, float32, 1.50M parameters" in text
    assert "6 graphs: batch_buckets [1, 4], verify_tokens 0" in text
    assert f"tpcluster serve --model NAME={tmp_path / 'out'}" in text


def test_a_replica_that_cannot_fit_is_refused_before_any_rank_starts(llama, monkeypatch):
    """KV-cache bytes a sequence and the replica's total are said first; --max-sequences x cache past
    the machine's memory is refused naming the bytes and what fits, and no rank is started."""
    from cluster.models import hub

    info = inspect_checkpoint(llama)
    layout = hub.decoder_layout(info, CompileOptions(cache_buckets=(256,), max_sequences=8))
    memory = hub.decoder_memory(info, layout, "bfloat16", parameters=1000)
    # DECODER_SHAPE: 2 layers, 2 KV heads of 16 dims; k and v; 256 positions; 2 bytes
    assert memory.cache_bytes_per_sequence == 2 * 2 * 2 * 16 * 256 * 2 and memory.sequences == 8
    assert memory.total_bytes == 2000 + 8 * memory.cache_bytes_per_sequence
    hub.check_memory(memory, host_bytes=10**9)  # fits
    with pytest.raises(CheckpointError, match=r"KV cache 0.1 MiB a sequence x 8 sequences.*more than 90% of this "
                                              r"machine's .*at most 6 sequences fit \(--max-sequences 6\)"):
        hub.check_memory(memory, host_bytes=int((2000 + 6.5 * memory.cache_bytes_per_sequence) / 0.9))
    with pytest.raises(CheckpointError, match="the weights alone do not fit"):
        hub.check_memory(memory, host_bytes=1000)

    monkeypatch.setattr(hub, "host_memory_bytes", lambda: 4096)
    monkeypatch.setattr("cluster.trace.parallel_model_trace",
                        lambda *a, **k: pytest.fail("a rank was started for a replica that cannot fit"))
    with pytest.raises(CheckpointError, match="this machine's 0.0 GiB"):
        trace_checkpoint(llama, 1, CompileOptions(cache_buckets=(256,), max_sequences=8), progress=False)

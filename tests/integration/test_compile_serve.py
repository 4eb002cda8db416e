"""Bring your own checkpoint: Hugging Face folders compiled (cpu backend, real rank actors) by the
library, `tpcluster compile` and `tpcluster serve`'s first-use path, then served by the gateway and
called over gRPC: the answers equal transformers' on the same weights."""

import argparse
import os

import numpy as np
import pytest
import torch

from clients.client import Client
from cluster.models import hub
from tests.hf_checkpoints import (hf_encoder_output, hf_seq2seq_greedy, save_classifier, save_decoder,
                                  save_sentence_transformer, save_t5)
from tests.integration.harness import GatewayThread
from tests.support import hf_greedy

pytestmark = pytest.mark.integration

DECODER_OPTIONS = hub.CompileOptions(batch_buckets=(1,), prompt_buckets=(16,), cache_buckets=(64,), verify_tokens=0)
ENCODER_OPTIONS = hub.CompileOptions(batch_buckets=(1, 4), seq_buckets=(16,))
T5_OPTIONS = hub.CompileOptions(batch_buckets=(1, 4), prompt_buckets=(16,), cache_buckets=(64,))
PROMPT = "The for statement is used to iterate"
TEXTS = ["The for statement is used to iterate", "tensor parallel ranks", "a third one"]


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    from actors import cli
    from actors.commands.serve import compile_checkpoints

    root = tmp_path_factory.mktemp("byo")
    saved_cache = os.environ.get("TPCLUSTER_CACHE")
    os.environ["TPCLUSTER_CACHE"] = str(root / "tpcluster-cache")  # serve's first-use compiles land here
    llama = save_decoder(root / "llama", "LlamaForCausalLM")
    roberta = save_classifier(root / "roberta", "RobertaForSequenceClassification", ("negative", "positive"))
    save_sentence_transformer(root / "st", pooling="mean")
    folders = {"llama": hub.ensure_compiled(root / "llama", 2, DECODER_OPTIONS, root=root / "cache", progress=False)}
    assert cli.main(["compile", str(root / "roberta"), "--out", str(root / "roberta-tp2"), "--tp", "2",
                     "--batch-buckets", "1,4", "--seq-buckets", "16", "-q"]) == 0
    folders["roberta"] = root / "roberta-tp2"
    t5 = save_t5(root / "t5")  # relu, tied embeddings: at TP=1 through the command
    t5_v1_1 = save_t5(root / "t5-v1_1", gated=True, seed=1)  # gated-gelu, untied: at TP=2 through the library
    assert cli.main(["compile", str(root / "t5"), "--out", str(root / "t5-tp1"), "--tp", "1", "--batch-buckets", "1,4",
                     "--prompt-buckets", "16", "--cache-buckets", "64", "-q"]) == 0
    folders["t5"] = root / "t5-tp1"
    decoders = {"llama": llama}
    for arch, name, tp in (("MistralForCausalLM", "mistral", 1), ("Qwen2ForCausalLM", "qwen2", 2)):
        decoders[name] = save_decoder(root / name, arch)
        folders[name] = hub.ensure_compiled(root / name, tp, DECODER_OPTIONS, root=root / "cache", progress=False)
    bert_cls = save_classifier(root / "bert-cls", "BertForSequenceClassification", ("a", "b", "c"))
    folders["bert-cls"] = hub.ensure_compiled(root / "bert-cls", 1, ENCODER_OPTIONS, root=root / "cache", progress=False)
    folders["t5-v1_1"] = hub.ensure_compiled(root / "t5-v1_1", 2, T5_OPTIONS, root=root / "cache", progress=False)
    models = {"st": str(root / "st")}  # what `tpcluster serve --model st=CHECKPOINT --tp 1` does before serving
    compile_checkpoints(models, argparse.Namespace(address=None, neuron_cores=None, tp=1))
    folders["st"] = models["st"]
    gateway = GatewayThread(folders)
    yield gateway, root, folders, {**decoders, "roberta": roberta, "bert-cls": bert_cls, "t5": t5, "t5-v1_1": t5_v1_1}
    gateway.close()
    if saved_cache is None:
        os.environ.pop("TPCLUSTER_CACHE", None)
    else:
        os.environ["TPCLUSTER_CACHE"] = saved_cache


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])  # TP=2, 1, 2
def test_a_compiled_decoder_streams_transformers_greedy_tokens(served, name):
    from transformers import AutoTokenizer

    gateway, root, _, hf = served
    prompt_ids = AutoTokenizer.from_pretrained(root / name)(PROMPT)["input_ids"]
    with Client(gateway.target) as client:
        result = client.generate(PROMPT, model=name, max_new_tokens=30)
    assert result.token_ids == hf_greedy(hf[name], prompt_ids, 30)


@pytest.mark.parametrize("name", ["t5", "t5-v1_1"])
def test_a_compiled_t5_generates_transformers_greedy_tokens(served, name):
    """The guide's T5 sample: the prompt is the encoder's input; Generate streams the decoder's tokens,
    equal to transformers' (stopping at eos as it does), alone and batched with other streams."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoTokenizer

    gateway, root, _, hf = served
    tokenizer = AutoTokenizer.from_pretrained(root / name)
    prompts = [PROMPT, "tensor parallel ranks", "a third one"]
    expected = [hf_seq2seq_greedy(hf[name], tokenizer(p)["input_ids"], 30, eos=True) for p in prompts]
    with Client(gateway.target) as client:
        assert client.generate(prompts[0], model=name, max_new_tokens=30).token_ids == expected[0]
        with ThreadPoolExecutor(3) as pool:  # three streams share the replica's batch
            batched = list(pool.map(lambda p: client.generate(p, model=name, max_new_tokens=30).token_ids, prompts))
        assert batched == expected
        seeded = [client.generate(PROMPT, model=name, max_new_tokens=12, temperature=0.8, seed=3).token_ids for _ in range(2)]
        assert seeded[0] == seeded[1] and 0 < len(seeded[0]) <= 12


@pytest.mark.parametrize("name, labels", [("roberta", ("negative", "positive")), ("bert-cls", ("a", "b", "c"))])  # TP=2, 1
def test_a_compiled_classifier_gives_transformers_logits_and_labels(served, name, labels):
    from transformers import AutoTokenizer

    gateway, root, _, hf = served
    tokenizer = AutoTokenizer.from_pretrained(root / name)
    inputs = [("The for statement", "is used to iterate"), "tensor parallel ranks"]
    with Client(gateway.target) as client:
        results = client.classify(inputs, model=name)
    for item, result in zip(inputs, results):
        enc = tokenizer(*item, return_tensors="pt") if isinstance(item, tuple) else tokenizer(item, return_tensors="pt")
        types = enc.get("token_type_ids") if name == "bert-cls" else None
        expected = hf_encoder_output(hf[name], enc["input_ids"], enc["attention_mask"], types)[0]
        np.testing.assert_allclose(np.array(result.logits), expected.numpy(), atol=1e-4)
        assert result.label == labels[int(expected.argmax())]


def test_a_sentence_transformers_folder_embeds_as_sentence_transformers_does(served):
    from sentence_transformers import SentenceTransformer

    gateway, root, _, _ = served
    with Client(gateway.target) as client:
        vectors = client.embed(TEXTS, model="st")
    expected = SentenceTransformer(str(root / "st"), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(vectors, expected, atol=1e-4)


def test_a_second_start_reuses_the_compiled_folder(served, monkeypatch):
    _, root, folders, _ = served

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(hub, "compile", no_compile)
    assert hub.ensure_compiled(root / "llama", 2, DECODER_OPTIONS, root=root / "cache") == folders["llama"]
    models = {"st": str(root / "st")}
    from actors.commands.serve import compile_checkpoints

    compile_checkpoints(models, argparse.Namespace(address=None, neuron_cores=None, tp=1))
    assert models["st"] == folders["st"]
    assert str(folders["st"]).startswith(str(root / "tpcluster-cache" / "compiled" / f"torch-{torch.__version__}"))


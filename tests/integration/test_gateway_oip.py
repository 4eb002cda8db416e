"""The Open Inference Protocol (KServe v2 gRPC) on the gateway's port, through Triton's real
`tritonclient.grpc`: the same vectors and labels as tpcluster.v1, the same auth, batching and status codes."""

import grpc
import numpy as np
import pytest

from actors.gateway.batching import BatchingConfig
from actors.gateway.server import GatewayConfig
from clients.client import Client
from clients.protocol import grpc_predict_v2_pb2 as oip
from clients.protocol import grpc_predict_v2_pb2_grpc as oip_grpc
from tests.integration.harness import GatewayThread
from tests.integration.triton import run_tritonclient
from tests.support import minilm_embeddings, minilm_tokens, paraphrase_logits

pytestmark = pytest.mark.integration

TOKEN = "s3cret"
TEXTS = ["The company HuggingFace is based in New York City", "Apples are especially bad for your health", "short"]
PARAPHRASE = ("The company HuggingFace is based in New York City", "HuggingFace's headquarters are situated in Manhattan")
UNRELATED = ("The company HuggingFace is based in New York City", "Apples are especially bad for your health")


@pytest.fixture(scope="module")
def gateway(minilm_tp2):
    served = GatewayThread(minilm_tp2, config=GatewayConfig(port=0, auth_token=TOKEN, health_interval_s=0.5),
                           batching=BatchingConfig(max_batch_rows=4, max_wait_s=0.02))
    yield served
    served.close()


def test_tritonclient_health_and_metadata(gateway):
    got = run_tritonclient(gateway.target, """
meta = client.get_model_metadata("minilm-paraphrase", headers=headers, as_json=True)
print(json.dumps({
    "live": client.is_server_live(headers=headers), "ready": client.is_server_ready(headers=headers),
    "model_ready": client.is_model_ready("minilm-embed", headers=headers),
    "server": client.get_server_metadata(headers=headers, as_json=True)["name"],
    "embed": client.get_model_metadata("minilm-embed", headers=headers, as_json=True),
    "classify": [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"] + meta["outputs"]],
    "unknown": error(lambda: client.is_model_ready("nope", headers=headers)),
    "wrong_version": error(lambda: client.get_model_metadata("minilm-embed", "7", headers=headers)),
}))
""", TOKEN)
    assert got["live"] and got["ready"] and got["model_ready"] and got["server"] == "tpcluster"
    embed = got["embed"]
    assert embed["versions"] == ["1"] and embed["platform"] == "tpcluster_embed"
    assert [(t["name"], t["datatype"], t["shape"]) for t in embed["inputs"]] == [("text", "BYTES", ["-1"])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in embed["outputs"]] == [("embedding", "FP32", ["-1", "384"])]
    assert got["classify"] == [["text", "BYTES", ["-1"]], ["text_pair", "BYTES", ["-1"]], ["logits", "FP32", ["-1", "2"]],
                               ["label_id", "INT64", ["-1"]], ["label", "BYTES", ["-1"]]]
    assert got["unknown"][0] == "StatusCode.NOT_FOUND" and "no model named 'nope'" in got["unknown"][1]
    assert got["wrong_version"][0] == "StatusCode.NOT_FOUND" and "only version is '1'" in got["wrong_version"][1]


def test_tritonclient_embed_classify_and_raw_tensors_match_tpcluster_v1(gateway):
    ids, mask, types = (t.numpy() for t in minilm_tokens(["raw tensors in and out"]))
    got = run_tritonclient(gateway.target, f"""
texts = np.array({TEXTS!r}, dtype=object)
print(json.dumps({{
    "embed": infer("minilm-embed", {{"text": texts}}, request_id="r1"),
    "classify": infer("minilm-paraphrase", {{"text": np.array({[PARAPHRASE[0], UNRELATED[0]]!r}, dtype=object),
                                            "text_pair": np.array({[PARAPHRASE[1], UNRELATED[1]]!r}, dtype=object)}}),
    "label_only": infer("minilm-paraphrase", {{"text": np.array([{PARAPHRASE[0]!r}], dtype=object),
                                              "text_pair": np.array([{PARAPHRASE[1]!r}], dtype=object)}}, outputs=["label"]),
    "raw": infer("minilm-embed", {{"token_type_ids": np.array({types.tolist()}), "input_ids": np.array({ids.tolist()}),
                                  "attention_mask": np.array({mask.tolist()})}}),
}}))
""", TOKEN)
    embed = np.array(got["embed"]["embedding"], np.float32).reshape(got["embed"]["embedding.shape"])
    assert embed.shape == (3, 384) and got["embed"]["id"] == "r1"
    np.testing.assert_allclose(embed, minilm_embeddings(TEXTS), atol=1e-4)
    with Client(gateway.target, token=TOKEN, timeout=60) as v1:
        np.testing.assert_allclose(embed, v1.embed(TEXTS, model="minilm-embed"), atol=1e-5)
    classify = got["classify"]
    assert classify["label"] == ["paraphrase", "different"] and classify["label_id"] == [1, 0]
    logits = np.array(classify["logits"]).reshape(classify["logits.shape"])
    for pair, row in zip([PARAPHRASE, UNRELATED], logits):
        np.testing.assert_allclose(row, paraphrase_logits(*pair), atol=1e-3)
    assert set(got["label_only"]) == {"label", "label.shape", "id"} and got["label_only"]["label"] == ["paraphrase"]
    raw = np.array(got["raw"]["embedding"], np.float32).reshape(got["raw"]["embedding.shape"])
    assert raw.shape == (1, 384)  # the request's rows, named as ModelMetadata.outputs
    np.testing.assert_allclose(raw, minilm_embeddings(["raw tensors in and out"]), atol=1e-4)


def test_tritonclient_gets_the_gateways_status_codes(gateway):
    got = run_tritonclient(gateway.target, """
text = np.array(["x"], dtype=object)
print(json.dumps({
    "unknown_model": error(lambda: infer("nope", {"text": text})),
    "bad_shape": error(lambda: infer("minilm-embed", {"input_ids": np.zeros((1, 3), np.float32),
                                                      "attention_mask": np.zeros((1, 3), np.float32),
                                                      "token_type_ids": np.zeros((1, 3), np.float32)})),
    "misspelt": error(lambda: infer("minilm-embed", {"input_idz": np.zeros((1, 3), np.int64),
                                                     "attention_mask": np.zeros((1, 3), np.int64),
                                                     "token_type_ids": np.zeros((1, 3), np.int64)})),
    "empty_text": error(lambda: infer("minilm-embed", {"text": np.array([""], dtype=object)})),
    "too_long": error(lambda: infer("minilm-embed", {"text": np.array(["word " * 200], dtype=object)})),
    "no_output": error(lambda: infer("minilm-embed", {"text": text}, outputs=["logits"])),
    "no_token": error(lambda: client.infer("minilm-embed", [tensor("text", text)])),
    "still": infer("minilm-embed", {"text": np.array(["still correct"], dtype=object)})["embedding.shape"],
}))
""", TOKEN)
    assert got["unknown_model"][0] == "StatusCode.NOT_FOUND" and "no model named 'nope'" in got["unknown_model"][1]
    assert got["bad_shape"][0] == "StatusCode.INVALID_ARGUMENT" and "match no bucket" in got["bad_shape"][1]
    assert got["misspelt"][0] == "StatusCode.INVALID_ARGUMENT" and "['input_idz'] are not among its inputs" in got["misspelt"][1]
    assert got["empty_text"][0] == "StatusCode.INVALID_ARGUMENT" and "empty" in got["empty_text"][1]
    assert got["too_long"][0] == "StatusCode.INVALID_ARGUMENT" and "takes at most 32" in got["too_long"][1]
    assert got["no_output"][0] == "StatusCode.INVALID_ARGUMENT" and "no outputs ['logits']" in got["no_output"][1]
    assert got["no_token"][0] == "StatusCode.UNAUTHENTICATED" and "bearer token" in got["no_token"][1]
    assert got["still"] == [1, 384]


def test_typed_contents_and_shared_batching_and_metrics(gateway):
    """Tensors in `contents` (what tritonclient never sends) give the same vectors; OIP requests go
    through the same batcher (rows counted once) and metrics as tpcluster.v1's."""
    metrics = gateway.gateway.metrics
    batch = metrics.batch_size.labels(model="minilm-embed")
    rows_before = next(s.value for s in batch.collect()[0].samples if s.name.endswith("_sum"))
    ok_before = metrics.requests.labels("oip.ModelInfer", "minilm-embed", "OK")._value.get()
    request = oip.ModelInferRequest(model_name="minilm-embed")
    request.inputs.add(name="text", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(t.encode() for t in TEXTS[:2])
    with grpc.insecure_channel(gateway.target) as channel:
        reply = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=60)
    (output,) = reply.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("embedding", "FP32", [2, 384])
    vectors = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(2, 384)
    np.testing.assert_allclose(vectors, minilm_embeddings(TEXTS[:2]), atol=1e-4)
    rows_after = next(s.value for s in batch.collect()[0].samples if s.name.endswith("_sum"))
    assert rows_after - rows_before == 2
    assert metrics.requests.labels("oip.ModelInfer", "minilm-embed", "OK")._value.get() == ok_before + 1

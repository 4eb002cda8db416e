"""Helpers shared by the test modules (no tests here).

References are computed independently of the code under test: MiniLM straight from transformers
with the pooling written out here, decoders with transformers' own `generate`.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cluster.generation.layout import DecoderLayout
from cluster.parallel_layers import layers, parallel_state
from cluster.parallel_layers.sharding import partition_dims, split_state_dict

REPO_ROOT = Path(__file__).resolve().parents[1]


class Block(torch.nn.Module):
    """Every parallel layer and mode in one small model."""

    def __init__(self) -> None:
        super().__init__()
        self.vocab = layers.ParallelEmbedding(32, 16)
        self.by_dim = layers.ParallelEmbedding(32, 16, shard_across_embedding=True)
        self.up = layers.ColumnParallelLinear(16, 24, gather_output=False)
        self.down = layers.RowParallelLinear(24, 16, input_is_parallel=True)
        self.gathered = layers.ColumnParallelLinear(16, 8, gather_output=True)
        self.whole_input = layers.RowParallelLinear(8, 4, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.vocab(ids) + self.by_dim(ids)
        h = h + self.down(torch.relu(self.up(h)))
        return self.whole_input(self.gathered(h))


def block_builder(state: dict[str, torch.Tensor]):
    """A `parallel_model_trace` function building this rank's shard of a Block with weights `state`."""

    def build():
        model = Block().eval()
        rank, world = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_size()
        model.load_state_dict(split_state_dict(state, partition_dims(model), rank, world))
        return model, {}

    return build


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@functools.lru_cache(maxsize=1)
def _minilm():
    from transformers import AutoModel, AutoTokenizer

    from cluster.models.bert import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path()), AutoModel.from_pretrained(minilm_path()).eval()


def minilm_tokens(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, token_type_ids) of `texts`, padded to the longest."""
    enc = _minilm()[0](list(texts), padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]


def minilm_embeddings(texts: Sequence[str]) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings as sentence-transformers defines them: the mean of the
    token states under the attention mask, L2-normalised (transformers' BertModel, unsharded)."""
    ids, mask, types = minilm_tokens(texts)
    with torch.no_grad():
        states = _minilm()[1](input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def paraphrase_logits(first: str, second: str) -> np.ndarray:
    """The shipped paraphrase head's logits [different, paraphrase]: +-10 * (cosine - 0.5)."""
    a, b = minilm_embeddings([first, second])
    score = 10.0 * (float(a @ b) - 0.5)
    return np.array([-score, score], dtype=np.float32)


# -- batch jobs: an input file with three bad lines, and the exactly-once check of its output --
RECORDS = 2000


def write_input(path):
    words = "tensor parallel ranks serve resident shards behind a gateway on a ray cluster".split()
    rng = np.random.default_rng(0)
    with open(path, "w") as out:
        for i in range(RECORDS):
            out.write(json.dumps({"id": f"r{i}", "text": " ".join(rng.choice(words, size=rng.integers(2, 9)))}) + "\n")
            if i == 10:
                out.write("{not json\n")
            if i == 20:
                out.write(json.dumps({"text": "no id"}) + "\n")
            if i == 30:
                out.write(json.dumps({"id": "r5", "text": "a duplicate id"}) + "\n")


def check_exactly_once(input_path, out):
    """One result per good record, the three bad lines reported once each, embeddings as in-process."""
    results = [json.loads(line) for line in open(out)]
    ids = [r["id"] for r in results]
    assert sorted(ids) == sorted(f"r{i}" for i in range(RECORDS)) and len(ids) == len(set(ids))
    errors = [json.loads(line) for line in open(str(out) + ".errors")]
    assert sorted(e["line"] for e in errors) == [12, 23, 34]  # bad JSON, no id, duplicate id: each once

    texts = {json.loads(line)["id"]: json.loads(line)["text"] for line in open(input_path) if line.startswith('{"id"')}
    sample = results[:: RECORDS // 40]
    expected = minilm_embeddings([texts[r["id"]] for r in sample])
    np.testing.assert_allclose(np.array([r["embedding"] for r in sample]), expected, atol=1e-4)


# -- decoders: small random-weight Llamas saved with transformers' own classes --------------------
TINY_TARGET = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
TINY_DRAFT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64)


def save_random_llama(path: Path, seed: int, vocab_size: int, **shape):
    """A seeded random LlamaForCausalLM saved to `path` (no eos: generations run their full length); returns it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=None, **shape)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def hf_greedy(model, prompt: Sequence[int], new: int) -> list[int]:
    """`new` greedy tokens from transformers' own model: the reference our decoders must equal."""
    ids = torch.tensor([list(prompt)])  # an explicit mask: a prompt token equal to the pad id is still attended to
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


# The tiny pair's layout, vocabulary and prompts (12 + 30 tokens cross cache bucket 32 -> 64).
TINY_LAYOUT = DecoderLayout(batch_buckets=(1, 4), prompt_buckets=(8, 16), cache_buckets=(32, 64), verify_tokens=5)
TINY_VOCAB = 128
TINY_PROMPTS = [[5, 9, 17, 3, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [40, 41], [7] * 15]

# Served through a gateway: random decoders with the shipped pair's tokenizer, and a prompt in its domain.
PAIR_VOCAB = 4096
PROMPT = "The for statement is used to iterate"


# -- sampling: random distributions, draws from them, and the check that samples follow one ---------
def random_probs(shape, generator: torch.Generator, sharpness: float = 2.0) -> torch.Tensor:
    return torch.softmax(torch.randn(*shape, generator=generator) * sharpness, dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per distribution: [..., V] -> [...]."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def check_matches(samples: torch.Tensor, probs: torch.Tensor, tolerance: float) -> None:
    """The frequencies of `samples` are within `tolerance` of `probs` (and pass a chi-square test where scipy is installed)."""
    vocab = probs.numel()
    frequencies = torch.bincount(samples, minlength=vocab).double() / samples.numel()
    assert (frequencies - probs.double()).abs().max() < tolerance, (frequencies.tolist(), probs.tolist())
    try:
        from scipy.stats import chisquare
    except ImportError:  # the tolerance check still ran
        return
    observed = torch.bincount(samples, minlength=vocab).double()
    expected = probs.double() / probs.double().sum() * samples.numel()
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


# -- the deploy/ files --------------------------------------------------------------------------------
DEPLOY = REPO_ROOT / "deploy"
LAUNCHER = DEPLOY / "aws" / "cluster.yaml"
KUBERAY = DEPLOY / "kuberay" / "raycluster.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
README = DEPLOY / "README.md"
NEURON_CONSTRAINTS = DEPLOY / "neuron-constraints.txt"

# NeuronCores per instance type (Inferentia2: 2 per chip; Trainium: 2 per chip).
NEURON_CORES = {"inf2.xlarge": 2, "inf2.24xlarge": 12, "trn1.32xlarge": 32}
EXPECTED_WORKER_TYPES = {
    "inf2_xlarge": "inf2.xlarge",
    "inf2_24xlarge": "inf2.24xlarge",
    "trn1_32xlarge": "trn1.32xlarge",
}
RAY_INTERNAL_PORTS = {6379, 8265, 10001}
GATEWAY_PORT = 50051
METRICS_PORT = 9464

# Text that must never appear in a config or image file: token auth off, or the dashboard on all interfaces.
FORBIDDEN = [
    re.compile(r"RAY_AUTH_MODE\s*[=:]\s*[\"']?disabled", re.I),
    re.compile(r"--dashboard-host[=\s]+[\"']?0\.0\.0\.0"),
    re.compile(r"dashboard-host[\"']?\s*:\s*[\"']?0\.0\.0\.0"),
]

BASH = shutil.which("bash")


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def bash_syntax_ok(script: str) -> tuple[bool, str]:
    proc = subprocess.run([BASH, "-n", "-c", script], capture_output=True, text=True, timeout=10)
    return proc.returncode == 0, proc.stderr


def container_env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}

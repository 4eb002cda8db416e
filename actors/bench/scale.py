"""The `scale` section: host memory and time per phase for a model of a real size (issue 26).

A random-weight checkpoint of a real model's shape (TinyLlama-1.1B by default, bf16; the shape of
Llama-2-7B with `TPCLUSTER_SCALE_SHAPE=llama2-7b`) is made tensor by tensor with safetensors and a
WordLevel tokenizer of the same vocabulary size: real shapes, no download. Then, each phase in its
own processes as a user runs it, with the rise of (MemTotal - MemAvailable) sampled every 0.2 s
(page cache that can be dropped, such as a memory-mapped weight file, does not count; every process
does, Ray's object store included):

- compile: `tpcluster compile CKPT --out DIR --tp 2 --dtype bfloat16` (one prompt and one cache bucket);
- ready: `tpcluster serve --model big=DIR` until gRPC health says SERVING;
- generate: 16 greedy tokens through the gateway (decode tok/s from the stream's own stats);
- rebuild: one rank SIGKILLed, until the replica serves again;
- transformers: `from_pretrained` + greedy `generate` of 16 tokens in a fresh process, the baseline.

The same phases with a tiny model of the same architecture give the fixed cost of the processes,
which is subtracted: `over_checkpoint` is (peak rise - fixed cost) / checkpoint bytes, the figure the
issue bounds at 1.25.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SHAPES = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=32000, max_position_embeddings=2048)
NEW_TOKENS = 16
PROMPT = " ".join(f"w{i}" for i in range(100, 120))
GOAL_OVER_CHECKPOINT = 1.25


def _used() -> int:
    info = {}
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            key, value = line.split(":")
            info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


class _Peak:
    """The peak rise of host memory from now until `end()`."""

    def __init__(self) -> None:
        self.base = self.peak = _used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.started = time.perf_counter()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, _used())

    def end(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _used())
        return {"s": round(time.perf_counter() - self.started, 1), "peak_gb": round((self.peak - self.base) / 1e9, 3)}


def make_checkpoint(folder: Path, shape: dict[str, int]) -> int:
    """A random-weight bf16 Llama checkpoint of `shape` with a WordLevel tokenizer; its weight bytes."""
    import torch
    import transformers
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                                      torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])
    config.save_pretrained(folder)
    with torch.device("meta"):
        names = {k: tuple(v.shape) for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, dims in names.items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(dims, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(dims, generator=generator) * 0.02).to(torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    size = sum(t.numel() * 2 for t in tensors.values())
    del tensors
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, shape["vocab_size"])}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    fast.save_pretrained(folder)
    return size


def _cli() -> str:
    return str(Path(sys.executable).with_name("tpcluster"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_serving(target: str, model: str, process: subprocess.Popen, timeout: float) -> None:
    from clients.client import Client
    from clients.errors import TpClusterError

    deadline = time.monotonic() + timeout
    with Client(target, timeout=10) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"tpcluster serve exited ({process.returncode}) before {model} was ready")
            try:
                if client.health(model) == "SERVING":
                    return
            except TpClusterError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"{model} not ready within {timeout:.0f} s")


def _phases(checkpoint: Path, work: Path, env: dict[str, str]) -> dict[str, Any]:
    """compile, ready, generate, rebuild (see the module docstring) for one checkpoint."""
    from clients.client import Client

    out, phases = work / "compiled", {}
    peak = _Peak()
    subprocess.run([_cli(), "compile", str(checkpoint), "--out", str(out), "--tp", "2", "--dtype", "bfloat16",
                    "--batch-buckets", "1", "--prompt-buckets", "32", "--cache-buckets", "128", "--force"],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    phases["compile"] = peak.end()
    port = _free_port()
    target = f"127.0.0.1:{port}"
    log = open(work / "serve.log", "w")
    peak = _Peak()
    serve = subprocess.Popen([_cli(), "serve", "--model", f"big={out}", "--port", str(port)], env=env,
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_serving(target, "big", serve, 900)
        phases["ready"] = peak.end()
        peak = _Peak()
        with Client(target, timeout=600) as client:
            generation = client.generate(PROMPT, model="big", max_new_tokens=NEW_TOKENS)
            stats = generation.stats  # decode only: the tokens after the first, over the time after it
            decode_s = max(stats.total_ms - stats.time_to_first_token_ms, 1e-6) / 1000
            phases["generate"] = {**peak.end(), "tokens": generation.token_ids,
                                  "decode_tokens_per_second": round((stats.generated_tokens - 1) / decode_s, 2)}
            ranks = [r.pid for m in client.status().models for rep in m.replicas for r in rep.ranks]
        peak = _Peak()
        os.kill(ranks[-1], signal.SIGKILL)
        time.sleep(1.0)  # the loss is pushed within 0.1 s; then wait for the rebuild to serve
        _wait_serving(target, "big", serve, 900)
        with Client(target, timeout=600) as client:
            again = client.generate(PROMPT, model="big", max_new_tokens=NEW_TOKENS).token_ids
        phases["rebuild"] = {**peak.end(), "same_tokens": again == generation.token_ids}
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(120)
        except subprocess.TimeoutExpired:
            serve.kill()
        log.close()
    return phases


_TRANSFORMERS = """
import json, sys, time, torch, transformers
folder, prompt, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(2)
tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
ids = tokenizer(prompt, return_tensors="pt").input_ids
with torch.no_grad():
    model.generate(ids, max_new_tokens=1, do_sample=False)
    start = time.perf_counter(); model.generate(ids, max_new_tokens=1, do_sample=False); one = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, do_sample=False, min_new_tokens=new)
    total = time.perf_counter() - start
print(json.dumps({"tokens": out[0, ids.shape[1]:].tolist(), "decode_tokens_per_second": (new - 1) / max(total - one, 1e-9)}))
"""


def _transformers(checkpoint: Path) -> dict[str, Any]:
    peak = _Peak()
    done = subprocess.run([sys.executable, "-c", _TRANSFORMERS, str(checkpoint), PROMPT, str(NEW_TOKENS)],
                          check=True, capture_output=True, text=True)
    return {**peak.end(), **json.loads(done.stdout.strip().splitlines()[-1])}


def bench_scale(results: dict[str, Any], repeats: int) -> None:
    """Memory and time per phase for the shape TPCLUSTER_SCALE_SHAPE (default tinyllama-1.1b), less the
    fixed cost measured with a tiny model of the same architecture. `repeats` is unused."""
    shape_name = os.environ.get("TPCLUSTER_SCALE_SHAPE", "tinyllama-1.1b")
    if shape_name not in SHAPES:
        raise ValueError(f"TPCLUSTER_SCALE_SHAPE={shape_name!r}: pick one of {sorted(SHAPES)}")
    with tempfile.TemporaryDirectory(prefix="tpcluster-bench-scale-") as tmp:
        root = Path(tmp)
        env = dict(os.environ, TPCLUSTER_CACHE=str(root / "cache"))
        measured = {}
        for label, shape in (("tiny", TINY), ("model", SHAPES[shape_name])):
            work = root / label
            size = make_checkpoint(work / "checkpoint", shape)
            measured[label] = {"checkpoint_gb": round(size / 1e9, 3), **_phases(work / "checkpoint", work, env)}
            if label == "model":
                measured[label]["transformers"] = _transformers(work / "checkpoint")
    model, tiny = measured["model"], measured["tiny"]
    for phase in ("compile", "ready", "generate", "rebuild"):
        fixed = tiny[phase]["peak_gb"]
        model[phase]["fixed_gb"] = fixed
        model[phase]["over_checkpoint"] = round((model[phase]["peak_gb"] - fixed) / model["checkpoint_gb"], 2)
    reference = model["transformers"]
    results["scale"] = {
        "shape": shape_name, "tp_degree": 2, "dtype": "bfloat16", "model": model, "tiny": tiny,
        "goal_over_checkpoint": GOAL_OVER_CHECKPOINT,
        "decode_ratio_to_transformers": round(model["generate"]["decode_tokens_per_second"]
                                              / reference["decode_tokens_per_second"], 2),
        "same_tokens_as_transformers": model["generate"]["tokens"] == reference["tokens"],
    }

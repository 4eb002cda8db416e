"""Models of a real size in bounded host memory (issue 26): what a compile writes and in which dtype.
Its own module: the compile needs two free NeuronCores, which test_compile_serve's served models hold."""

import json

import pytest
import torch
from safetensors import safe_open

from cluster.models import hub
from tests.hf_checkpoints import save_decoder

pytestmark = pytest.mark.integration


def test_a_bf16_checkpoint_compiles_to_bf16_rank_files_each_rank_wrote(ray_cluster, tmp_path):
    """bf16 stays bf16 (no float32 detour), and the saved folder is what the ranks wrote themselves."""
    model = save_decoder(tmp_path / "ckpt", "LlamaForCausalLM")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "ckpt")  # the same folder, its weights now bf16
    options = hub.CompileOptions(batch_buckets=(1,), prompt_buckets=(16,), cache_buckets=(64,), verify_tokens=0,
                                 dtype="bfloat16")
    hub.compile(tmp_path / "ckpt", tmp_path / "out", 2, options, progress=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    weight_files = [name for name in manifest["files"] if name.startswith("weights/")]
    assert "weights/rank_00.safetensors" in weight_files and "weights/rank_01.safetensors" in weight_files
    floats = {}
    for name in weight_files:
        with safe_open(str(tmp_path / "out" / name), "pt") as handle:
            floats.update({key: handle.get_slice(key).get_dtype() for key in handle.keys()
                           if handle.get_slice(key).get_dtype().startswith(("F", "BF"))})
    # every parameter bf16; only RoPE's inverse frequencies stay float32 (a buffer transformers keeps so)
    assert {k for k, dtype in floats.items() if dtype != "BF16"} == {"model.inv_freq"}, floats
    assert sum(dtype == "BF16" for dtype in floats.values()) > 10
    assert not list((tmp_path / "out").rglob("*.tmp"))

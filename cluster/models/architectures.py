"""What a Hugging Face checkpoint folder is, and whether it compiles at a TP degree: checked in the
calling process, before any rank starts, so bad input fails at once with an error that says why.

`inspect_checkpoint(folder, task)` reads config.json: the architecture (one of `SUPPORTED`), the
task it serves (inferred, or as asked where the architecture can serve it) and the model's family.
`check_checkpoint(info, tp_degree, max_cache)` checks the TP split, the settings (RoPE type, sliding
window), the tokenizer and every weight tensor's shape against the config.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cluster.errors import CheckpointError, ShardingError, UnsupportedModel

# architecture -> tasks it serves, the first one inferred
SUPPORTED: dict[str, tuple[str, ...]] = {
    "LlamaForCausalLM": ("generate",),
    "MistralForCausalLM": ("generate",),
    "Qwen2ForCausalLM": ("generate",),
    "BertModel": ("embed",),
    "RobertaModel": ("embed",),
    "BertForSequenceClassification": ("classify", "embed"),
    "RobertaForSequenceClassification": ("classify", "embed"),
    "T5ForConditionalGeneration": ("generate",),
}
DECODERS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SEQ2SEQ = ("T5ForConditionalGeneration",)
POOLING_MODES = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json",
                   "chat_template.jinja")


@dataclass(frozen=True)
class CheckpointInfo:
    folder: Path
    architecture: str
    task: str
    config: dict = field(repr=False, compare=False)

    @property
    def is_decoder(self) -> bool:
        return self.architecture in DECODERS

    @property
    def is_seq2seq(self) -> bool:
        return self.architecture in SEQ2SEQ

    @property
    def labels(self) -> tuple[str, ...]:
        """Class names by index, from config.json's id2label (classifiers)."""
        id2label = self.config.get("id2label") or {}
        return tuple(str(id2label[k]) for k in sorted(id2label, key=int)) if self.task == "classify" else ()

    @property
    def max_positions(self) -> int:
        """The longest sequence the position embeddings hold (RoBERTa's first pad_token_id + 1 are taken)."""
        positions = int(self.config.get("max_position_embeddings") or 0)
        if self.architecture.startswith("Roberta"):
            positions -= int(self.config.get("pad_token_id") or 0) + 1
        return positions


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a Hugging Face checkpoint folder holds config.json beside its weights")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def inspect_checkpoint(folder: str | os.PathLike, task: str | None = None) -> CheckpointInfo:
    """The architecture and task of a checkpoint folder; UnsupportedModel names what is supported."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    config = read_config(folder)
    names = config.get("architectures") or []
    architecture = next((a for a in names if a in SUPPORTED), None)
    if architecture is None:
        raise UnsupportedModel(f"{folder / 'config.json'}: architecture {', '.join(names) or '(none named)'} is not "
                               f"supported; supported: {', '.join(SUPPORTED)}")
    tasks = SUPPORTED[architecture]
    if task is not None and task not in tasks:
        raise UnsupportedModel(f"{architecture} cannot serve task {task!r}; it serves {', '.join(tasks)}")
    return CheckpointInfo(folder, architecture, task or tasks[0], config)


def check_sharding(info: CheckpointInfo, tp_degree: int) -> None:
    """ShardingError, with the numbers, where a split dimension does not divide by `tp_degree`."""
    config = info.config
    if info.is_seq2seq:
        sizes = [("heads", config["num_heads"]), ("d_ff", config["d_ff"]), ("vocab_size", config["vocab_size"])]
    else:
        sizes = [("attention heads", config["num_attention_heads"]), ("intermediate_size", config["intermediate_size"])]
    if info.is_decoder:
        sizes += [("KV heads", config.get("num_key_value_heads") or config["num_attention_heads"]),
                  ("vocab_size", config["vocab_size"])]
    bad = [f"{count} {what}" for what, count in sizes if count % tp_degree]
    if bad:
        raise ShardingError(f"{info.architecture} at tp {tp_degree}: {', '.join(bad)} do not divide by {tp_degree}; "
                            f"pick a tp degree that divides them")


def check_settings(info: CheckpointInfo, max_cache: int = 0) -> None:
    """UnsupportedModel for settings the compiled model would not honour."""
    if info.is_seq2seq:
        from cluster.models.t5 import T5Shape

        T5Shape.from_config(info.config)  # refuses unsupported feed-forwards
        return
    if info.is_decoder:
        from cluster.models.llama import LlamaShape

        shape = LlamaShape.from_config(info.config)  # refuses unsupported RoPE types
        if shape.sliding_window is not None and shape.sliding_window < max_cache:
            raise UnsupportedModel(
                f"{info.architecture}: sliding_window {shape.sliding_window} is below the largest cache bucket "
                f"{max_cache}; attention here spans the whole cache, so compile with cache buckets of at most "
                f"{shape.sliding_window} tokens")
        act = info.config.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModel(f"{info.architecture}: hidden_act {act!r} is not supported (silu only)")
        return
    if info.task == "embed":
        from cluster.models.bert import pooling_config

        pooling = pooling_config(info.folder)
        modes = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
        if len(modes) != 1 or modes[0] not in POOLING_MODES:
            raise UnsupportedModel(f"{info.folder / '1_Pooling' / 'config.json'}: pooling {modes} is not supported; "
                                   f"one of {', '.join(POOLING_MODES)}")


def check_tokenizer(info: CheckpointInfo) -> int:
    """The tokenizer's size; CheckpointError when there is none, it does not load, or it exceeds the vocabulary."""
    if not any((info.folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{info.folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:5])}, ...); "
                              "save the tokenizer beside the model (tokenizer.save_pretrained)")
    from transformers import AutoTokenizer

    try:
        size = len(AutoTokenizer.from_pretrained(info.folder))
    except Exception as exc:  # whatever the tokenizer files hold that transformers cannot read
        raise CheckpointError(f"{info.folder}: the tokenizer does not load: {exc}") from exc
    if size > int(info.config["vocab_size"]):
        raise CheckpointError(f"{info.folder}: the tokenizer has {size} tokens but config.json's vocab_size is "
                              f"{info.config['vocab_size']}")
    return size


def skeleton(info: CheckpointInfo) -> tuple[torch.nn.Module, str, tuple[str, ...]]:
    """The TP=1 model the weights load into, on the meta device (no memory): (module, strip, drop)."""
    with torch.device("meta"):
        if info.is_seq2seq:
            from cluster.models.t5 import T5ForConditionalGeneration, T5Shape

            return T5ForConditionalGeneration(T5Shape.from_config(info.config), 1, 2, 2), "", ()
        if info.is_decoder:
            from cluster.models.llama import LlamaForCausalLM, LlamaShape

            return LlamaForCausalLM(LlamaShape.from_config(info.config), 1, 2), "", ()
        from cluster.models.bert import pooling_config
        from cluster.models.encoders import build_encoder, encoder_config

        _, target, strip, drop = build_encoder(info.architecture, info.task, encoder_config(info.folder),
                                               tensor_parallel=False, pooling=pooling_config(info.folder))
        return target, strip, drop


def check_weights(info: CheckpointInfo) -> int:
    """Every tensor the config implies, present with its shape (CheckpointError names the others);
    returns the parameter count."""
    from cluster.models.hf_weights import compare_shapes, expected_shapes, rename, tensor_shapes

    found = tensor_shapes(info.folder)
    model, strip, drop = skeleton(info)
    if info.is_decoder:
        from cluster.models.llama import LlamaShape, tie_lm_head

        found = tie_lm_head(found, LlamaShape.from_config(info.config))
    if info.is_seq2seq:
        from cluster.models.t5 import T5Shape, t5_names

        found = t5_names(found, T5Shape.from_config(info.config))
    found = rename(found, strip, drop)
    buffers = {name for name, _ in model.named_buffers()}
    expected = {k: v for k, v in expected_shapes(model).items() if k not in buffers}
    compare_shapes(expected, {k: v for k, v in found.items() if k not in buffers}, str(info.folder))
    return sum(int(torch.Size(s).numel()) for s in expected.values())


def check_checkpoint(info: CheckpointInfo, tp_degree: int, max_cache: int = 0) -> int:
    """Every check above, cheapest first; returns the parameter count."""
    check_sharding(info, tp_degree)
    check_settings(info, max_cache)
    check_tokenizer(info)
    return check_weights(info)

"""Small random-weight Hugging Face checkpoints, saved by transformers' own classes (no downloads),
and their references: transformers' greedy tokens, logits and sentence-transformers' embeddings.

Decoders use the shipped pair's tokenizer (4096 tokens); encoders the embedded MiniLM's (30522).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

DECODER_VOCAB = 4096
ENCODER_VOCAB = 30522
DECODER_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, max_position_embeddings=512, bos_token_id=1, eos_token_id=None)
ENCODER_SHAPE = dict(vocab_size=ENCODER_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64)

# architecture -> (transformers config class, config overrides): each exercises one more setting
DECODERS = {
    "LlamaForCausalLM": ("LlamaConfig", dict(tie_word_embeddings=False, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "MistralForCausalLM": ("MistralConfig", dict(tie_word_embeddings=False, head_dim=32, sliding_window=512)),
    "Qwen2ForCausalLM": ("Qwen2Config", dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=2.0))),
}


def _tokenizer_files(source: Path, folder: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)


def _perturb_biases(model: torch.nn.Module, seed: int) -> None:
    """transformers initialises biases to zero: random ones, so that a bias lost on the way shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def save_decoder(folder: Path, architecture: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A seeded random decoder of `architecture` with the pair's tokenizer, saved to `folder`; returns it."""
    import transformers

    from cluster.models.pair import pair_path

    config_class, settings = DECODERS[architecture]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(vocab_size=DECODER_VOCAB, **{**DECODER_SHAPE, **settings, **overrides})
    model = getattr(transformers, architecture)(config).eval()
    _perturb_biases(model, seed)
    model.save_pretrained(folder)
    _tokenizer_files(pair_path(), folder, ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"))
    return model


T5_SHAPE = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                pad_token_id=3, eos_token_id=1, decoder_start_token_id=3)


def save_t5(folder: Path, gated: bool = False, seed: int = 0) -> torch.nn.Module:
    """A seeded random T5ForConditionalGeneration with the pair's tokenizer, saved to `folder`; returns it.
    relu T5 ties its embeddings (and scales the output), gated-gelu T5 v1.1 does not. transformers
    initialises T5 with small weights whose greedy output repeats one token: they are redrawn larger."""
    from transformers import T5Config, T5ForConditionalGeneration

    from cluster.models.pair import pair_path

    torch.manual_seed(seed)
    config = T5Config(vocab_size=DECODER_VOCAB, feed_forward_proj="gated-gelu" if gated else "relu",
                      tie_word_embeddings=not gated, **T5_SHAPE)
    model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    _tokenizer_files(pair_path(), folder, ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"))
    return model


def hf_seq2seq_greedy(model: torch.nn.Module, prompt: list[int], new: int, eos: bool = False) -> list[int]:
    """transformers' greedy tokens of an encoder-decoder for the encoder input `prompt` (the decoder's
    start token left out); exactly `new` unless `eos`, where it stops at (and keeps) the eos."""
    ids = torch.tensor([list(prompt)])
    limits = dict(max_new_tokens=new) if eos else dict(max_new_tokens=new, min_new_tokens=new)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, **limits)
    return out[0, 1:].tolist()


def _minilm_tokenizer(folder: Path) -> None:
    from cluster.models.bert import minilm_path

    _tokenizer_files(minilm_path(), folder, ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"))


def save_classifier(folder: Path, architecture: str, labels: tuple[str, ...], seed: int = 0) -> torch.nn.Module:
    """A seeded random Bert/RobertaForSequenceClassification with the MiniLM tokenizer; returns it."""
    import transformers

    torch.manual_seed(seed)
    extra = dict(max_position_embeddings=64)
    if architecture.startswith("Roberta"):  # RoBERTa: one token type, positions after pad_token_id
        extra = dict(max_position_embeddings=66, pad_token_id=0, type_vocab_size=1)
    config_class = getattr(transformers, "BertConfig" if architecture.startswith("Bert") else "RobertaConfig")
    config = config_class(**ENCODER_SHAPE, **extra, id2label=dict(enumerate(labels)),
                          label2id={label: i for i, label in enumerate(labels)})
    model = getattr(transformers, architecture)(config).eval()
    _perturb_biases(model, seed)
    model.save_pretrained(folder)
    _minilm_tokenizer(folder)
    return model


def save_bert(folder: Path, seed: int = 0) -> torch.nn.Module:
    """A seeded random BertModel (plain folder: mean pooling) with the MiniLM tokenizer; returns it."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    model = BertModel(BertConfig(**ENCODER_SHAPE, max_position_embeddings=64)).eval()
    _perturb_biases(model, seed)
    model.save_pretrained(folder)
    _minilm_tokenizer(folder)
    return model


def save_sentence_transformer(folder: Path, seed: int = 0, pooling: str = "cls") -> Path:
    """A sentence-transformers folder (BertModel + 1_Pooling + Normalize), written by sentence-transformers."""
    from sentence_transformers import SentenceTransformer, models

    base = folder.with_name(folder.name + "-base")
    save_bert(base, seed)
    transformer = models.Transformer(str(base), max_seq_length=32)
    modules = [transformer, models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode=pooling), models.Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    return folder


def hf_encoder_output(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None,
                      pooling: str | None = None) -> torch.Tensor:
    """transformers' own forward: classifier logits, or (with `pooling` "mean") the masked mean of the states."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    if pooling is None:
        return out.logits
    weights = mask[..., None].float()
    return (out.last_hidden_state * weights).sum(1) / weights.sum(1)

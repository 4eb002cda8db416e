"""The project's own speculative-decoding pair: a small target Llama and a tiny draft.

Both share one byte-level BPE tokenizer and were trained on English text that ships with
CPython (see ``MODEL_CARD.md`` in this folder, and ``deploy/pair/train.py`` to re-make them)::

    tokenizer = AutoTokenizer.from_pretrained(pair_path())
    target = LlamaForCausalLM.from_pretrained(target_path(), dtype="float32")
    draft = LlamaForCausalLM.from_pretrained(draft_path(), dtype="float32")

Importing this package is cheap: it only names the folders.
"""

from __future__ import annotations

import pathlib

__all__ = ["draft_path", "pair_path", "target_path"]


def pair_path() -> pathlib.Path:
    """The folder holding the tokenizer, ``target/``, ``draft/`` and the model card."""
    return pathlib.Path(__file__).resolve().parent


def target_path() -> pathlib.Path:
    """The target model's folder (``config.json``, ``model.safetensors``, ...)."""
    return pair_path() / "target"


def draft_path() -> pathlib.Path:
    """The draft model's folder (``config.json``, ``model.safetensors``, ...)."""
    return pair_path() / "draft"

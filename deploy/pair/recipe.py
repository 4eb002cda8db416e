"""The pieces of the pair's recipe: tokenizer, model shapes, token streams, metrics.

``train.py`` strings these together; they are kept apart so that the shapes and the
evaluation used for the model card can be read (and reused) without the training loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<pad>")
BOS_ID, EOS_ID, UNK_ID, PAD_ID = range(4)
VOCAB_SIZE = 4096
SEQ_LEN = 256
MAX_POSITIONS = 1024


@dataclasses.dataclass(frozen=True)
class Shape:
    """The size of one LlamaForCausalLM of the pair."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int

    def config(self) -> LlamaConfig:
        """The LlamaConfig for this shape, sharing vocab and special ids with the pair."""
        return LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            intermediate_size=self.intermediate,
            max_position_embeddings=MAX_POSITIONS,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        )


# Target: 2.7 x 256 = 691 -> 704 (a multiple of 64). Draft: 3 x 128 = 384.
TARGET_SHAPE = Shape(hidden=256, layers=6, heads=8, kv_heads=4, intermediate=704)
DRAFT_SHAPE = Shape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=384)


def shape_with_layers(config: LlamaConfig, layers: int) -> Shape:
    """The width of ``config`` with ``layers`` decoder layers (``distill.py``'s drafts)."""
    return Shape(
        hidden=config.hidden_size,
        layers=layers,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        intermediate=config.intermediate_size,
    )


def build_model(shape: Shape, seed: int) -> LlamaForCausalLM:
    """A freshly initialised fp32 model of ``shape`` with the pair's generation defaults."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(shape.config())
    model.generation_config = generation_config()
    return model


def generation_config() -> GenerationConfig:
    """Greedy decoding that stops at ``</s>``."""
    return GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False
    )


def parameter_count(model: torch.nn.Module) -> int:
    """Number of parameters in ``model``."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(docs: Sequence[str], out: pathlib.Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``docs`` and save it under ``out`` for AutoTokenizer.

    Encoding with special tokens prepends ``<s>``; the model never sees ``<unk>``
    (byte-level BPE covers every byte) but the token exists for tooling that wants it.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer, length=len(docs))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == token_id, (token, tok.token_to_id(token))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=MAX_POSITIONS,
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    _write_tokenizer_maps(out)
    return fast


def _write_tokenizer_maps(out: pathlib.Path) -> None:
    """Name the portable class and write the special-token map older loaders read."""
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    special = {name: token for name, token in zip(names, SPECIAL_TOKENS, strict=True)}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def token_stream(tokenizer: PreTrainedTokenizerFast, docs: Sequence[str]) -> torch.Tensor:
    """All of ``docs`` as one int64 stream: ``<s> doc </s> <s> doc </s> ...``."""
    encoded = tokenizer.backend_tokenizer.encode_batch(list(docs), add_special_tokens=False)
    ids: list[int] = []
    for doc in encoded:
        ids.append(BOS_ID)
        ids.extend(doc.ids)
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


def fixed_windows(stream: torch.Tensor, count: int | None = None, seed: int = 0) -> torch.Tensor:
    """``SEQ_LEN + 1``-token windows of ``stream``: all of them in order, or ``count`` at random."""
    span = SEQ_LEN + 1
    if count is None:
        starts = torch.arange(0, len(stream) - span + 1, SEQ_LEN)
    else:
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(stream) - span + 1, (count,), generator=generator)
    return torch.stack([stream[s : s + span] for s in starts.tolist()])


def random_batches(stream: torch.Tensor, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """An endless supply of ``[batch, SEQ_LEN + 1]`` windows at random offsets."""
    generator = torch.Generator().manual_seed(seed)
    span = SEQ_LEN + 1
    offsets = torch.arange(span)
    while True:
        starts = torch.randint(0, len(stream) - span + 1, (batch, 1), generator=generator)
        yield stream[starts + offsets]


# ---------------------------------------------------------------- losses and metrics


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` [B, T, V] against ``labels`` [B, T]."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def distill_kl(draft_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(target || draft); the target side carries no gradient."""
    vocab = draft_logits.shape[-1]
    draft_logp = F.log_softmax(draft_logits.reshape(-1, vocab), dim=-1)
    target_logp = F.log_softmax(target_logits.detach().reshape(-1, vocab), dim=-1)
    return F.kl_div(draft_logp, target_logp, log_target=True, reduction="batchmean")


@dataclasses.dataclass
class PairMetrics:
    """Validation numbers for the pair on one set of windows."""

    target_loss: float
    draft_loss: float
    kl: float
    greedy_agreement: float
    sampled_acceptance: float
    target_top1: float
    draft_top1: float

    @property
    def target_ppl(self) -> float:
        """Perplexity of the target."""
        return math.exp(self.target_loss)

    @property
    def draft_ppl(self) -> float:
        """Perplexity of the draft."""
        return math.exp(self.draft_loss)


@torch.no_grad()
def evaluate_pair(
    target: LlamaForCausalLM, draft: LlamaForCausalLM, windows: torch.Tensor, batch: int = 16
) -> PairMetrics:
    """Losses, KL and agreement of the pair on ``windows`` (``[N, SEQ_LEN + 1]``).

    ``greedy_agreement`` is the fraction of positions where both models' argmax next
    token is the same (the per-token acceptance of greedy speculative decoding);
    ``sampled_acceptance`` is the mean of ``sum_v min(p_target, p_draft)``, the
    per-token acceptance of speculative sampling at temperature 1; ``*_top1`` are the
    models' next-token accuracies.
    """
    was_training = (target.training, draft.training)
    target.eval()
    draft.eval()
    sums = torch.zeros(7, dtype=torch.float64)
    positions = 0
    for chunk in windows.split(batch):
        inputs, labels = chunk[:, :-1], chunk[:, 1:]
        t_logits = target(input_ids=inputs).logits.float()
        d_logits = draft(input_ids=inputs).logits.float()
        n = labels.numel()
        t_prob, d_prob = t_logits.softmax(-1), d_logits.softmax(-1)
        sums += torch.tensor(
            [
                next_token_loss(t_logits, labels).item() * n,
                next_token_loss(d_logits, labels).item() * n,
                distill_kl(d_logits, t_logits).item() * n,
                (t_logits.argmax(-1) == d_logits.argmax(-1)).sum().item(),
                torch.minimum(t_prob, d_prob).sum(-1).sum().item(),
                (t_logits.argmax(-1) == labels).sum().item(),
                (d_logits.argmax(-1) == labels).sum().item(),
            ],
            dtype=torch.float64,
        )
        positions += n
    target.train(was_training[0])
    draft.train(was_training[1])
    values = (sums / positions).tolist()
    return PairMetrics(*values)


@torch.no_grad()
def mean_loss(model: LlamaForCausalLM, windows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token cross-entropy of ``model`` on ``windows``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch):
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        total += next_token_loss(logits, chunk[:, 1:]).item() * chunk[:, 1:].numel()
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return total / count


@torch.no_grad()
def generated_agreement(
    target: LlamaForCausalLM,
    draft: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    new_tokens: int = 64,
) -> float:
    """Greedy agreement of the pair on the target's own greedy continuations of ``prompts``.

    This is the text a greedy speculative decoder verifies, so it is the acceptance
    rate such a decoder sees (per proposed token, before the first rejection).
    """
    config = generation_config()
    config.max_new_tokens = new_tokens
    agree, total = 0, 0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        sequence = target.generate(input_ids=ids, generation_config=config)
        start = ids.shape[1] - 1  # logits at position i predict token i + 1
        t_next = target(input_ids=sequence).logits[0, start:-1].argmax(-1)
        d_next = draft(input_ids=sequence).logits[0, start:-1].argmax(-1)
        agree += int((t_next == d_next).sum())
        total += t_next.numel()
    return agree / total


@torch.no_grad()
def greedy_continuation(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompt: str, new_tokens: int = 60
) -> str:
    """``prompt`` followed by ``new_tokens`` greedy tokens of ``model``, decoded."""
    encoded = tokenizer(prompt, return_tensors="pt")
    config = generation_config()
    config.max_new_tokens = new_tokens
    output = model.generate(**encoded, generation_config=config)
    return tokenizer.decode(output[0], skip_special_tokens=True)

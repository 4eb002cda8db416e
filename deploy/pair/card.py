"""``MODEL_CARD.md`` for the speculative-decoding pair, written from a training run."""

from __future__ import annotations

import dataclasses
import math
import pathlib

import corpus  # sibling modules: deploy/pair/ is on sys.path when train.py runs
import recipe

PROMPTS = ("The for statement", "A class definition", "The json module")
AGREEMENT_PROMPTS = (
    "The for statement",
    "A class definition",
    "The json module",
    "Return the",
    "If the exception is raised",
    "The while statement",
    "Raise ValueError if",
    "The try statement",
)
GENERATED_TOKENS = 64


@dataclasses.dataclass
class CardFacts:
    """Everything the model card reports about one training run."""

    train_docs: int
    val_docs: int
    train_chars: int
    val_chars: int
    train_tokens: int
    val_tokens: int
    target_params: int
    draft_params: int
    target_steps: int
    draft_steps: int
    batch: int
    train_eval_windows: int
    target_train_loss: float
    draft_train_loss: float
    val: recipe.PairMetrics
    generated_agreement: float
    train_minutes: float
    total_minutes: float
    machine: str
    command: str
    samples: list[str]
    versions: str


def _shape_row(name: str, shape: recipe.Shape, params: int) -> str:
    return (
        f"| {name} | {params:,} | {shape.hidden} | {shape.layers} | {shape.heads} | "
        f"{shape.kv_heads} | {shape.intermediate} |"
    )


def _folder_size(folder: pathlib.Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def render(facts: CardFacts, folder: pathlib.Path) -> str:
    """The card's Markdown text; ``folder`` is where the pair was saved (for sizes)."""
    v = facts.val
    sizes = {name: _folder_size(folder / name) for name in ("target", "draft")}
    samples = "\n\n".join(
        f"**Prompt:** `{prompt}`\n\n```text\n{sample}\n```"
        for prompt, sample in zip(PROMPTS, facts.samples, strict=True)
    )
    return f"""# tpcluster speculative-decoding pair

A small **target** and a much smaller **draft** causal language model
(`LlamaForCausalLM`) that share one tokenizer, made for testing speculative decoding in
tpcluster. Both were trained from scratch on English text that ships with CPython, on a
CPU, in one run of `deploy/pair/train.py`. They know a little about Python's
language reference and standard library and nothing else; they are test fixtures, not
useful language models.

## Files

| path | what |
| --- | --- |
| `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json` | byte-level BPE, {recipe.VOCAB_SIZE} tokens |
| `target/` | `config.json`, `generation_config.json`, `model.safetensors` (float16, {sizes['target'] / 1e6:.1f} MB) |
| `draft/` | `config.json`, `generation_config.json`, `model.safetensors` (float16, {sizes['draft'] / 1e6:.1f} MB) |

The weights are stored in float16 to keep the files small; load them in float32 for
CPU inference (every number below was measured after that round trip):

```python
from transformers import AutoTokenizer, LlamaForCausalLM
from cluster.models.pair import draft_path, pair_path, target_path

tokenizer = AutoTokenizer.from_pretrained(pair_path())
target = LlamaForCausalLM.from_pretrained(target_path(), dtype="float32")
draft = LlamaForCausalLM.from_pretrained(draft_path(), dtype="float32")
ids = tokenizer("The for statement", return_tensors="pt")
out = target.generate(**ids, assistant_model=draft, max_new_tokens=40, do_sample=False)
print(tokenizer.decode(out[0], skip_special_tokens=True))
```

## Corpus

* `pydoc_data.topics.topics`: the language reference topics behind `help()`, cut into
  passages of about {corpus.TOPIC_PASSAGE_CHARS} characters at blank lines.
* docstrings (`inspect.getdoc`) of the public standard-library modules in
  `sys.stdlib_module_names` and the public submodules of its packages, and of their
  public classes, functions and methods, each headed by its qualified name and
  signature. Private, test, GUI (`tkinter`, `turtle`, `idlelib`), side-effecting
  (`this`, `antigravity`, `readline`) and shimmed (`distutils`) modules are skipped;
  repeated docstrings are kept once.

Visiting order is sorted, so the corpus is fixed for a given Python build. One passage
in 50, chosen by CRC-32, is held out for validation.

| split | documents | characters | tokens |
| --- | --- | --- | --- |
| train | {facts.train_docs:,} | {facts.train_chars:,} | {facts.train_tokens:,} |
| validation | {facts.val_docs:,} | {facts.val_chars:,} | {facts.val_tokens:,} |

## Tokenizer

Byte-level BPE (`tokenizers`), vocabulary {recipe.VOCAB_SIZE}, trained on the
training split. Special tokens: `<s>` = {recipe.BOS_ID} (bos, prepended on encode),
`</s>` = {recipe.EOS_ID} (eos), `<unk>` = {recipe.UNK_ID}, `<pad>` = {recipe.PAD_ID}.
Every training document is `<s> text </s>`; documents are packed into
{recipe.SEQ_LEN}-token windows.

## Models

| model | parameters | hidden | layers | heads | KV heads | intermediate |
| --- | --- | --- | --- | --- | --- | --- |
{_shape_row("target", recipe.TARGET_SHAPE, facts.target_params)}
{_shape_row("draft", recipe.DRAFT_SHAPE, facts.draft_params)}

Both: vocabulary {recipe.VOCAB_SIZE}, `max_position_embeddings` {recipe.MAX_POSITIONS},
RoPE theta 10000, RMSNorm eps 1e-5, SiLU MLP, untied input and output embeddings.

## Training

fp32, AdamW (betas 0.9/0.95, weight decay 0.1 on matrices, gradient clip 1.0),
batches of {facts.batch} x {recipe.SEQ_LEN} tokens at random offsets, 100 warmup steps
then a cosine decay to 10% of the peak learning rate, driven by the wall clock.

1. **Joint** (80% of the training time): the target learns cross-entropy (peak lr 2e-3);
   on the same batch the draft learns `0.5 * CE + 0.5 * KL(target || draft)` (peak lr
   3e-3). The target with the lowest validation loss is kept.
2. **Distillation** (20%): the kept target is frozen; the draft learns
   `0.9 * KL + 0.1 * CE` against it. The draft with the lowest validation value of that
   objective is kept.

Steps: target {facts.target_steps:,}, draft {facts.draft_steps:,}.

Training took {facts.train_minutes:.1f} minutes ({facts.total_minutes:.1f} minutes for the whole run)
on a {facts.machine}, under `nice -n 19` with `OMP_WAIT_POLICY=PASSIVE`, while other
work (tests, benchmarks) shared the machine. {facts.versions}.

## Results

| model | train loss | train ppl | val loss | val ppl |
| --- | --- | --- | --- | --- |
| target | {facts.target_train_loss:.3f} | {math.exp(facts.target_train_loss):.1f} | {v.target_loss:.3f} | {v.target_ppl:.1f} |
| draft | {facts.draft_train_loss:.3f} | {math.exp(facts.draft_train_loss):.1f} | {v.draft_loss:.3f} | {v.draft_ppl:.1f} |

Train loss is measured on {facts.train_eval_windows} fixed training windows, validation loss on all
validation windows, both after saving in float16 and reloading in float32.

How often the draft's next-token argmax equals the target's, i.e. the per-token
acceptance rate of greedy speculative decoding:

* on the validation set: **{v.greedy_agreement:.1%}**;
* on the target's own greedy continuations ({GENERATED_TOKENS} tokens after each of
  {len(AGREEMENT_PROMPTS)} short prompts such as `Return the`), the text a speculative
  decoder actually verifies: **{facts.generated_agreement:.1%}**.

For reference, on the validation set: next-token top-1 accuracy is
{v.target_top1:.1%} (target) and {v.draft_top1:.1%} (draft); KL(target || draft) is
{v.kl:.3f} nats per token; the expected per-token acceptance of speculative *sampling*
at temperature 1 (mean of `sum min(p_target, p_draft)`) is {v.sampled_acceptance:.1%}.

## Samples

Greedy continuations from the target (60 new tokens):

{samples}

## Re-making it

From the repository root (the run takes the whole budget):

```bash
{facts.command}
```

The corpus and tokenizer are deterministic for a given Python build; the weights are
not bit-for-bit reproducible because the schedule follows the wall clock.
"""


def write_model_card(path: pathlib.Path, facts: CardFacts) -> None:
    """Render the card for the pair saved next to ``path`` and write it."""
    path.write_text(render(facts, path.parent))

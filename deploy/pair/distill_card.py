"""``MODEL_CARD.md`` for the pair once ``distill.py`` has replaced its draft.

``python deploy/pair/distill.py --card`` measures the pair in ``--pair`` as ``train.py``
does, renders ``train.py``'s card (``card.py``) for it and rewrites that card for the two
phases: the target and a first draft from ``train.py``, then the shipped draft distilled
by ``distill.py``, compared with the first one from ``--out/distill_record.json``.
"""

from __future__ import annotations

import json
import pathlib

import transformers

import card  # sibling modules: deploy/pair/ is on sys.path when distill.py runs
import corpus
import recipe
import train

DECODE_STEPS = 200  # decode steps timed per model, reported on the card
STAGING = "/tmp/pair-distill"  # where the card's re-making commands stage the draft

# How the shipped draft's depth and starting layers were chosen (for the model card).
PILOTS = """
Depth and starting layers were picked by measuring, before any training, the
validation greedy agreement of drafts copied from target layers (0: 30.2%; 5: 3.1%;
0,5: 35.7%; 0,1: 36.0%; 0,3: 35.1%; 4,5: 2.9%; 0,1,5: 46.0%; 0,3,5: 46.6%), then by
4-minute pilots (peak lr 1e-3, 100 warmup steps, same objective): layers 0,5 reached
51.9% (68 steps; 59.6% on the target's greedy continuations); layers 0,5 with half
of the batches sampled from the target at temperature 1 reached 49.3% (51 steps;
54.1%); layers 0,3,5 reached 58.2% (63 steps; 61.5%)."""

# The run that made the shipped target (and the first draft), from its model card:
# train.py cannot be re-run to learn these, and the target is kept as it is.
ORIGINAL_RUN = train.RunRecord(
    target_steps=1173,
    draft_steps=1588,
    train_minutes=48.0,
    command="nice -n 19 python deploy/pair/train.py --out cluster/models/pair --minutes 50",
)
ORIGINAL_TOTAL_MINUTES = 48.1
ORIGINAL_MACHINE = "2-core x86_64 CPU (AMD EPYC), 2 torch threads"
ORIGINAL_VERSIONS = "Python 3.11.7, torch 2.13.0+cpu, transformers 5.24.0, tokenizers 0.23.3"


def _section(text: str, heading: str) -> tuple[int, int]:
    """Start and end offsets of the ``## heading`` section of ``text``."""
    start = text.index(f"\n## {heading}\n") + 1
    end = text.find("\n## ", start + 1)
    return start, (len(text) if end < 0 else end + 1)


def _replace_section(text: str, heading: str, body: str) -> str:
    start, end = _section(text, heading)
    return text[:start] + f"## {heading}\n\n{body.strip()}\n\n" + text[end:]


def write_card(pair: pathlib.Path, out: pathlib.Path) -> None:
    """Measure the pair now in ``pair`` and rewrite its model card with both phases.

    ``out`` is the folder of the ``distill.py`` run that made the draft, with its
    ``distill_record.json``.
    """
    record = json.loads((out / "distill_record.json").read_text())
    texts = corpus.build_corpus()
    facts = train.measure_pair(pair, texts, ORIGINAL_RUN, seed=0, total_minutes=lambda: ORIGINAL_TOTAL_MINUTES)
    facts.machine = ORIGINAL_MACHINE
    facts.versions = ORIGINAL_VERSIONS
    draft_config = transformers.AutoConfig.from_pretrained(str(pair / "draft"))
    shape = recipe.shape_with_layers(draft_config, draft_config.num_hidden_layers)
    text = card.render(facts, pair)
    old_row = card._shape_row("draft", recipe.DRAFT_SHAPE, facts.draft_params)
    text = text.replace(old_row, card._shape_row("draft", shape, facts.draft_params))
    text = text.replace(
        "tpcluster. Both were trained from scratch on English text that ships with CPython, on a\n"
        "CPU, in one run of `deploy/pair/train.py`.",
        "tpcluster. The target was trained from scratch on English text that ships with CPython, on a\n"
        "CPU, by `deploy/pair/train.py`; the draft was then distilled from it by\n"
        "`deploy/pair/distill.py`.",
    )
    text = text.replace("A small **target** and a much smaller **draft**", "A small **target** and a shallower **draft**")
    before, after = record["before"], record["after"]
    record["machine"] = record["machine"].replace(" 1 torch threads", " 1 torch thread")
    record["command"] = record["command"].replace(f"--out {record['args']['out']}", f"--out {STAGING}")
    ms = record["decode_step_ms"]
    hist = record["history"]
    training = f"""
fp32, AdamW (betas 0.9/0.95, weight decay 0.1 on matrices, gradient clip 1.0),
batches of {facts.batch} x {recipe.SEQ_LEN} tokens, a linear warmup (100 steps in phase 1,
{record["args"]["warmup"]} in phase 2) then a cosine decay to 10% of the peak learning rate,
driven by the wall clock.

### Phase 1: the target (and a first draft), `train.py`

1. **Joint** (80% of the training time): the target learns cross-entropy (peak lr 2e-3)
   on windows at random offsets; on the same batch a first draft (hidden 128, 2 layers,
   4 heads, 2 KV heads, intermediate 384, 1,442,432 parameters) learns
   `0.5 * CE + 0.5 * KL(target || draft)` (peak lr 3e-3). The target with the lowest
   validation loss is kept.
2. **Distillation** (20%): the kept target is frozen; the first draft learns
   `0.9 * KL + 0.1 * CE` against it. The draft with the lowest validation value of that
   objective is kept.

Steps: target {ORIGINAL_RUN.target_steps:,}, first draft {ORIGINAL_RUN.draft_steps:,}.
Training took {ORIGINAL_RUN.train_minutes:.1f} minutes ({ORIGINAL_TOTAL_MINUTES:.1f} minutes for the whole run)
on a {ORIGINAL_MACHINE}, under `nice -n 19` with `OMP_WAIT_POLICY=PASSIVE`, while other
work shared the machine. {ORIGINAL_VERSIONS}.

### Phase 2: the shipped draft, `distill.py`

The target of phase 1 is kept exactly as it was (frozen); only the draft was replaced.
The new draft is as wide as the target (hidden {shape.hidden}, {shape.heads} heads,
{shape.kv_heads} KV heads, intermediate {shape.intermediate}) but has {shape.layers} layers instead of 6,
and starts as a copy of parts of the target ("self-speculative" init): its input
embedding, final norm and output head, and its layers {", ".join(str(i) for i in record["init_layers"])}
(validation greedy agreement at that start, before any training:
{hist[0]["agreement"]:.1%}). It then learns `0.9 * KL(target || draft) + 0.1 * CE`
(peak lr {float(record["args"]["lr"]):g}) on windows of the training corpus at random offsets{_on_policy_text(record)}.
The draft with the lowest validation value of that objective is kept.{PILOTS}

Steps: {record["steps"]:,}{f" ({record['on_policy_steps']:,} of them on target continuations)" if record["on_policy_steps"] else ""}.
Training took {record["train_minutes"]:.1f} minutes ({record["total_minutes"]:.1f} minutes for the whole run,
measuring included) on a {record["machine"]}, under `nice -n 19` with `OMP_WAIT_POLICY=PASSIVE`,
while other work shared the machine. {record["versions"]}.
"""
    text = _replace_section(text, "Training", training)
    results_start, results_end = _section(text, "Results")
    results = text[results_start:results_end]
    b, a = before["val"], after["val"]
    comparison = f"""
### The draft before and after phase 2

| | first draft (before) | distilled draft (shipped) |
| --- | --- | --- |
| parameters | {before["params"]:,} | {after["params"]:,} |
| greedy agreement, validation set | {b["greedy_agreement"]:.1%} | **{a["greedy_agreement"]:.1%}** |
| greedy agreement, target's greedy continuations | {before["generated_agreement"]:.1%} | **{after["generated_agreement"]:.1%}** |
| speculative-sampling acceptance (T = 1), validation | {b["sampled_acceptance"]:.1%} | {a["sampled_acceptance"]:.1%} |
| KL(target \\|\\| draft), validation, nats/token | {b["kl"]:.3f} | {a["kl"]:.3f} |
| draft val loss | {b["draft_loss"]:.3f} | {a["draft_loss"]:.3f} |
| decode step, batch 1, ms (target: {ms["target"]:.2f} ms) | {ms["old_draft"]:.2f} ({ms["old_draft"] / ms["target"]:.0%} of the target) | {ms["new_draft"]:.2f} ({ms["new_draft"] / ms["target"]:.0%} of the target) |

A decode step is one forward pass of one new token with `past_key_values`, in float32,
1 torch thread, in-process (median over {DECODE_STEPS} steps, the models taking turns), measured
on the machine of phase 2 while other work shared it.
"""
    results = results.rstrip("\n") + "\n" + comparison
    text = text[:results_start] + results + "\n" + text[results_end:]
    remake = f"""
From the repository root, phase 1 then phase 2 (each takes its whole budget); phase 2
writes the draft to a staging folder, to be copied into `draft/`, and `--card` then
writes this card:

```bash
{ORIGINAL_RUN.command}
{record["command"]}
cp {STAGING}/draft/* cluster/models/pair/draft/
nice -n 19 python deploy/pair/distill.py --pair cluster/models/pair --out {STAGING} --card
```

The corpus and tokenizer are deterministic for a given Python build; the weights are
not bit-for-bit reproducible because the schedules follow the wall clock.
"""
    text = _replace_section(text, "Re-making it", remake)
    (pair / "MODEL_CARD.md").write_text(text.rstrip("\n") + "\n")


def _on_policy_text(record: dict) -> str:
    if not record["on_policy_steps"]:
        return ""
    args = record["args"]
    temperature = float(args["temperature"])
    how = "greedy" if temperature == 0 else f"sampled at temperature {temperature:g}"
    return (
        f" and, for a fraction {float(args['on_policy']):g} of the batches, on the target's own"
        f" continuations (a random {args['prefix']}-token prefix of the training corpus followed"
        f" by {recipe.SEQ_LEN + 1 - int(args['prefix'])} tokens {how} from the target), the kind"
        " of text a speculative decoder verifies"
    )

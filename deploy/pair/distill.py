"""Distil a new draft for the pair from the shipped target, which stays frozen.

Run from the repository root after ``train.py`` (or on the shipped pair)::

    nice -n 19 python deploy/pair/distill.py --pair cluster/models/pair --out /tmp/distill --minutes 40

The draft is a ``LlamaForCausalLM`` as wide as the target (same hidden size, heads and
MLP) but with only ``--layers`` decoder layers, so a decode step costs a fraction of the
target's. It starts as a "self-speculative" copy of the target: the target's input
embedding, final norm, output head and the layers named by ``--init-layers``. It then
learns ``0.9 * KL(target || draft) + 0.1 * CE`` on two kinds of batches:

* windows of the training corpus at random offsets (as in ``train.py``);
* with probability ``--on-policy``, the target's own continuations: a random
  ``--prefix``-token prefix of the training corpus followed by tokens sampled from the
  target at ``--temperature`` (DistillSpec-style on-policy data: the text a
  speculative decoder actually verifies).

The draft with the lowest validation value of the objective is kept, saved in float16
under ``--out/draft`` and measured exactly as ``train.py`` measures the pair (after the
float16 round trip), together with the old draft (``--pair/draft``) for comparison, and
the per-token decode time of both drafts and the target (batch 1, ``past_key_values``,
median over 200 steps, 1 thread). The numbers go to ``--out/distill_record.json``.

``--card`` instead rewrites ``--pair/MODEL_CARD.md`` from that record, once the new
draft has been copied into ``--pair/draft`` (see ``distill_card.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Sequence

import tokenizers
import torch
import transformers
from transformers import AutoTokenizer, LlamaForCausalLM

import card  # sibling modules: this script's folder is on sys.path
import corpus
import distill_card
import recipe
import train

KL_WEIGHT = 0.9
LOG_EVERY_S = 60.0
EVALS_PER_RUN = 20


def self_speculative_draft(
    target: LlamaForCausalLM, layers: Sequence[int], seed: int
) -> LlamaForCausalLM:
    """A draft made of the target's embedding, final norm, head and ``layers``."""
    draft = recipe.build_model(recipe.shape_with_layers(target.config, len(layers)), seed)
    source = target.state_dict()
    state = {}
    for key in draft.state_dict():
        if key.startswith("model.layers."):
            index, rest = key[len("model.layers.") :].split(".", 1)
            state[key] = source[f"model.layers.{layers[int(index)]}.{rest}"].clone()
        else:
            state[key] = source[key].clone()
    draft.load_state_dict(state)
    return draft


def make_trainee(model: LlamaForCausalLM, lr: float) -> train.Trainee:
    """``model`` with AdamW as in ``train.py`` (weight decay on matrices only)."""
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    return train.Trainee(name="draft", model=model, optimizer=optimizer, peak_lr=lr)


@torch.no_grad()
def target_continuations(
    target: LlamaForCausalLM,
    stream: torch.Tensor,
    batch: int,
    prefix: int,
    temperature: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[batch, SEQ_LEN + 1]``: random corpus prefixes continued by the target's samples.

    Sampling runs on past the end of a document: the target starts the next one.
    ``temperature`` 0 means greedy. Also returns the target's logits at the first
    ``SEQ_LEN`` positions, which sampling computed anyway.
    """
    starts = torch.randint(0, len(stream) - prefix, (batch, 1), generator=generator)
    ids = stream[starts + torch.arange(prefix)]
    out = target(input_ids=ids, use_cache=True)
    pieces, logits_seen = [ids], [out.logits]
    while sum(p.shape[1] for p in pieces) < recipe.SEQ_LEN + 1:
        logits = out.logits[:, -1].float()
        if temperature > 0:
            probs = (logits / temperature).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        else:
            nxt = logits.argmax(-1, keepdim=True)
        pieces.append(nxt)
        if sum(p.shape[1] for p in pieces) == recipe.SEQ_LEN + 1:
            break
        out = target(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        logits_seen.append(out.logits)
    return torch.cat(pieces, dim=1), torch.cat(logits_seen, dim=1)


@dataclasses.dataclass
class ValCache:
    """The frozen target's validation outputs, computed once."""

    windows: torch.Tensor
    target_logp: list[torch.Tensor]

    @classmethod
    @torch.no_grad()
    def build(cls, target: LlamaForCausalLM, windows: torch.Tensor, batch: int = 16) -> ValCache:
        logp = [target(input_ids=c[:, :-1]).logits.float().log_softmax(-1) for c in windows.split(batch)]
        return cls(windows=windows, target_logp=logp)

    @torch.no_grad()
    def measure(self, draft: LlamaForCausalLM, batch: int = 16) -> tuple[float, float, float]:
        """Validation KL(target || draft), draft CE and greedy agreement."""
        was_training = draft.training
        draft.eval()
        kl = ce = agree = 0.0
        n = 0
        for chunk, t_logp in zip(self.windows.split(batch), self.target_logp, strict=True):
            d_logits = draft(input_ids=chunk[:, :-1]).logits.float()
            labels = chunk[:, 1:]
            count = labels.numel()
            kl += recipe.distill_kl(d_logits, t_logp).item() * count
            ce += recipe.next_token_loss(d_logits, labels).item() * count
            agree += (d_logits.argmax(-1) == t_logp.argmax(-1)).sum().item()
            n += count
        draft.train(was_training)
        return kl / n, ce / n, agree / n


def distil(
    args: argparse.Namespace,
    target: LlamaForCausalLM,
    train_stream: torch.Tensor,
    val: ValCache,
    clock: train.Clock,
) -> tuple[LlamaForCausalLM, dict]:
    """Train the draft for ``args.minutes``; return the best draft and what happened."""
    layers = [int(i) for i in args.init_layers.split(",")]
    draft = self_speculative_draft(target, layers, args.seed)
    train.WARMUP_STEPS = args.warmup  # read by train.Trainee.update
    trainee = make_trainee(draft, args.lr)
    kl0, ce0, agree0 = val.measure(draft)
    train.log(clock, f"init layers {layers}: val kl {kl0:.3f} ce {ce0:.3f} greedy agreement {agree0:.3f}")
    batches: Iterator[torch.Tensor] = recipe.random_batches(train_stream, train.BATCH, seed=args.seed + 2)
    generator = torch.Generator().manual_seed(args.seed + 3)
    seconds = args.minutes * 60.0
    eval_every = max(seconds / EVALS_PER_RUN, 20.0)
    begin = clock.now()
    next_eval, next_log = begin + eval_every, begin + LOG_EVERY_S
    sums = torch.zeros(2, dtype=torch.float64)
    steps = on_policy_steps = 0
    history = [{"minutes": 0.0, "step": 0, "kl": kl0, "ce": ce0, "agreement": agree0}]

    def evaluate() -> None:
        kl, ce, agree = val.measure(draft)
        kept = trainee.consider(KL_WEIGHT * kl + (1 - KL_WEIGHT) * ce)
        minutes = (clock.now() - begin) / 60
        history.append({"minutes": minutes, "step": trainee.step, "kl": kl, "ce": ce, "agreement": agree})
        train.log(clock, f"eval step {trainee.step}: val kl {kl:.3f} ce {ce:.3f} "
                  f"greedy agreement {agree:.3f}" + (" (kept)" if kept else ""))

    trainee.consider(KL_WEIGHT * kl0 + (1 - KL_WEIGHT) * ce0)
    while clock.now() - begin < seconds and not clock.stopped:
        progress = (clock.now() - begin) / seconds
        if args.on_policy > 0 and torch.rand((), generator=generator).item() < args.on_policy:
            window, t_logits = target_continuations(
                target, train_stream, train.BATCH, args.prefix, args.temperature, generator
            )
            on_policy_steps += 1
        else:
            window = next(batches)
            with torch.no_grad():
                t_logits = target(input_ids=window[:, :-1]).logits
        inputs, labels = window[:, :-1], window[:, 1:]
        d_logits = draft(input_ids=inputs).logits
        kl = recipe.distill_kl(d_logits, t_logits)
        ce = recipe.next_token_loss(d_logits, labels)
        trainee.update(KL_WEIGHT * kl + (1 - KL_WEIGHT) * ce, progress)
        sums += torch.tensor([kl.item(), ce.item()], dtype=torch.float64)
        steps += 1
        if clock.now() >= next_log:
            mean = (sums / steps).tolist()
            train.log(clock, f"step {trainee.step} ({on_policy_steps} on-policy): "
                      f"train kl {mean[0]:.3f} ce {mean[1]:.3f}")
            sums.zero_()
            steps = 0
            next_log = clock.now() + LOG_EVERY_S
        if clock.now() >= next_eval:
            evaluate()
            next_eval = clock.now() + eval_every
    evaluate()
    trainee.restore_best()
    draft.eval()
    info = {
        "layers": len(layers),
        "init_layers": layers,
        "steps": trainee.step,
        "on_policy_steps": on_policy_steps,
        "train_minutes": (clock.now() - begin) / 60,
        "history": history,
    }
    return draft, info


@torch.no_grad()
def decode_step_ms(
    models: dict[str, LlamaForCausalLM], steps: int = distill_card.DECODE_STEPS, warmup: int = 10
) -> dict[str, float]:
    """Median wall time of one batch-1 decode step with ``past_key_values``, per model.

    The models take turns step by step so that load from other work hits them alike.
    """
    prompt = torch.tensor([[recipe.BOS_ID, 464, 329, 2364, 318, 973, 284, 1194]]) % recipe.VOCAB_SIZE
    state = {}
    for name, model in models.items():
        model.eval()
        out = model(input_ids=prompt, use_cache=True)
        state[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(warmup + steps):
        for name, model in models.items():
            past, nxt = state[name]
            begin = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            times[name].append(time.perf_counter() - begin)
            state[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
    return {name: 1000 * statistics.median(t[warmup:]) for name, t in times.items()}


def save_draft(draft: LlamaForCausalLM, folder: pathlib.Path) -> None:
    """Write ``draft`` in float16 with its config and generation config."""
    half = recipe.build_model(recipe.shape_with_layers(draft.config, draft.config.num_hidden_layers), seed=0)
    half.load_state_dict(draft.state_dict())
    half.to(torch.float16).save_pretrained(str(folder))


def measure(
    target: LlamaForCausalLM,
    draft: LlamaForCausalLM,
    tokenizer: transformers.PreTrainedTokenizerFast,
    val_windows: torch.Tensor,
) -> dict:
    """The card's pair numbers for ``draft`` against ``target``."""
    metrics = recipe.evaluate_pair(target, draft, val_windows)
    return {
        "params": recipe.parameter_count(draft),
        "val": dataclasses.asdict(metrics),
        "generated_agreement": recipe.generated_agreement(target, draft, tokenizer, card.AGREEMENT_PROMPTS),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", type=pathlib.Path, default=pathlib.Path("cluster/models/pair"),
                        help="folder with the tokenizer, target/ and the old draft/")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="staging folder for the new draft")
    parser.add_argument("--minutes", type=float, default=40.0, help="training time (measuring comes on top)")
    parser.add_argument("--init-layers", default="0,5", help="target layers the draft starts from")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=train.WARMUP_STEPS, help="warmup steps")
    parser.add_argument("--on-policy", type=float, default=0.0, help="fraction of batches of target continuations")
    parser.add_argument("--prefix", type=int, default=16, help="corpus tokens before a target continuation")
    parser.add_argument("--temperature", type=float, default=1.0, help="target sampling temperature (0: greedy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="pilot: skip the old draft, the float16 round trip and timing")
    parser.add_argument("--card", action="store_true", help="rewrite --pair/MODEL_CARD.md from --out/distill_record.json")
    return parser.parse_args(argv)


def _reexec_with_passive_openmp(argv: Sequence[str] | None) -> None:
    """As in ``train.py``: restart with ``OMP_WAIT_POLICY=PASSIVE`` unless it is set."""
    if "OMP_WAIT_POLICY" in os.environ:
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    args = list(sys.argv[1:] if argv is None else argv)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, str(pathlib.Path(__file__).resolve()), *args], env)


def command_line(args: argparse.Namespace) -> str:
    """The command that re-makes this run."""
    return (
        f"nice -n 19 python deploy/pair/distill.py --pair {args.pair} --out {args.out} "
        f"--minutes {args.minutes:g} --init-layers {args.init_layers} --lr {args.lr:g} --warmup {args.warmup}"
        + (f" --on-policy {args.on_policy:g} --prefix {args.prefix} --temperature {args.temperature:g}"
           if args.on_policy > 0 else "")
        + (f" --threads {args.threads}" if args.threads != 1 else "")
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Distil, save and measure a new draft (or, with ``--card``, write the model card)."""
    args = parse_args(argv)
    _reexec_with_passive_openmp(argv)
    transformers.utils.logging.disable_progress_bar()
    os.nice(max(0, 19 - os.nice(0)))  # never compete with other work on the machine
    torch.set_num_threads(args.threads)
    if args.card:
        distill_card.write_card(args.pair, args.out)
        return 0
    clock = train.Clock()
    args.out.mkdir(parents=True, exist_ok=True)
    texts = corpus.build_corpus()
    tokenizer = AutoTokenizer.from_pretrained(str(args.pair))
    train_stream = recipe.token_stream(tokenizer, texts.train_docs)
    val_windows = recipe.fixed_windows(recipe.token_stream(tokenizer, texts.val_docs))
    target = LlamaForCausalLM.from_pretrained(str(args.pair / "target"), dtype=torch.float32).eval()
    target.requires_grad_(False)
    val = ValCache.build(target, val_windows)
    train.log(clock, f"corpus and target ready: {len(train_stream)} train tokens, {len(val_windows)} val windows")

    draft, info = distil(args, target, train_stream, val, clock)
    record = {"command": command_line(args), "args": {k: str(v) for k, v in vars(args).items()}, **info}
    if args.quick:
        kl, ce, agree = val.measure(draft)
        record["after"] = {"val_kl": kl, "val_ce": ce, "greedy_agreement": agree,
                           "generated_agreement": recipe.generated_agreement(
                               target, draft, tokenizer, card.AGREEMENT_PROMPTS)}
    else:
        save_draft(draft, args.out / "draft")
        new = LlamaForCausalLM.from_pretrained(str(args.out / "draft"), dtype=torch.float32).eval()
        old = LlamaForCausalLM.from_pretrained(str(args.pair / "draft"), dtype=torch.float32).eval()
        record["before"] = measure(target, old, tokenizer, val_windows)
        record["after"] = measure(target, new, tokenizer, val_windows)
        ms = decode_step_ms({"target": target, "old_draft": old, "new_draft": new})
        record["decode_step_ms"] = ms
        record["sizes_bytes"] = {
            name: sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
            for name, folder in (("target", args.pair / "target"), ("old_draft", args.pair / "draft"),
                                 ("new_draft", args.out / "draft"))
        }
    record["machine"] = train.machine_description()
    record["versions"] = (f"Python {platform.python_version()}, torch {torch.__version__}, "
                          f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}")
    record["total_minutes"] = clock.now() / 60
    (args.out / "distill_record.json").write_text(json.dumps(record, indent=2) + "\n")
    summary = {k: record[k] for k in ("steps", "on_policy_steps", "train_minutes")}
    train.log(clock, f"done: {summary}")
    for key in ("before", "after"):
        if key in record:
            val_agree = record[key].get("greedy_agreement", record[key].get("val", {}).get("greedy_agreement"))
            train.log(clock, f"{key}: val greedy agreement {val_agree:.3f}, "
                      f"generated {record[key]['generated_agreement']:.3f}")
    if "decode_step_ms" in record:
        train.log(clock, f"decode step ms: {record['decode_step_ms']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

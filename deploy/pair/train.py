"""Train the speculative-decoding pair (a target and a draft Llama) on CPython's own text.

Run from the repository root::

    nice -n 19 python deploy/pair/train.py --out cluster/models/pair --minutes 50

The script renices itself to 19 anyway and restarts itself with
``OMP_WAIT_POLICY=PASSIVE`` (see ``_reexec_with_passive_openmp``). The whole run,
tokenizer and final evaluation included, fits in ``--minutes``. The training time is
split in two phases:

1. joint (80%): the target learns next-token cross-entropy; on the same batch the
   draft learns ``0.5 * CE + 0.5 * KL(target || draft)`` against the target's logits.
   The target with the lowest validation loss is kept.
2. distillation (20%): the kept target is frozen and the draft learns
   ``0.9 * KL + 0.1 * CE`` against it; the draft with the lowest validation value of
   that objective is kept.

Both models are saved in float16 (``save_pretrained``), reloaded in float32 and
measured again for ``MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import tokenizers
import torch
import transformers
from transformers import AutoTokenizer, LlamaForCausalLM

import card  # sibling modules: this script's folder is on sys.path
import corpus
import recipe

BATCH = 16
WARMUP_STEPS = 100
TARGET_LR = 2e-3
DRAFT_LR = 3e-3
MIN_LR_RATIO = 0.1
WEIGHT_DECAY = 0.1
JOINT_FRACTION = 0.8
JOINT_KL_WEIGHT = 0.5
DISTILL_KL_WEIGHT = 0.9
LOG_EVERY_S = 60.0
EVALS_PER_RUN = 24
TRAIN_EVAL_WINDOWS = 64


@dataclasses.dataclass
class Trainee:
    """One model of the pair with its optimizer and the best weights seen so far."""

    name: str
    model: LlamaForCausalLM
    optimizer: torch.optim.Optimizer
    peak_lr: float
    step: int = 0
    best_score: float = math.inf
    best_state: dict[str, torch.Tensor] | None = None

    def update(self, loss: torch.Tensor, progress: float) -> None:
        """One AdamW step on ``loss`` with warmup then cosine decay by ``progress``."""
        warm = min(1.0, (self.step + 1) / WARMUP_STEPS)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
        lr = self.peak_lr * warm * (MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * cosine)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1

    def consider(self, score: float) -> bool:
        """Keep a copy of the weights if ``score`` is the best so far."""
        if score >= self.best_score:
            return False
        self.best_score = score
        self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return True

    def restore_best(self) -> None:
        """Load the best weights kept by :meth:`consider`, if any."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)


def make_trainee(name: str, shape: recipe.Shape, seed: int, lr: float) -> Trainee:
    """A fresh model with AdamW (weight decay on matrices only)."""
    model = recipe.build_model(shape, seed)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    return Trainee(name=name, model=model, optimizer=optimizer, peak_lr=lr)


class Clock:
    """Wall-clock bookkeeping and a stop flag raised by SIGTERM / SIGINT."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.stopped = False
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)

    def _stop(self, signum: int, _frame: object) -> None:
        print(f"signal {signum}: finishing the current step, then saving", flush=True)
        self.stopped = True

    def now(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.start


def log(clock: Clock, message: str) -> None:
    """Print ``message`` with the elapsed time."""
    print(f"[{clock.now() / 60:6.2f} min] {message}", flush=True)


def run_phase(
    clock: Clock,
    name: str,
    seconds: float,
    batches: Iterator[torch.Tensor],
    target: Trainee,
    draft: Trainee,
    val_windows: torch.Tensor,
    schedule: tuple[float, float],
    eval_every: float,
) -> None:
    """Train for ``seconds``: jointly (``name == 'joint'``) or the draft alone.

    ``schedule`` maps this phase onto the draft's cosine: its progress runs from
    ``schedule[0]`` to ``schedule[1]`` while the phase runs; the target's cosine spans
    the joint phase alone. The pair is measured on ``val_windows`` every
    ``eval_every`` seconds and at the end of the phase.
    """
    joint = name == "joint"
    kl_weight = JOINT_KL_WEIGHT if joint else DISTILL_KL_WEIGHT
    begin = clock.now()
    next_eval, next_log = begin + eval_every, begin + LOG_EVERY_S
    sums = torch.zeros(3, dtype=torch.float64)
    steps, tokens = 0, 0

    def evaluate() -> None:
        metrics = recipe.evaluate_pair(target.model, draft.model, val_windows)
        draft_score = kl_weight * metrics.kl + (1 - kl_weight) * metrics.draft_loss
        kept = target.consider(metrics.target_loss) if joint else draft.consider(draft_score)
        log(
            clock,
            f"{name} eval: val target {metrics.target_loss:.3f} draft {metrics.draft_loss:.3f} "
            f"kl {metrics.kl:.3f} greedy agreement {metrics.greedy_agreement:.3f}"
            + (" (kept)" if kept else ""),
        )

    if not joint:
        evaluate()  # the draft as it leaves the joint phase, against the kept target
    while clock.now() - begin < seconds and not clock.stopped:
        progress = (clock.now() - begin) / seconds
        window = next(batches)
        inputs, labels = window[:, :-1], window[:, 1:]
        if joint:
            t_logits = target.model(input_ids=inputs).logits
            t_loss = recipe.next_token_loss(t_logits, labels)
            target.update(t_loss, progress)
        else:
            with torch.no_grad():
                t_logits = target.model(input_ids=inputs).logits
                t_loss = recipe.next_token_loss(t_logits, labels)
        d_logits = draft.model(input_ids=inputs).logits
        kl = recipe.distill_kl(d_logits, t_logits)
        d_ce = recipe.next_token_loss(d_logits, labels)
        lo, hi = schedule
        draft.update(kl_weight * kl + (1 - kl_weight) * d_ce, lo + (hi - lo) * progress)
        sums += torch.tensor([t_loss.item(), d_ce.item(), kl.item()], dtype=torch.float64)
        steps += 1
        tokens += labels.numel()
        if clock.now() >= next_log:
            mean = (sums / steps).tolist()
            rate = tokens / max(clock.now() - begin, 1e-9)
            log(
                clock,
                f"{name} step {draft.step}: train target {mean[0]:.3f} draft {mean[1]:.3f} "
                f"kl {mean[2]:.3f}  {rate:.0f} tok/s",
            )
            sums.zero_()
            steps = 0
            next_log = clock.now() + LOG_EVERY_S
        if clock.now() >= next_eval:
            evaluate()
            next_eval = clock.now() + eval_every
    evaluate()
    if joint:
        target.restore_best()
        target.model.eval()
        target.model.requires_grad_(False)
    else:
        draft.restore_best()


def save_pair(out: pathlib.Path, target: LlamaForCausalLM, draft: LlamaForCausalLM) -> None:
    """Write ``target/`` and ``draft/`` in float16 with config and generation config."""
    for name, model in (("target", target), ("draft", draft)):
        half = recipe.build_model(
            recipe.TARGET_SHAPE if name == "target" else recipe.DRAFT_SHAPE, seed=0
        )
        half.load_state_dict(model.state_dict())
        half.to(torch.float16).save_pretrained(str(out / name))


def load_pair(out: pathlib.Path) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """Reload the saved pair in float32."""
    loaded = tuple(
        LlamaForCausalLM.from_pretrained(str(out / name), dtype=torch.float32).eval()
        for name in ("target", "draft")
    )
    return loaded[0], loaded[1]


def machine_description() -> str:
    """CPU model, core count and architecture, for the model card."""
    model_name = platform.processor() or "unknown CPU"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({model_name}), {torch.get_num_threads()} torch threads"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, required=True, help="folder to write the pair to")
    parser.add_argument("--minutes", type=float, default=50.0, help="wall-clock budget for the whole run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    return parser.parse_args(argv)


def _reexec_with_passive_openmp(argv: Sequence[str] | None) -> None:
    """Restart this process with ``OMP_WAIT_POLICY=PASSIVE`` unless it is already set.

    OpenMP threads that spin at barriers collapse when a niced job shares the cores
    with other work (measured here: 2 spinning threads ran 5x slower than 1 thread
    while tests ran beside them). libgomp reads the policy when torch loads it, which
    has happened by now, so the setting needs a fresh interpreter.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    args = list(sys.argv[1:] if argv is None else argv)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, str(pathlib.Path(__file__).resolve()), *args], env)


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What only the training run itself knows, for the model card."""

    target_steps: int
    draft_steps: int
    train_minutes: float
    command: str


def measure_pair(
    out: pathlib.Path,
    texts: corpus.Corpus,
    run: RunRecord,
    seed: int,
    total_minutes: Callable[[], float],
) -> card.CardFacts:
    """Reload the saved pair and tokenizer from ``out`` and measure them for the card.

    ``total_minutes`` is called last, so that the measuring is part of the run time.
    """
    target_model, draft_model = load_pair(out)
    tokenizer = AutoTokenizer.from_pretrained(str(out))  # what users will load
    train_stream = recipe.token_stream(tokenizer, texts.train_docs)
    val_stream = recipe.token_stream(tokenizer, texts.val_docs)
    train_windows = recipe.fixed_windows(train_stream, TRAIN_EVAL_WINDOWS, seed=seed)
    samples = [recipe.greedy_continuation(target_model, tokenizer, p) for p in card.PROMPTS]
    return card.CardFacts(
        train_docs=len(texts.train_docs),
        val_docs=len(texts.val_docs),
        train_chars=texts.train_chars,
        val_chars=texts.val_chars,
        train_tokens=len(train_stream),
        val_tokens=len(val_stream),
        target_params=recipe.parameter_count(target_model),
        draft_params=recipe.parameter_count(draft_model),
        target_steps=run.target_steps,
        draft_steps=run.draft_steps,
        batch=BATCH,
        train_eval_windows=TRAIN_EVAL_WINDOWS,
        target_train_loss=recipe.mean_loss(target_model, train_windows),
        draft_train_loss=recipe.mean_loss(draft_model, train_windows),
        val=recipe.evaluate_pair(target_model, draft_model, recipe.fixed_windows(val_stream)),
        generated_agreement=recipe.generated_agreement(
            target_model, draft_model, tokenizer, card.AGREEMENT_PROMPTS
        ),
        train_minutes=run.train_minutes,
        machine=machine_description(),
        command=run.command,
        samples=samples,
        versions=f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}",
        total_minutes=total_minutes(),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Build corpus and tokenizer, train the pair, save it, and write the model card."""
    args = parse_args(argv)
    _reexec_with_passive_openmp(argv)
    transformers.utils.logging.disable_progress_bar()
    os.nice(max(0, 19 - os.nice(0)))  # never compete with other work on the machine
    torch.set_num_threads(args.threads)
    clock = Clock()
    budget = args.minutes * 60.0
    reserve = min(120.0, max(15.0, 0.1 * budget))  # saving, reloading, measuring, samples
    out: pathlib.Path = args.out

    texts = corpus.build_corpus()
    log(clock, f"corpus: {len(texts.train_docs)} train docs ({texts.train_chars} chars), "
        f"{len(texts.val_docs)} val docs ({texts.val_chars} chars)")
    tokenizer = recipe.train_tokenizer(texts.train_docs, out)
    train_stream = recipe.token_stream(tokenizer, texts.train_docs)
    val_stream = recipe.token_stream(tokenizer, texts.val_docs)
    val_windows = recipe.fixed_windows(val_stream)
    log(clock, f"tokens: train {len(train_stream)}, val {len(val_stream)} ({len(val_windows)} windows)")

    target = make_trainee("target", recipe.TARGET_SHAPE, args.seed, TARGET_LR)
    draft = make_trainee("draft", recipe.DRAFT_SHAPE, args.seed + 1, DRAFT_LR)
    log(clock, f"params: target {recipe.parameter_count(target.model)}, draft {recipe.parameter_count(draft.model)}")
    batches = recipe.random_batches(train_stream, BATCH, seed=args.seed + 2)

    train_begin = clock.now()
    train_seconds = max(budget - reserve - train_begin, 10.0)
    joint_seconds = JOINT_FRACTION * train_seconds
    eval_every = max(train_seconds / EVALS_PER_RUN, 10.0)
    run_phase(
        clock, "joint", joint_seconds, batches, target, draft, val_windows, (0.0, JOINT_FRACTION), eval_every
    )
    distill_seconds = train_seconds - (clock.now() - train_begin)
    run_phase(
        clock, "distill", distill_seconds, batches, target, draft, val_windows, (JOINT_FRACTION, 1.0), eval_every
    )
    train_minutes = (clock.now() - train_begin) / 60.0

    save_pair(out, target.model, draft.model)
    run = RunRecord(
        target_steps=target.step,
        draft_steps=draft.step,
        train_minutes=train_minutes,
        command=f"nice -n 19 python deploy/pair/train.py --out {out} --minutes {args.minutes:g}"
        + (f" --threads {args.threads}" if args.threads != 2 else ""),
    )
    facts = measure_pair(out, texts, run, seed=args.seed, total_minutes=lambda: clock.now() / 60.0)
    final = facts.val
    card.write_model_card(out / "MODEL_CARD.md", facts)
    log(clock, f"final: val target {final.target_loss:.3f} (ppl {final.target_ppl:.1f}), "
        f"draft {final.draft_loss:.3f} (ppl {final.draft_ppl:.1f}), "
        f"greedy agreement {final.greedy_agreement:.3f}")
    log(clock, f"greedy agreement on the target's own greedy text: {facts.generated_agreement:.3f}")
    for sample in facts.samples:
        log(clock, f"sample: {sample!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

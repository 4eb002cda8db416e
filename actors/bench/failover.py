"""The `failover` section: issue 15's soak. Two replicas of every model, a rank killed every minute
under mixed load; its goal is 0 failed requests and every greedy stream identical to an undisturbed run.

One gateway, started in this process as the other serving sections start theirs, serves the MiniLM
embedder and paraphrase classifier and the shipped decoder `pair-target`, two replicas each (TP=2:
12 rank processes). Closed-loop clients, each with the default `Client` (UNAVAILABLE retried with
backoff up to its 60 s deadline), send a mix of Embed, Classify and greedy Generate for `minutes`.
Every stream's token ids are compared with the same prompt's stream taken before the load and the
kills started: a difference is a lost, duplicated or changed token. A killer thread kills one rank
process (SIGKILL, by the pid the gateway's Status reports) of a random ready replica of a random
model every `kill_every_s`, half an interval in first, and times the replica's rebuild.

Memory is each process's resident set read from /proc (Status's figure where /proc has no such
process): the gateway's process (which also runs these clients), every rank's and every
coordinator's, before the load and after it, once every replica is ready again. Ranks killed are
replaced by new processes, so rank memory is compared as totals, not per process.
"""

from __future__ import annotations

import collections
import difflib
import os
import random
import signal
import sys
import threading
import time
from typing import Any, Sequence

from actors.bench.inputs import SENTENCES
from actors.bench.measure import percentiles_ms

REPLICAS = 2
SPARE_RANKS = 1  # a hot spare rank process per replica (CoordinatorConfig.spare_ranks)
NEURON_CORES = 3 * REPLICAS * (2 + SPARE_RANKS)  # three models, TP=2 each: the local cluster must advertise this many
NEW_TOKENS = 48
PROMPTS = ("The for statement is used to", "A class definition defines", "Return a new list containing",
           "The import statement", "An expression statement is", "The while loop")
MIX = (("embed", 3), ("classify", 2), ("generate", 2))  # (RPC, weight) of each client's next request


def bench_failover(results: dict[str, Any], repeats: int, minutes: float = 10.0, clients: int = 6,
                   kill_every_s: float = 60.0, seed: int = 0) -> None:
    """Serve the three models with two replicas each and run `run_failover` against them for `minutes`."""
    from actors.gateway.app import BackgroundGateway, ServeConfig
    from actors.gateway.server import GatewayConfig
    from cluster.models.defaults import ensure_decoders, ensure_defaults

    decoders = ensure_decoders()
    if "pair-target" not in decoders:
        raise RuntimeError("the failover section needs the shipped decoder pair (cluster/models/pair), "
                           "which this checkout lacks")
    folders = {**ensure_defaults(), "pair-target": decoders["pair-target"]}
    served = BackgroundGateway(ServeConfig(models=folders, replicas=REPLICAS, spare_ranks=SPARE_RANKS,
                                           gateway=GatewayConfig(port=0)))
    try:
        tasks = {"embed": "minilm-embed", "classify": "minilm-paraphrase", "generate": "pair-target"}
        results["failover"] = run_failover(served.target, tasks, minutes * 60, clients, kill_every_s, seed)
    finally:
        served.close()


def run_failover(target: str, models: dict[str, str], seconds: float, clients: int, kill_every_s: float,
                 seed: int = 0) -> dict[str, Any]:
    """Drive the gateway at `target` (models: task -> served model name) for `seconds` while killing
    a rank every `kill_every_s`; returns every count and figure of the section."""
    from clients.client import Client

    with Client(target) as probe:
        start_status = probe.status()
        memory_start = _memory(start_status)
        # the undisturbed streams: one per prompt, alone on an idle gateway, before any kill
        references = {p: probe.generate(p, model=models["generate"], max_new_tokens=NEW_TOKENS).token_ids for p in PROMPTS}
    recoveries_start = _recoveries(start_status)
    load = _Load(target, models, references)
    started = time.monotonic()
    stop = threading.Event()
    killer = threading.Thread(target=_killer, args=(target, started, seconds, kill_every_s, seed, stop, load.kills),
                              name="failover-killer", daemon=True)
    threads = [threading.Thread(target=load.client, args=(i, started + seconds, seed), name=f"failover-client-{i}",
                                daemon=True) for i in range(clients)]
    for thread in [killer, *threads]:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, started + seconds - time.monotonic()) + 120)  # a call's deadline is 60 s
    elapsed = time.monotonic() - started
    stop.set()
    killer.join(130)
    hung = sum(t.is_alive() for t in threads)
    with Client(target) as probe:
        end_status, all_ready = _settled(probe, 180.0)
        memory_end = _memory(end_status)
    recoveries = _recoveries(end_status)
    return {
        "setup": f"{', '.join(models.values())}, {REPLICAS} replicas each, TP=2, {SPARE_RANKS} spare rank each; {clients} closed-loop clients "
                 f"(default Client), Embed/Classify/Generate weights {'/'.join(str(w) for _, w in MIX)}, greedy "
                 f"streams of {NEW_TOKENS} tokens; a rank killed (SIGKILL) every {kill_every_s:.0f} s",
        "seconds": round(elapsed, 1), "clients": clients, **load.counts(hung),
        "kills": [{key: value for key, value in kill.items() if key != "at"} for kill in load.kills], "kills_done": sum(1 for k in load.kills if k.get("pid")),
        "rebuilds_observed": sum(recoveries.values()) - sum(recoveries_start.values()),
        "rebuild_s": [k["rebuild_s"] for k in load.kills if k.get("rebuild_s") is not None],
        "all_ready_at_end": all_ready,
        "memory_start_mb": memory_start, "memory_end_mb": memory_end,
        "memory_growth_mb": memory_growth(memory_start, memory_end),
    }


class _Load:
    """The clients' shared tally: calls by RPC, outcomes by status, latencies, and the streams."""

    def __init__(self, target: str, models: dict[str, str], references: dict[str, list[int]]) -> None:
        self.target, self.models, self.references = target, models, references
        self.lock = threading.Lock()
        self.requests: collections.Counter[str] = collections.Counter()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.latencies: dict[str, list[float]] = collections.defaultdict(list)
        self.streams: list[tuple[float, float, dict[str, int]]] = []  # (began, ended, token_diff)
        self.kills: list[dict[str, Any]] = []

    def client(self, index: int, stop_at: float, seed: int) -> None:
        from clients import errors
        from clients.client import Client

        rng = random.Random(seed * 1000 + index)
        rpcs, weights = zip(*MIX)
        with Client(self.target) as client:
            while time.monotonic() < stop_at:
                rpc = rng.choices(rpcs, weights)[0]
                with self.lock:
                    self.requests[rpc] += 1
                began = time.monotonic()
                tokens = None
                try:
                    tokens = self._call(client, rpc, rng)
                    code = "OK"
                except errors.TpClusterError as exc:
                    code = exc.code.name
                except Exception as exc:  # anything else is a defect the run must surface
                    code = f"CLIENT_{type(exc).__name__}"
                ended = time.monotonic()
                with self.lock:
                    self.outcomes[f"{rpc}:{code}"] += 1
                    if code == "OK":
                        self.latencies[rpc].append((ended - began) * 1e3)
                    if tokens is not None:
                        self.streams.append((began, ended, token_diff(*tokens)))

    def _call(self, client: Any, rpc: str, rng: random.Random) -> tuple[list[int], list[int]] | None:
        """One request; for Generate, (the reference token ids, the streamed ones)."""
        if rpc == "embed":
            client.embed(rng.sample(SENTENCES, rng.randint(1, 3)), model=self.models["embed"])
        elif rpc == "classify":
            client.classify([(rng.choice(SENTENCES), rng.choice(SENTENCES))], model=self.models["classify"])
        else:
            prompt = rng.choice(PROMPTS)
            got = client.generate(prompt, model=self.models["generate"], max_new_tokens=NEW_TOKENS).token_ids
            return self.references[prompt], got
        return None

    def counts(self, hung: int) -> dict[str, Any]:
        with self.lock:
            kill_times = [k["at"] for k in self.kills if k.get("pid")]
            return {
                "requests": sum(self.requests.values()), "requests_by_rpc": dict(sorted(self.requests.items())),
                "answered": sum(self.outcomes.values()), "hung_clients": hung,
                "failed": sum(n for key, n in self.outcomes.items() if not key.endswith(":OK")),
                "failures_by_status": failures_by_status(self.outcomes),
                "outcomes": dict(sorted(self.outcomes.items())),
                "latency_ms": {rpc: percentiles_ms(s) for rpc, s in sorted(self.latencies.items()) if s},
                **compare_streams(self.streams, kill_times),
            }


def token_diff(reference: Sequence[int], got: Sequence[int]) -> dict[str, int]:
    """How `got` differs from `reference`, token by token: tokens missing from it (lost), tokens it
    has beyond the reference (duplicated), and tokens in the same place that differ (changed)."""
    lost = duplicated = changed = 0
    for op, a0, a1, b0, b1 in difflib.SequenceMatcher(None, reference, got, autojunk=False).get_opcodes():
        if op == "delete":
            lost += a1 - a0
        elif op == "insert":
            duplicated += b1 - b0
        elif op == "replace":
            changed += min(a1 - a0, b1 - b0)
            lost += max(0, (a1 - a0) - (b1 - b0))
            duplicated += max(0, (b1 - b0) - (a1 - a0))
    return {"lost": lost, "duplicated": duplicated, "changed": changed}


def compare_streams(streams: Sequence[tuple[float, float, dict[str, int]]], kill_times: Sequence[float]) -> dict[str, Any]:
    """Totals over the streams' `token_diff`s, and how many of the mismatching ones were running
    when a rank was killed (the others differ for another reason: batching, say)."""
    differing = [(began, ended, diff) for began, ended, diff in streams if any(diff.values())]
    return {
        "streams_compared": len(streams), "streams_mismatching": len(differing),
        "streams_across_a_kill": sum(1 for b, e, _ in streams if any(b <= t <= e for t in kill_times)),
        "streams_mismatching_across_a_kill": sum(1 for b, e, _ in differing if any(b <= t <= e for t in kill_times)),
        **{f"tokens_{kind}": sum(diff[kind] for _, _, diff in streams) for kind in ("lost", "duplicated", "changed")},
    }


def failures_by_status(outcomes: dict[str, int]) -> dict[str, int]:
    """{"rpc:CODE": n} -> {"CODE": n} over every outcome that is not OK."""
    failed: collections.Counter[str] = collections.Counter()
    for key, n in outcomes.items():
        code = key.rsplit(":", 1)[1]
        if code != "OK":
            failed[code] += n
    return dict(sorted(failed.items()))


def memory_growth(start: dict[str, float], end: dict[str, float]) -> dict[str, float]:
    """End minus start (MB) of each figure both have."""
    return {key: round(end[key] - start[key], 1) for key in start if key in end}


def _killer(target: str, started: float, seconds: float, every: float, seed: int, stop: threading.Event,
            kills: list[dict[str, Any]]) -> None:
    """Every `every` seconds (the first after half of one), SIGKILL one rank of a random ready replica
    of a random model, then wait for that replica to be ready again and record how long it took."""
    from clients import errors
    from clients.client import Client

    rng = random.Random(seed + 7919)
    with Client(target) as client:
        moment = started + every / 2
        while moment < started + seconds:
            if stop.wait(max(0.0, moment - time.monotonic())):
                return
            try:
                kill = _kill_one(client, rng)
            except errors.TpClusterError as exc:  # Status failed: no victim this time
                kill = {"skipped": f"Status failed: {exc.code.name}"}
            kill["at"] = time.monotonic()
            kill["t_s"] = round(kill["at"] - started, 1)
            kills.append(kill)
            victim = (f"{kill['model']} replica {kill['replica']} rank {kill['rank']} (pid {kill['pid']})"
                      if kill.get("pid") else f"nothing: {kill['skipped']}")
            print(f"failover: t={kill['t_s']:.0f} s killed {victim}", file=sys.stderr, flush=True)
            moment += every
            if kill.get("pid"):
                kill["rebuild_s"] = _wait_rebuilt(client, kill, min(moment, started + seconds + 120))


def _kill_one(client: Any, rng: random.Random) -> dict[str, Any]:
    status = client.status()
    candidates = {m.name: [r for r in m.replicas if r.ready and r.ranks] for m in status.models}
    candidates = {name: replicas for name, replicas in candidates.items() if replicas}
    if not candidates:
        return {"skipped": "no ready replica with ranks"}
    model = rng.choice(sorted(candidates))
    replica = rng.choice(candidates[model])
    rank = rng.choice(list(replica.ranks))
    if rank.pid in (0, 1, os.getpid()):
        return {"skipped": f"refusing pid {rank.pid}", "model": model}
    kill = {"model": model, "replica": replica.index, "rank": rank.rank, "pid": rank.pid,
            "recoveries_before": replica.recoveries}
    try:
        os.kill(rank.pid, signal.SIGKILL)
    except ProcessLookupError:
        kill["pid"], kill["skipped"] = 0, f"pid {rank.pid} was already gone"
    return kill


def _wait_rebuilt(client: Any, kill: dict[str, Any], until: float) -> float | None:
    """Seconds from the kill until the replica is ready after a recovery; None if not by `until`."""
    from clients import errors

    while time.monotonic() < until:
        try:
            for model in client.status().models:
                for replica in model.replicas:
                    if (model.name, replica.index) == (kill["model"], kill["replica"]) and replica.ready \
                            and replica.recoveries > kill["recoveries_before"]:
                        return round(time.monotonic() - kill["at"], 2)
        except errors.TpClusterError:
            pass
        time.sleep(0.5)
    return None


def _settled(client: Any, timeout: float) -> tuple[Any, bool]:
    """The Status once every replica is ready (or as it is after `timeout`), and whether they all were."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.status()
        ready = all(r.ready for m in status.models for r in m.replicas)
        if ready or time.monotonic() > deadline:
            return status, ready
        time.sleep(1.0)


def _recoveries(status: Any) -> dict[str, int]:
    return {f"{m.name}/r{r.index}": r.recoveries for m in status.models for r in m.replicas}


def _memory(status: Any) -> dict[str, float]:
    """Resident MB of this process (the gateway and the clients), and totals over the ranks and the coordinators."""
    ranks = [_rss(rank.pid) or rank.memory_bytes for m in status.models for r in m.replicas for rank in r.ranks]
    coordinators = [_rss(r.coordinator_pid) for m in status.models for r in m.replicas if r.coordinator_pid]
    return {"gateway_process": round(_rss(os.getpid()) / 2**20, 1), "ranks_total": round(sum(ranks) / 2**20, 1),
            "coordinators_total": round(sum(coordinators) / 2**20, 1)}


def _rss(pid: int) -> int:
    """Resident bytes of process `pid` on this machine; 0 when there is no such process here."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0

"""`tpcluster serve`: attach to (or start) a Ray cluster, load the models, serve them over gRPC."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from actors.gateway.batching import BatchingConfig
from actors.gateway.server import Gateway, GatewayConfig
from actors.gateway.pool import ReplicaPool
from actors.gateway.served import ServedModel
from cluster.coordinator import CoordinatorConfig
from cluster.serving import ServingSpec

log = logging.getLogger("tpcluster.gateway")


@dataclass(frozen=True)
class ServeConfig:
    models: dict[str, Path] = field(default_factory=dict)  # empty: the embedded defaults
    replicas: int = 1
    spare_ranks: int = 0  # hot spare rank processes per replica (CoordinatorConfig.spare_ranks)
    compile_graphs: bool = False  # compile the cpu backend's rank graphs at load (CoordinatorConfig.compile_graphs)
    address: str | None = None
    neuron_cores: int | None = None
    batching: BatchingConfig = BatchingConfig()
    gateway: GatewayConfig = GatewayConfig()
    # resident replicas are named, detached coordinators: a gateway (re)started later adopts them, and
    # they stay loaded when it exits. None: resident when attached to a running cluster (address given).
    resident: bool | None = None
    # the OpenAI-compatible HTTP API (actors.gateway.openai_http) on this port of the gateway's host
    # (0: any free port); None: not served
    http_port: int | None = None
    # target model -> the draft model its OpenAI-API completions speculate with when they ask for
    # speculation (speculation_length) without naming a draft_model
    drafts: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("replicas must be at least 1")
        if self.spare_ranks < 0:
            raise ValueError("spare_ranks must be 0 or more")
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port {self.http_port} is out of range; use 1-65535, or 0 for any free port")

    @property
    def keeps_resident(self) -> bool:
        return self.address is not None if self.resident is None else self.resident


def load_models(config: ServeConfig) -> dict[str, ServedModel]:
    """Load every model's replicas onto the cluster (blocking; runs before the server starts)."""
    import cluster

    cluster.init(address=config.address, neuron_cores=config.neuron_cores)
    folders = dict(config.models)
    if not folders:
        from cluster.models.defaults import ensure_all_defaults

        folders = ensure_all_defaults()
    models: dict[str, ServedModel] = {}
    for name, folder in folders.items():
        pool = ReplicaPool.load(name, Path(folder), config.replicas, config.keeps_resident,
                                CoordinatorConfig(spare_ranks=config.spare_ranks, compile_graphs=config.compile_graphs))
        models[name] = ServedModel(name, ServingSpec.read(folder), pool, config.batching)
    return models


def adopt_model(name: str, folder: Path | None = None, batching: BatchingConfig = BatchingConfig()) -> ServedModel | None:
    """The resident replicas of model `name` (a gateway's, on this cluster) as a ServedModel for this
    process (a batch job); None when none holds `folder` (default: the folder they were loaded from)."""
    pool = ReplicaPool.adopt_resident(name, folder)
    if pool is None:
        return None
    return ServedModel(name, ServingSpec.read(pool.folder), pool, batching)


async def serve_forever(config: ServeConfig, ready_file: str | None = None) -> None:
    models = await asyncio.get_running_loop().run_in_executor(None, load_models, config)
    gateway = Gateway(models, config.gateway)
    for model in models.values():
        model.metrics = gateway.metrics
    port = await gateway.start()
    print(f"tpcluster gateway serving {sorted(models)} on {config.gateway.host}:{port}", file=sys.stderr, flush=True)
    http = await _start_http(gateway, config)
    if ready_file:
        Path(ready_file).write_text(str(port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("tpcluster gateway: shutting down (finishing in-flight requests)", file=sys.stderr, flush=True)
    if http is not None:
        await http.stop()
    await gateway.stop()
    for model in models.values():
        await model.close(release=not config.keeps_resident)
    if config.keeps_resident:
        print(f"tpcluster gateway: {sorted(models)} stay resident (`tpcluster unload` frees them)", file=sys.stderr, flush=True)
    import cluster

    cluster.shutdown()  # stops the local cluster this process started (a no-op when attached)


async def _start_http(gateway: Gateway, config: ServeConfig):
    """The OpenAI-compatible HTTP API beside the gRPC server, in this loop (None unless http_port is set)."""
    if config.http_port is None:
        return None
    from actors.gateway.openai_http import OpenAIServer

    http = OpenAIServer(gateway, config.http_port, config.drafts)
    port = await http.start()
    print(f"tpcluster gateway: OpenAI-compatible HTTP API on {http.scheme}://{config.gateway.host}:{port}/v1",
          file=sys.stderr, flush=True)
    return http


class BackgroundGateway:
    """A gateway serving from a thread of this process (the demo, tests): `.target`, then `.close()`;
    with `http_port` set, also `.http_url` (the OpenAI-compatible API's base URL, ending in /v1)."""

    def __init__(self, config: ServeConfig) -> None:
        import threading

        self.config = config
        self.models = load_models(config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="gateway", daemon=True)
        self._thread.start()
        self.gateway = Gateway(self.models, config.gateway)
        for model in self.models.values():
            model.metrics = self.gateway.metrics
        self.port = self.run(self.gateway.start())
        self.target = f"{config.gateway.host}:{self.port}"
        self.http = self.run(_start_http(self.gateway, config))
        self.http_url = f"{self.http.scheme}://{config.gateway.host}:{self.http.port}/v1" if self.http else None

    def run(self, coroutine, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        if self.http is not None:
            self.run(self.http.stop())
        self.run(self.gateway.stop())
        for model in self.models.values():
            self.run(model.close(release=not self.config.keeps_resident))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

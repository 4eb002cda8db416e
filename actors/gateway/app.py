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
from actors.gateway.served import Replica, ServedModel
from cluster.serving import ServingSpec

log = logging.getLogger("tpcluster.gateway")


@dataclass(frozen=True)
class ServeConfig:
    models: dict[str, Path] = field(default_factory=dict)  # empty: the embedded defaults
    replicas: int = 1
    address: str | None = None
    neuron_cores: int | None = None
    batching: BatchingConfig = BatchingConfig()
    gateway: GatewayConfig = GatewayConfig()
    # resident replicas are named, detached coordinators: a gateway (re)started later adopts them, and
    # they stay loaded when it exits. None: resident when attached to a running cluster (address given).
    resident: bool | None = None

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("replicas must be at least 1")

    @property
    def keeps_resident(self) -> bool:
        return self.address is not None if self.resident is None else self.resident


def load_models(config: ServeConfig) -> dict[str, ServedModel]:
    """Load every model's replicas onto the cluster (blocking; runs before the server starts)."""
    import cluster
    from cluster.trace import parallel_model_load

    cluster.init(address=config.address, neuron_cores=config.neuron_cores)
    folders = dict(config.models)
    if not folders:
        from cluster.models.defaults import ensure_all_defaults

        folders = ensure_all_defaults()
    models: dict[str, ServedModel] = {}
    for name, folder in folders.items():
        nodes: set[str] = set()
        replicas = [load_replica(name, Path(folder), index, nodes, config.keeps_resident) for index in range(config.replicas)]
        models[name] = ServedModel(name, Path(folder), ServingSpec.read(folder), replicas, config.batching,
                                   resident=config.keeps_resident)
        log.info("serving %s from %s: %d replica(s) on %s", name, folder, config.replicas, sorted(nodes) or "one node")
    return models


def load_replica(model: str, folder: Path, index: int, nodes: set[str], resident: bool) -> Replica:
    """Replica `index` of `model`: the resident one when it holds this very artifact, else a new one
    placed on a node that holds no replica of the model yet (`nodes`, updated here)."""
    from actors.coordinator_actor import coordinator_name, find_coordinator
    from actors.placement import pick_node, rank_nodes
    from cluster.trace import artifact, parallel_model_load

    name = coordinator_name(model, index) if resident else None
    if name is not None:
        found = find_coordinator(name)
        if found is not None:
            coordinator, label = found
            if label.get("manifest") == artifact.digest(folder):
                nodes |= rank_nodes(coordinator.describe_ranks())
                log.info("model %s replica %d: adopted the resident replica", model, index)
                return Replica(index, coordinator, adopted=True)
            log.warning("model %s replica %d: the resident replica holds another model (%s); replacing it",
                        model, index, label.get("path"))
            coordinator.close()
    tp_degree = int(artifact.read_manifest(folder)["tp_degree"])
    loaded = parallel_model_load(folder, name=name, node_ip=pick_node(tp_degree, nodes))
    nodes |= rank_nodes(loaded._coordinator.describe_ranks())
    return Replica(index, loaded._coordinator)


async def serve_forever(config: ServeConfig, ready_file: str | None = None) -> None:
    models = await asyncio.get_running_loop().run_in_executor(None, load_models, config)
    gateway = Gateway(models, config.gateway)
    for model in models.values():
        model.metrics = gateway.metrics
    port = await gateway.start()
    print(f"tpcluster gateway serving {sorted(models)} on {config.gateway.host}:{port}", file=sys.stderr, flush=True)
    if ready_file:
        Path(ready_file).write_text(str(port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("tpcluster gateway: shutting down (finishing in-flight requests)", file=sys.stderr, flush=True)
    await gateway.stop()
    for model in models.values():
        await model.close(release=not config.keeps_resident)
    if config.keeps_resident:
        print(f"tpcluster gateway: {sorted(models)} stay resident (`tpcluster unload` frees them)", file=sys.stderr, flush=True)
    import cluster

    cluster.shutdown()  # stops the local cluster this process started (a no-op when attached)


class BackgroundGateway:
    """A gateway serving from a thread of this process (the demo, tests): `.target`, then `.close()`."""

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

    def run(self, coroutine, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.gateway.stop())
        for model in self.models.values():
            self.run(model.close(release=not self.config.keeps_resident))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

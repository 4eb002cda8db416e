"""A real gateway on 127.0.0.1, served from a thread of the test process over the session's Ray cluster."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from actors.gateway.batching import BatchingConfig
from actors.gateway.server import Gateway, GatewayConfig
from actors.gateway.served import Replica, ServedModel
from cluster.serving import ServingSpec
from cluster.trace import parallel_model_load


class GatewayThread:
    def __init__(self, folders: dict[str, Path], config: GatewayConfig | None = None,
                 batching: BatchingConfig | None = None, replicas: int = 1) -> None:
        self.models = {
            name: ServedModel(name, Path(folder), ServingSpec.read(folder),
                              [Replica(i, parallel_model_load(folder)._coordinator) for i in range(replicas)],
                              batching or BatchingConfig())
            for name, folder in folders.items()
        }
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.gateway = Gateway(self.models, config or GatewayConfig(port=0, health_interval_s=0.5))
        for model in self.models.values():
            model.metrics = self.gateway.metrics
        self.port = self.run(self.gateway.start())
        self.target = f"127.0.0.1:{self.port}"

    def run(self, coroutine, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.gateway.stop())
        for model in self.models.values():
            self.run(model.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

"""A real gateway on 127.0.0.1, served from a thread of the test process over the session's Ray cluster."""

from __future__ import annotations

from pathlib import Path

from actors.gateway.app import BackgroundGateway, ServeConfig
from actors.gateway.batching import BatchingConfig
from actors.gateway.server import GatewayConfig


def GatewayThread(folders: dict[str, Path], config: GatewayConfig | None = None, batching: BatchingConfig | None = None,
                  replicas: int = 1) -> BackgroundGateway:
    return BackgroundGateway(ServeConfig(models=dict(folders), replicas=replicas, batching=batching or BatchingConfig(),
                                         gateway=config or GatewayConfig(port=0, health_interval_s=0.5)))

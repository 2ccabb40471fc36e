"""The Prometheus endpoint of the gRPC services (admin serves /metrics itself)."""

from __future__ import annotations

from prometheus_client import start_http_server


def start_metrics(host: str, port: int) -> None:
    if port:
        start_http_server(port, addr=host)

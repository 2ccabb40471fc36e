"""The baseline: the same Envoy binary with `envoy/bare.yaml.tmpl` (no Atlas filters)."""

from __future__ import annotations

from pathlib import Path

from atlas.envoy_config import EnvoyParams, envoy_binary, render
from atlas.probes import http_ok
from bench.procs import Service

TEMPLATE = "bare.yaml.tmpl"


def render_bare(upstream: str, listen_port: int, envoy_admin_port: int) -> str:
    """A bootstrap with the listener, /v1/ route, timeouts and upstream cluster of
    `atlas.yaml.tmpl`, rendered by Atlas's own renderer, and no ext_authz/ext_proc."""
    return render(
        EnvoyParams(upstream=upstream, listen_port=listen_port, envoy_admin_port=envoy_admin_port),
        template=TEMPLATE,
    )


def bare_envoy(
    upstream: str, listen_port: int, envoy_admin_port: int, workdir: Path, concurrency: int = 1
) -> Service:
    config = workdir / "bare-envoy.yaml"
    config.write_text(render_bare(upstream, listen_port, envoy_admin_port))
    return Service(
        "bare-envoy",
        [
            envoy_binary(),
            "-c",
            str(config),
            "--disable-hot-restart",
            "--concurrency",
            str(concurrency),
            "--log-level",
            "warn",
        ],
        ready=lambda: http_ok(f"http://127.0.0.1:{envoy_admin_port}/ready"),
    )

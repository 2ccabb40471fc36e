"""`atlas` command line: one subcommand per process, plus `up` for the whole local stack.

Every option is also an `ATLAS_*` environment variable; a flag wins over the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import types
import typing
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from atlas.errors import ConfigError
from atlas.settings import Settings, load_settings

_COMMON = [
    "redis_url",
    "redis_cluster",
    "redis_timeout_s",
    "redis_max_connections",
    "log_level",
]
_ADMISSION = [
    "fail_mode",
    "ceiling_low",
    "ceiling_normal",
    "ceiling_high",
    "ceiling_critical",
    "strip_client_key",
    "upstream_api_key",
    "key_cache_ttl_s",
    "max_reservation",
    "default_stream_reservation",
]
_ACCOUNTING = ["reservation_ttl_s", "window_timezone", "window_utc_offset_min", "history_days"]
_KEY_DEFAULTS = [
    "default_daily_limit",
    "default_monthly_limit",
    "default_rate_per_sec",
    "default_burst",
]
COMMAND_FIELDS: dict[str, list[str]] = {
    "authz": [
        *_COMMON,
        "authz_host",
        "authz_port",
        "authz_metrics_port",
        "grpc_max_message_bytes",
        *_ADMISSION,
        *_ACCOUNTING,
    ],
    "extproc": [
        *_COMMON,
        "extproc_host",
        "extproc_port",
        "extproc_metrics_port",
        "grpc_max_message_bytes",
        "reap_charge_reserved",
        "reap_interval_s",
        *_ACCOUNTING,
    ],
    "admin": [
        *_COMMON,
        "admin_host",
        "admin_port",
        "admin_token",
        "authz_host",
        "authz_port",
        "extproc_host",
        "extproc_port",
        "envoy_admin_url",
        *_KEY_DEFAULTS,
        *_ACCOUNTING,
    ],
}
COMMAND_FIELDS["up"] = [
    "proxy_port",
    "admin_port",
    "upstream",
    "redis_url",
    "admin_token",
    "envoy_admin_port",
    "envoy_concurrency",
    "authz_port",
    "extproc_port",
    "authz_metrics_port",
    "extproc_metrics_port",
    "demo_upstream_port",
    "log_level",
    "max_request_bytes",
    "grpc_max_message_bytes",
    *_ADMISSION,
    *_ACCOUNTING,
    *_KEY_DEFAULTS,
]
#: Short names the contract promises for `atlas up`.
FLAG_ALIASES = {"proxy_port": "--port"}


def _arg_type(annotation: Any) -> tuple[Callable[[str], Any] | None, bool]:
    """(converter, is_bool) for a settings field's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0]
    if annotation is bool:
        return None, True
    if annotation in (int, float):
        return annotation, False
    return str, False


def add_settings_flags(parser: argparse.ArgumentParser, fields: Sequence[str]) -> None:
    for name in fields:
        info = Settings.model_fields[name]
        convert, is_bool = _arg_type(info.annotation)
        flag = FLAG_ALIASES.get(name, "--" + name.replace("_", "-"))
        default = info.default
        if hasattr(default, "get_secret_value"):
            default = "***"
        help_text = f"{info.description} [env ATLAS_{name.upper()}; default {default}]"
        if is_bool:
            parser.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag,
                dest=name,
                type=convert or str,
                default=argparse.SUPPRESS,
                metavar=name.split("_")[-1].upper(),
                help=help_text,
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atlas", description="Atlas: LLM traffic governance beside Envoy."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "up": "run the whole local stack (Valkey, Envoy, authz, extproc, admin, demo upstream)",
        "authz": "run the Envoy ext_authz service (HTTP or gRPC)",
        "extproc": "run the Envoy ext_proc gRPC service",
        "admin": "run the admin REST API",
    }
    for command, fields in COMMAND_FIELDS.items():
        p = sub.add_parser(command, help=helps[command], description=helps[command])
        add_settings_flags(p, fields)
    sim = sub.add_parser(
        "simulate",
        help="backfill realistic usage history (new keys) to see forecasts at once",
        description="Create keys with weeks of hourly usage history in the ledger.",
    )
    sim.add_argument("--days", type=int, default=28, help="days of history [default 28]")
    sim.add_argument("--keys", type=int, default=4, help="keys to create [default 4]")
    sim.add_argument("--seed", type=int, default=1, help="random seed [default 1]")
    add_settings_flags(sim, [*_COMMON, "window_timezone", "window_utc_offset_min", "history_days"])
    demo = sub.add_parser(
        "demo-upstream", help="run the demo OpenAI-compatible upstream", add_help=False
    )
    demo.add_argument("rest", nargs=argparse.REMAINDER)
    render = sub.add_parser("render-envoy", help="print an Envoy bootstrap for given endpoints")
    render.add_argument("--upstream", required=True, help="OpenAI-compatible upstream URL")
    render.add_argument("--listen-address", default="0.0.0.0")
    render.add_argument("--port", type=int, default=8080)
    render.add_argument("--authz", default="authz:50051", help="host:port[,host:port...]")
    render.add_argument("--extproc", default="extproc:50052", help="host:port[,host:port...]")
    render.add_argument("--admin", default="admin:8081", help="host:port of atlas admin")
    render.add_argument(
        "--model-route",
        action="append",
        default=[],
        metavar="MODEL=URL[,URL...]",
        help="route a model (or prefix*) to its own upstream cluster; repeatable",
    )
    render.add_argument(
        "--authz-protocol",
        choices=("http", "grpc"),
        default="http",
        help="how Envoy calls authz (must match the authz service's ATLAS_AUTHZ_PROTOCOL)",
    )
    render.add_argument(
        "--no-access-log-settlement",
        dest="access_log_settlement",
        action="store_false",
        help="settle non-streamed completions through ext_proc, not the gRPC access log "
        "(must match the services' ATLAS_SETTLE_FROM_ACCESS_LOG=false)",
    )
    render.add_argument(
        "--sse-usage",
        action="store_true",
        help="Envoy >= 1.40: settle streams whose client asked for usage from the access log, "
        "read by sse_to_metadata (must match ATLAS_STREAM_USAGE_FROM_ENVOY=true)",
    )
    render.add_argument(
        "--providers", metavar="FILE", help="providers file: their clusters and routes"
    )
    render.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate")
    render.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    render.add_argument(
        "--client-ca", metavar="PEM", help="verify client certificates (mTLS app identity)"
    )
    render.add_argument("--validate", action="store_true", help="check with envoy --mode validate")
    mesh = sub.add_parser(
        "render-mesh",
        help="print Istio or Envoy Gateway resources for the providers file",
        description="The providers of FILE as Istio (ServiceEntry, DestinationRule, VirtualService)"
        " or Envoy Gateway (Backend, BackendTLSPolicy, HTTPRoute) resources, multi-document YAML.",
    )
    mesh.add_argument("--providers", metavar="FILE", required=True)
    mesh.add_argument("--mesh", choices=("istio", "gateway"), required=True)
    mesh.add_argument("--namespace", default="atlas")
    mesh.add_argument(
        "--gateway", default="istio-system/atlas", help="Istio gateway / EG parent name"
    )
    check = sub.add_parser(
        "check-config",
        help="validate the settings (environment) and the providers file",
        description="Validate ATLAS_* settings and the providers file; with --secrets also read"
        " every pool member's credential (never printed); with --envoy render and validate the"
        " bootstrap with envoy --mode validate. Exit 0 when all hold, 2 otherwise.",
    )
    check.add_argument("--providers", metavar="FILE", help="default: ATLAS_PROVIDERS_FILE")
    check.add_argument("--secrets", action="store_true", help="resolve every credential")
    check.add_argument("--envoy", action="store_true", help="render and validate with Envoy")
    return parser


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run(coro_fn: Callable[[Settings], Coroutine[Any, Any, Any]], settings: Settings) -> int:
    _configure_logging(settings)
    with contextlib.suppress(KeyboardInterrupt):
        run_event_loop(coro_fn(settings))
    return 0


def run_event_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    """uvloop when installed (measured faster for gRPC and Redis I/O), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _hostports(spec: str) -> list[tuple[str, int]]:
    out = []
    for part in spec.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"{part!r}: expected host:port")
        out.append((host, int(port)))
    return out


def _model_routes(specs: list[str]) -> dict[str, list[str]]:
    routes: dict[str, list[str]] = {}
    for spec in specs:
        model, _, urls = spec.partition("=")
        if not model or not urls:
            raise ConfigError(f"--model-route {spec!r}: expected MODEL=URL[,URL...]")
        routes[model] = [u.strip() for u in urls.split(",") if u.strip()]
    return routes


def _render_envoy(ns: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from atlas.envoy_config import EnvoyParams, ListenerTls, render, validate
    from atlas.providers import config as providers_config

    if bool(ns.tls_cert) != bool(ns.tls_key) or (ns.client_ca and not ns.tls_cert):
        raise ConfigError("--tls-cert and --tls-key go together; --client-ca needs both")
    tls = ListenerTls(ns.tls_cert, ns.tls_key, ns.client_ca) if ns.tls_cert else None
    text = render(
        EnvoyParams(
            upstream=ns.upstream,
            listen_address=ns.listen_address,
            listen_port=ns.port,
            stats_address="0.0.0.0",  # containers: probes and Prometheus read /ready, stats
            authz=_hostports(ns.authz),
            extproc=_hostports(ns.extproc),
            atlas_admin=_hostports(ns.admin)[0],
            model_routes=_model_routes(ns.model_route),
            authz_protocol=ns.authz_protocol,
            access_log_settlement=ns.access_log_settlement,
            sse_usage=ns.sse_usage,
            providers=providers_config.load(ns.providers) if ns.providers else None,
            listener_tls=tls,
        )
    )
    if ns.validate:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "envoy.yaml"
            path.write_text(text)
            validate(path)
    sys.stdout.write(text)
    return 0


def _render_mesh(ns: argparse.Namespace) -> int:
    import yaml

    from atlas.providers import config as providers_config
    from atlas.providers import mesh

    config = providers_config.load(ns.providers)
    if ns.mesh == "istio":
        docs = mesh.istio(config, namespace=ns.namespace, gateway=ns.gateway)
    else:
        docs = mesh.gateway(config, namespace=ns.namespace, parent=ns.gateway.split("/")[-1])
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
    return 0


def _check_config(ns: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from atlas.envoy_config import EnvoyParams, render, validate
    from atlas.providers import config as providers_config
    from atlas.providers.credentials import resolve

    settings = load_settings({})
    path = ns.providers or settings.providers_file
    providers = providers_config.load(path) if path else None
    if providers is not None:
        members = sum(len(p.pool.members) if p.pool else 0 for p in providers.providers)
        print(
            f"{path}: {len(providers.providers)} providers, {members} pool members,"
            f" {len(providers.models)} model aliases"
        )
        if ns.secrets:
            resolve(providers)
            print(f"{path}: every credential is readable")
    if ns.envoy:
        text = render(
            EnvoyParams(upstream=settings.upstream or "http://127.0.0.1:9000", providers=providers)
        )
        with tempfile.TemporaryDirectory() as d:
            target = Path(d) / "envoy.yaml"
            target.write_text(text)
            validate(target)
        print("envoy --mode validate: the rendered bootstrap is valid")
    print("atlas check-config: ok")
    return 0


async def _simulate(settings: Settings, days: int, keys: int, seed: int) -> int:
    from atlas.ledger.redis import RedisLedger
    from atlas.local.simulate import backfill

    if not 1 <= days <= settings.history_days or not 1 <= keys <= 1000:
        raise ConfigError(f"--days must be 1..{settings.history_days} and --keys 1..1000")
    ledger = RedisLedger.from_settings(settings)
    try:
        created = await backfill(ledger, days=days, keys=keys, seed=seed)
    finally:
        await ledger.close()
    for rec, secret in created:
        print(f"{rec.id}  {rec.name:<16} daily_limit={rec.daily_limit:<8} api_key={secret}")
    print(f"atlas simulate: {len(created)} keys with {days} days of hourly history")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["demo-upstream"]:  # its own parser; argparse REMAINDER rejects leading options
        from atlas.local.demo import main as demo_main

        return demo_main(args[1:])
    ns = build_parser().parse_args(args)
    try:
        if ns.command == "render-envoy":
            return _render_envoy(ns)
        if ns.command == "check-config":
            return _check_config(ns)
        if ns.command == "render-mesh":
            return _render_mesh(ns)
        overrides = {k: v for k, v in vars(ns).items() if k in Settings.model_fields}
        settings = load_settings(overrides)
        if ns.command == "simulate":
            return asyncio.run(_simulate(settings, ns.days, ns.keys, ns.seed))
        if ns.command == "up":
            from atlas.local.stack import run_up

            return run_up(settings, explicit=set(overrides))
        if ns.command == "authz":
            from atlas.metrics_server import start_metrics
            from authz.service import serve as serve_authz

            start_metrics(settings.authz_host, settings.authz_metrics_port)
            return _run(serve_authz, settings)
        if ns.command == "extproc":
            from atlas.metrics_server import start_metrics
            from extproc.server import serve as serve_extproc

            start_metrics(settings.extproc_host, settings.extproc_metrics_port)
            return _run(serve_extproc, settings)
        from admin.server import serve as serve_admin

        return _run(serve_admin, settings)
    except ConfigError as exc:
        print(f"atlas {ns.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

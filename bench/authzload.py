"""Load on the ext_authz service alone, over the protocol the stack's Envoy speaks to it.

    python -m bench.authzload --target 127.0.0.1:P --key SECRET --duration S \
        [--concurrency N] [--protocol http|grpc]

*http* (Atlas's default, `ATLAS_AUTHZ_PROTOCOL` unset): what Envoy's HTTP ext_authz client
sends with `with_request_body`: `POST <path_prefix>/v1/chat/completions HTTP/1.1` (the
prefix of Atlas's `http_service`, from `atlas.envoy_filters`) with the client's headers,
`content-length` of the body, `x-envoy-auth-partial-body: false`, the headers Envoy adds
(`x-forwarded-for`, `x-envoy-*`) and the JSON body.
Envoy's HTTP/1.1 connection pool runs one request per connection at a time, so `--concurrency`
keep-alive connections each carry one Check after another; a 200 is "allowed".

*grpc* (`ATLAS_AUTHZ_PROTOCOL=grpc`): unary `Check` calls, `--concurrency` in flight over a
few HTTP/2 channels (Envoy multiplexes its Checks the same way). The CheckRequest is what
Envoy 1.40 sends with `encode_raw_headers` and `with_request_body` (`pack_as_bytes`): the
request's headers as raw bytes, the JSON body, the addresses and the time.

Either request is built once, so the client spends its CPU on the transport only. Prints one
JSON line: Checks completed, allowed/denied (`codes`: HTTP status, 200 = allowed), errors,
latency percentiles (ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import grpc
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as auth_pb2
from google.protobuf import timestamp_pb2

from bench.loadgen import Conn, percentiles

METHOD = "/envoy.service.auth.v3.Authorization/Check"
PATH = "/v1/chat/completions"
BODY = {
    "model": "demo-small",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "Write one short sentence about benchmarks."}],
}


def client_headers(secret: str, host: str) -> dict[str, str]:
    """What an OpenAI SDK sends (after Envoy: x-forwarded-proto, x-request-id)."""
    return {
        "host": host,
        "authorization": f"Bearer {secret}",
        "content-type": "application/json",
        "user-agent": "OpenAI/Python 1.54.0",
        "accept": "application/json",
        "x-stainless-lang": "python",
        "x-forwarded-proto": "http",
        "x-request-id": "5f0c6c2e-9c1b-4a57-8a1e-2f7d9b1c3e44",
    }


def check_path_prefix() -> str:
    """What Atlas's Envoy puts before the client's path when it asks authz over HTTP."""
    from atlas.envoy_filters import authz_service

    service = authz_service("http", "1s")["http_service"]
    assert isinstance(service, dict)
    return str(service.get("path_prefix", ""))


def http_check_request(
    secret: str, body: dict[str, Any], host: str = "127.0.0.1:8080", prefix: str = ""
) -> bytes:
    """The request Envoy's HTTP ext_authz client makes for one client request (seen on the
    wire from Envoy 1.40 with Atlas's bootstrap: the client's headers, the body's length,
    and the headers Envoy adds as the edge and as the caller)."""
    raw = json.dumps(body, separators=(",", ":")).encode()
    headers = client_headers(secret, host)
    headers["content-length"] = str(len(raw))
    headers["x-envoy-auth-partial-body"] = "false"
    headers["x-envoy-external-address"] = "127.0.0.1"
    headers["x-forwarded-for"] = "127.0.0.1"
    headers["x-envoy-internal"] = "true"
    headers["x-envoy-expected-rq-timeout-ms"] = "500"
    line = f"POST {prefix}{PATH} HTTP/1.1\r\n"
    head = line + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (head + "\r\n").encode("latin-1") + raw


def check_request(secret: str, body: dict[str, Any], host: str = "127.0.0.1:8080") -> bytes:
    raw = json.dumps(body, separators=(",", ":")).encode()
    client = client_headers(secret, host)
    del client["host"]
    headers = {
        ":authority": host,
        ":path": PATH,
        ":method": "POST",
        ":scheme": "http",
        "content-length": str(len(raw)),
        **client,
    }
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()

    def peer(port: int) -> ac.AttributeContext.Peer:
        return ac.AttributeContext.Peer(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
            )
        )

    req = auth_pb2.CheckRequest(
        attributes=ac.AttributeContext(
            source=peer(53312),
            destination=peer(8080),
            request=ac.AttributeContext.Request(
                time=now,
                http=ac.AttributeContext.HttpRequest(
                    id="16108155243254346391",
                    method="POST",
                    path=PATH,
                    host=host,
                    scheme="http",
                    protocol="HTTP/1.1",
                    size=len(raw),
                    raw_body=raw,
                    header_map=base_pb2.HeaderMap(
                        headers=[
                            base_pb2.HeaderValue(key=k, raw_value=v.encode())
                            for k, v in headers.items()
                        ]
                    ),
                ),
            ),
        )
    )
    return req.SerializeToString()


async def run_http(args: argparse.Namespace) -> dict[str, Any]:
    prefix = check_path_prefix() if args.path_prefix is None else args.path_prefix
    request = http_check_request(args.key, BODY, prefix=prefix)
    host, _, port = args.target.rpartition(":")
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    codes: dict[str, int] = {}
    errors: dict[str, int] = {}
    perf = time.perf_counter
    deadline = 0.0

    async def connect() -> tuple[Conn, list[asyncio.Future[Conn]]]:
        slot: list[asyncio.Future[Conn]] = [loop.create_future()]

        def on_done(c: Conn) -> None:
            if not slot[0].done():
                slot[0].set_result(c)

        def lost(c: Conn) -> None:
            if not slot[0].done():
                slot[0].set_exception(ConnectionError("connection closed"))

        _, conn = await loop.create_connection(lambda: Conn(on_done, lost), host, int(port))
        return conn, slot

    conns = await asyncio.gather(*(connect() for _ in range(args.concurrency)))

    async def worker(conn: Conn, slot: list[asyncio.Future[Conn]]) -> None:
        while perf() < deadline:
            slot[0] = loop.create_future()
            conn.send(request, perf())
            try:
                c = await asyncio.wait_for(slot[0], 5)
            except (ConnectionError, TimeoutError) as exc:
                name = type(exc).__name__
                errors[name] = errors.get(name, 0) + 1
                if conn.transport is not None:
                    conn.transport.close()
                conn, slot = await connect()
                continue
            latencies.append(c.t_done - c.t_sent)
            codes[str(c.status)] = codes.get(str(c.status), 0) + 1

    t0 = perf()
    deadline = t0 + args.duration
    await asyncio.gather(*(worker(c, s) for c, s in conns))
    elapsed = perf() - t0
    for c, _ in conns:
        if c.transport is not None:
            c.transport.close()
    return {
        "protocol": "http",
        "path": prefix + PATH,
        "checks": len(latencies),
        "elapsed_s": elapsed,
        "rate": len(latencies) / elapsed,
        "codes": codes,
        "errors": errors,
        "concurrency": args.concurrency,
        "connections": args.concurrency,
        "latency_ms": percentiles(latencies),
    }


async def run_grpc(args: argparse.Namespace) -> dict[str, Any]:
    payload = check_request(args.key, BODY)
    channels = [grpc.aio.insecure_channel(args.target) for _ in range(args.channels)]
    # No (de)serialisers: the request goes as prepared bytes, the answer comes back as bytes.
    calls = [ch.unary_unary(METHOD) for ch in channels]
    latencies: list[float] = []
    codes: dict[str, int] = {}
    errors: dict[str, int] = {}
    perf = time.perf_counter
    deadline = 0.0

    async def worker(i: int) -> None:
        call = calls[i % len(calls)]
        resp = auth_pb2.CheckResponse()
        while perf() < deadline:
            t = perf()
            try:
                raw = await call(payload, timeout=5)
            except grpc.RpcError as exc:
                name = exc.code().name if hasattr(exc, "code") else type(exc).__name__
                errors[name] = errors.get(name, 0) + 1
                continue
            latencies.append(perf() - t)
            resp.ParseFromString(raw)
            denied = resp.HasField("denied_response")
            code = str(resp.denied_response.status.code) if denied else "200"
            codes[code] = codes.get(code, 0) + 1

    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), 10)
    t0 = perf()
    deadline = t0 + args.duration
    await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
    elapsed = perf() - t0
    for ch in channels:
        await ch.close()
    return {
        "protocol": "grpc",
        "checks": len(latencies),
        "elapsed_s": elapsed,
        "rate": len(latencies) / elapsed,
        "codes": codes,
        "errors": errors,
        "concurrency": args.concurrency,
        "connections": args.channels,
        "latency_ms": percentiles(latencies),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.authzload")
    p.add_argument("--target", required=True, help="host:port of the authz service")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument(
        "--path-prefix", default=None, help="http: before the path (default: Atlas's Envoy's)"
    )
    p.add_argument("--key", required=True, help="API key secret to send")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=32, help="Checks in flight")
    p.add_argument("--channels", type=int, default=2, help="grpc: HTTP/2 connections")
    args = p.parse_args(argv)
    run = run_http if args.protocol == "http" else run_grpc
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(args))
    else:
        result = uvloop.run(run(args))
    print("BENCHJSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

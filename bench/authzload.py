"""gRPC load on the ext_authz service alone: unary `Check` calls like Envoy makes them.

    python -m bench.authzload --target 127.0.0.1:P --key SECRET --duration S [--concurrency N]

`--concurrency` calls are kept in flight over a few HTTP/2 channels (Envoy multiplexes its
Checks the same way). The CheckRequest is what Envoy 1.40 sends with `encode_raw_headers` and
`with_request_body` (`pack_as_bytes`): the request's headers as raw bytes, the JSON body, the
addresses and the time; it is serialised once, so the client spends its CPU on gRPC only.
Prints one JSON line: Checks completed, allowed/denied, errors, latency percentiles (ms).
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

from bench.loadgen import percentiles

METHOD = "/envoy.service.auth.v3.Authorization/Check"


def check_request(secret: str, body: dict[str, Any], host: str = "127.0.0.1:8080") -> bytes:
    raw = json.dumps(body, separators=(",", ":")).encode()
    headers = {
        ":authority": host,
        ":path": "/v1/chat/completions",
        ":method": "POST",
        ":scheme": "http",
        "content-type": "application/json",
        "content-length": str(len(raw)),
        "authorization": f"Bearer {secret}",
        "user-agent": "OpenAI/Python 1.54.0",
        "accept": "application/json",
        "x-stainless-lang": "python",
        "x-forwarded-proto": "http",
        "x-request-id": "5f0c6c2e-9c1b-4a57-8a1e-2f7d9b1c3e44",
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
                    path="/v1/chat/completions",
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


async def run(args: argparse.Namespace) -> dict[str, Any]:
    body = {
        "model": "demo-small",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "Write one short sentence about benchmarks."}],
    }
    payload = check_request(args.key, body)
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
        "checks": len(latencies),
        "elapsed_s": elapsed,
        "rate": len(latencies) / elapsed,
        "codes": codes,
        "errors": errors,
        "concurrency": args.concurrency,
        "channels": args.channels,
        "latency_ms": percentiles(latencies),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.authzload")
    p.add_argument("--target", required=True, help="host:port of the authz gRPC service")
    p.add_argument("--key", required=True, help="API key secret to send")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=32, help="Checks in flight")
    p.add_argument("--channels", type=int, default=2, help="HTTP/2 connections")
    args = p.parse_args(argv)
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

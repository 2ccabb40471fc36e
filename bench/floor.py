"""The design's floor: do-nothing servers behind Atlas's own Envoy bootstrap.

    python -m bench.floor authz   --port P    # HTTP ext_authz: 200 to everything
    python -m bench.floor extproc --port Q    # ext_proc: pass-through to every message

The benchmark runs one Envoy rendered by `atlas.envoy_config.render` (the same template,
transports and per-request ext_proc modes as Atlas) in front of these two processes, so the
distance between Atlas and what its design costs with no policy, no Redis and no token
counting at all is visible ("Atlas minus floor").

*authz*: a raw `asyncio.Protocol` (uvloop) with `httptools`, the transport Atlas's authz uses
by default. Every request is answered `200` with `x-atlas-proc: splice` for a body that
asks for a stream (what Atlas answers for one whose client did not ask for usage: Envoy's Lua
filter runs) and `x-atlas-proc: json` otherwise, and a fixed `x-atlas-grant`.

*extproc*: grpc.aio, like Atlas's extproc: each message gets the empty answer of its kind
(HeadersResponse, BodyResponse, TrailersResponse): continue, change nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from atlas.envoy_config import EnvoyParams, envoy_binary, render
from atlas.grant import GRANT_HEADER, PROC_HEADER, ProcMode
from atlas.local.ports import free_port
from atlas.probes import http_ok
from bench.procs import Service

#: A grant extproc could decode; the floor's extproc never reads it.
FLOOR_GRANT = '{"key_id":"floor","reservation_id":"r","reserved":1,"prompt_estimate":1}'
_STREAM = re.compile(rb'"stream"\s*:\s*true')


def authz_answer(mode: str) -> bytes:
    """The whole HTTP answer, built once per mode."""
    return (
        "HTTP/1.1 200 OK\r\n"
        "content-length: 0\r\n"
        f"{PROC_HEADER}: {mode}\r\n"
        f"{GRANT_HEADER}: {FLOOR_GRANT}\r\n"
        "\r\n"
    ).encode()


ANSWER_JSON = authz_answer(ProcMode.JSON)
ANSWER_SPLICE = authz_answer(ProcMode.SPLICE)


def answer_for(body: bytes) -> bytes:
    return ANSWER_SPLICE if _STREAM.search(body) else ANSWER_JSON


class FloorAuthz(asyncio.Protocol):
    """One connection from Envoy's ext_authz HTTP client; keep-alive, pipelining tolerated."""

    def __init__(self) -> None:
        import httptools

        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.error = httptools.HttpParserError
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except self.error:
            assert self.transport is not None
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.body = []

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        self.transport.write(answer_for(b"".join(self.body)))


async def serve_authz(host: str, port: int, stop: asyncio.Event) -> None:
    server = await asyncio.get_running_loop().create_server(FloorAuthz, host, port)
    print(f"floor authz listening on {host}:{port}", flush=True)
    async with server:
        await stop.wait()


def _extproc_servicer() -> Any:
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

    headers = ep.HeadersResponse()
    body = ep.BodyResponse()
    trailers = ep.TrailersResponse()
    answers = {
        "request_headers": ep.ProcessingResponse(request_headers=headers),
        "response_headers": ep.ProcessingResponse(response_headers=headers),
        "request_body": ep.ProcessingResponse(request_body=body),
        "response_body": ep.ProcessingResponse(response_body=body),
        "request_trailers": ep.ProcessingResponse(request_trailers=trailers),
        "response_trailers": ep.ProcessingResponse(response_trailers=trailers),
    }

    class PassThrough(ep_grpc.ExternalProcessorServicer):
        async def Process(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async for req in requests:
                answer = answers.get(req.WhichOneof("request"))
                if answer is not None:
                    yield answer

    return PassThrough(), ep_grpc.add_ExternalProcessorServicer_to_server


async def serve_extproc(host: str, port: int, stop: asyncio.Event) -> None:
    import grpc

    servicer, add = _extproc_servicer()
    server = grpc.aio.server()
    add(servicer, server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"floor extproc listening on {host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop(grace=1)


# ---- the floor path, as the benchmark starts it ---------------------------------------------


async def _listening(svc: Service) -> None:
    """Ready once the service printed that it listens (grpc.aio has no HTTP probe)."""
    if not any("listening" in line for line in svc.tail):
        raise RuntimeError("not listening yet")


def floor_services(
    upstream: str, listen_port: int, envoy_admin_port: int, workdir: Path, max_request_bytes: int
) -> dict[str, Service]:
    """The do-nothing authz and extproc, and an Envoy with Atlas's bootstrap in front of them
    (one worker, like the stack's); start them in this order."""
    authz_port, extproc_port = free_port(), free_port()
    py = [sys.executable, "-m", "bench.floor"]
    authz = Service(
        "floor-authz",
        [*py, "authz", "--port", str(authz_port)],
        ready=lambda: http_ok(f"http://127.0.0.1:{authz_port}/ready"),
    )
    extproc = Service(
        "floor-extproc",
        [*py, "extproc", "--port", str(extproc_port)],
        ready=lambda: _listening(extproc),
    )
    config = workdir / "floor-envoy.yaml"
    config.write_text(
        render(
            EnvoyParams(
                upstream=upstream,
                listen_port=listen_port,
                envoy_admin_port=envoy_admin_port,
                stats_port=free_port(),
                authz=[("127.0.0.1", authz_port)],
                extproc=[("127.0.0.1", extproc_port)],
                atlas_admin=("127.0.0.1", free_port()),  # nothing there: no admin route is used
                max_request_bytes=max_request_bytes,
                authz_protocol="http",
            )
        )
    )
    envoy = Service(
        "floor-envoy",
        [
            envoy_binary(),
            "-c",
            str(config),
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "--log-level",
            "warn",
            "--file-flush-interval-msec",
            "250",  # as atlas.local.stack starts Atlas's Envoy
        ],
        ready=lambda: http_ok(f"http://127.0.0.1:{envoy_admin_port}/ready"),
    )
    return {"authz": authz, "extproc": extproc, "envoy": envoy}


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    serve = serve_authz if args.service == "authz" else serve_extproc
    await serve(args.host, args.port, stop)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floor")
    p.add_argument("service", choices=("authz", "extproc"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    import uvloop  # like Atlas's services (atlas.cli)

    uvloop.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

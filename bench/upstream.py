"""The demo upstream for the benchmark: `atlas.local.demo.DemoUpstream`, unchanged, on a
port shared with SO_REUSEPORT, so that several identical processes can serve one URL (the
kernel spreads connections over them) when one process would be the bottleneck.

    python -m bench.upstream --port P
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from atlas.local.demo import DemoUpstream


async def _serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    create_server = loop.create_server

    async def shared(*args: Any, **kwargs: Any) -> Any:
        return await create_server(*args, **{**kwargs, "reuse_port": True})

    loop.create_server = shared  # type: ignore[method-assign]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    upstream = DemoUpstream(host, port)
    await upstream.start()
    print(f"bench upstream listening on {upstream.url}", flush=True)
    await stop.wait()
    await upstream.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.upstream")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    asyncio.run(_serve(args.host, args.port))  # plain asyncio, like `atlas demo-upstream`
    return 0


if __name__ == "__main__":
    sys.exit(main())

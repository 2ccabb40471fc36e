"""A tiny Chrome DevTools Protocol client for tests: Debian's headless Chromium, one
websocket to the browser, one flattened session per page.

Only what the dashboard test needs: open a page, evaluate JavaScript, poll the DOM, capture
a screenshot, and record every error the page reports (uncaught exceptions, console.error,
and the browser's own error log) so a test can assert there were none.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from atlas.local.ports import free_port

CHROMIUM = Path("/usr/bin/chromium")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 30.0


class CDPError(RuntimeError):
    pass


@dataclass
class PageError:
    """One error the page reported; `source` is exception, console or log."""

    source: str
    text: str
    url: str = ""
    log_source: str = ""  # for source == "log": network, javascript, security, ...

    def __str__(self) -> str:
        where = f" ({self.url})" if self.url else ""
        return (
            f"[{self.source}{':' + self.log_source if self.log_source else ''}] {self.text}{where}"
        )


@dataclass
class Page:
    browser: Browser
    target_id: str
    session_id: str
    errors: list[PageError] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        return await self.browser.send(method, params, session_id=self.session_id)

    def on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            exc = details.get("exception") or {}
            text = exc.get("description") or details.get("text", "exception")
            self.errors.append(PageError("exception", text, details.get("url", "")))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in {"error", "assert"}:
            args = params.get("args", [])
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in args)
            self.errors.append(PageError("console", text))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            self.errors.append(
                PageError(
                    "log", entry.get("text", ""), entry.get("url", ""), entry.get("source", "")
                )
            )
        elif method == "Network.requestWillBeSent":
            req = params["request"]
            self.requests.append({"url": req["url"], "headers": req.get("headers", {})})

    async def goto(self, url: str) -> None:
        result = await self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise CDPError(f"navigating to {url}: {result['errorText']}")

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of `expression` (awaited when it is a promise)."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            exc = details.get("exception") or {}
            raise CDPError(f"{expression!r} threw: {exc.get('description') or details['text']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, *, timeout_s: float = 20.0) -> Any:
        """Poll `expression` until it is truthy; its value. Polling, not sleeping for a guess,
        keeps the test as fast as the page and still tolerant of a slow machine."""
        deadline = time.monotonic() + timeout_s
        value: Any = None
        while time.monotonic() < deadline:
            try:
                value = await self.evaluate(expression)
            except CDPError as exc:
                # Mid-navigation the document (or its <body>) may not be there yet.
                value = exc
            else:
                if value:
                    return value
            await asyncio.sleep(0.1)
        errors = "\n  ".join(map(str, self.errors)) or "(none)"
        raise TimeoutError(
            f"{expression!r} still {value!r} after {timeout_s:.0f}s; page errors:\n  {errors}"
        )

    async def screenshot(self, *, full_page: bool = True) -> bytes:
        """A PNG of the page; `full_page` captures below the fold too."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = await self.send("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            params["clip"] = {
                "x": 0,
                "y": 0,
                "width": size["width"],
                "height": size["height"],
                "scale": 1,
            }
            params["captureBeyondViewport"] = True
        result = await self.send("Page.captureScreenshot", **params)
        return base64.b64decode(result["data"])

    async def close(self) -> None:
        with contextlib.suppress(CDPError, ConnectionError, TimeoutError):
            await self.browser.send("Target.closeTarget", {"targetId": self.target_id})


class Browser:
    """One Chromium process and the websocket to it."""

    def __init__(self, proc: asyncio.subprocess.Process, ws: ClientConnection, log: Path) -> None:
        self.proc = proc
        self.log = log
        self._ws = ws
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pages: dict[str, Page] = {}
        self._reader = asyncio.create_task(self._read())

    async def send(
        self, method: str, params: dict[str, Any] | None = None, *, session_id: str | None = None
    ) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session_id is not None:
            msg["sessionId"] = session_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        await self._ws.send(json.dumps(msg))
        try:
            return await asyncio.wait_for(future, COMMAND_TIMEOUT_S)
        finally:
            self._pending.pop(msg["id"], None)

    async def _read(self) -> None:
        try:
            async for raw in self._ws:
                msg = json.loads(raw)
                if "id" in msg:
                    future = self._pending.get(msg["id"])
                    if future is None or future.done():
                        continue
                    if "error" in msg:
                        future.set_exception(CDPError(f"{msg['error']}"))
                    else:
                        future.set_result(msg.get("result", {}))
                elif (page := self._pages.get(msg.get("sessionId", ""))) is not None:
                    page.on_event(msg["method"], msg.get("params", {}))
        finally:
            # The browser went away: nobody waits forever for an answer that cannot come.
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(CDPError("the browser closed the connection"))

    async def new_page(self, *, width: int = 1360, height: int = 900) -> Page:
        """A fresh tab (its own sessionStorage) with error collection on."""
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, target["targetId"], attached["sessionId"])
        self._pages[page.session_id] = page
        for domain in ("Runtime", "Log", "Page", "Network"):
            await page.send(f"{domain}.enable")
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        return page

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


def _own_process_group() -> None:
    # Chromium forks a zygote, renderers and a GPU process; a group of their own lets the
    # test stop all of them with one signal, and none of them outlives the test.
    os.setpgrp()


def chromium_argv(binary: Path, port: int, user_data_dir: Path) -> list[str]:
    return [
        str(binary),
        "--headless",
        "--no-sandbox",  # the tests run as root in a container, where the sandbox cannot start
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
        "--hide-scrollbars",  # screenshots without a scrollbar gutter
        f"--user-data-dir={user_data_dir}",
        "--remote-debugging-address=127.0.0.1",
        f"--remote-debugging-port={port}",
        "about:blank",
    ]


def _tail(log: Path, chars: int = 3000) -> str:
    # Only on the failure path: a few KB read once, so blocking the loop does not matter.
    with contextlib.suppress(OSError):
        return log.read_text(errors="replace")[-chars:]
    return ""


async def _devtools_ws_url(port: int, proc: asyncio.subprocess.Process, log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with httpx.AsyncClient(timeout=1.0) as client:
        while True:
            if proc.returncode is not None:
                raise CDPError(f"chromium exited with {proc.returncode}:\n{_tail(log)}")
            try:
                r = await client.get(f"http://127.0.0.1:{port}/json/version")
                if r.status_code == 200:
                    return str(r.json()["webSocketDebuggerUrl"])
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise CDPError(f"chromium not answering after {START_TIMEOUT_S:.0f}s")
            await asyncio.sleep(0.1)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
    # Children that ignored SIGTERM while the browser exited still share the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def chromium(binary: Path = CHROMIUM) -> AsyncIterator[Browser]:
    """A headless Chromium on a free 127.0.0.1 port, stopped (with its whole process group)
    on exit."""
    with tempfile.TemporaryDirectory(prefix="atlas-chromium-") as tmp:
        log = Path(tmp) / "chromium.log"
        port = free_port()
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *chromium_argv(binary, port, Path(tmp) / "profile"),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                preexec_fn=_own_process_group,
            )
        browser: Browser | None = None
        try:
            url = await _devtools_ws_url(port, proc, log)
            # Screenshots are base64 in one message; a full page is a few MB.
            ws = await connect(url, max_size=64 * 2**20, ping_interval=None)
            browser = Browser(proc, ws, log)
            yield browser
        finally:
            if browser is not None:
                await browser.close()
            await _stop(proc)

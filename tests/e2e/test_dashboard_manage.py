"""The dashboard as the admin's working tool, in headless Chromium against the whole stack:
sign in with the admin token, create a key in the UI and use the secret its dialog showed
with the openai SDK, find the request in the request log panel, edit and revoke the key in
the UI (the next SDK call is refused), create a team and an app, read the audit log, open the
alerts panel, delete the key; the admin API confirms each change, and the page logs no errors.

Screenshots (a 1366x768 laptop viewport) land in the test's tmp dir; with
ATLAS_UPDATE_SCREENSHOT=1 they also replace docs/dashboard-keys.png and
docs/dashboard-requests.png.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import openai
import pytest
import pytest_asyncio

from atlas.local.stack import Stack
from tests.browser import CHROMIUM, Browser, Page, chromium
from tests.e2e.conftest import ADMIN_TOKEN

DOCS = Path(__file__).resolve().parents[2] / "docs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SETTLED = "document.body.dataset.ready === 'true' && document.body.dataset.state !== 'starting'"
MODEL = "demo-small"
TEAM_ID = "ui-team"
APP_ID = "ui-app"
#: How long a key change may take to reach authz (its key cache), s.
PROPAGATION_S = 5.0

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def chromium_binary() -> Path:
    if CHROMIUM.exists():
        return CHROMIUM
    message = f"{CHROMIUM} is missing: run scripts/install-chromium.sh"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def browser(chromium_binary: Path) -> AsyncIterator[Browser]:
    async with chromium(chromium_binary) as the_browser:
        yield the_browser


@pytest_asyncio.fixture(loop_scope="session")
async def page(browser: Browser) -> AsyncIterator[Page]:
    the_page = await browser.new_page(width=1366, height=768)
    try:
        yield the_page
    finally:
        await the_page.close()


@pytest_asyncio.fixture(loop_scope="session")
async def cleanup(admin: httpx.AsyncClient) -> AsyncIterator[list[str]]:
    """Admin paths deleted after the test, whatever the UI managed to do."""
    paths: list[str] = []
    yield paths
    for path in reversed(paths):
        await admin.delete(path)


class UI:
    """The few gestures the test makes, each one round trip of JavaScript."""

    def __init__(self, page: Page) -> None:
        self.page = page

    async def settled(self, extra: str = "true") -> None:
        # !! since an element comes back over CDP as {} (falsy in Python).
        await self.page.wait_for(f"{SETTLED} && !!({extra})")

    async def click(self, selector: str) -> None:
        await self.page.evaluate(f"document.querySelector({json.dumps(selector)}).click()")

    async def tab(self, name: str) -> None:
        await self.click(f'#tabs [data-tab="{name}"]')
        await self.settled(f"document.body.dataset.tab === {json.dumps(name)}")

    async def fill(self, form: str, values: dict[str, object]) -> None:
        await self.page.evaluate(
            f"""(() => {{
              for (const [name, v] of Object.entries({json.dumps(values)})) {{
                const input = document.getElementById({json.dumps(form)} + '-' + name);
                if (input.type === 'checkbox') input.checked = v; else input.value = v;
              }}
            }})()"""
        )

    async def submit(self, form: str) -> None:
        await self.page.evaluate(f"document.getElementById({json.dumps(form)}).requestSubmit()")

    async def text(self, selector: str) -> str:
        value = await self.page.evaluate(
            f"(document.querySelector({json.dumps(selector)}) || {{}}).innerText || ''"
        )
        return str(value)

    async def secret(self) -> str:
        """The secret the dialog shows once; the dialog closed afterwards."""
        await self.page.wait_for("document.getElementById('secret-dialog').open")
        await self.click("#secret-copy")
        await self.page.wait_for("document.getElementById('secret-copied').textContent !== ''")
        value = str(await self.page.evaluate("document.getElementById('secret-value').value"))
        await self.click("#secret-done")
        await self.page.wait_for("!document.getElementById('secret-dialog').open")
        return value

    async def confirm(self) -> None:
        await self.page.wait_for("document.getElementById('confirm-dialog').open")
        await self.click("#confirm-ok")

    async def screenshot(self, name: str, tmp_path: Path) -> None:
        png = await self.page.screenshot(full_page=False)  # what a laptop screen shows
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000, len(png)
        (tmp_path / name).write_bytes(png)
        if os.environ.get("ATLAS_UPDATE_SCREENSHOT") == "1":
            (DOCS / name).write_bytes(png)


async def _chat(client: openai.AsyncOpenAI, text: str, *, stream: bool = False) -> None:
    messages = [{"role": "user", "content": text}]
    if not stream:
        await client.chat.completions.create(model=MODEL, messages=messages)
        return
    chunks = await client.chat.completions.create(
        model=MODEL,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for _ in chunks:
        pass


async def _refused_once_propagated(client: openai.AsyncOpenAI) -> openai.APIStatusError:
    """The refusal of a call with a revoked key (authz may serve it from its key cache for a
    moment; the admin API promises within a second)."""
    deadline = time.monotonic() + PROPAGATION_S
    while True:
        try:
            await _chat(client, "after revoke")
        except (openai.PermissionDeniedError, openai.AuthenticationError) as exc:
            return exc
        assert time.monotonic() < deadline, "a revoked key still admitted"
        await asyncio.sleep(0.2)


async def test_manage_keys_teams_apps_and_read_the_logs(
    stack: Stack,
    page: Page,
    admin: httpx.AsyncClient,
    client_for: Callable[[str], openai.AsyncOpenAI],
    cleanup: list[str],
    tmp_path: Path,
) -> None:
    ui = UI(page)
    allowed_network_errors: set[str] = set()  # answers the test provokes (or features absent)
    request_log = (await admin.get("/v1/admin/requests?limit=1")).status_code != 404

    # Sign in with the admin token, typed into the form.
    await page.goto(f"{stack.admin_url}/dashboard")
    await ui.settled("document.body.dataset.state === 'signed-out'")
    await page.evaluate(
        f"document.getElementById('token-input').value = {json.dumps(ADMIN_TOKEN)};"
        "document.getElementById('token-form').requestSubmit()"
    )
    await ui.settled("document.body.dataset.state === 'ok'")

    # A team, made in the UI, then a key in it.
    await ui.tab("teams")
    await ui.click("#teams-new")
    await ui.fill("team-form", {"id": TEAM_ID, "name": "UI team", "daily_limit": 5_000_000})
    await ui.submit("team-form")
    cleanup.append(f"/v1/admin/teams/{TEAM_ID}")
    await ui.settled(f"document.querySelector('#teams tr[data-team-id=\"{TEAM_ID}\"]')")
    team = (await admin.get(f"/v1/admin/teams/{TEAM_ID}")).json()
    assert team["name"] == "UI team" and team["daily_limit"] == 5_000_000

    await ui.tab("keys")
    await ui.click("#mkeys-new")
    await ui.page.wait_for("!!document.getElementById('key-form')")
    # A refused form first: the API's 422 is shown beside the form, naming the field.
    await ui.fill("key-form", {"name": "ui-key", "priority": "critical", "max_priority": "low"})
    await ui.submit("key-form")
    await ui.page.wait_for("!document.getElementById('key-form-error').hidden")
    error = await ui.text("#key-form-error")
    assert "priority" in error and "max_priority" in error, error
    allowed_network_errors.add(f"{stack.admin_url}/v1/admin/keys")
    await ui.fill(
        "key-form",
        {
            "priority": "high",
            "max_priority": "critical",
            "team": TEAM_ID,
            "daily_limit": 1_000_000,
            "rate_per_sec": 50,
            "burst": 20,
            "tokens_per_minute": 200_000,
            "monthly_budget_usd": 25,
        },
    )
    await ui.submit("key-form")
    secret = await ui.secret()
    keys = (await admin.get("/v1/admin/keys", params={"team": TEAM_ID})).json()["items"]
    assert [k["name"] for k in keys] == ["ui-key"], keys
    key = keys[0]
    cleanup.insert(0, f"/v1/admin/keys/{key['id']}")  # before its team
    assert (key["priority"], key["max_priority"], key["burst"]) == ("high", "critical", 20)
    assert key["monthly_budget_usd"] == 25 and key["tokens_per_minute"] == 200_000
    row = f'#mkeys tr[data-key-id="{key["id"]}"]'
    await ui.settled(f"document.querySelector({json.dumps(row)})")

    # The secret from the dialog works with the SDK.
    client = client_for(secret)
    await _chat(client, "hello from the dashboard test")
    await _chat(client, "and a stream", stream=True)

    # Editing a limit in the UI is what the API then says.
    await ui.click(f"{row} [data-action=edit]")
    await ui.fill("key-form", {"daily_limit": 123_456})
    await ui.submit("key-form")
    await ui.settled("!document.getElementById('form-dialog').open")
    assert (await admin.get(f"/v1/admin/keys/{key['id']}")).json()["daily_limit"] == 123_456
    await ui.settled(
        f"document.querySelector({json.dumps(row)} + ' td[title]').title.startsWith('123,456 ')"
    )

    # An app with a shared secret.
    await ui.tab("apps")
    await ui.click("#apps-new")
    await ui.fill(
        "app-form",
        {"id": APP_ID, "name": "UI app", "shared_secret": True, "principals": "spiffe://ui/app"},
    )
    await ui.submit("app-form")
    app_secret = await ui.secret()
    cleanup.append(f"/v1/admin/apps/{APP_ID}")
    assert len(app_secret) >= 16
    app = (await admin.get(f"/v1/admin/apps/{APP_ID}")).json()
    assert app["has_shared_secret"] and app["principals"] == ["spiffe://ui/app"]
    await ui.settled(f"document.querySelector('#apps tr[data-app-id=\"{APP_ID}\"]')")

    await ui.tab("keys")
    await ui.screenshot("dashboard-keys.png", tmp_path)

    # The request log panel shows the key's requests (polled while the tab is open).
    await ui.tab("requests")
    await ui.fill("req", {"key-id": key["id"]})
    await ui.submit("req-form")
    if request_log:
        found = await page.wait_for(
            f"document.querySelectorAll('#requests tr[data-key-id=\"{key['id']}\"]').length >= 2",
            timeout_s=20,
        )
        assert found
        text = await ui.text("#requests tbody")
        assert MODEL in text and "completed" in text, text
        assert "exact" in text or "est." in text
        # An export is fetched with the token (no token in a URL) and saved as a download.
        await ui.click("#req-csv")
        await ui.settled(
            "performance.getEntriesByType('resource')"
            ".some((e) => e.name.includes('/v1/admin/requests/export?'))"
        )
        assert await ui.text("#req-error") == ""
    else:
        await ui.settled("!document.getElementById('req-absent').hidden")
        allowed_network_errors.add(f"{stack.admin_url}/v1/admin/requests")
    await ui.screenshot("dashboard-requests.png", tmp_path)

    # Revoked in the UI: the next SDK call is refused.
    await ui.tab("keys")
    await ui.click(f"{row} [data-action=revoke]")
    await ui.confirm()
    await ui.settled(f"document.querySelector({json.dumps(row)}).dataset.status === 'disabled'")
    assert (await admin.get(f"/v1/admin/keys/{key['id']}")).json()["status"] == "disabled"
    refusal = await _refused_once_propagated(client)
    assert refusal.status_code == 403 and refusal.code == "key_disabled", refusal.body

    # The audit log has each change to the key, newest first.
    await ui.tab("audit")
    await ui.fill("audit", {"key": key["id"]})
    await ui.submit("audit-form")
    await ui.settled("document.querySelectorAll('#audit tr[data-action]').length >= 3")
    actions = await page.evaluate(
        "[...document.querySelectorAll('#audit tr[data-action]')].map((tr) => tr.dataset.action)"
    )
    assert actions == ["key.revoke", "key.update", "key.create"], actions
    assert "daily_limit: 1000000 → 123456" in await ui.text("#audit tbody")

    # Alerts: the panel loads, or says the feature is absent.
    await ui.tab("alerts")
    state = await page.evaluate(
        "document.getElementById('alerts-absent').hidden ? 'present' : 'absent'"
    )
    if state == "absent":
        allowed_network_errors |= {
            f"{stack.admin_url}/v1/admin/alerts",
            f"{stack.admin_url}/v1/admin/alerts/webhooks",
        }
    assert await ui.text("#alerts-error") == ""

    # Deleted in the UI, after a confirm.
    await ui.tab("keys")
    await ui.click(f"{row} [data-action=delete]")
    await ui.confirm()
    await ui.settled(f"!document.querySelector({json.dumps(row)})")
    assert (await admin.get(f"/v1/admin/keys/{key['id']}")).status_code == 404

    unexpected = [
        e
        for e in page.errors
        if not (e.log_source == "network" and e.url.split("?")[0] in allowed_network_errors)
    ]
    assert unexpected == [], "\n".join(map(str, page.errors))
    # data: URLs are Chromium's own (the calendar icon of a datetime input), not fetched.
    urls = [r["url"] for r in page.requests if not r["url"].startswith("data:")]
    assert [u for u in urls if not u.startswith(stack.admin_url + "/")] == []
    assert not [u for u in urls if ADMIN_TOKEN in u or secret in u]
    api_calls = [r for r in page.requests if "/v1/" in r["url"]]
    exports = [r["url"] for r in api_calls if "/v1/admin/requests/export?" in r["url"]]
    assert request_log is any("format=csv" in u and key["id"] in u for u in exports), exports
    for call in api_calls:
        headers = {k.lower(): v for k, v in call["headers"].items()}
        assert headers.get("authorization") == f"Bearer {ADMIN_TOKEN}", call["url"]
    if not request_log:
        pytest.xfail("GET /v1/admin/requests is not there yet: the request log part is pending")

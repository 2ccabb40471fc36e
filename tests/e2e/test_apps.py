"""Internal apps end to end through the real Envoy, on a TLS listener with certificates the
suite makes: an app identified by its client certificate's SPIFFE id (or DNS SAN) is admitted
and accounted without a bearer key; an app with a shared secret and its id likewise; forged
identity headers (x-forwarded-client-cert) are ignored; the app secret never reaches the
upstream; apps are managed over the admin API."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from atlas.local.stack import Stack
from tests.certs import Authority, Pem
from tests.e2e.conftest import running_stack
from tests.e2e.helpers import clear_upstream, settled, upstream_saw

CHECKOUT = "spiffe://atlas.test/ns/shop/sa/checkout"
BILLING = "spiffe://atlas.test/ns/shop/sa/billing"
MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pem]:
    d: Path = tmp_path_factory.mktemp("certs")
    ca = Authority(d, "atlas-test-ca")
    rogue = Authority(d, "rogue-ca")
    return {
        "ca": ca.pem,
        "server": ca.server(),
        "checkout": ca.client_uri("checkout", CHECKOUT),
        "billing": ca.client_uri("billing", BILLING),
        "reports": ca.client_dns("reports", "reports.shop.svc"),
        "rogue": rogue.client_uri("rogue", CHECKOUT),
    }


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(certs: dict[str, Pem]) -> AsyncIterator[Stack]:
    """This module's stack: Envoy's listener serves TLS and verifies client certificates."""
    async with running_stack(
        listener_tls_cert_file=str(certs["server"].cert),
        listener_tls_key_file=str(certs["server"].key),
        listener_client_ca_file=str(certs["ca"].cert),
    ) as the_stack:
        yield the_stack


def _tls(certs: dict[str, Pem], client: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs["ca"].cert))
    if client is not None:
        ctx.load_cert_chain(str(certs[client].cert), str(certs[client].key))
    return ctx


@pytest_asyncio.fixture(loop_scope="session")
async def https(stack: Stack, certs: dict[str, Pem]) -> AsyncIterator[Any]:
    """`https(client_cert_name | None)`: an httpx client to the proxy over TLS."""
    opened: list[httpx.AsyncClient] = []

    def make(client: str | None) -> httpx.AsyncClient:
        c = httpx.AsyncClient(base_url=stack.proxy_url, verify=_tls(certs, client), timeout=30)
        opened.append(c)
        return c

    yield make
    for c in opened:
        await c.aclose()


def sdk(stack: Stack, http: httpx.AsyncClient, **headers: str) -> openai.AsyncOpenAI:
    """The openai SDK as an app uses it: it insists on an api_key, so a placeholder."""
    return openai.AsyncOpenAI(
        base_url=stack.proxy_url + "/v1",
        api_key="mesh-identity",
        http_client=http,
        max_retries=0,
        default_headers=headers or None,
    )


async def new_app(admin: httpx.AsyncClient, app_id: str, **fields: Any) -> dict[str, Any]:
    await admin.delete(f"/v1/admin/apps/{app_id}")  # a leftover of an earlier run
    body = {"id": app_id, "name": app_id, "rate_per_sec": 100, "burst": 100, **fields}
    r = await admin.post("/v1/admin/apps", json=body)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def test_an_mtls_app_is_admitted_and_accounted_without_a_bearer_key(
    stack: Stack, admin: httpx.AsyncClient, https: Any
) -> None:
    app = await new_app(admin, "checkout", principals=[CHECKOUT])
    assert app["app_secret"] is None and app["principals"] == [CHECKOUT]
    await clear_upstream(stack.upstream_url)
    client = sdk(stack, https("checkout"))
    got = await client.chat.completions.create(model="demo-small", messages=MESSAGES, max_tokens=20)
    assert got.usage is not None
    usage = await settled(admin, app["id"])
    assert usage["daily"]["used"] == got.usage.total_tokens
    assert usage["daily"]["requests"] == 1
    (seen,) = await upstream_saw(stack.upstream_url)
    assert seen["headers"]["x-atlas-key-id"] == app["id"]
    # A stream is accounted to the app as well.
    stream = await client.chat.completions.create(
        model="demo-small",
        messages=MESSAGES,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    streamed = next(c.usage for c in chunks if c.usage is not None)
    usage = await settled(admin, app["id"])
    assert usage["daily"]["used"] == got.usage.total_tokens + streamed.total_tokens


async def test_a_dns_san_identifies_an_app_too(
    stack: Stack, admin: httpx.AsyncClient, https: Any
) -> None:
    app = await new_app(admin, "reports", principals=["reports.shop.svc"])
    got = await sdk(stack, https("reports")).chat.completions.create(
        model="demo-small", messages=MESSAGES, max_tokens=5
    )
    assert got.usage is not None
    assert (await settled(admin, app["id"]))["daily"]["used"] == got.usage.total_tokens


async def test_forged_identity_headers_are_ignored(
    stack: Stack, admin: httpx.AsyncClient, https: Any
) -> None:
    checkout = await new_app(admin, "checkout", principals=[CHECKOUT])
    billing = await new_app(admin, "billing", principals=[BILLING])
    forged = {"x-forwarded-client-cert": f"By=spiffe://atlas.test/envoy;URI={CHECKOUT}"}
    # Without a certificate: Envoy replaces the client's XFCC (SANITIZE_SET), nobody is named.
    with pytest.raises(openai.AuthenticationError) as info:
        await sdk(stack, https(None), **forged).chat.completions.create(
            model="demo-small", messages=MESSAGES, max_tokens=5
        )
    assert "Incorrect API key" in info.value.message
    # With billing's certificate, a forged XFCC naming checkout is still billing.
    got = await sdk(stack, https("billing"), **forged).chat.completions.create(
        model="demo-small", messages=MESSAGES, max_tokens=5
    )
    assert got.usage is not None
    assert (await settled(admin, billing["id"]))["daily"]["used"] == got.usage.total_tokens
    assert (await settled(admin, checkout["id"]))["daily"]["requests"] == 0
    # A certificate from another CA naming checkout never completes the handshake.
    with pytest.raises(openai.APIConnectionError):
        await sdk(stack, https("rogue")).chat.completions.create(
            model="demo-small", messages=MESSAGES, max_tokens=5
        )


async def test_a_shared_secret_app_without_mtls(
    stack: Stack, admin: httpx.AsyncClient, https: Any
) -> None:
    app = await new_app(admin, "batch", shared_secret=True, daily_limit=10**6)
    secret = app["app_secret"]
    assert secret and app["has_shared_secret"] and "app_secret_hash" not in app
    ids = {"x-atlas-app-id": "batch", "x-atlas-app-secret": secret}
    await clear_upstream(stack.upstream_url)
    got = await sdk(stack, https(None), **ids).chat.completions.create(
        model="demo-small", messages=MESSAGES, max_tokens=5
    )
    assert got.usage is not None
    assert (await settled(admin, app["id"]))["daily"]["used"] == got.usage.total_tokens
    (seen,) = await upstream_saw(stack.upstream_url)
    assert seen["headers"]["x-atlas-key-id"] == app["id"]
    assert secret not in str(seen), "the app secret reached the upstream"
    # The secret is scoped to its app id, and rotating it retires the old one at once.
    wrong = {"x-atlas-app-id": "checkout", "x-atlas-app-secret": secret}
    with pytest.raises(openai.AuthenticationError) as info:
        await sdk(stack, https(None), **wrong).chat.completions.create(
            model="demo-small", messages=MESSAGES, max_tokens=5
        )
    assert "app identity" in info.value.message
    r = await admin.post("/v1/admin/apps/batch/rotate-secret")
    assert r.status_code == 200, r.text
    fresh = r.json()["app_secret"]
    with pytest.raises(openai.AuthenticationError):
        await sdk(stack, https(None), **ids).chat.completions.create(
            model="demo-small", messages=MESSAGES, max_tokens=5
        )
    ok = {"x-atlas-app-id": "batch", "x-atlas-app-secret": fresh}
    await sdk(stack, https(None), **ok).chat.completions.create(
        model="demo-small", messages=MESSAGES, max_tokens=5
    )


async def test_apps_over_the_admin_api(stack: Stack, admin: httpx.AsyncClient, https: Any) -> None:
    app = await new_app(admin, "ledger-svc", principals=["spiffe://atlas.test/ns/a/sa/x"])
    assert (
        await admin.post(
            "/v1/admin/apps", json={"id": "ledger-svc", "principals": ["spiffe://atlas.test/other"]}
        )
    ).status_code == 409
    taken = {"id": "ledger-svc-2", "principals": ["spiffe://atlas.test/ns/a/sa/x"]}
    assert (await admin.post("/v1/admin/apps", json=taken)).status_code == 409
    assert (await admin.get("/v1/admin/apps/ledger-svc-2")).status_code == 404
    assert (await admin.post("/v1/admin/apps", json={"id": "nothing"})).status_code == 422
    bad = {"id": "bad", "principals": ["spiffe://a;URI=spiffe://b"]}
    assert (await admin.post("/v1/admin/apps", json=bad)).status_code == 422
    listed = (await admin.get("/v1/admin/apps")).json()
    assert "ledger-svc" in [a["app"] for a in listed["items"]]
    # An app's record is refused where a key's secret would be rotated or deleted.
    assert (await admin.post(f"/v1/admin/keys/{app['id']}/rotate")).status_code == 409
    assert (await admin.delete(f"/v1/admin/keys/{app['id']}")).status_code == 409
    # Moving checkout's principal onto this app makes this app the one the certificate names.
    await new_app(admin, "checkout", principals=[CHECKOUT])
    moved = {"principals": [CHECKOUT]}
    assert (await admin.patch("/v1/admin/apps/ledger-svc", json=moved)).status_code == 409
    await admin.delete("/v1/admin/apps/checkout")
    r = await admin.patch("/v1/admin/apps/ledger-svc", json=moved)
    assert r.status_code == 200, r.text
    got = await sdk(stack, https("checkout")).chat.completions.create(
        model="demo-small", messages=MESSAGES, max_tokens=5
    )
    assert got.usage is not None
    assert (await settled(admin, app["id"]))["daily"]["used"] == got.usage.total_tokens
    # Disabled, then deleted: the certificate identifies nothing.
    r = await admin.patch("/v1/admin/apps/ledger-svc", json={"status": "disabled"})
    assert r.status_code == 200
    with pytest.raises(openai.PermissionDeniedError):
        await sdk(stack, https("checkout")).chat.completions.create(
            model="demo-small", messages=MESSAGES, max_tokens=5
        )
    assert (await admin.delete("/v1/admin/apps/ledger-svc")).status_code == 204
    with pytest.raises(openai.AuthenticationError):
        await sdk(stack, https("checkout")).chat.completions.create(
            model="demo-small", messages=MESSAGES, max_tokens=5
        )
    audit = (await admin.get("/v1/admin/audit", params={"limit": 50})).json()
    actions = [e["action"] for e in audit["entries"] if e.get("subject") == "ledger-svc"]
    assert {"app.create", "app.update", "app.delete"} <= set(actions)

"""The authz process: the policy and what it needs, served over the configured protocol.

`ATLAS_AUTHZ_PROTOCOL=http` (default) speaks Envoy's HTTP ext_authz protocol
(`authz.http_server`), `grpc` the gRPC one (`authz.server`); the policy is the same.
"""

from __future__ import annotations

import asyncio

from atlas import tokens
from atlas.grpc_service import stop_tasks, wait_for_shutdown
from atlas.inflight import InflightGauge
from atlas.ledger.redis import RedisLedger
from atlas.modelnames import ModelNames
from atlas.pricing import PriceBook
from atlas.providers import config as providers_config
from atlas.providers.credentials import resolve
from atlas.providers.routing import ProviderRouter
from atlas.requestlog_writer import RequestLogWriter
from atlas.settings import Settings
from authz.bodyparse import BodyParser
from authz.http_server import serve_http
from authz.keycache import KeyCache
from authz.policy import Authorizer
from authz.server import serve_grpc
from authz.shedding import Shedder


async def serve(settings: Settings, *, ready: asyncio.Event | None = None) -> None:
    ledger = RedisLedger.from_settings(settings)
    cache = KeyCache(ledger.find_key, ttl_s=settings.key_cache_ttl_s)
    background = [asyncio.create_task(cache.follow(ledger.key_changes))]
    shedder = None
    if settings.capacity_tokens:
        gauge = InflightGauge(ledger.add_inflight, interval_s=settings.inflight_sync_s)
        shedder = Shedder(gauge, settings)
        background.append(asyncio.create_task(gauge.run()))
    tokenizer = tokens.configuration(settings)
    tokens.configure(*tokenizer)
    parser = BodyParser(
        workers=settings.authz_parse_workers,
        timeout_s=settings.authz_parse_timeout_s,
        tokenizer=tokenizer,
    )
    parser.start()
    router = None
    if settings.providers_file:
        providers = providers_config.load(settings.providers_file)
        router = ProviderRouter(
            providers, resolve(providers), ledger, PriceBook(settings.model_prices)
        )
    requests = RequestLogWriter(ledger, service="authz")
    background.append(asyncio.create_task(requests.run()))
    authorizer = Authorizer(
        ledger,
        cache,
        settings,
        shedder=shedder,
        names=ModelNames.from_settings(settings),
        parser=parser,
        providers=router,
        requests=requests,
    )
    protocol = serve_grpc if settings.authz_protocol == "grpc" else serve_http
    try:
        await protocol(authorizer, settings, until=wait_for_shutdown, ready=ready)
    finally:
        await stop_tasks(background)
        parser.close()
        if shedder is not None:
            await shedder.gauge.flush()
        await ledger.close()

"""Envoy ext_proc gRPC service: `envoy.service.ext_proc.v3.ExternalProcessor/Process`.

One gRPC stream is one HTTP exchange. The stream may end three ways, and each settles:
after `end_of_stream` (normal), by half-close without it (client or upstream gone, with
Envoy's graceful-close flag), or by cancellation (Envoy resets the stream). Settlement runs
in its own task so a cancelled handler cannot lose it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from atlas import metrics, tokens
from atlas.errors import LedgerUnavailable
from atlas.grant import AUTHZ_NAMESPACE, GRANT_HEADER, Grant
from atlas.grpc_service import grpc_server, stop_tasks, wait_for_shutdown
from atlas.inflight import InflightGauge
from atlas.ledger.protocol import Settlements
from atlas.ledger.redis import RedisLedger
from atlas.modelnames import ModelNames
from atlas.pricing import PriceBook
from atlas.providers import config as providers_config
from atlas.requestlog_writer import RequestLogWriter
from atlas.settings import Settings
from extproc.accesslog import AccessLogSettler
from extproc.exchange import Exchange
from extproc.journal import SettlementJournal
from extproc.leases import LeaseKeeper
from extproc.providers import ProviderReporter
from extproc.reaper import Reaper
from extproc.settler import Settler

log = logging.getLogger("atlas.extproc")

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"


def grant_of(req: ep.ProcessingRequest) -> Grant | None:
    """authz's grant, from the ext_authz metadata Envoy forwards (a string on both protocols)."""
    md = req.metadata_context.filter_metadata.get(AUTHZ_NAMESPACE)
    if md is None:
        return None
    v = md.fields.get(GRANT_HEADER)
    if v is None or v.WhichOneof("kind") != "string_value":
        return None
    return Grant.decode(v.string_value)


def _path_of(req: ep.ProcessingRequest, kind: str | None) -> str:
    if kind != "request_headers":
        return ""
    for h in req.request_headers.headers.headers:
        if h.key == ":path":
            return (h.raw_value or h.value.encode()).decode("latin-1")
    return ""


def _headers(msg: Any) -> dict[str, str]:
    return {h.key: (h.raw_value or h.value.encode()).decode("latin-1") for h in msg.headers.headers}


_PASS_THROUGH: dict[str, Callable[[], Any]] = {
    "request_headers": ep.HeadersResponse,
    "response_headers": ep.HeadersResponse,
    "request_body": ep.BodyResponse,
    "response_body": ep.BodyResponse,
    "request_trailers": ep.TrailersResponse,
    "response_trailers": ep.TrailersResponse,
}


def _passed_through(kind: str) -> ep.ProcessingResponse:
    """Hostile or unexpected input must never break the client's response: this message
    passes through untouched and we count what we can."""
    log.exception("extproc could not process %s; passing it through", kind)
    metrics.DECISIONS.labels(service="extproc", decision="error").inc()
    return ep.ProcessingResponse(**{kind: _PASS_THROUGH[kind]()})


class ExternalProcessor(ep_grpc.ExternalProcessorServicer):
    def __init__(
        self,
        settler: Settler,
        prices: PriceBook | None = None,
        *,
        route_by_model: bool = False,
        leases: LeaseKeeper | None = None,
        models: ModelNames | None = None,
        keep_max: int = 1 << 20,
    ) -> None:
        self._settler = settler
        self._prices = prices
        self._route_by_model = route_by_model
        self._keep_max = keep_max
        self._leases = leases
        self._models = models if models is not None else ModelNames()  # bounded label values

    @staticmethod
    def _handle(ex: Exchange, req: ep.ProcessingRequest, kind: str | None) -> Any:
        if kind == "request_headers":
            return ex.on_request_headers(_headers(req.request_headers))
        if kind == "request_body":
            return ex.on_request_body(req.request_body.body)
        if kind == "response_headers":
            return ex.on_response_headers(
                _headers(req.response_headers), req.response_headers.end_of_stream
            )
        if kind == "response_body":
            return ex.on_response_body(req.response_body.body, req.response_body.end_of_stream)
        if kind == "response_trailers":
            ex.response_done = True
            return ep.ProcessingResponse(response_trailers=ep.TrailersResponse())
        if kind == "request_trailers":
            return ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
        raise ValueError(f"unknown ProcessingRequest {kind!r}")

    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: Any
    ) -> AsyncIterator[ep.ProcessingResponse]:
        ex = Exchange(
            route_by_model=self._route_by_model, models=self._models, keep_max=self._keep_max
        )
        started = claimed = False
        bodies = 0  # response_body messages not yet added to their counter
        try:
            async for req in request_iterator:
                kind = req.WhichOneof("request")
                if kind == "response_body" and started:
                    # The per-chunk path of a stream: no dispatch, a batched counter, and the
                    # grant was claimed with the exchange's first message.
                    bodies += 1
                    if bodies == BODY_COUNT_BATCH:
                        MESSAGES[kind].inc(bodies)
                        bodies = 0
                    msg = req.response_body
                    try:
                        reply = ex.on_response_body(msg.body, msg.end_of_stream)
                    except Exception:
                        reply = _passed_through(kind)
                    yield reply
                    continue
                MESSAGES[kind].inc()
                if not started:
                    started = True
                    ex.start(grant_of(req), _path_of(req, kind))
                try:
                    reply = self._handle(ex, req, kind)
                except Exception:
                    reply = _passed_through(kind)
                if not claimed and (g := ex.grant) is not None:
                    claimed = True
                    if self._leases is not None and not g.degraded:
                        # The request reached us: claim its reservation (batched, no I/O).
                        # Degraded: nothing was reserved.
                        self._leases.claim(g.key_id, g.reservation_id)
                yield reply
        finally:
            # Reached on normal end, on half-close without end_of_stream and on cancellation.
            if bodies:
                MESSAGES["response_body"].inc(bodies)
            settlement = ex.settlement(self._prices)
            if settlement is not None:
                stream_s = None
                if ex.streaming_response:
                    done = ex.finished_at
                    stream_s = -1.0 if done is None else done - ex.started_at
                ended = ex.finished_at if ex.finished_at is not None else time.monotonic()
                self._settler.submit(
                    settlement,
                    ex.grant,
                    stream_s=stream_s,
                    status=ex.status,
                    latency_ms=(ended - ex.started_at) * 1000,
                )
            if self._leases is not None and ex.grant is not None:
                self._leases.release(ex.grant.key_id, ex.grant.reservation_id)
            if ex.first_chunk_at is not None:
                metrics.TIME_TO_FIRST_TOKEN.observe(ex.first_chunk_at - ex.started_at)


#: A stream's response_body messages are counted this many at a time (and at its end).
BODY_COUNT_BATCH = 64
HISTORY_FLUSH_S = 1.0
JOURNAL_REPLAY_S = 1.0
#: Label lookups done once: the message counter is on the per-chunk path.
MESSAGES = {
    kind: metrics.EXTPROC_MESSAGES.labels(kind=kind)
    for kind in (
        "request_headers",
        "request_body",
        "request_trailers",
        "response_headers",
        "response_body",
        "response_trailers",
    )
}


async def _replay_forever(journal: SettlementJournal, ledger: Settlements) -> None:
    """Replay journaled settlements (also those a crash left behind) once Redis answers."""
    while True:
        with contextlib.suppress(LedgerUnavailable):
            await journal.replay(ledger.settle)
        await asyncio.sleep(JOURNAL_REPLAY_S)


async def _flush_history_forever(ledger: Settlements) -> None:
    while True:
        await asyncio.sleep(HISTORY_FLUSH_S)
        await ledger.flush_history()


async def serve(settings: Settings, *, ready: asyncio.Event | None = None) -> None:
    tokens.configure(*tokens.configuration(settings))
    ledger = RedisLedger.from_settings(settings, buffer_history=True)
    inflight = None
    background: list[asyncio.Task[None]] = []
    if settings.capacity_tokens:
        inflight = InflightGauge(ledger.add_inflight, interval_s=settings.inflight_sync_s)
        background.append(asyncio.create_task(inflight.run()))
    journal_dir = Path(settings.journal_dir or tempfile.gettempdir())
    journal = SettlementJournal(
        journal_dir / f"atlas-extproc-{settings.extproc_port}.journal",
        max_bytes=settings.journal_max_bytes,
    )
    reporter = None
    if settings.providers_file:
        reporter = ProviderReporter(providers_config.load(settings.providers_file), ledger)
        background.append(asyncio.create_task(reporter.run()))
    requests = RequestLogWriter(ledger, service="extproc")
    background.append(asyncio.create_task(requests.run()))
    settler = Settler(
        ledger, journal=journal, inflight=inflight, providers=reporter, requests=requests
    )
    background.append(asyncio.create_task(_replay_forever(journal, ledger)))
    reaper = Reaper(
        ledger,
        interval_s=settings.reap_interval_s,
        charge=settings.reap_charge_reserved,
        inflight=inflight,
        requests=requests,
    )
    background.append(asyncio.create_task(reaper.run()))
    leases = LeaseKeeper(ledger, ttl_s=settings.reservation_ttl_s)
    background.append(asyncio.create_task(leases.run()))
    background.append(asyncio.create_task(_flush_history_forever(ledger)))
    processor = ExternalProcessor(
        settler,
        PriceBook(settings.model_prices),
        route_by_model=bool(settings.model_routes),
        models=ModelNames.from_settings(settings),
        leases=leases,
        keep_max=settings.idempotency_max_response_bytes,
    )
    access_log = AccessLogSettler(
        settler.submit_many,
        leases.abandon,
        prices=PriceBook(settings.model_prices),
        models=ModelNames.from_settings(settings),
        providers=reporter,
        requests=requests,
    )

    def register(server: Any) -> None:
        ep_grpc.add_ExternalProcessorServicer_to_server(processor, server)
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(access_log, server)

    address = f"{settings.extproc_host}:{settings.extproc_port}"
    try:
        async with grpc_server(
            address,
            max_message_bytes=settings.grpc_max_message_bytes,
            register=register,
            service_name=SERVICE_NAME,
            grace_s=10,  # streams in flight are still being accounted
        ):
            log.info("extproc listening on %s", address)
            if ready is not None:
                ready.set()
            await wait_for_shutdown()
    finally:
        await settler.drain()  # every settlement task, or its usage would only be reaped
        await stop_tasks(background)
        if inflight is not None:
            await inflight.flush()
        await ledger.flush_history()
        await ledger.close()

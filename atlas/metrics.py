"""Prometheus metrics. Atlas's names are kept; they are labelled by key id, never by secret.

Each process exports its own registry: authz and extproc on their metrics ports, admin on
`/metrics`.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "atlas_requests_total",
    "Requests settled, by key, model and outcome",
    ["key_id", "model", "outcome"],
)
TOKENS_USED = Counter(
    "atlas_tokens_used_total",
    "Tokens settled, by key, model and kind: prompt, completion, and their parts cached and"
    " cache_write (in prompt) and reasoning (in completion)",
    ["key_id", "model", "kind"],
)
QUOTA_REJECTIONS = Counter(
    "atlas_quota_rejections_total",
    "Requests refused by a daily/monthly quota",
    ["key_id", "window"],
)
RATE_LIMIT_REJECTIONS = Counter(
    "atlas_rate_limit_rejections_total",
    "Requests refused by a rate limit",
    ["key_id", "limit"],
)
STREAMING_REQUESTS = Counter(
    "atlas_streaming_requests_total", "Streamed (SSE) responses seen", ["key_id", "model"]
)
STREAMING_DURATION = Histogram(
    "atlas_streaming_duration_seconds",
    "Duration of streamed responses",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
TIME_TO_FIRST_TOKEN = Histogram(
    "atlas_time_to_first_token_seconds",
    "Response headers to first streamed body chunk",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
TOKEN_REFUNDS = Counter(
    "atlas_token_refunds_total",
    "Reserved tokens given back at settlement",
    ["key_id", "reason"],
)
SETTLEMENTS = Counter(
    "atlas_settlements_total",
    "Settlements by outcome and by where the count came from",
    ["outcome", "source", "status"],
)
DECISIONS = Counter(
    "atlas_decisions_total",
    "Answers given to Envoy, by service and decision",
    ["service", "decision"],
)
LEDGER_ERRORS = Counter(
    "atlas_ledger_errors_total",
    "Ledger calls that failed (Redis unreachable or erroring)",
    ["service", "op"],
)
EXTPROC_MESSAGES = Counter(
    "atlas_extproc_messages_total", "ext_proc messages from Envoy, by kind", ["kind"]
)
JOURNAL = Counter(
    "atlas_journal_settlements_total",
    "Settlements journaled on disk while Redis was unreachable, by event",
    ["event"],  # written | replayed | dropped | rejected (unsettleable, kept aside)
)
REAPED = Counter(
    "atlas_reaped_reservations_total", "Reservations settled by the reaper (never settled)"
)
ABANDONED = Counter(
    "atlas_abandoned_reservations_total",
    "Reaped reservations no ext_proc stream claimed (never reached the upstream), charged 0",
)
LEASES = Counter(
    "atlas_reservation_leases_total",
    "Reservation claims and renewals written for live ext_proc streams",
    ["op"],  # claim | renew
)
ALERTS_FIRED = Counter(
    "atlas_alerts_fired_total",
    "Quota and budget alerts fired (once per window and threshold)",
    ["kind", "limit", "threshold"],
)
ALERT_DELIVERIES = Counter(
    "atlas_alert_deliveries_total", "Webhook deliveries of alerts, by result", ["result"]
)
REQUEST_LOG = Counter(
    "atlas_request_log_records_total",
    "Request log records, by event",
    ["service", "event"],  # written | dropped (buffer full or Redis unreachable too long)
)

# ---- providers (extproc, from Envoy's access log and settlements) ---------------------------
_PROVIDER_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PROVIDER_REQUESTS = Counter(
    "atlas_provider_requests_total",
    "Requests sent to a provider, by provider, pool member and status class"
    " (2xx, 4xx, 429, 5xx, error: no answer)",
    ["provider", "member", "status_class"],
)
PROVIDER_LATENCY = Histogram(
    "atlas_provider_latency_seconds",
    "Provider response time, first byte sent to last byte received",
    ["provider"],
    buckets=_PROVIDER_BUCKETS,
)
PROVIDER_TTFB = Histogram(
    "atlas_provider_ttfb_seconds",
    "Provider time to first byte (a stream's first token)",
    ["provider"],
    buckets=_PROVIDER_BUCKETS,
)
PROVIDER_COOLING = Gauge(
    "atlas_provider_member_cooling",
    "1 while a pool member (member '*': the whole provider) is cooling after 429/401/5xx",
    ["provider", "member"],
)
PROVIDER_TOKENS = Counter(
    "atlas_provider_tokens_total",
    "Tokens settled per provider and pool member, by kind (prompt, completion)",
    ["provider", "member", "kind"],
)
PROVIDER_SPEND = Counter(
    "atlas_provider_spend_usd_total",
    "Spend settled per provider and pool member (ATLAS_MODEL_PRICES), USD",
    ["provider", "member"],
)

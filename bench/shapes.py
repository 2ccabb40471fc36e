"""What the benchmark sends: request bodies, stream shape, key limits."""

from __future__ import annotations

CHUNKS = 64  # completion tokens of a streamed answer: one SSE event each
PACED_DELAY_MS = 1  # between the upstream's SSE events in the paced-stream phases
PACED_CONNECTIONS = 8  # concurrent streams in the paced-stream phase ("a handful")
HALF = 0.5  # the latency phase runs at this share of Atlas's maximum req/s
PROMPT = [{"role": "user", "content": "Write one short sentence about benchmarks."}]
NONSTREAM_BODY = {"model": "demo-small", "max_tokens": 16, "messages": PROMPT}
STREAM_BODY = {"model": "demo-small", "max_tokens": CHUNKS, "stream": True, "messages": PROMPT}
#: A stream whose client asks for usage: what the opt-in fast path serves without ext_proc.
STREAM_USAGE_BODY = {**STREAM_BODY, "stream_options": {"include_usage": True}}
#: Limits no benchmark can reach (admin/schemas.py bounds rate_per_sec and burst at 1e6).
KEY_LIMITS = {
    "rate_per_sec": 1e6,
    "burst": 1_000_000,
    "daily_limit": 10**12,
    "monthly_limit": 10**12,
}
#: The issue's reference numbers (2-core machines, one Envoy worker, wrk, 16 connections).
REFERENCE = (
    "bare Envoy ~9,400 req/s (p50 1.6 ms); Envoy + naive Python ext_authz and ext_proc "
    "(no Redis) ~860 req/s"
)

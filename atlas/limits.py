"""Bounds on every number that crosses Atlas's edge (admin JSON, request bodies, settings).

Redis Lua numbers are doubles: integers are exact only below 2**53, and `..` formats a
double of 1e14 or more as `1e+14`. Every token count Atlas stores is a sum of a few of the
numbers below, so keeping each under these bounds keeps every sum exact and printable as an
integer. Values beyond a bound are refused at the edge (admin: 422; client: 400), never
clipped silently.
"""

from __future__ import annotations

#: A quota (daily/monthly tokens), a tokens/minute limit: 10**12 tokens.
MAX_TOKEN_LIMIT = 10**12
#: max_tokens (and its spellings) of one request: no model generates more per choice.
MAX_COMPLETION_TOKENS = 10**8
#: Choices (`n`, `best_of`) and prompts of one request.
MAX_CHOICES = 128
MAX_PROMPTS = 2048
#: One request's reservation, all choices and prompts: far above any real request.
MAX_RESERVATION_TOKENS = 10**13
#: Requests per second, burst and max_concurrent of one key.
MAX_RATE_PER_SEC = 10**6
MAX_BURST = 10**9
MAX_CONCURRENT = 10**6
#: Requests per minute of one end user within a key.
MAX_END_USER_RPM = 10**8
#: A monthly budget in USD (stored as micro-USD: 10**9 USD -> 10**15 micro-USD < 2**53).
MAX_BUDGET_USD = 10**9
#: Below one micro-USD a budget would be stored as 0, which means "no budget".
MIN_BUDGET_USD = 1e-6
#: Below this a key's Retry-After (1/rate) would run to days; 0.001/s is one per 17 min.
MIN_RATE_PER_SEC = 1e-3
#: Hours an admin query may look back or ahead (history is kept 90 days by default).
MAX_QUERY_HOURS = 24 * 90
#: Offsets into listings (keys, audit).
MAX_LIST_OFFSET = 10**9
#: Models a key may be restricted to, and the JSON size of its free-form metadata: a key
#: record is cached by every authz replica.
MAX_KEY_MODELS = 1000
MAX_METADATA_BYTES = 16 * 1024
#: Model names are client input; longer ones are refused or folded.
MAX_MODEL_NAME_CHARS = 256
#: End-user ids (a header or OpenAI's `user`) are client input: a bounded prefix is kept.
MAX_END_USER_CHARS = 128
#: Bytes above ATLAS_MAX_REQUEST_BYTES for headers and framing: Envoy's per-connection buffer
#: is max_request_bytes plus this, and a gRPC message to authz or extproc carries a whole
#: body plus its headers, so ATLAS_GRPC_MAX_MESSAGE_BYTES must be at least as large.
ENVOY_HEADROOM_BYTES = 1 << 20

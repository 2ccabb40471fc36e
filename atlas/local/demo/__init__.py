"""Fast, OpenAI-, Anthropic- and Gemini-compatible demo LLM upstream that counts like a model.

`atlas up` uses it as the default upstream, the end-to-end tests put it behind a real Envoy,
and benchmarks drive it hard, so it is a bare ``asyncio.Protocol`` HTTP/1.1 server (keep-alive,
pipelining, Content-Length and chunked request bodies) with no framework and as little
per-request work as possible. Streams are Server-Sent Events framed like vLLM: one HTTP chunk
per SSE event, one generated token per content event.

Endpoints
---------
``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``,
``POST /v1/completions``, ``POST /v1/embeddings``, ``POST /v1/responses`` (OpenAI and vLLM),
``POST /v1/messages`` (Anthropic Messages), ``POST /v1beta/models/{model}:generateContent`` and
``:streamGenerateContent`` (Gemini; ``?alt=sse`` for SSE, else one JSON array; ``/v1/models/``
works too), ``GET|DELETE /demo/requests``, ``GET|PUT|DELETE /demo/mode`` (the instance plays a
provider: per-credential 429/401 with ``Retry-After`` or a whole-instance failure; see
:mod:`atlas.local.demo.modes`; ``--name`` adds ``x-demo-provider``). Any model name is
accepted and echoed back. Errors have each API's own shape (OpenAI ``{"error": {message,
type, param, code}}``, Anthropic ``{"type": "error", "error": {type, message}}``, Gemini
``{"error": {code, message, status}}``).

Token model: the "truth" Atlas's estimators are tested against
------------------------------------------------------------------
Counts come from a real tokenizer, tiktoken ``cl100k_base`` (loaded offline through
``atlas.tokens.bpe.load_encoding``; without it, ``ceil(chars / 4)`` and a warning), applied the
way each API counts. ``tok(s)`` is the number of cl100k tokens of ``s``:

* Chat completions (OpenAI's published counting): 3 priming tokens, plus per message 3 +
  ``tok(role)`` + content (a string, or parts: ``text``/``refusal`` parts ``tok(text)``, image
  parts as below, other parts 0) + for ``name`` 1 + ``tok(name)``; each assistant tool call
  (or legacy ``function_call``) 3 + ``tok(name)`` + ``tok(arguments)``. ``tools`` (or legacy
  ``functions``): 12 + ``tok`` of their compact JSON (``separators=(",", ":")``, non-ASCII
  kept); ``response_format`` of type ``json_schema``: 8 + ``tok`` of the compact JSON of its
  ``json_schema`` object.
* Images, OpenAI's rule: ``detail: low`` is 85; ``high``/``auto``/absent is 85 + 170 per
  512-px tile after fitting into 2048x2048 and then scaling the shortest side down to 768. The
  size is read from a ``data:`` URL's PNG, GIF, JPEG or WebP header; unknown (a remote URL) is
  taken as 1024x1024, so 765. Anthropic images: ``ceil(w * h / 750)`` after fitting the long
  edge into 1568 px, at most 1600 (unknown: 1024x1024, 1399). Gemini images: 258 per 768-px
  tile (258 when both sides are <= 384; unknown: 258).
* Completions: ``tok`` of each prompt; embeddings: ``tok`` of each input (token-id lists count
  one per id). Responses: ``tok(instructions)`` + the text of every input item (strings,
  ``input_text``/``output_text`` parts, ``function_call`` name + arguments,
  ``function_call_output`` output) and image parts as above, no per-item overhead; ``tools``
  and a ``text.format`` JSON schema as for chat (12 / 8 + ``tok`` of their compact JSON).
* Anthropic Messages: like chat (3 priming, 3 + ``tok(role)`` per message, ``system`` counted
  as a system message), blocks: ``text`` ``tok(text)``, ``image`` as above, ``tool_use`` 3 +
  ``tok(name)`` + ``tok`` of the compact JSON of ``input``, ``tool_result`` its content,
  ``thinking`` ``tok(thinking)``; ``tools`` 12 + ``tok`` of their compact JSON.
* Gemini: ``tok`` of every text part of ``contents`` and ``systemInstruction``, 3 +
  ``tok(name)`` + ``tok(JSON)`` per ``functionCall``/``functionResponse``, images as above;
  ``tools`` 12 + ``tok`` of their compact JSON; no per-turn overhead.

Completion text is drawn from a vocabulary whose every entry is ONE cl100k token, checked at
import (entries that are not, or that would merge with their neighbour, are dropped), so a
choice of N tokens has N content events and ``tok(text) == N``. N is ``max_completion_tokens``
/ ``max_tokens`` / ``max_output_tokens`` / ``maxOutputTokens`` when given, else 16, capped at
4096; ``finish_reason`` is ``length`` (``max_tokens``, ``MAX_TOKENS``) when a limit was given and
reached, else ``stop`` (``end_turn``, ``STOP``). ``n`` / ``candidateCount`` > 1 yields that many
identical choices; a list of prompts on ``/v1/completions`` yields n choices per prompt.

Test and fault hooks (request headers)
--------------------------------------
* ``x-demo-tokens: N`` -- emit exactly N tokens (0..4096) whatever the request's limit says,
  so tests can fake an upstream that overruns ``max_tokens``.
* ``x-demo-text: words|prose|code|cjk`` -- the completion's vocabulary. ``words`` (default):
  16 four-character words (" the", " fox", ...), so the text is ``4 * N`` characters;
  ``prose``: an English paragraph (~5.3 characters a token); ``code``: a Python function
  (~4.0); ``cjk``: Chinese made of characters that are one token each (~1.07).
* ``x-demo-cached-tokens: N`` -- N of the prompt tokens (at most all) were read from a prompt
  cache: OpenAI ``prompt_tokens_details.cached_tokens`` / Responses
  ``input_tokens_details.cached_tokens`` (part of the prompt count), Anthropic
  ``cache_read_input_tokens`` and Gemini ``cachedContentTokenCount`` (part of
  ``promptTokenCount``).
* ``x-demo-cache-write-tokens: N`` -- Anthropic ``cache_creation_input_tokens`` (at most the
  prompt tokens not read from the cache). Anthropic's ``input_tokens`` excludes both cache
  reads and writes: the whole prompt is ``input + cache_creation + cache_read``.
* ``x-demo-reasoning-tokens: N`` -- N hidden reasoning tokens on top of the visible ones. OpenAI
  counts them inside ``completion_tokens`` / ``output_tokens`` (and reports
  ``completion_tokens_details.reasoning_tokens`` / ``output_tokens_details.reasoning_tokens``);
  Anthropic inside ``output_tokens``; Gemini reports them as ``thoughtsTokenCount`` apart from
  ``candidatesTokenCount`` (``totalTokenCount`` = prompt + candidates + thoughts). They are
  not streamed as text, and vLLM's per-chunk continuous usage leaves them out (the final usage
  has them).
* ``x-demo-strict: 1`` (or the server's ``--strict``) -- reject what OpenAI rejects: an unknown
  request field or ``stream_options`` key is a 400 ``invalid_request_error`` "Unrecognized
  request argument supplied: NAME" (vLLM's ``continuous_usage_stats`` included); ``0`` turns a
  strict server lenient for one request.
* ``x-demo-status: CODE`` (400..599) -- answer with that status and the API's error shape.
* ``x-demo-no-usage: 1`` -- never report usage, neither in JSON nor in streams.
* ``x-demo-chunk-delay-ms: N`` -- sleep N ms between streamed events (default: the server's
  ``chunk_delay_s``).
* ``x-demo-abort-after: N`` -- in a stream, abort the TCP connection after N content events,
  like an upstream reset. A stream with fewer content events completes normally.
* ``x-demo-json-tokens: N`` -- a non-streamed answer of exactly N tokens per choice
  (0..2**23, i.e. up to 32 MiB of text), for responses bigger than any buffer on the way.

Usage in streams: OpenAI chat/completions with ``stream_options.include_usage`` end with a
usage-only chunk (``"choices":[]``); with vLLM's ``continuous_usage_stats`` as well, every chunk
carries the cumulative usage of its choice. Responses end with ``response.completed``.
Anthropic's ``message_start`` carries the input usage and ``output_tokens: 1``, its
``message_delta`` the cumulative ``output_tokens``. Gemini sends ``usageMetadata`` on every
chunk, cumulative, the last one complete. Usage details (cached, reasoning) appear in OpenAI
usage only when a hook asks for them, so default answers keep vLLM's plain shape.

``GET /demo/requests`` lists the last 50 requests seen (method, path, query, lower-cased headers,
body as JSON if it parses, else as a string) and ``DELETE /demo/requests`` clears them.
``/health`` and ``/demo/*`` are not recorded, so health checks cannot push real traffic out.

Modules, by job: ``protocol`` (HTTP/1.1 parsing), ``responses`` (status lines, error shapes,
SSE framing), ``hooks`` (the ``x-demo-*`` options and shared counts), ``counting`` (the token
model), ``images`` (image sizes and tokens), ``openai`` / ``anthropic`` / ``gemini`` (each
API's endpoints), ``apis`` (the route table), ``connection`` (one client connection) and
``server`` (`DemoUpstream`, `serve`, the command line). Underscored names are internal to this
package; run it with ``python -m atlas.local.demo``.
"""

from __future__ import annotations

from atlas.local.demo.apis import true_prompt_tokens
from atlas.local.demo.common import DEFAULT_MODELS
from atlas.local.demo.counting import (
    TEXT_CLASSES,
    TOKENIZER,
    VOCABULARY,
    count_tokens,
    generated_text,
)
from atlas.local.demo.modes import Failure, Mode, ModeError, parse_mode
from atlas.local.demo.server import DemoUpstream, main, serve

__all__ = [
    "DEFAULT_MODELS",
    "TEXT_CLASSES",
    "TOKENIZER",
    "VOCABULARY",
    "DemoUpstream",
    "Failure",
    "Mode",
    "ModeError",
    "count_tokens",
    "generated_text",
    "main",
    "parse_mode",
    "serve",
    "true_prompt_tokens",
]

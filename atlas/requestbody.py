"""What authz and extproc need from an OpenAI-style request body, parsed defensively.

The body is hostile input: anything that is not the JSON we expect yields a `LLMRequest` with
`parsed=False` and a size-based estimate, never an exception. Fields that decide what a
request may cost (`max_tokens`, `n`, `best_of`, `stream`, prompt lists) are read the way vLLM
reads them (pydantic v2 lax mode, see `lax_int`/`lax_bool`); a value vLLM would refuse, or one
beyond `atlas.limits`, makes `invalid` non-empty and authz answers 400.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from atlas import tokens
from atlas.limits import (
    MAX_CHOICES,
    MAX_COMPLETION_TOKENS,
    MAX_END_USER_CHARS,
    MAX_MODEL_NAME_CHARS,
    MAX_PROMPTS,
    MAX_RESERVATION_TOKENS,
)
from atlas.tokens import fallback
from atlas.tokens.chat import prompt_tokens

#: Bytes per token for what no estimator could read (a body too large to parse, an answer
#: settled from its size): ~4 for English with BPE tokenizers (OpenAI's rule of thumb).
CHARS_PER_TOKEN = 4
T = TypeVar("T")

# vLLM's request models are pydantic v2 models in lax mode; the same adapters judge the same
# way (`"stream": 1`, `"max_tokens": "4096"` or `4096.0` are accepted there, `"4096.5"` is not).
_INT = TypeAdapter(int)
_BOOL = TypeAdapter(bool)


def lax_int(value: object) -> int | None:
    """`value` as vLLM's `int` fields read it (ints, integral floats, integer strings), or
    None when vLLM would refuse it."""
    if type(value) is int:
        return value
    if isinstance(value, str) and len(value) > 64:  # no token count needs 64 digits
        return None
    try:
        return _INT.validate_python(value)
    except ValidationError:
        return None


def lax_bool(value: object) -> bool | None:
    """`value` as vLLM's `bool` fields read it (true/false, 0/1, "yes"/"off"/"t"/...), or
    None when vLLM would refuse it."""
    if type(value) is bool:
        return value
    try:
        return _BOOL.validate_python(value)
    except ValidationError:
        return None


@dataclass(slots=True, frozen=True)
class LLMRequest:
    parsed: bool
    model: str
    stream: bool
    include_usage: bool  # the client asked for stream_options.include_usage
    max_tokens: int | None  # max_tokens / max_completion_tokens / max_output_tokens
    n: int
    prompt_tokens: int  # estimate
    best_of: int = 1  # completions: candidates generated per prompt (>= n)
    prompts: int = 1  # completions: a list of prompts is that many generations
    invalid: str = ""  # why the body must be refused (400); '' when it may go on
    invalid_param: str | None = None
    #: OpenAI's `user`: the end user the caller attributes the request to (bounded; "").
    user: str = ""

    @property
    def choices(self) -> int:
        """Generations of up to `max_tokens` each that this request may cause."""
        return max(self.n, self.best_of) * self.prompts


_MAX_TOKENS_KEYS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_GEMINI_MAX_KEYS = ("maxOutputTokens", "max_output_tokens")
_GEMINI_CANDIDATE_KEYS = ("candidateCount", "candidate_count")


def _estimate(body: object) -> tuple[int, bool]:
    """The prompt estimate and whether the walk saw all of it."""
    if not isinstance(body, dict):
        return 0, True
    return prompt_tokens(body, tokens.counter())


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """Estimate the prompt tokens of a parsed request body, for any API Atlas reads
    (`atlas.tokens.chat`): the text by the process's token counter, the wire format's
    overheads, images and audio by their rules, token-id lists one token per id. Bounded:
    what lies beyond the walk's limits is not counted."""
    return _estimate(body)[0]


def tokens_for_chars(chars: int) -> int:
    """The token estimate of `chars` characters of unknown text: ceil(chars / CHARS_PER_TOKEN)."""
    return -(-max(0, chars) // CHARS_PER_TOKEN)


def bytes_estimate(size: int, sample: bytes = b"") -> int:
    """Prompt tokens of a body of `size` bytes that could not be parsed: the calibrated
    estimate of `sample` (its first bytes) scaled to the whole size, and never less than one
    per 4 bytes (CJK text is ~3 bytes a character and ~1 token each, so bytes / 4 alone
    would under-charge it)."""
    floor = tokens_for_chars(size)
    if not sample:
        return floor
    head = sample[:_SAMPLE_BYTES]
    sampled = fallback.count(head.decode("utf-8", "replace"))
    return max(floor, math.ceil(sampled * size / len(head)))


#: Bytes of an unparsed body read by the calibrated estimator (the rest is scaled from it).
_SAMPLE_BYTES = 16 << 10


def count_prompts(prompt: object) -> int:
    """Generations a completions ``prompt`` asks for: a string or one token-id list is one;
    a list of strings or of token-id lists is one per element."""
    if isinstance(prompt, list) and prompt and not all(type(p) is int for p in prompt):
        return len(prompt)
    return 1


class _Invalid(Exception):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _lax_field(
    data: dict[str, Any], name: str, read: Callable[[object], T | None], kind: str
) -> T | None:
    """Field `name` as vLLM reads it; None when absent, 400 when vLLM would refuse it."""
    value = data.get(name)
    if value is None:
        return None
    read_value = read(value)
    if read_value is None:
        raise _Invalid(name, f"'{name}' must be {kind}.")
    return read_value


def _bounded_int(data: dict[str, Any], name: str, low: int, high: int) -> int | None:
    n = _lax_field(data, name, lax_int, "an integer")
    if n is not None and not low <= n <= high:
        raise _Invalid(name, f"'{name}' must be between {low} and {high}, got {n}.")
    return n


def _bool(data: dict[str, Any], name: str) -> bool:
    return _lax_field(data, name, lax_bool, "a boolean") is True


def _fields(data: dict[str, Any], size: int, body: bytes) -> LLMRequest:
    model = data.get("model")
    if model is None:
        model = ""
    elif not isinstance(model, str):
        raise _Invalid("model", "'model' must be a string.")
    elif len(model) > MAX_MODEL_NAME_CHARS:
        raise _Invalid("model", f"'model' must be at most {MAX_MODEL_NAME_CHARS} characters.")
    limits = [_bounded_int(data, f, 1, MAX_COMPLETION_TOKENS) for f in _MAX_TOKENS_KEYS]
    n = _bounded_int(data, "n", 1, MAX_CHOICES) or 1
    gen = data.get("generationConfig", data.get("generation_config"))
    if isinstance(gen, dict):  # Gemini
        limits += [_bounded_int(gen, f, 1, MAX_COMPLETION_TOKENS) for f in _GEMINI_MAX_KEYS]
        candidates = [_bounded_int(gen, f, 1, MAX_CHOICES) for f in _GEMINI_CANDIDATE_KEYS]
        n = max([n] + [c for c in candidates if c is not None])
    present = [m for m in limits if m is not None]
    # vLLM prefers max_completion_tokens; the largest is what may be generated at worst.
    max_tokens = max(present) if present else None
    best_of = _bounded_int(data, "best_of", 1, MAX_CHOICES) or 1
    prompts = count_prompts(data.get("prompt"))
    if prompts > MAX_PROMPTS:
        raise _Invalid("prompt", f"'prompt' may hold at most {MAX_PROMPTS} prompts.")
    stream = _bool(data, "stream")
    opts = data.get("stream_options")
    include_usage = _bool(opts, "include_usage") if isinstance(opts, dict) else False
    req_choices = max(n, best_of) * prompts
    if max_tokens is not None and max_tokens * req_choices > MAX_RESERVATION_TOKENS:
        raise _Invalid(
            "max_tokens",
            f"This request could generate {max_tokens * req_choices} tokens "
            f"(max_tokens x choices x prompts); at most {MAX_RESERVATION_TOKENS} are allowed.",
        )
    user = data.get("user")
    user = user[:MAX_END_USER_CHARS] if isinstance(user, str) else ""
    tokens_n, whole = _estimate(data)
    if not whole:  # too deep or too many parts to walk: fall back on the bytes
        tokens_n = max(tokens_n, bytes_estimate(size, body))
    # Positional, in field order: a frozen dataclass takes keywords at twice the cost, and
    # this runs for every request (test_requestbody checks the order).
    return LLMRequest(
        True, model, stream, include_usage, max_tokens, n, tokens_n, best_of, prompts, "", None,
        user,
    )  # fmt: skip


def _unparsed(size: int, sample: bytes = b"") -> LLMRequest:
    """A body that is not the JSON we expect: estimated from its size."""
    return LLMRequest(
        parsed=False,
        model="",
        stream=False,
        include_usage=False,
        max_tokens=None,
        n=1,
        prompt_tokens=bytes_estimate(size, sample),
    )


def parse_llm_request(body: bytes, *, complete: bool = True, size: int = 0) -> LLMRequest:
    """:param complete: False when Envoy sent only the first bytes of a larger body.
    :param size: the whole body's length in bytes when known (Content-Length)."""
    size = max(size, len(body))
    if not body or not complete:
        return _unparsed(size, body)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return _unparsed(size, body)
    if not isinstance(data, dict):
        return _unparsed(size, body)
    try:
        return _fields(data, size, body)
    except _Invalid as exc:
        return LLMRequest(
            parsed=True,
            model="",
            stream=False,
            include_usage=False,
            max_tokens=None,
            n=1,
            prompt_tokens=bytes_estimate(size, body),
            invalid=str(exc),
            invalid_param=exc.param,
        )

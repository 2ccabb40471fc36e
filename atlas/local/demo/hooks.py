"""Request options (the ``x-demo-*`` hooks, OpenAI's fields, strict mode) and the counts
every endpoint reports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from atlas.local.demo.common import DEFAULT_COMPLETION_TOKENS, DEFAULT_MODELS
from atlas.local.demo.counting import _DEFAULT_VOCAB, _Vocabulary
from atlas.local.demo.responses import _ApiError


@dataclass(slots=True)
class _Hooks:
    tokens: int | None
    no_usage: bool
    delay_s: float
    abort_after: int | None
    json_tokens: int | None = None
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    vocab: _Vocabulary = _DEFAULT_VOCAB
    strict: bool = False

    @property
    def details(self) -> bool:
        """OpenAI usage details are reported when a test asked for cached or reasoning."""
        return self.cached_tokens is not None or self.reasoning_tokens is not None


@dataclass(slots=True)  # not frozen: a frozen dataclass costs ~1 us to build
class _Counts:
    """What one answer consumed, before each API's way of reporting it."""

    prompt: int  # every input token, cache reads and writes included
    cached: int  # read from the prompt cache
    cache_write: int  # written to the prompt cache (Anthropic)
    visible: int  # generated text, all choices
    reasoning: int  # hidden, not in the text

    @property
    def completion(self) -> int:
        return self.visible + self.reasoning


def _counts(prompt: int, visible: int, hooks: _Hooks) -> _Counts:
    cached = min(hooks.cached_tokens or 0, prompt)
    write = min(hooks.cache_write_tokens or 0, prompt - cached)
    return _Counts(prompt, cached, write, visible, hooks.reasoning_tokens or 0)


def _header_int(headers: dict[str, str], name: str, low: int, high: int) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise _ApiError(400, f"header {name} must be an integer") from None
    if not low <= value <= high:
        raise _ApiError(400, f"header {name} must be between {low} and {high}")
    return value


def _header_flag(headers: dict[str, str], name: str) -> bool | None:
    raw = headers.get(name)
    if raw is None:
        return None
    value = raw.lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise _ApiError(400, f"header {name} must be 1 or 0")


def _int_field(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _ApiError(400, f"'{name}' must be an integer >= {low}", name)
    if high is not None:
        value = min(value, high)
    return value


def _bool_field(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _ApiError(400, f"'{name}' must be a boolean", name)
    return value


def _model(body: dict[str, Any]) -> str:
    model = body.get("model", DEFAULT_MODELS[0])
    if not isinstance(model, str) or not model:
        raise _ApiError(400, "'model' must be a non-empty string", "model")
    return model


def _stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    """``(include_usage, continuous_usage_stats)``; vLLM sends continuous usage only when both
    are set."""
    options = body.get("stream_options")
    if options is None:
        return False, False
    if not isinstance(options, dict):
        raise _ApiError(400, "'stream_options' must be an object", "stream_options")
    flags = []
    for key in ("include_usage", "continuous_usage_stats"):
        value = options.get(key, False)
        if value is None:
            value = False
        if not isinstance(value, bool):
            raise _ApiError(400, f"'stream_options.{key}' must be a boolean", "stream_options")
        flags.append(value)
    return flags[0], flags[0] and flags[1]


# What OpenAI's API accepts (2025); in strict mode anything else is refused, as OpenAI does.
_COMMON_FIELDS: Final = frozenset(
    {"model", "stream", "stream_options", "user", "metadata", "store", "service_tier"}
)
_CHAT_FIELDS: Final = _COMMON_FIELDS | {
    "messages", "audio", "frequency_penalty", "function_call", "functions", "logit_bias",
    "logprobs", "max_completion_tokens", "max_tokens", "modalities", "n", "parallel_tool_calls",
    "prediction", "presence_penalty", "prompt_cache_key", "prompt_cache_retention",
    "reasoning_effort", "response_format", "safety_identifier", "seed", "stop", "temperature",
    "tool_choice", "tools", "top_logprobs", "top_p", "verbosity", "web_search_options",
}  # fmt: skip
_COMPLETIONS_FIELDS: Final = _COMMON_FIELDS | {
    "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens",
    "n", "presence_penalty", "seed", "stop", "suffix", "temperature", "top_p",
}  # fmt: skip
_EMBEDDINGS_FIELDS: Final = frozenset({"model", "input", "encoding_format", "dimensions", "user"})
_RESPONSES_FIELDS: Final = _COMMON_FIELDS | {
    "background", "conversation", "include", "input", "instructions", "max_output_tokens",
    "max_tool_calls", "parallel_tool_calls", "previous_response_id", "prompt",
    "prompt_cache_key", "prompt_cache_retention", "reasoning", "safety_identifier",
    "temperature", "text", "tool_choice", "tools", "top_logprobs", "top_p", "truncation",
}  # fmt: skip
_STREAM_OPTION_KEYS: Final = frozenset({"include_usage", "include_obfuscation"})


def _check_strict(body: dict[str, Any], known: frozenset[str], hooks: _Hooks) -> None:
    if not hooks.strict:
        return
    unknown = [key for key in body if key not in known]
    options = body.get("stream_options")
    if isinstance(options, dict):
        unknown += [key for key in options if key not in _STREAM_OPTION_KEYS]
    if unknown:
        noun = "argument" if len(unknown) == 1 else "arguments"
        raise _ApiError(400, f"Unrecognized request {noun} supplied: {', '.join(unknown)}")


def _plan(limit: int | None, hooks: _Hooks) -> tuple[int, str]:
    if hooks.json_tokens is not None:
        n = hooks.json_tokens
    elif hooks.tokens is not None:
        n = hooks.tokens
    elif limit is not None:
        n = limit
    else:
        n = DEFAULT_COMPLETION_TOKENS
    finish = "length" if limit is not None and n >= limit else "stop"
    return n, finish

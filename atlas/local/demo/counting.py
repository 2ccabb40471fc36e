"""The token "truth": cl100k counts, the one-token completion vocabularies and the
OpenAI way of counting a prompt (see the package docstring for the rules)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from atlas.local.demo.common import _dumps_google, _dumps_text
from atlas.local.demo.images import _data_url_size, _openai_image_tokens
from atlas.local.demo.responses import _ApiError

log = logging.getLogger(__name__)


def _load_tokenizer() -> Any:
    try:
        from atlas.tokens.bpe import load_encoding

        return load_encoding()
    except Exception:  # no tokenizer means counting by characters, never a crash
        return None


_ENC: Final = _load_tokenizer()
#: What the counts come from: ``cl100k_base``, or ``chars/4`` when tiktoken is missing.
TOKENIZER: Final = "cl100k_base" if _ENC is not None else "chars/4"
if _ENC is None:
    log.warning(
        "demo upstream: tiktoken's cl100k_base is not available offline; "
        "counting 4 characters a token"
    )

# Benchmarks send the same prompt again and again: short texts are counted once.
_CACHED_TEXT_CHARS: Final = 4096


def _make_counter(enc: Any) -> Callable[[str], int]:
    if enc is None:

        def by_chars(text: str) -> int:
            return (len(text) + 3) // 4

        return by_chars
    encode = enc.encode_ordinary

    @functools.lru_cache(maxsize=2048)
    def cached(text: str) -> int:
        return len(encode(text))

    def count(text: str) -> int:
        if len(text) <= _CACHED_TEXT_CHARS:
            return cached(text)
        return len(encode(text))

    return count


#: Tokens of a text: cl100k_base when loaded, else ``ceil(chars / 4)``.
count_tokens: Final = _make_counter(_ENC)


@dataclass(frozen=True, slots=True)
class _Vocabulary:
    """A cycle of one-token pieces; token ``i`` of an answer is ``pieces[i % len(pieces)]``."""

    name: str
    pieces: tuple[str, ...]
    json: tuple[str, ...]  # each piece as a JSON string (non-ASCII as is)
    google_json: tuple[str, ...]
    cycle: str
    offsets: tuple[int, ...]  # offsets[i]: characters of the first i pieces

    @classmethod
    def of(cls, name: str, pieces: Sequence[str]) -> _Vocabulary:
        offsets = [0]
        for p in pieces:
            offsets.append(offsets[-1] + len(p))
        return cls(
            name,
            tuple(pieces),
            tuple(json.dumps(p, ensure_ascii=False) for p in pieces),
            tuple(_dumps_google(p) for p in pieces),
            "".join(pieces),
            tuple(offsets),
        )

    def text(self, n_tokens: int) -> str:
        q, r = divmod(n_tokens, len(self.pieces))
        return self.cycle * q + self.cycle[: self.offsets[r]]

    def token_json(self, i: int) -> str:
        return self.json[i % len(self.json)]


def _one_token_pieces(pieces: Sequence[str], enc: Any) -> list[str]:
    """The pieces that are one token each and stay so when joined in order and repeated: a
    piece that is not one token, or whose addition changes how the text so far tokenizes (BPE
    merges across the boundary), is dropped."""
    if enc is None:
        return list(pieces)
    encode = enc.encode_ordinary
    kept: list[str] = []
    tokens: list[int] = []
    text = ""
    for piece in pieces:
        ids = encode(piece)
        if len(ids) == 1 and encode(text + piece) == tokens + ids:
            kept.append(piece)
            tokens += ids
            text += piece
    # The answer repeats the cycle: every prefix across the seam must still count one a piece.
    while kept:
        cycle = "".join(kept)
        k = len(kept)
        bad = next(
            (j for j in range(1, k + 1) if len(encode(cycle + "".join(kept[:j]))) != k + j), None
        )
        if bad is None:
            break
        del kept[-1]
    return kept


_WORDS: Final = (
    " the", " fox", " and", " run", " sky", " sea", " red", " big",
    " old", " new", " cat", " dog", " sun", " day", " way", " end",
)  # fmt: skip
# The source texts are cut into pieces by the tokenizer itself (then checked as above); the
# prose opens with a space so that the cycle's seam (".", " The") does not merge.
_PROSE: Final = (
    " The committee met on a cold morning in early spring to discuss the future of the old"
    " railway station. Several members argued that the building should be restored, while"
    " others believed it would be cheaper to replace it with a modern library, a small market"
    " and a park where children could play safely. After a long and sometimes heated debate,"
    " they agreed to ask the residents what they wanted before making any final decision."
)
_CODE: Final = (
    "def merge_sorted(left: list[int], right: list[int]) -> list[int]:\n"
    '    """Merge two sorted lists into one sorted list."""\n'
    "    result = []\n"
    "    i, j = 0, 0\n"
    "    while i < len(left) and j < len(right):\n"
    "        if left[i] <= right[j]:\n"
    "            result.append(left[i])\n"
    "            i += 1\n"
    "        else:\n"
    "            result.append(right[j])\n"
    "            j += 1\n"
    "    result.extend(left[i:])\n"
    "    result.extend(right[j:])\n"
    "    return result\n\n\n"
)
# Many Chinese characters are two or three cl100k tokens; those are dropped, so this reads
# less well than the source, but every chunk is one character and one token.
_CJK: Final = (
    "人工智能是计算机科学的一个分支，它试图了解智能的实质，并生产出一种新的能以人类智能相似的"
    "方式做出反应的智能机器。该领域的研究包括机器人、语言识别、图像识别、自然语言处理和专家系统等。"
)


def _split(text: str, enc: Any) -> list[str]:
    if enc is None:
        return [text[i : i + 4] for i in range(0, len(text), 4)]
    pieces = []
    for token in enc.encode_ordinary(text):
        with contextlib.suppress(UnicodeDecodeError):  # part of a character: not a chunk
            pieces.append(enc.decode_single_token_bytes(token).decode())
    return pieces


def _vocabularies(enc: Any) -> dict[str, _Vocabulary]:
    sources = {
        "words": list(_WORDS),
        "prose": _split(_PROSE, enc),
        "code": _split(_CODE, enc),
        "cjk": _split(_CJK, enc),
    }
    vocabs = {}
    for name, pieces in sources.items():
        kept = _one_token_pieces(pieces, enc)
        if len(kept) < len(pieces):
            log.debug("demo upstream: %s vocabulary keeps %d of %d", name, len(kept), len(pieces))
        vocabs[name] = _Vocabulary.of(name, kept or list(_WORDS))
    return vocabs


_VOCABS: Final = _vocabularies(_ENC)
#: The completion vocabularies, by ``x-demo-text`` value.
TEXT_CLASSES: Final = tuple(_VOCABS)
_DEFAULT_VOCAB: Final = _VOCABS["words"]
#: The default vocabulary: every entry is four characters and one cl100k token.
VOCABULARY: Final = _DEFAULT_VOCAB.pieces


def generated_text(n_tokens: int, text_class: str = "words") -> str:
    """The text of an answer of ``n_tokens`` tokens, as every endpoint generates it."""
    return _VOCABS[text_class].text(n_tokens)


_PRIMING: Final = 3  # every reply is primed with <|start|>assistant<|message|>
_PER_MESSAGE: Final = 3  # <|start|>{role}<|message|>...<|end|> around each message
_PER_NAME: Final = 1
_PER_CALL: Final = 3  # around each tool call (name, arguments)
_TOOLS_OVERHEAD: Final = 12  # the tools preamble
_SCHEMA_OVERHEAD: Final = 8  # the response-format preamble


def _json_tokens(value: Any) -> int:
    return count_tokens(value if isinstance(value, str) else _dumps_text(value))


def _image_part_tokens(part: dict[str, Any]) -> int:
    image = part.get("image_url")
    detail = part.get("detail")
    url = image
    if isinstance(image, dict):
        url = image.get("url")
        detail = image.get("detail", detail)
    return _openai_image_tokens(detail, _data_url_size(url))


def _part_tokens(part: dict[str, Any]) -> int:
    text = part.get("text")
    if isinstance(text, str):
        return count_tokens(text)
    ptype = part.get("type")
    if ptype in ("image_url", "input_image"):
        return _image_part_tokens(part)
    refusal = part.get("refusal")
    if isinstance(refusal, str):
        return count_tokens(refusal)
    return 0  # audio, files: not modelled


def _content_tokens(content: Any, param: str) -> int:
    """Tokens of a message content: a string, null, or a list of content parts."""
    if content is None:
        return 0
    if isinstance(content, str):
        return count_tokens(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, str):
                total += count_tokens(part)
            elif isinstance(part, dict):
                total += _part_tokens(part)
            else:
                raise _ApiError(400, f"invalid content part in '{param}'", param)
        return total
    raise _ApiError(400, f"invalid content in '{param}'", param)


def _call_tokens(function: Any) -> int:
    if not isinstance(function, dict):
        return 0
    total = _PER_CALL
    name = function.get("name")
    if isinstance(name, str):
        total += count_tokens(name)
    arguments = function.get("arguments")
    if arguments is not None:
        total += _json_tokens(arguments)
    return total


_DEFINITION_KEYS: Final = frozenset({"tools", "functions", "response_format"})


def _definitions_tokens(body: dict[str, Any]) -> int:
    if not body.keys() & _DEFINITION_KEYS:
        return 0
    total = 0
    for key in ("tools", "functions"):
        value = body.get(key)
        if isinstance(value, list) and value:
            total += _TOOLS_OVERHEAD + _json_tokens(value)
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and "json_schema" in fmt:
        total += _SCHEMA_OVERHEAD + _json_tokens(fmt["json_schema"])
    return total


def _chat_prompt_tokens(body: dict[str, Any], messages: list[Any]) -> int:
    total = _PRIMING
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _ApiError(400, f"'messages[{i}]' must be an object", "messages")
        role = message.get("role")
        content = message.get("content")
        if len(message) == 2 and type(role) is str and type(content) is str:
            total += _PER_MESSAGE + count_tokens(role) + count_tokens(content)
            continue  # the common message: nothing else to look at
        total += _PER_MESSAGE
        if isinstance(role, str):
            total += count_tokens(role)
        total += _content_tokens(content, "messages")
        name = message.get("name")
        if isinstance(name, str):
            total += _PER_NAME + count_tokens(name)
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                if isinstance(call, dict):
                    total += _call_tokens(call.get("function"))
        if "function_call" in message:
            total += _call_tokens(message["function_call"])
    return total + _definitions_tokens(body)


def _prompt_list(value: Any, param: str) -> list[str | list[int]]:
    """Normalise a prompt/input field (string, list of strings, token list(s)) to a list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [value]
        if all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value):
            return list(value)
    raise _ApiError(400, f"'{param}' must be a string, a list of strings or token lists", param)


def _prompt_tokens(items: Sequence[str | list[int]]) -> int:
    return sum(count_tokens(item) if isinstance(item, str) else len(item) for item in items)


def _responses_input_tokens(value: Any) -> int:
    if isinstance(value, str):
        return count_tokens(value)
    if not isinstance(value, list):
        raise _ApiError(400, "'input' must be a string or an array of items", "input")
    total = 0
    for item in value:
        if isinstance(item, str):
            total += count_tokens(item)
        elif isinstance(item, dict):
            if "content" in item:
                total += _content_tokens(item["content"], "input")
            elif item.get("type") == "function_call":
                total += _call_tokens(item)
            elif "output" in item:
                total += _json_tokens(item["output"])
        else:
            raise _ApiError(400, "'input' items must be objects", "input")
    return total


def _responses_definitions_tokens(body: dict[str, Any]) -> int:
    total = 0
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        total += _TOOLS_OVERHEAD + _json_tokens(tools)
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        total += _SCHEMA_OVERHEAD + _json_tokens(fmt)
    return total

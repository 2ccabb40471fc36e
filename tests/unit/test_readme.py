"""The README's configuration table names every setting."""

from __future__ import annotations

from pathlib import Path

from atlas.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_documented() -> None:
    text = README.read_text()
    missing = [n for n in Settings.model_fields if f"`ATLAS_{n.upper()}`" not in text]
    assert missing == []

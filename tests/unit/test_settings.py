from __future__ import annotations

import pytest

from atlas.cli import COMMAND_FIELDS, build_parser
from atlas.errors import ConfigError
from atlas.settings import Settings, load_settings


def test_defaults_validate() -> None:
    s = Settings()
    assert s.proxy_port == 8080 and s.admin_port == 8081
    assert s.redis_url.startswith("redis://")


def test_env_prefix_and_flags_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATLAS_ADMIN_PORT", "9999")
    monkeypatch.setenv("ATLAS_PROXY_PORT", "7000")
    s = load_settings({"proxy_port": 7001})
    assert s.admin_port == 9999
    assert s.proxy_port == 7001


def test_atlas_legacy_env_names_are_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFAULT_DAILY_LIMIT", "1234")
    monkeypatch.setenv("MAX_STREAM_RESERVATION", "77")
    assert Settings().default_daily_limit == 1234
    assert Settings().max_reservation == 77
    monkeypatch.setenv("ATLAS_DEFAULT_DAILY_LIMIT", "42")
    assert Settings().default_daily_limit == 42


def test_every_error_is_reported_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATLAS_ADMIN_PORT", "70000")
    monkeypatch.setenv("ATLAS_REDIS_URL", "http://nope")
    with pytest.raises(ConfigError) as info:
        load_settings()
    msg = str(info.value)
    assert "ATLAS_ADMIN_PORT (admin_port)" in msg
    assert "ATLAS_REDIS_URL (redis_url)" in msg


def test_upstream_must_be_http() -> None:
    with pytest.raises(ConfigError, match="ATLAS_UPSTREAM"):
        load_settings({"upstream": "ftp://x"})


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(ConfigError, match="not_a_setting"):
        load_settings({"not_a_setting": 1})


def test_every_command_documents_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for command, fields in COMMAND_FIELDS.items():
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        out = capsys.readouterr().out
        for name in fields:
            assert f"ATLAS_{name.upper()}" in out, (command, name)


def test_up_flags_from_the_contract() -> None:
    ns = build_parser().parse_args(
        [
            "up",
            "--port",
            "1",
            "--admin-port",
            "2",
            "--upstream",
            "http://u",
            "--redis-url",
            "redis://r:1/0",
        ]
    )
    assert (ns.proxy_port, ns.admin_port, ns.upstream, ns.redis_url) == (
        1,
        2,
        "http://u",
        "redis://r:1/0",
    )

"""The providers file (atlas/providers/config.py) and pool members' secrets
(atlas/providers/credentials.py): every refusal names the file and the field, and no error or
repr ever carries a secret."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from atlas.errors import ConfigError
from atlas.providers.config import MAX_FILE_BYTES, load, parse
from atlas.providers.credentials import MAX_SECRET_CHARS, resolve

BASE = """\
providers:
  - name: openai
    base_url: https://api.openai.com/v1
    pool:
      strategy: least_used
      members:
        - {id: oa-1, credential: {env: OA_1}, requests_per_minute: 10}
        - {id: oa-2, credential: {env: OA_2}, tokens_per_minute: 1000}
  - name: local
    base_url: http://10.0.0.5:8000/v1
models:
  - alias: gpt-4o
    targets: [{provider: openai}, {provider: local, priority: 1}]
"""
SRC = "prov.yaml"


def _refused(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse(text, SRC)
    return str(e.value)


def test_a_valid_file_parses_with_defaults() -> None:
    cfg = parse(BASE, SRC)
    openai, local = cfg.providers
    assert openai.api == "openai" and openai.pool is not None
    assert openai.pool.strategy == "least_used"
    assert [m.id for m in openai.pool.members] == ["oa-1", "oa-2"]
    assert openai.pool.members[0].requests_per_minute == 10
    assert openai.pool.members[1].tokens_per_minute == 1000
    assert local.pool is None and local.timeouts.connect_s == 2.0
    assert local.cooldown.rate_limited_s == 30.0 and local.cooldown.max_s == 3600.0
    assert cfg.models[0].routing == "priority"
    assert cfg.provider("local") is local


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ("{env: OA_2}", "{}", r"providers\[0\]\.pool\.members\[1\]\.credential: .*exactly one"),
        ("{env: OA_2}", "{env: OA_2, file: /k}", r"providers\[0\]\.pool\.members\[1\]\.credential"),
        ("{env: OA_2}", "{env: 2BAD}", r"providers\[0\]\.pool\.members\[1\]\.credential\.env"),
        ("requests_per_minute: 10", "requests_per_minute: 0", r"members\[0\]\.requests_per_minute"),
        ("id: oa-2", "id: oa-1", r"providers\[0\]\.pool\.members: .*unique"),
        ("id: oa-2", "id: Bad_Id", r"providers\[0\]\.pool\.members\[1\]\.id"),
        ("strategy: least_used", "strategy: random", r"providers\[0\]\.pool\.strategy"),
        ("name: local", "name: LOCAL!", r"providers\[1\]\.name"),
        ("http://10.0.0.5:8000/v1", "ftp://x/v1", r"providers\[1\]\.base_url: .*not an http"),
        ("http://10.0.0.5:8000/v1", "http://h:99999/v1", r"providers\[1\]\.base_url"),
        ("{provider: openai}", "{provider: openai, weight: -1}", r"models\[0\]\.targets\[0\]"),
    ],
)
def test_field_errors_name_the_source_and_the_path(old: str, new: str, where: str) -> None:
    assert old in BASE
    message = _refused(BASE.replace(old, new, 1))
    assert message.startswith(f"{SRC}: ")
    assert re.search(where, message), message


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ("models:", "secret: sk-x\nmodels:", "secret"),
        ("    base_url: https://api", "    api_key: sk-x\n    base_url: https://api", r"\[0\]"),
        ("{id: oa-1,", "{id: oa-1, key: sk-x,", r"providers\[0\]\.pool\.members\[0\]\.key"),
        ("{env: OA_1}", "{env: OA_1, value: x}", r"members\[0\]\.credential\.value"),
        ("  - alias: gpt-4o", "  - alias: gpt-4o\n    fallback: x", r"models\[0\]\.fallback"),
    ],
)
def test_unknown_fields_are_refused(old: str, new: str, where: str) -> None:
    message = _refused(BASE.replace(old, new, 1))
    assert "Extra inputs are not permitted" in message and re.search(where, message), message


def test_duplicate_provider_names_are_refused() -> None:
    message = _refused(BASE.replace("name: local", "name: openai"))
    assert SRC in message and "provider names must be unique" in message


def test_a_target_must_name_a_known_provider() -> None:
    message = _refused(BASE.replace("{provider: local, priority: 1}", "{provider: groq}"))
    assert "models[0].targets[1].provider: unknown provider 'groq'" in message
    assert "known: openai, local" in message


def test_an_alias_is_listed_once_and_a_provider_once_per_alias() -> None:
    twice = BASE + "  - alias: gpt-4o\n    targets: [{provider: local}]\n"
    assert "models[1].alias: 'gpt-4o' is listed twice" in _refused(twice)
    message = _refused(BASE.replace("{provider: local, priority: 1}", "{provider: openai}"))
    assert "models[0]" in message and "a provider may be a target once per alias" in message


def test_weighted_routing_needs_some_weight() -> None:
    text = BASE.replace(
        "    targets: [{provider: openai}, {provider: local, priority: 1}]",
        "    routing: weighted\n"
        "    targets: [{provider: openai, weight: 0}, {provider: local, weight: 0}]",
    )
    assert "models[0]: Value error, weighted routing needs" in _refused(text)


@pytest.mark.parametrize("alias", ["*gpt", "gpt-*-mini", "g*pt*", "**"])
def test_only_a_trailing_star_is_allowed(alias: str) -> None:
    message = _refused(BASE.replace("alias: gpt-4o", f'alias: "{alias}"'))
    assert "models[0].alias" in message and "only a trailing *" in message


def _aliases(*names: str) -> str:
    models = "".join(f'  - alias: "{n}"\n    targets: [{{provider: local}}]\n' for n in names)
    return BASE.split("models:")[0] + "models:\n" + models


def test_alias_for_prefers_exact_names_then_the_first_prefix() -> None:
    cfg = parse(_aliases("gpt-*", "gpt-4*", "gpt-4o", "*"))
    assert cfg.alias_for("gpt-4o").alias == "gpt-4o"  # type: ignore[union-attr]
    assert cfg.alias_for("gpt-4o-mini").alias == "gpt-*"  # type: ignore[union-attr]
    assert cfg.alias_for("gpt-").alias == "gpt-*"  # type: ignore[union-attr]
    assert cfg.alias_for("llama").alias == "*"  # type: ignore[union-attr]
    assert parse(_aliases("gpt-*")).alias_for("GPT-4") is None  # case matters
    assert parse(BASE).alias_for("gpt-4o-mini") is None  # no prefix without a star


def test_a_prefix_alias_is_a_plain_prefix() -> None:
    cfg = parse(_aliases("gpt-4?*", "sonnet[1m]*"))
    assert cfg.alias_for("gpt-4o") is None  # "gpt-4?" is not a prefix of it
    assert cfg.alias_for("gpt-4?-x").alias == "gpt-4?*"  # type: ignore[union-attr]
    assert cfg.alias_for("sonnet[1m]-2025").alias == "sonnet[1m]*"  # type: ignore[union-attr]


@pytest.mark.parametrize("text", ["- providers\n", "just text\n", "", "42\n", "null\n"])
def test_a_file_that_is_not_a_mapping_is_refused(text: str) -> None:
    assert _refused(text) == f"{SRC}: must be a mapping with `providers` (and `models`)"


def test_bad_yaml_and_an_empty_provider_list_are_refused() -> None:
    assert _refused("providers: [\n").startswith(f"{SRC}: not valid YAML")
    assert _refused("providers: []\n").startswith(f"{SRC}: providers: List should have at least")
    assert "providers: Field required" in _refused("models: []\n")


def test_the_file_size_is_bounded_before_parsing() -> None:
    padding = "#" * (MAX_FILE_BYTES - len(BASE.encode()) - 1) + "\n"
    assert parse(BASE + padding, SRC).providers  # exactly at the bound
    assert _refused(BASE + padding + "#") == f"{SRC}: larger than {MAX_FILE_BYTES} bytes"
    assert "larger than" in _refused("é" * (MAX_FILE_BYTES // 2 + 1))  # bytes, not characters


def test_load_names_the_path(tmp_path: Path) -> None:
    good = tmp_path / "providers.yaml"
    good.write_text(BASE)
    assert [p.name for p in load(good).providers] == ["openai", "local"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE.replace("name: local", "name: openai"))
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: (top level)")):
        load(bad)
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'nope.yaml'}: cannot read")):
        load(tmp_path / "nope.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"providers: \xff\xfe\n")
    with pytest.raises(ConfigError, match=re.escape(f"{binary}: cannot read")):
        load(binary)


# ---- credentials -----------------------------------------------------------------------

SECRET_1 = "sk-first-0123456789"
SECRET_2 = "sk-second-abcdefghij"
ENV = {"OA_1": SECRET_1, "OA_2": SECRET_2}


def test_secrets_come_from_the_environment_and_repr_hides_them() -> None:
    secrets = resolve(parse(BASE), ENV)
    assert secrets.get("openai", "oa-1") == SECRET_1
    assert secrets.get("openai", "oa-2") == SECRET_2
    assert repr(secrets) == "Secrets(['oa-1', 'oa-2'])"
    assert SECRET_1 not in f"{secrets!r} {secrets!s}"


def test_environ_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OA_1", SECRET_1)
    monkeypatch.setenv("OA_2", f"  {SECRET_2}\n")  # surrounding whitespace is not the secret
    assert resolve(parse(BASE)).get("openai", "oa-2") == SECRET_2


def test_secrets_come_from_files(tmp_path: Path) -> None:
    (tmp_path / "oa-2").write_text(SECRET_2 + "\n")  # as `kubectl create secret` leaves it
    cfg = parse(BASE.replace("{env: OA_2}", f"{{file: {tmp_path / 'oa-2'}}}"))
    assert resolve(cfg, {"OA_1": SECRET_1}).get("openai", "oa-2") == SECRET_2


def test_a_missing_variable_names_the_member_not_the_secrets() -> None:
    with pytest.raises(ConfigError) as e:
        resolve(parse(BASE), {"OA_1": SECRET_1})
    message = str(e.value)
    assert message == (
        "providers[0].pool.members[1] (openai/oa-2): environment variable OA_2 is not set"
    )
    assert SECRET_1 not in message


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "No such file or directory"),
        (b"sk-\xff\xfe-secret", "not UTF-8"),
    ],
)
def test_an_unreadable_file_names_the_member_and_the_path(
    tmp_path: Path, content: bytes | None, why: str
) -> None:
    path = tmp_path / "key"
    if content is not None:
        path.write_bytes(content)
    cfg = parse(BASE.replace("{env: OA_1}", f"{{file: {path}}}"))
    with pytest.raises(ConfigError) as e:
        resolve(cfg, ENV)
    message = str(e.value)
    assert message == f"providers[0].pool.members[0] (openai/oa-1): cannot read {path}: {why}"


def test_a_directory_is_not_a_secret(tmp_path: Path) -> None:
    cfg = parse(BASE.replace("{env: OA_1}", f"{{file: {tmp_path}}}"))
    with pytest.raises(ConfigError, match=r"members\[0\] \(openai/oa-1\): cannot read"):
        resolve(cfg, ENV)


@pytest.mark.parametrize("value", ["", "   ", "\n\t\n"])
def test_empty_secrets_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=r"members\[1\] \(openai/oa-2\): the credential is empty"):
        resolve(parse(BASE), {**ENV, "OA_2": value})


@pytest.mark.parametrize(
    "value",
    [
        "sk-two\nlines-secret",
        "sk-tab\tinside-secret",
        "sk-space inside-secret",
        "sk-accent-é-secret",
        "sk-nul-\x00-secret",
        "sk-del-\x7f-secret",
        "sk-" + "x" * (MAX_SECRET_CHARS - 2),
    ],
)
def test_unprintable_secrets_are_refused_without_showing_them(value: str) -> None:
    with pytest.raises(ConfigError) as e:
        resolve(parse(BASE), {**ENV, "OA_2": value})
    message = str(e.value)
    assert message == (
        "providers[0].pool.members[1] (openai/oa-2): the credential must be one line of"
        " printable ASCII"
    )
    assert "sk-" not in message


def test_the_longest_secret_is_accepted() -> None:
    value = "k" * MAX_SECRET_CHARS
    assert resolve(parse(BASE), {**ENV, "OA_2": value}).get("openai", "oa-2") == value


def test_providers_without_a_pool_need_no_secret() -> None:
    only_local = parse("providers:\n  - name: local\n    base_url: http://10.0.0.5:8000/v1\n")
    assert repr(resolve(only_local, {})) == "Secrets([])"

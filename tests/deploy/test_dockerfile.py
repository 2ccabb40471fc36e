"""The Dockerfile, checked by structure (no Docker engine and no hadolint here): a parser for
its instructions, then the rules the image must keep. It does not build the image: whether
pip resolves the dependencies on python:3.11-slim is not tested here."""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from atlas.cli import build_parser
from atlas.settings import Settings
from tests.deploy.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """JSON (exec) form arguments, if written that way."""
        text = self.args
        for flag in re.findall(r"^(?:--\S+\s+)+", text):
            text = text[len(flag) :]
        if text.startswith("["):
            value = json.loads(text)
            assert isinstance(value, list) and all(isinstance(v, str) for v in value)
            return value
        return None

    def flags(self) -> dict[str, str]:
        return dict(re.findall(r"--([a-z-]+)=(\S+)", self.args))


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse(text: str) -> list[Stage]:
    """Dockerfile instructions by stage: comments dropped, continuation lines joined."""
    stages: list[Stage] = []
    logical, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if logical and line.startswith("#"):
            continue  # comment inside a continued instruction
        if not logical:
            start = number
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, args = logical.partition(" ")
        inst = Instruction(keyword.upper(), " ".join(args.split()), start)
        logical = ""
        if inst.keyword == "FROM":
            m = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", inst.args, re.IGNORECASE)
            assert m, f"line {start}: bad FROM"
            stages.append(Stage(m.group(1), m.group(2)))
        else:
            assert stages, f"line {start}: {inst.keyword} before FROM"
            stages[-1].instructions.append(inst)
    assert not logical, "Dockerfile ends inside a continued line"
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def test_parser() -> None:
    got = parse('# c\nFROM a:1 AS b\nRUN x \\\n  # note\n  && y\nFROM c:2\nCMD ["z"]\n')
    assert [(s.image, s.name) for s in got] == [("a:1", "b"), ("c:2", None)]
    assert got[0].instructions[0].args == "x && y"
    assert got[1].instructions[0].exec_form() == ["z"]
    with pytest.raises(AssertionError):
        parse("RUN x\n")


def test_base_images_are_pinned_python_slim(stages: list[Stage]) -> None:
    names = {s.name for s in stages if s.name}
    assert len(stages) >= 2, "multi-stage: build the wheel, then install it"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", requires).group(1).split("."))
    for stage in stages:
        if stage.image in names:
            continue
        repo, _, tag = stage.image.partition(":")
        assert tag and tag != "latest" and "@" not in repo, f"unpinned base {stage.image}"
        assert repo == "python" and tag.endswith("-slim"), stage.image
        assert tuple(int(x) for x in tag.removesuffix("-slim").split(".")) >= minimum


def test_final_stage_installs_the_built_wheel(stages: list[Stage], final: Stage) -> None:
    build = stages[0]
    assert build.name, "the build stage needs a name to copy from"
    copies = [c for c in final.all("COPY") if c.flags().get("from") == build.name]
    assert copies, "the final stage copies the wheel from the build stage"
    runs = " ".join(r.args for r in final.all("RUN"))
    assert "pip install" in runs and ".whl" in runs


def test_pip_never_caches(stages: list[Stage]) -> None:
    for stage in stages:
        for run in stage.all("RUN"):
            for cmd in re.findall(r"pip3? (?:install|wheel)[^&;]*", run.args):
                assert "--no-cache-dir" in cmd, f"line {run.line}: {cmd}"


def test_runs_as_a_fixed_non_root_user(final: Stage) -> None:
    (user,) = final.all("USER")
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit() and int(uid) > 0, "numeric uid, so Kubernetes runAsNonRoot can check it"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    # The user it names exists in the image.
    runs = " ".join(r.args for r in final.all("RUN"))
    assert re.search(rf"useradd\b[^&]*--uid {uid}\b", runs)
    # Nothing after USER needs root.
    after = [i for i in final.instructions if i.line > user.line]
    assert not [i for i in after if i.keyword in ("RUN", "COPY", "ADD")]


def test_journal_dir_belongs_to_the_user(final: Stage) -> None:
    """extproc's settlement journal (ATLAS_JOURNAL_DIR) must be writable by the image user;
    Docker copies the directory's owner into a new named volume mounted there."""
    (user,) = final.all("USER")
    uid, _, gid = user.args.partition(":")
    runs = " ".join(r.args for r in final.all("RUN"))
    m = re.search(r"install -d -o (\d+) -g (\d+) -m 0?700 (\S+)", runs)
    assert m and m.group(1) == uid and m.group(2) == (gid or uid), runs
    assert m.group(3) == "/var/lib/atlas/journal"
    assert "journal_dir" in Settings.model_fields


def test_services_listen_on_all_interfaces(final: Stage) -> None:
    env: dict[str, str] = {}
    for inst in final.all("ENV"):
        env.update(re.findall(r"(\w+)=(\S+)", inst.args))
    for name in ("authz_host", "extproc_host", "admin_host"):
        assert env.get(f"ATLAS_{name.upper()}") == "0.0.0.0", name
    for key in env:
        if key.startswith("ATLAS_"):
            assert key.removeprefix("ATLAS_").lower() in Settings.model_fields, key


def test_exposed_ports_are_the_settings_defaults(final: Stage) -> None:
    exposed = {int(p) for inst in final.all("EXPOSE") for p in inst.args.split()}
    defaults = {
        Settings.model_fields[name].default
        for name in (
            "authz_port",
            "extproc_port",
            "admin_port",
            "authz_metrics_port",
            "extproc_metrics_port",
        )
    }
    assert exposed == defaults


def test_entrypoint_and_default_command(final: Stage) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (entrypoint,) = final.all("ENTRYPOINT")
    assert entrypoint.exec_form() == ["atlas"] and "atlas" in scripts
    (cmd,) = final.all("CMD")
    args = cmd.exec_form()
    assert args == ["admin"]
    assert build_parser().parse_args(args).command == "admin"


def test_healthcheck(final: Stage) -> None:
    (check,) = final.all("HEALTHCHECK")
    command = re.sub(r"^(?:--\S+\s+)*", "", check.args)
    assert command.startswith("CMD [")
    assert json.loads(command.removeprefix("CMD ")) == ["atlas-healthcheck"]  # exec form
    for flag in ("interval", "timeout", "start-period", "retries"):
        assert flag in check.flags(), flag
    # The script it runs is copied in, executable, on PATH.
    (copy,) = [c for c in final.all("COPY") if "atlas-healthcheck" in c.args]
    assert copy.flags().get("chmod") in ("0755", "755")
    source, dest = copy.args.split()[-2:]
    assert dest == "/usr/local/bin/atlas-healthcheck"
    script = ROOT / source
    assert script.read_text().startswith("#!/usr/bin/env python3\n")
    compile(script.read_text(), str(script), "exec")


def test_copied_sources_exist_and_are_in_the_context(stages: list[Stage]) -> None:
    patterns = dockerignore_patterns()
    for stage in stages:
        for copy in stage.all("COPY") + stage.all("ADD"):
            if "from" in copy.flags():
                continue
            parts = [p for p in copy.args.split() if not p.startswith("--")]
            for source in parts[:-1]:
                assert not re.match(r"https?://", source), "no downloads at build time"
                path = ROOT / source
                assert path.exists(), f"line {copy.line}: {source} does not exist"
                assert not ignored(source, patterns), f"{source} is excluded by .dockerignore"


def test_wheel_build_gets_everything_hatch_needs(stages: list[Stage]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {"pyproject.toml", project["project"]["readme"], *wheel["packages"]}
    needed |= set(wheel.get("force-include", {}))
    copied: set[str] = set()
    for copy in stages[0].all("COPY"):
        parts = [p for p in copy.args.split() if not p.startswith("--")]
        copied.update(p.rstrip("/") for p in parts[:-1])
    assert needed <= copied, f"build stage lacks {needed - copied}"


# --- .dockerignore ---------------------------------------------------------------------------


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) per line, in order (Docker: the last match wins)."""
    out = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.removeprefix("!").strip().strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        out.append((negate, re.compile(regex)))
    return out


def ignored(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = Path(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negate, regex in patterns:
        if any(regex.fullmatch(c) for c in candidates):
            result = not negate
    return result


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        (".git/config", True),
        (".venv/bin/python", True),
        ("tests/unit/test_policy.py", True),
        (".pytest_cache/v/x", True),
        ("atlas/__pycache__/cli.cpython-311.pyc", True),
        ("admin/dashboard/main.js", False),
        ("bench/__main__.py", True),
        ("deploy/k8s/base/authz.yaml", True),
        ("deploy/docker/healthcheck.py", False),
        ("envoy/atlas.yaml.tmpl", False),
        ("README.md", False),
        ("compose.yaml", True),
    ],
)
def test_dockerignore(path: str, excluded: bool) -> None:
    assert ignored(path, dockerignore_patterns()) is excluded

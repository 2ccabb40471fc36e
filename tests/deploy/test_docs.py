"""docs/deploy.md: the commands it promises, the caveats it must state, and no stale paths."""

from __future__ import annotations

import re

import pytest

from tests.deploy.conftest import ROOT

DOC = ROOT / "docs" / "deploy.md"


@pytest.fixture(scope="module")
def text() -> str:
    return DOC.read_text()


@pytest.mark.parametrize(
    "command",
    [
        "export ATLAS_ADMIN_TOKEN=",
        "docker compose up --build",
        "docker compose --profile observability up --build",
        "kubectl apply -k deploy/k8s/base",
        "kubectl apply -k deploy/k8s/mesh",
        "kubectl apply -k deploy/istio",
        "kubectl apply -k deploy/gateway",
        "sh deploy/render-envoy.sh",
        "docker build -t atlas .",
    ],
)
def test_commands(text: str, command: str) -> None:
    assert command in text


@pytest.mark.parametrize(
    "caveat",
    [
        r"timeout: 0s",
        r"envoy\.filters\.http\.ext_authz",
        r"forwarding_namespaces",
        r"[Cc]ontent-[Ll]ength",
        r"message_timeout",
        r"failOpen: false",
        r"ATLAS_REDIS_URL",
        r"appProtocol: grpc",
        r"route_cache_action",
        r"per_connection_buffer_limit_bytes|bufferLimit",
        r"envoyExtAuthzHttp",
        r"extAuth\.http",
        r"x-atlas-grant",
        r"460/463",
        r"ATLAS_SETTLE_FROM_ACCESS_LOG: \"false\"",
        r"--no-access-log-settlement",
    ],
)
def test_caveats(text: str, caveat: str) -> None:
    assert re.search(caveat, text), caveat


def test_paths_exist(text: str) -> None:
    paths = set(re.findall(r"`((?:deploy|tests|envoy|docs|atlas)/[\w./-]+)`", text))
    paths |= {p for p in ("Dockerfile", "compose.yaml", ".dockerignore") if f"`{p}`" in text}
    assert paths
    missing = [p for p in paths if not (ROOT / p.rstrip("/")).exists()]
    assert not missing, missing

"""Prometheus scrape config, Grafana provisioning and the Atlas dashboard: they point at the
compose services, and every metric the dashboard queries exists (Atlas's from
atlas/metrics.py, Envoy's from what Envoy 1.40 really exports with our bootstrap).

Not run here: Prometheus, Grafana (no promtool or Grafana binary); PromQL is checked for
names, label names and balanced brackets only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

import atlas.metrics
from tests.deploy.conftest import DEPLOY, ROOT, LocalEnvoy, load_yaml, stats_port
from tests.deploy.test_compose import _listen_port, interpolate

PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "atlas.json"
ENVOY_STATS = Path(__file__).resolve().parent / "data" / "envoy-1.40-stats.txt"
# Envoy creates these on first use: a fresh Envoy without traffic does not list them.
LAZY_ENVOY_STATS = {
    "envoy_cluster_ext_authz_ok",
    "envoy_cluster_ext_authz_denied",
    "envoy_cluster_upstream_rq_time",
    # Exported only for clusters with outlier detection (provider and model clusters).
    "envoy_cluster_outlier_detection_ejections_active",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate(load_yaml(ROOT / "compose.yaml"), {"ATLAS_ADMIN_TOKEN": "t"})


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def atlas_metric_labels() -> dict[str, set[str]]:
    """Sample names Atlas exports -> their label names (from atlas/metrics.py itself)."""
    out: dict[str, set[str]] = {}
    for obj in vars(atlas.metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        labels = set(obj._labelnames)
        if obj._type == "counter":
            out[f"{obj._name}_total"] = labels
        elif obj._type == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                out[obj._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
        else:
            out[obj._name] = labels
    return out


def envoy_metric_names() -> dict[str, str]:
    """Envoy metric name -> type, as captured from Envoy 1.40 under traffic."""
    out = {}
    for line in ENVOY_STATS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, kind = line.split()
            out[name] = kind
    return out


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label matchers and `by (...)` removed)."""
    stripped = re.sub(r"\{[^}]*\}", "", expr)
    stripped = re.sub(r"\b(by|without)\s*\([^)]*\)", "", stripped)
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)
    stripped = re.sub(r'"[^"]*"', "", stripped)
    return set(re.findall(r"\b((?:atlas|envoy)_[a-z0-9_]+)\b", stripped))


def label_names(expr: str) -> set[str]:
    names = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        names |= {n.strip() for n in group.split(",") if n.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        names |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    return names


# --- Prometheus --------------------------------------------------------------------------------


def test_prometheus_scrapes_every_service(compose: dict[str, Any]) -> None:
    config = load_yaml(PROMETHEUS)
    services = compose["services"]
    bootstrap = load_yaml(DEPLOY / "envoy" / "envoy.yaml")
    envoy_stats = stats_port(bootstrap)
    jobs = {}
    for job in config["scrape_configs"]:
        (static,) = job["static_configs"]
        (target,) = static["targets"]
        host, port = target.split(":")
        assert host in services, f"{job['job_name']}: {host} is not a compose service"
        jobs[host] = (int(port), job.get("metrics_path", "/metrics"))
    assert set(jobs) == {"envoy", "authz", "extproc", "admin"}
    assert jobs["envoy"] == (envoy_stats, "/stats/prometheus")
    for name in ("authz", "extproc"):
        metrics_port = {"authz": 9102, "extproc": 9103}[name]
        assert jobs[name] == (metrics_port, "/metrics")
        assert str(metrics_port) in services[name]["expose"]
    assert jobs["admin"] == (_listen_port(services, "admin"), "/metrics")
    assert services["prometheus"]["volumes"][0].startswith("./deploy/prometheus/prometheus.yml:")


# --- Grafana provisioning ----------------------------------------------------------------------


def test_grafana_provisioning(compose: dict[str, Any], dashboard: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = dict(v.rsplit(":", 2)[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards_dir = mounts["./deploy/grafana/dashboards"]
    (ds,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in compose["services"]["prometheus"]["ports"]
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "atlas.yaml")["providers"]
    assert provider["options"]["path"] == dashboards_dir
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"
    # The dashboard's datasource variable picks Prometheus datasources; the provisioned one
    # is the default.
    (var,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert var["query"] == "prometheus" and ds["isDefault"] is True


# --- the dashboard ------------------------------------------------------------------------------


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    (var,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": f"${{{var['name']}}}"}
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            expr = target["expr"]
            for open_, close in ("()", "[]", "{}"):
                assert expr.count(open_) == expr.count(close), expr


def test_dashboard_covers_the_metrics_we_promised(dashboard: dict[str, Any]) -> None:
    used = set().union(*(metric_names(e) for e in exprs(dashboard)))
    promised = {
        "atlas_requests_total",
        "atlas_tokens_used_total",
        "atlas_quota_rejections_total",
        "atlas_rate_limit_rejections_total",
        "atlas_token_refunds_total",
        "atlas_settlements_total",
        "atlas_decisions_total",
        "atlas_streaming_duration_seconds_bucket",
        "atlas_time_to_first_token_seconds_bucket",
        "atlas_ledger_errors_total",
        "envoy_http_downstream_rq_total",
        "envoy_cluster_upstream_rq_time_bucket",
        "envoy_http_ext_authz_ok",
        "envoy_http_ext_proc_streams_started",
    }
    assert promised <= used, promised - used
    for quantile in ("0.5", "0.95"):
        for hist in ("atlas_streaming_duration_seconds", "atlas_time_to_first_token_seconds"):
            assert any(
                f"histogram_quantile({quantile}," in e and hist in e for e in exprs(dashboard)
            ), (quantile, hist)


def test_dashboard_queries_only_real_metrics_and_labels(dashboard: dict[str, Any]) -> None:
    atlas_metrics = atlas_metric_labels()
    envoy = envoy_metric_names()
    envoy_labels = {"envoy_cluster_name", "envoy_http_conn_manager_prefix"}
    envoy_labels |= {"envoy_response_code_class", "le"}
    for expr in exprs(dashboard):
        names = metric_names(expr)
        assert names, expr
        allowed_labels: set[str] = set()
        for name in names:
            if name.startswith("atlas_"):
                assert name in atlas_metrics, f"{name} is not in atlas/metrics.py"
                allowed_labels |= atlas_metrics[name]
            else:
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                assert name in envoy or envoy.get(base) == "histogram", f"Envoy has no {name}"
                allowed_labels |= envoy_labels
        unknown = label_names(expr) - allowed_labels
        assert not unknown, f"{expr}: unknown labels {unknown}"


def test_metric_name_helpers() -> None:
    expr = 'sum by (le, x) (rate(envoy_a_b_bucket{p!="admin"}[5m])) / atlas_c_total'
    assert metric_names(expr) == {"envoy_a_b_bucket", "atlas_c_total"}
    assert label_names(expr) == {"le", "x", "p"}


def test_envoy_stat_snapshot_matches_the_binary(
    dashboard: dict[str, Any], local_envoy: LocalEnvoy
) -> None:
    """The captured names are still what this Envoy exports (apart from lazily made ones)."""
    status, text = local_envoy.get("/stats/prometheus")
    assert status == 200
    live = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    used = {
        re.sub(r"_(bucket|sum|count)$", "", n)
        for e in exprs(dashboard)
        for n in metric_names(e)
        if n.startswith("envoy_")
    }
    assert used - live <= LAZY_ENVOY_STATS, used - live - LAZY_ENVOY_STATS
    snapshot = envoy_metric_names()
    assert live <= set(snapshot), f"Envoy exports names not captured: {live - set(snapshot)}"


def test_promtool_accepts_config_and_queries(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Prometheus's own parser, when promtool is installed (Debian: `prometheus`)."""
    import shutil
    import subprocess

    import yaml

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed: names and labels were still checked above")
    rules = [
        {"record": f"atlas_check:panel{i}", "expr": e.replace("$__rate_interval", "5m")}
        for i, e in enumerate(exprs(dashboard))
    ]
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    for args in (["check", "config", str(PROMETHEUS)], ["check", "rules", str(rules_file)]):
        proc = subprocess.run(
            [promtool, *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alerting_rules_name_only_real_metrics_and_labels() -> None:
    rules = load_yaml(DEPLOY / "prometheus" / "alerts.yml")
    atlas_metrics = atlas_metric_labels()
    exprs_seen = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert len(exprs_seen) >= 3
    envoy = envoy_metric_names()
    for expr in exprs_seen:
        names = metric_names(expr)
        assert names and names <= set(atlas_metrics) | set(envoy), expr
        allowed = set().union(*(atlas_metrics.get(n, set()) for n in names))
        if names & set(envoy):
            allowed |= {"envoy_http_conn_manager_prefix", "envoy_cluster_name"}
        assert not label_names(expr) - allowed, expr

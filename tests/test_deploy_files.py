"""The deployment files hang together: everything docker-compose, the Dockerfiles, Prometheus and
Grafana refer to exists, and the dashboard asks only for metrics the server exports. Docker itself
does not run here."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.metrics import ServerMetrics

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = [REPO / "docker" / "Dockerfile.cpu", REPO / "docker" / "Dockerfile.cuda"]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    return load_yaml(REPO / "docker-compose.yml")


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path → host path of a service's bind mounts (named volumes left out)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = REPO / source
    return mounts


def host_path(service: dict[str, Any], container_path: str) -> Path:
    for target, source in bind_mounts(service).items():
        if container_path == target or container_path.startswith(target + "/"):
            return source / Path(container_path).relative_to(target)
    raise AssertionError(f"{container_path} is not mounted from the repository")


def test_compose_services_and_their_files() -> None:
    spec = compose()
    services = spec["services"]
    assert {"server", "prometheus", "grafana"} <= set(services)
    build = services["server"]["build"]
    assert (REPO / build["context"] / build["dockerfile"]).is_file()
    for name, service in services.items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) is missing"
        for volume in service.get("volumes", []):
            if not volume.startswith("."):
                assert volume.split(":")[0] in spec["volumes"], f"{name}: undeclared volume {volume}"
    override = load_yaml(REPO / "docker" / "compose.cuda.yml")
    assert (REPO / build["context"] / override["services"]["server"]["build"]["dockerfile"]).is_file()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile(dockerfile: Path) -> None:
    lines = [line.strip() for line in dockerfile.read_text().splitlines()]
    for line in lines:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"COPY source {source} is missing"
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    text = dockerfile.read_text()
    assert "HEALTHCHECK" in text and "/healthz" in text
    index = "whl/cpu" if dockerfile.name.endswith("cpu") else "whl/cu"
    assert f"https://download.pytorch.org/{index}" in text
    assert (dockerfile.parent / f"{dockerfile.name}.dockerignore").is_file()


def test_prometheus_scrapes_the_server() -> None:
    services = compose()["services"]
    config = load_yaml(host_path(services["prometheus"], "/etc/prometheus/prometheus.yml"))
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "server"
    assert f"{port}:" in services["server"]["ports"][0] or services["server"]["ports"][0].endswith(f":{port}")
    assert f"DD_PORT={port}" in DOCKERFILES[0].read_text().replace(" ", "")


def test_grafana_provisioning_and_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    (source,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert source["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(provisioning / "dashboards" / "deepdefense.yml")["providers"]
    dashboards = host_path(grafana, provider["options"]["path"])
    assert host_path(grafana, grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]).is_file()

    (dashboard_file,) = dashboards.glob("*.json")
    dashboard = json.loads(dashboard_file.read_text())
    exported = exported_names()
    titles = set()
    for panel in dashboard["panels"]:
        titles.add(panel["title"])
        assert panel["datasource"]["uid"] == source["uid"]
        for target in panel["targets"]:
            for name in re.findall(r"\bdd_[a-z_]+\b", target["expr"]):
                assert name in exported, f"panel {panel['title']!r} asks for unknown metric {name}"
    assert {
        "/predict latency percentiles",
        "Throughput",
        "Queue",
        "Fail-closed fallbacks",
        "Queries per API key",
        "Misinformation and flagged keys",
    } <= titles


def exported_names() -> set[str]:
    """Every sample name the server's registry can export."""
    registry = ServerMetrics(model="m", defense="d", interpreter="i", device="cpu").registry
    suffixes = {"counter": ("_total",), "gauge": ("",), "info": ("_info",), "histogram": ("_bucket", "_count", "_sum")}
    return {family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]}

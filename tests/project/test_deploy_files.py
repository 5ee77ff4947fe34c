"""The deployment files hang together: everything docker-compose, the Dockerfiles, Prometheus and
Grafana refer to exists, and the dashboard asks only for metrics the server exports. Docker itself
does not run here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from deepdefense.server.metrics import ServerMetrics
from deepdefense.server.settings import ServerSettings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = [REPO / "docker" / "Dockerfile.cpu", REPO / "docker" / "Dockerfile.cuda"]
#: docker compose -f docker/compose.cluster.yml: its relative paths are relative to docker/
CLUSTER = REPO / "docker" / "compose.cluster.yml"
RAY_SERVICES = ("ray-head", "ray-worker")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    return load_yaml(REPO / "docker-compose.yml")


def bind_mounts(service: dict[str, Any], base: Path = REPO) -> dict[str, Path]:
    """Container path → host path of a service's bind mounts (named volumes left out); relative sources
    are relative to ``base``, the folder of the (first) compose file."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = (base / source).resolve()
    return mounts


def host_path(service: dict[str, Any], container_path: str, base: Path = REPO) -> Path:
    for target, source in bind_mounts(service, base).items():
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
    metrics = ServerMetrics()
    metrics.model("m", defense="d", interpreter="i", device="cpu")
    suffixes = {"counter": ("_total",), "gauge": ("",), "info": ("_info",), "histogram": ("_bucket", "_count", "_sum")}
    families = [*metrics.registry.collect(), *metrics.operator_registry.collect()]  # Prometheus scrapes as operator
    return {family.name + suffix for family in families for suffix in suffixes[family.type]}


def cluster() -> dict[str, Any]:
    return load_yaml(CLUSTER)


def command_text(service: dict[str, Any]) -> str:
    command = service["command"]
    return " ".join(command) if isinstance(command, list) else command


def flag(service: dict[str, Any], name: str) -> str:
    """The value of ``--name=value`` (or ``--name value``) in a service's command."""
    found = re.findall(rf"--{name}[= ](\S+)", command_text(service))
    assert len(found) == 1, f"{name} given {len(found)} times in {command_text(service)!r}"
    return found[0]


def test_cluster_compose_services_and_their_files() -> None:
    spec = cluster()
    services = spec["services"]
    assert {"ray-head", "ray-worker", "redis", "prometheus", "grafana"} <= set(services)
    base = CLUSTER.parent
    optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    builds = [services[name]["build"] for name in RAY_SERVICES]
    assert builds[0] == builds[1], "the Ray head and workers run the same image"
    assert services["ray-head"]["image"] == services["ray-worker"]["image"]
    build = builds[0]
    assert (base / build["context"]).resolve() == REPO, "the build context is the repository root"
    assert (REPO / build["dockerfile"]).is_file()
    assert (REPO / f"{build['dockerfile']}.dockerignore").is_file()
    assert set(build["args"]["EXTRAS"].split(",")) <= set(optional)
    assert "cluster" in build["args"]["EXTRAS"].split(",")
    for name, service in services.items():
        for target, source in bind_mounts(service, base).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) is missing"
        for volume in service.get("volumes", []):
            if not volume.startswith("."):
                assert volume.split(":")[0] in spec["volumes"], f"{name}: undeclared volume {volume}"
    redis = services["redis"]
    assert redis["image"].split(":")[0] == "redis" and redis["image"].split(":")[1].startswith("7")
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]
    assert services["ray-head"]["depends_on"]["redis"]["condition"] == "service_healthy"
    # the same dashboard as docker-compose.yml
    assert bind_mounts(services["grafana"], base) == bind_mounts(compose()["services"]["grafana"])


def test_cluster_ray_and_redis() -> None:
    services = cluster()["services"]
    head, worker = services["ray-head"], services["ray-worker"]
    env = head["environment"]
    state = urlsplit(env["DD_STATE"])
    assert (state.scheme, state.hostname, state.port) == ("redis", "redis", 6379), "DD_STATE is the redis service"
    assert "--port" not in command_text(services["redis"]) or flag(services["redis"], "port") == "6379"
    # Ray's GCS on a port of its own, which the workers join
    assert "ray start --head" in command_text(head)
    assert flag(head, "include-dashboard") == "false"
    gcs_port = flag(head, "port")
    assert gcs_port != "6379"
    assert command_text(worker).startswith("ray start") and "--block" in command_text(worker)
    assert flag(worker, "address") == f"ray-head:{gcs_port}"
    # the driver: deepdefense serve as Ray Serve replicas on this Ray cluster (server/cluster.py)
    assert "deepdefense serve" in command_text(head)
    assert env["DD_RAY_ADDRESS"] == "auto"
    assert int(re.fullmatch(r"\$\{DD_REPLICAS:-(\d+)\}", str(env["DD_REPLICAS"]))[1]) >= 2
    # the same deployment as docker/serve-config.yaml, with the Redis of this network
    serve_config = load_yaml(REPO / "docker" / "serve-config.yaml")
    (app,) = serve_config["applications"]
    assert app["import_path"] == "deepdefense.server.cluster:app_builder"
    assert urlsplit(app["args"]["state"]).port == state.port and urlsplit(app["args"]["state"]).path == state.path
    assert head["ports"] == [f"{serve_config['http_options']['port']}:{serve_config['http_options']['port']}"]
    # every Ray node exports its metrics on the same, explicit port
    assert flag(head, "metrics-export-port") == flag(worker, "metrics-export-port")


def test_cluster_prometheus_scrapes_the_proxy_and_every_ray_node() -> None:
    services = cluster()["services"]
    config = load_yaml(host_path(services["prometheus"], "/etc/prometheus/prometheus.yml", CLUSTER.parent))
    targets: dict[str, set[str]] = {}  # metrics path → host:port scraped
    for job in config["scrape_configs"]:
        found = targets.setdefault(job.get("metrics_path", "/metrics"), set())
        for static in job.get("static_configs", []):
            found.update(static["targets"])
        for dns in job.get("dns_sd_configs", []):
            assert dns.get("type", "SRV") == "A", "compose's DNS answers A records, one per container"
            found.update(f"{name}:{dns['port']}" for name in dns["names"])
    (published,) = services["ray-head"]["ports"]
    assert f"ray-head:{published.split(':')[-1]}" in targets["/metrics"], "the app's /metrics through Serve's proxy"
    for name in RAY_SERVICES:
        assert f"{name}:{flag(services[name], 'metrics-export-port')}" in targets["/metrics"], f"{name}'s Ray metrics"


def test_dockerfile_extras_arg() -> None:
    """docker/Dockerfile.cpu installs the package's extras named by the build argument EXTRAS, none by default."""
    text = (REPO / "docker" / "Dockerfile.cpu").read_text()
    assert re.search(r'^ARG EXTRAS=""$', text, re.M)
    (line,) = [line for line in text.splitlines() if line.startswith("RUN pip install") and "EXTRAS" in line]
    argument = line.split()[3]  # RUN pip install <argument> && …, expanded by the shell of RUN
    assert argument.startswith('"') and argument.endswith('"')

    def expand(extras: str) -> str:
        command = ["sh", "-c", f"printf %s {argument}"]
        return subprocess.run(command, env={"EXTRAS": extras}, capture_output=True, text=True, check=True).stdout

    assert expand("") == "."
    assert expand("cluster") == ".[cluster]"


def test_the_deployments_are_not_open_and_take_keys_from_a_secret_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """The images bind every interface, so a container without keys must not start; the compose files give the
    keys as a Docker secret (a file mounted at /run/secrets), never as an empty DD_API_KEYS, nor open the server."""
    for spec, name in ((compose(), "server"), (cluster(), "ray-head")):
        service = spec["services"][name]
        env = service["environment"]
        assert "DD_API_KEYS" not in env and "DD_ALLOW_OPEN" not in env, f"{name}: keys in the environment, or open"
        secret = service["secrets"][0]
        assert env["DD_API_KEYS_FILE"] == f"/run/secrets/{secret}"
        assert all("file" in spec["secrets"][s] for s in service["secrets"])
    for dockerfile in DOCKERFILES:
        text = "".join(line for line in dockerfile.read_text().splitlines() if not line.startswith("#"))
        assert "DD_HOST=0.0.0.0" in text.replace(" ", "") and "DD_ALLOW_OPEN" not in text
    for name in [n for n in os.environ if n.startswith("DD_")]:
        monkeypatch.delenv(name)
    with pytest.raises(ValueError, match="no API keys are configured"):
        ServerSettings(host="0.0.0.0")


def test_prometheus_scrapes_with_the_operator_key_the_server_reads() -> None:
    """The gate's and the monitor's series are shown to operator keys only: the scrape job sends the key the
    server is given, from the same Docker secret."""
    services = compose()["services"]
    config = load_yaml(host_path(services["prometheus"], "/etc/prometheus/prometheus.yml"))
    (job,) = config["scrape_configs"]
    assert job["authorization"]["credentials_file"] == "/run/secrets/dd_operator_key"
    assert "dd_operator_key" in services["prometheus"]["secrets"] and "dd_operator_key" in services["server"]["secrets"]
    assert services["server"]["environment"]["DD_ADMIN_KEYS_FILE"] == "/run/secrets/dd_operator_key"

"""docker/ as far as it can be checked without Docker: the compose file parses, every capworks
command it runs (services and health checks) parses in our CLI, every CAPWORKS_* variable it
sets is a real setting, the broker is configured not to lose jobs, each worker reserves its
own GPU, and every Grafana expression names a metric that workers/metrics.py defines."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from conftest import REPO

from capworks.cli import build_parser
from schema.settings import Settings

DOCKER = REPO / "docker"
OUR_IMAGES = {"capworks-worker", "capworks-producer"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())  # type: ignore[no-any-return]


def capworks_argvs(compose: dict[str, Any]) -> dict[str, list[str]]:
    """Every capworks command line in the compose file and the Dockerfiles, by where it is."""
    found: dict[str, list[str]] = {}
    for name, service in compose["services"].items():
        entrypoint = service.get("entrypoint", ["capworks"])
        if service.get("image") in OUR_IMAGES and entrypoint[0] == "capworks":
            found[name] = [*entrypoint[1:], *service.get("command", [])]
        test = service.get("healthcheck", {}).get("test", [])
        if test[:2] == ["CMD", "capworks"]:
            found[f"{name} healthcheck"] = test[2:]
    for dockerfile in DOCKER.glob("*.Dockerfile"):
        text = dockerfile.read_text()
        cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
        found[f"{dockerfile.name} CMD"] = cmd
        health = re.search(r'CMD \["capworks", (.*)\]$', text, re.M)
        assert health, f"{dockerfile.name} has no capworks health check"
        found[f"{dockerfile.name} HEALTHCHECK"] = json.loads(f"[{health.group(1)}]")
    return found


def test_compose_runs_only_commands_our_cli_accepts(compose: dict[str, Any]) -> None:
    argvs = capworks_argvs(compose)
    parser = build_parser()
    for where, argv in argvs.items():
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `capworks {' '.join(argv)}` does not parse")
    commands = {argv[0] for argv in argvs.values()}
    assert {"worker", "events", "enqueue", "health", "status"} <= commands
    assert argvs["events"][:3] == ["events", "--source", "webhook"]


def test_every_capworks_variable_is_a_real_setting(compose: dict[str, Any]) -> None:
    known = {f"CAPWORKS_{name.upper()}" for name in Settings.model_fields}
    set_anywhere = set()
    for service in compose["services"].values():
        set_anywhere |= {k for k in service.get("environment", {}) if k.startswith("CAPWORKS_")}
    for dockerfile in DOCKER.glob("*.Dockerfile"):
        set_anywhere |= set(re.findall(r"\b(CAPWORKS_[A-Z0-9_]+)=", dockerfile.read_text()))
    assert set_anywhere, "no CAPWORKS_ variable found: the checks read the wrong thing"
    assert set_anywhere <= known, f"not settings: {sorted(set_anywhere - known)}"


def test_redis_keeps_jobs_and_each_worker_has_its_own_gpu(compose: dict[str, Any]) -> None:
    services = compose["services"]
    redis_args = services["redis"]["command"]
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"
    assert redis_args[redis_args.index("--maxmemory-policy") + 1] == "noeviction"
    workers = {n: s for n, s in services.items() if s.get("image") == "capworks-worker"}
    assert len(workers) >= 2
    gpus = []
    for name, worker in workers.items():
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
        gpus.extend(device["device_ids"])
        assert worker["hostname"] == name  # heartbeats and `health --worker` name the host
        assert "model-cache:/cache" in worker["volumes"]
    assert len(gpus) == len(set(gpus)) == len(workers)
    flower = services["flower"]
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    assert all(p.startswith("127.0.0.1:") for p in flower["ports"])  # /metrics skips auth


def metric_families() -> dict[str, set[str]]:
    """Each metric family of workers/metrics.py and of the farm collector
    (capworks/farm_metrics.py), with the sample names it can expose."""
    from prometheus_client.metrics import MetricWrapperBase

    from workers import metrics

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
        "summary": ("_sum", "_count", "_created", ""),
    }
    from capworks.farm_metrics import FAMILIES

    workers = {
        family.name: {family.name + s for s in suffixes[family.type]}
        for value in vars(metrics).values()
        if isinstance(value, MetricWrapperBase)
        for family in value.describe()
    }
    return {**workers, **{name: {name} for name in FAMILIES}}  # the farm's are gauges


def grafana_expressions() -> list[str]:
    dashboard = json.loads((DOCKER / "grafana" / "capworks.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def test_every_grafana_expression_names_a_metric_that_exists() -> None:
    families = metric_families()
    known = set().union(*families.values())
    assert {"capworks_images_total", "capworks_batch_seconds_bucket"} <= known
    expressions = grafana_expressions()
    assert len(expressions) >= 8
    used = set()
    for expr in expressions:
        names = set(re.findall(r"\b(capworks_[a-z_]+)\b", expr))
        assert names, f"expression names no capworks metric: {expr}"
        assert names <= known, f"{expr}: unknown {sorted(names - known)}"
        used |= names
    unused = [f for f, samples in families.items() if not samples & used]
    assert not unused, f"metrics with no panel: {unused}"


def test_prometheus_scrapes_every_worker(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for c in job["static_configs"]
               for t in c["targets"]}  # fmt: skip
    workers = [n for n, s in compose["services"].items() if s.get("image") == "capworks-worker"]
    assert targets == {f"{w}:9750" for w in workers} | {"farm-metrics:9760"}
    assert compose["services"]["farm-metrics"]["command"] == ["status", "--serve-metrics", "9760"]
    # Every scrape sends the metrics token, read from the secret compose mounts for Prometheus.
    secret = compose["secrets"]["metrics_token"]
    assert secret == {"environment": "CAPWORKS_METRICS_TOKEN"}
    assert "metrics_token" in compose["services"]["prometheus"]["secrets"]
    for job in config["scrape_configs"]:
        auth = job["authorization"]
        assert (auth["type"], auth["credentials_file"]) == ("Bearer", "/run/secrets/metrics_token")


def test_every_metrics_endpoint_off_loopback_has_the_token(compose: dict[str, Any]) -> None:
    from schema.metrics_endpoint import is_loopback

    serving = {"farm-metrics"} | {
        n for n, s in compose["services"].items() if s.get("image") == "capworks-worker"
    }
    for name in serving:
        env = compose["services"][name]["environment"]
        assert not is_loopback(env["CAPWORKS_METRICS_HOST"]), name  # Prometheus is elsewhere
        token = "${CAPWORKS_METRICS_TOKEN:?set CAPWORKS_METRICS_TOKEN}"
        assert env.get("CAPWORKS_METRICS_TOKEN") == token, name  # the start fails without it
        assert "CAPWORKS_METRICS_ALLOW_OPEN" not in env, name


def test_images_get_what_they_copy_and_nothing_else_and_pin_torch() -> None:
    for dockerfile in DOCKER.glob("*.Dockerfile"):
        text = dockerfile.read_text()
        ignore = (DOCKER / f"{dockerfile.name}.dockerignore").read_text().splitlines()
        rules = [r for r in ignore if r and not r.startswith("#")]
        assert rules[0] == "*", "the build context must start from nothing (never .venv)"
        included = {r[1:] for r in rules if r.startswith("!")}
        copied = [src for line in re.findall(r"^COPY (.+)$", text, re.M)
                  for src in line.split()[:-1]]  # fmt: skip
        assert copied and set(copied) <= included, dockerfile.name
        assert all((REPO / src).exists() for src in copied)
        assert 'pip install "torch==2.13.0"' in text

"""docker/ as far as it can be checked without a Docker daemon: Docker Compose v2's own `config`
reads the file with the .env that `new-env.sh` writes (and refuses it without each secret);
the README's lines bring it up as written; the Redis service's own command and health check run
in a network namespace of their own and refuse a client without the password; the PostgreSQL
init script, run against the real server, makes a plain role that can migrate its database;
every capworks command in the file parses in our CLI, every CAPWORKS_* variable is a setting,
Prometheus finds its targets by DNS, and every Grafana expression names a real metric."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import PG_ADMIN_URL, REPO, require_service

from capworks.cli import build_parser
from capworks.schema.settings import Settings

DOCKER = REPO / "docker"
OUR_IMAGES = {"capworks-worker", "capworks-producer"}
COMPOSE_FILES = ["compose.yaml", ".env.example", "new-env.sh", "prometheus.yml"]
COMPOSE_DIRS = ["postgres-init", "grafana"]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())  # type: ignore[no-any-return]


def compose_binary() -> str:
    """Docker Compose v2 (scripts/install.sh puts it in the venv), or a skip / CI failure."""
    found = shutil.which("docker-compose", path=str(Path(sys.executable).parent))
    found = found or shutil.which("docker-compose")
    if found is None:
        require_service("Docker Compose v2", "no docker-compose binary (scripts/install.sh)")
    version = subprocess.run([found, "version", "--short"], capture_output=True, text=True)  # type: ignore[list-item]
    if not version.stdout.strip().lstrip("v").startswith("2."):
        require_service("Docker Compose v2", f"{found} is {version.stdout.strip()!r}")
    return found  # type: ignore[return-value]


def copy_of_docker(tmp: Path) -> Path:
    """docker/ without anything new-env.sh writes, in a scratch folder."""
    for name in COMPOSE_FILES:
        shutil.copy(DOCKER / name, tmp / name)
    for name in COMPOSE_DIRS:
        shutil.copytree(DOCKER / name, tmp / name)
    return tmp


def compose_config(
    folder: Path, *args: str, profiles: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """`docker compose config` in `folder`, with nothing from this shell's environment."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(folder)}
    chosen = [arg for profile in profiles for arg in ("--profile", profile)]
    return subprocess.run(
        [compose_binary(), *chosen, "config", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
    )


def read_env(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of docker/ after `sh new-env.sh`."""
    folder = copy_of_docker(tmp_path_factory.mktemp("docker"))
    subprocess.run(["sh", "new-env.sh"], cwd=folder, check=True, capture_output=True)
    return folder


@pytest.fixture(scope="module")
def resolved(generated: Path) -> dict[str, Any]:
    """The compose file as Docker Compose v2 resolves it with new-env.sh's .env, every profile
    on."""
    done = compose_config(generated, "--format", "json", profiles=("tools", "monitoring"))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def required_variables() -> list[str]:
    """The variables .env.example leaves empty: the secrets compose must be given."""
    return [k for k, v in read_env(DOCKER / ".env.example").items() if v == ""]


def test_compose_v2_reads_the_file_with_the_env_new_env_writes(
    generated: Path, resolved: dict[str, Any]
) -> None:
    env = read_env(generated / ".env")
    assert set(required_variables()) <= env.keys()
    assert all(len(env[name]) >= 32 for name in required_variables())
    assert len(set(map(env.get, required_variables()))) == len(required_variables())  # distinct
    # Prometheus's file secret holds the workers' token; both are for the owner only.
    token = (generated / "secrets" / "metrics_token").read_text()
    assert token == env["CAPWORKS_METRICS_TOKEN"]
    assert (generated / ".env").stat().st_mode & 0o077 == 0
    assert (generated / "secrets").stat().st_mode & 0o077 == 0
    assert resolved["secrets"]["metrics_token"]["file"] == str(generated / "secrets/metrics_token")
    again = subprocess.run(["sh", "new-env.sh"], cwd=generated, capture_output=True, text=True)
    assert again.returncode == 1 and "exists already" in again.stderr
    assert read_env(generated / ".env") == env  # the volumes' passwords are not replaced


@pytest.mark.parametrize("name", required_variables())
def test_compose_refuses_to_start_without_each_secret(name: str, generated: Path) -> None:
    folder = generated.parent / f"without-{name}"
    shutil.copytree(generated, folder)
    env_file = folder / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in read_env(env_file).items() if k != name))
    done = compose_config(folder, "-q")
    assert done.returncode != 0
    assert f"set {name}" in done.stderr  # one line that says what to set


def test_no_secret_has_a_default_in_the_file() -> None:
    text = (DOCKER / "compose.yaml").read_text()
    for name, operator in re.findall(r"\$\{([A-Z0-9_]+)(:?[-?]?)", text):
        if re.search(r"PASSWORD|TOKEN|SECRET|KEY", name):
            assert operator == ":?", f"{name} must be required (${{{name}:?...}})"
    assert "admin" not in re.findall(r"GF_SECURITY_ADMIN_PASSWORD: (\S+)", text)[0]


def test_the_readme_brings_compose_up_as_written(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text().splitlines()
    (up,) = [i for i, line in enumerate(readme) if "docker compose up" in line]
    start = up
    while start > 0 and readme[start - 1].startswith("    "):
        start -= 1
    block = [line.strip() for line in readme[start : up + 1]]
    folder = tmp_path
    for line in block:
        if line == "cd docker":
            (tmp_path / "docker").mkdir()
            folder = copy_of_docker(tmp_path / "docker")
        elif line.startswith("docker compose up"):
            done = compose_config(folder, "-q")
            assert done.returncode == 0, f"`{line}` after {block[:-1]}: {done.stderr}"
        else:
            cmd = line.split("#")[0].split()
            subprocess.run(cmd, cwd=folder, check=True, capture_output=True)
    assert folder != tmp_path, f"the README's block does not cd into docker/: {block}"


def test_redis_needs_its_password_and_every_redis_url_carries_it(
    resolved: dict[str, Any],
) -> None:
    services = resolved["services"]
    password = services["redis"]["environment"]["REDIS_PASSWORD"]
    urls = {
        (name, key): value
        for name, service in services.items()
        for key, value in (service.get("environment") or {}).items()
        if isinstance(value, str) and value.startswith("redis://")
    }
    assert {name for name, _ in urls} >= {"worker", "events", "farm-metrics", "flower", "cli"}
    for where, url in urls.items():
        assert url.startswith(f"redis://:{password}@redis:6379/"), where
    redis_args = " ".join(services["redis"]["command"])
    for needed in ("--appendonly yes", "--maxmemory-policy noeviction"):
        assert needed in redis_args  # queued jobs are never evicted or lost at a restart
    assert password not in redis_args  # argv is world-readable: the password is expanded inside


DRIVER = r"""
import json, os, subprocess, sys, time
cfg = json.loads(sys.argv[1])
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
env = {"PATH": os.environ["PATH"], **cfg["environment"]}
# `config` keeps compose's escape: $$ is the $ that reaches the container.
command = [arg.replace("$$", "$") for arg in cfg["command"]]
server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
try:
    for _ in range(100):
        if b"NOAUTH" in subprocess.run(["redis-cli", "ping"], capture_output=True).stdout:
            break
        time.sleep(0.1)
    anonymous = subprocess.run(["redis-cli", "ping"], capture_output=True, text=True).stdout
    check = cfg["healthcheck"]["test"][1].replace("$$", "$")
    health = subprocess.run(["sh", "-c", check], env=env).returncode
    argvs = [open(f"/proc/{server.pid}/cmdline", "rb").read().decode()]
finally:
    server.kill()
    server.wait(timeout=10)
print(json.dumps({"anonymous": anonymous, "health": health, "argvs": argvs}))
"""


def test_the_redis_service_refuses_clients_without_the_password(
    resolved: dict[str, Any], tmp_path: Path
) -> None:
    """The service's own command and health check, run by this machine's redis-server in a
    network namespace of its own (port 6379 there is free, and nothing leaves it)."""
    if shutil.which("redis-server") is None or shutil.which("unshare") is None:
        require_service("redis-server and unshare", "not on PATH")
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        require_service("a network namespace", "unshare --net is not permitted here")
    redis = resolved["services"]["redis"]
    cfg = {k: redis[k] for k in ("command", "environment", "healthcheck")}
    assert redis["healthcheck"]["test"][0] == "CMD-SHELL"
    done = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", DRIVER, json.dumps(cfg)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert "NOAUTH" in seen["anonymous"]
    assert seen["health"] == 0  # the health check authenticates, from its environment
    password = redis["environment"]["REDIS_PASSWORD"]
    assert all(password not in argv for argv in seen["argvs"]), "the password is in an argv"


def test_flower_takes_its_broker_url_from_the_environment(
    resolved: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    flower = resolved["services"]["flower"]
    argv = [*flower["entrypoint"], *flower["command"]]
    assert argv[:2] == ["celery", "flower"]
    assert not any("redis" in arg or "broker" in arg for arg in argv), argv
    url = flower["environment"]["CELERY_BROKER_URL"]
    assert url.startswith("redis://:")
    assert flower["environment"]["FLOWER_BASIC_AUTH"].split(":", 1)[1]
    assert all(p["host_ip"] == "127.0.0.1" for p in flower["ports"])  # /metrics skips auth
    # What `celery flower` does with that variable: its app's broker is that URL.
    from celery import Celery

    monkeypatch.setenv("CELERY_BROKER_URL", url)
    assert Celery().conf.broker_url == url


def test_postgres_app_role_is_a_plain_role_that_owns_and_migrates_its_database(
    compose: dict[str, Any],
) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.pool import NullPool

    from capworks.schema.db import connect

    postgres = compose["services"]["postgres"]
    assert postgres["environment"].get("POSTGRES_USER", "postgres") == "postgres"
    assert "./postgres-init:/docker-entrypoint-initdb.d:ro" in postgres["volumes"]
    url = compose["x-capworks-env"]["CAPWORKS_DATABASE_URL"]
    user, db = (
        postgres["environment"]["CAPWORKS_DB_USER"],
        postgres["environment"]["CAPWORKS_DB_NAME"],
    )
    assert url.startswith(f"postgresql+psycopg://{user}:") and url.endswith(f"@postgres:5432/{db}")

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        admin.connect().close()
    except OperationalError as exc:
        require_service("PostgreSQL", str(exc.orig))
    suffix = uuid.uuid4().hex[:10]
    role, database, password = f"capworks_role_{suffix}", f"captions_{suffix}", uuid.uuid4().hex
    env = {
        "PATH": "/usr/bin:/bin",
        "PGHOST": "127.0.0.1",
        "POSTGRES_USER": "postgres",
        "CAPWORKS_DB_USER": role,
        "CAPWORKS_DB_NAME": database,
        "CAPWORKS_DB_PASSWORD": password,
    }
    scripts = sorted((DOCKER / "postgres-init").iterdir())
    try:
        for script in scripts:
            done = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
        with admin.connect() as conn:
            flags = conn.execute(
                text(
                    "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls"
                    " FROM pg_roles WHERE rolname = :r"
                ),
                {"r": role},
            ).one()
            owner = conn.execute(
                text("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = :d"),
                {"d": database},
            ).scalar_one()
        assert tuple(flags) == (False,) * 5
        assert owner == role
        # The plain role migrates capworks' schema into its database and writes to it.
        engine = connect(f"postgresql+psycopg://{role}:{password}@127.0.0.1:5432/{database}")
        with engine.begin() as conn:
            tables = conn.execute(
                text("SELECT count(*) FROM pg_tables WHERE tableowner = :r"), {"r": role}
            ).scalar_one()
        engine.dispose()
        assert tables >= 5
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
            conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()


def test_images_and_the_model_revision_are_pinned(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        image = service["image"]
        if image in OUR_IMAGES:
            continue
        defaulted = re.sub(r"\$\{[A-Z_]+:-([^}]+)\}", r"\1", image)
        tag = defaulted.rsplit(":", 1)[-1] if ":" in defaulted else "latest"
        assert re.fullmatch(r"v?\d+(\.\d+)*", tag), f"{name}: {image} is not pinned"
    env = compose["x-capworks-env"]
    assert re.fullmatch(r"\$\{CAPWORKS_REVISION:-v\d+(\.\d+)+\}", env["CAPWORKS_REVISION"])


def test_one_worker_service_takes_every_gpu_and_our_images_are_built(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    workers = {n: s for n, s in services.items() if s.get("image") == "capworks-worker"}
    assert list(workers) == ["worker"]
    worker = workers["worker"]
    assert worker["command"] == ["worker", "--gpus", "all"]  # one process per GPU it is given
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    assert "model-cache:/cache" in worker["volumes"]
    for name, service in services.items():
        if service.get("image") in OUR_IMAGES:
            assert "build" in service, f"{name} runs our image but does not build it"


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
    set_anywhere = set(compose["x-capworks-env"])
    for service in compose["services"].values():
        set_anywhere |= {k for k in service.get("environment", {}) if k.startswith("CAPWORKS_")}
    for dockerfile in DOCKER.glob("*.Dockerfile"):
        set_anywhere |= set(re.findall(r"\b(CAPWORKS_[A-Z0-9_]+)=", dockerfile.read_text()))
    # CAPWORKS_DB_* are the postgres service's, for its init script: not capworks settings.
    set_anywhere -= {"CAPWORKS_DB_USER", "CAPWORKS_DB_NAME", "CAPWORKS_DB_PASSWORD"}
    assert set_anywhere, "no CAPWORKS_ variable found: the checks read the wrong thing"
    assert set_anywhere <= known, f"not settings: {sorted(set_anywhere - known)}"


def metric_families() -> dict[str, set[str]]:
    """Each metric family of workers/metrics.py and of the farm collector
    (capworks/farm_metrics.py), with the sample names it can expose."""
    from prometheus_client.metrics import MetricWrapperBase

    from capworks.workers import metrics

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


def test_prometheus_finds_every_metrics_endpoint_by_dns(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert all("static_configs" not in job for job in jobs.values()), "targets edited by hand"
    found = {
        name: {(n, sd["port"]) for sd in job["dns_sd_configs"] for n in sd["names"]}
        for name, job in jobs.items()
    }
    # The worker container's processes serve 9750 + their GPU index: 8 GPUs' worth of ports.
    assert found["capworks-workers"] == {("worker", 9750 + i) for i in range(8)}
    assert found["capworks-farm"] == {("farm-metrics", 9760)}
    assert {n for names in found.values() for n, _ in names} <= compose["services"].keys()
    assert compose["services"]["farm-metrics"]["command"] == ["status", "--serve-metrics", "9760"]
    # Every scrape sends the metrics token, read from the file secret compose mounts.
    assert compose["secrets"]["metrics_token"] == {"file": "./secrets/metrics_token"}
    assert "metrics_token" in compose["services"]["prometheus"]["secrets"]
    for job in jobs.values():
        auth = job["authorization"]
        assert (auth["type"], auth["credentials_file"]) == ("Bearer", "/run/secrets/metrics_token")


def test_every_metrics_endpoint_off_loopback_has_the_token(compose: dict[str, Any]) -> None:
    from capworks.schema.metrics_endpoint import is_loopback

    serving = {"farm-metrics", "worker"}
    for name in serving:
        env = compose["services"][name]["environment"]
        assert not is_loopback(env["CAPWORKS_METRICS_HOST"]), name  # Prometheus is elsewhere
        token = env.get("CAPWORKS_METRICS_TOKEN", "")
        assert token.startswith("${CAPWORKS_METRICS_TOKEN:?"), name  # the start fails without it
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


def test_secrets_written_by_new_env_are_never_committed() -> None:
    ignored = subprocess.run(
        ["git", "check-ignore", "docker/.env", "docker/secrets/metrics_token"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert ignored.stdout.split() == ["docker/.env", "docker/secrets/metrics_token"]


def test_grafana_filters_workers_by_instance_and_answers_load_time_utilisation_and_drain() -> None:
    dashboard = json.loads((DOCKER / "grafana" / "capworks.json").read_text())
    (variable,) = dashboard["templating"]["list"]
    assert variable["name"] == "instance" and variable["includeAll"]
    assert "capworks_images_total" in variable["definition"]
    by_metric: dict[str, list[dict[str, Any]]] = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            for name in set(re.findall(r"\b(capworks_[a-z_]+)\b", target["expr"])):
                by_metric.setdefault(name, []).append(panel)
    # The model load time alone, on a seconds axis (it shared a bytes axis with GPU memory).
    (load,) = by_metric["capworks_model_load_seconds"]
    assert load["fieldConfig"]["defaults"]["unit"] == "s"
    assert all("model_load" in t["expr"] for t in load["targets"])
    batch_time = by_metric["capworks_batch_seconds_sum"]
    utilisation = [p for p in batch_time if "utilisation" in p["title"]]
    assert [p["fieldConfig"]["defaults"]["unit"] for p in utilisation] == ["percentunit"]
    (drain,) = [p for p in by_metric["capworks_queue_images"] if "drain" in p["title"].lower()]
    assert drain["fieldConfig"]["defaults"]["unit"] == "s"
    assert "/ sum(rate(capworks_images_total" in drain["targets"][0]["expr"]
    # Every worker metric follows the $instance choice, except in the farm-wide drain ETA.
    from capworks.farm_metrics import FAMILIES

    farm = set(FAMILIES)
    for panel in dashboard["panels"]:
        if panel is drain:
            continue
        for target in panel.get("targets", []):
            for name in re.findall(r"\b(capworks_[a-z_]+)\b", target["expr"]):
                if name not in farm:
                    assert f"{name}{{" in target["expr"], target["expr"]
                    assert '$instance"' in target["expr"], target["expr"]

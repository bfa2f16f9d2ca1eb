"""`capworks status` (the farm at a glance) and `capworks health` (exit 0/1 for a container's
health check, with the reasons)."""

from __future__ import annotations

import json
import signal
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from capworks.farm import (
    RATE_WINDOW_S,
    FarmStatus,
    gather,
    health_problems,
    ping_database,
    worker_states,
)
from capworks.farm_metrics import FarmCollector
from capworks.plain import counted, plain, plain_line
from capworks.schema.broker_check import broker_name
from capworks.schema.db import connect
from capworks.schema.errors import CapworksError
from capworks.schema.heartbeat import pid_space, read_heartbeats, redis_now
from capworks.schema.metrics_endpoint import check_bind, start_metrics_server
from capworks.schema.queue import RedisAddress

REDIS_TIMEOUT_S = 3.0


class FarmUnreachable(ValueError):
    """Redis or the database (or both) cannot be reached; the message says which."""


@dataclass(frozen=True)
class FarmAddress:
    """Where the farm's state lives."""

    redis: RedisAddress
    db_url: str
    queue: str
    stale_after_s: float


@dataclass(frozen=True)
class StatusRequest:
    """What `capworks status` was asked."""

    farm: FarmAddress
    as_json: bool = False
    watch: bool = False
    interval_s: float = 2.0
    serve_metrics_port: int | None = None  # serve farm metrics here instead of printing
    metrics_host: str = "127.0.0.1"
    metrics_token: SecretStr | None = None  # scrapes must send it as a bearer token
    metrics_allow_open: bool = False  # no token needed off loopback (the operator's choice)


@dataclass(frozen=True)
class HealthRequest:
    """What `capworks health` was asked: `host` (by name), or this host or container (`here`,
    by pid namespace), must have a fresh worker when given."""

    farm: FarmAddress
    host: str | None = None
    check_database: bool = True
    here: bool = False


def open_redis(address: RedisAddress) -> Any:
    """A Redis client that has answered a PING; `FarmUnreachable` otherwise."""
    client = address.client(REDIS_TIMEOUT_S)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise FarmUnreachable(
            f"cannot reach the broker (Redis) at {redacted(client)}: {exc}"
        ) from exc
    return client


def redacted(client: Any) -> str:
    """A Redis client's address without its password (the primary's name behind Sentinels)."""
    name = broker_name(client)
    return name if name.startswith("Sentinel") else f"redis://{name}"


def open_database(url: str) -> Engine:
    """A migrated engine that has answered; `FarmUnreachable` otherwise."""
    try:
        db = connect(url)
        ping_database(db)
    except CapworksError as exc:
        raise FarmUnreachable(f"the database is unreachable: {exc.message}") from exc
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise FarmUnreachable(f"the database is unreachable: {reason}") from exc
    return db


def open_farm(farm: FarmAddress) -> tuple[Any, Engine]:
    """Redis and the database, both reached; one `FarmUnreachable` naming each that is not."""
    reasons, client, db = [], None, None
    try:
        client = open_redis(farm.redis)
    except FarmUnreachable as exc:
        reasons.append(str(exc))
    try:
        db = open_database(farm.db_url)
    except FarmUnreachable as exc:
        reasons.append(str(exc))
    if reasons or client is None or db is None:
        raise FarmUnreachable("; ".join(reasons))
    return client, db


def run_status(request: StatusRequest) -> int:
    """Print the farm's status once, or refresh it in place until interrupted (--watch)."""
    farm = request.farm
    if request.serve_metrics_port is not None:  # refused before anything is opened
        check_bind(request.metrics_host, request.metrics_token, request.metrics_allow_open)
    client, db = open_farm(farm)
    if request.serve_metrics_port is not None:
        return serve_metrics(
            client,
            db,
            farm,
            request.metrics_host,
            request.serve_metrics_port,
            request.metrics_token,
        )
    if not request.watch:
        status = gather(client, db, farm.queue, farm.stale_after_s)
        if request.as_json:
            print(json.dumps(status.as_dict()))
        else:
            Console().print(render(status))
        return 0
    stop = _stop_on_interrupt()
    try:
        if request.as_json:
            while not stop.is_set():  # one JSON object per line and refresh
                found = _read_or_error(client, db, farm)
                line = found.as_dict() if isinstance(found, FarmStatus) else found
                print(json.dumps(line), flush=True)
                stop.wait(request.interval_s)
            return 0
        console = Console()
        if not console.is_terminal:  # Live draws nothing into a pipe: one snapshot per refresh
            while not stop.is_set():
                found = _read_or_error(client, db, farm)
                when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
                console.print(f"-- {when}")
                console.print(
                    render(found) if isinstance(found, FarmStatus) else plain(found["error"])
                )
                console.file.flush()
                stop.wait(request.interval_s)
            return 0
        with Live(console=console, auto_refresh=False) as live:
            while not stop.is_set():
                found = _read_or_error(client, db, farm)
                shown = render(found) if isinstance(found, FarmStatus) else plain(found["error"])
                live.update(shown, refresh=True)
                stop.wait(request.interval_s)
    except KeyboardInterrupt:  # a second Ctrl-C, during a read that does not end
        pass
    return 0


def _stop_on_interrupt() -> threading.Event:
    """An event set by the first SIGINT: the watch ends after the read in progress. Raised as
    KeyboardInterrupt mid-query, psycopg cancels the query and waits for the server's answer,
    which under load outlasted a test's 20 s; a second SIGINT interrupts at once."""
    stop = threading.Event()

    def interrupted(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGINT, interrupted)
    return stop


def _read_or_error(client: Any, db: Engine, farm: FarmAddress) -> FarmStatus | dict[str, str]:
    # While watching, an outage is shown in place of the figures and the next refresh retries.
    try:
        status = gather(client, db, farm.queue, farm.stale_after_s)
    except (redis.RedisError, SQLAlchemyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return {"error": f"cannot read the farm: {reason}"}
    return status


def serve_metrics(
    client: Any,
    db: Engine,
    farm: FarmAddress,
    host: str,
    port: int,
    token: SecretStr | None = None,
) -> int:
    """Serve the farm's metrics at http://host:port/metrics (behind `token` when set) until
    SIGTERM or SIGINT."""
    registry = CollectorRegistry()
    registry.register(FarmCollector(client, db, farm.queue, farm.stale_after_s))
    try:
        server, thread = start_metrics_server(host, port, registry, token)
    except OSError as exc:
        raise FarmUnreachable(f"cannot serve metrics on {host}:{port}: {exc}") from exc
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"farm metrics at http://{host}:{server.server_port}/metrics", flush=True)
    stop.wait()
    server.shutdown()
    thread.join(timeout=10)
    return 0


def throughput_text(per_s: float, window_s: float) -> str:
    """The caption rate over the window; below 0.1/s (which would print as 0.0) the count."""
    minutes = f"last {window_s / 60:g} min"
    if per_s >= 0.1:
        return f"{per_s:.1f} images/s ({minutes})"
    return f"{counted(round(per_s * window_s), 'image')} captioned in the {minutes}"


def render(status: FarmStatus) -> Group:
    """The status as terminal tables."""
    q, a = status.queue, status.activity
    about = "~" if q.images_estimated else ""
    summary = Table.grid(padding=(0, 2))
    summary.add_row("queue", f"{q.jobs_waiting:,} jobs, {about}{q.images_waiting:,} images waiting")
    summary.add_row("held", f"{q.jobs_held:,} jobs, {q.images_held:,} images held by workers")
    summary.add_row(
        "last hour",
        f"{a.captioned_last_hour:,} captioned, {a.dead_lettered_last_hour:,} dead-lettered",
    )
    eta = f", queue drains in ~{_duration(status.drain_eta_s)}" if status.drain_eta_s else ""
    summary.add_row("throughput", throughput_text(a.captioned_per_s, RATE_WINDOW_S) + eta)
    parts: list[Any] = [summary]
    if status.workers:
        workers = Table(
            "worker", "device", "model", "jobs", "waiting", "last beat", title="workers"
        )
        for w in status.workers:
            hb = w.heartbeat
            state = "gone" if w.gone else "STALE" if w.stale else "ok"
            workers.add_row(
                plain(hb.node or f"{hb.host}:{hb.pid}"),  # Flower's name for it
                plain(hb.device),
                plain(hb.model),
                str(hb.jobs_in_flight),
                str(hb.images_waiting),
                f"{w.age_s:.0f} s ago ({state})",
            )
        parts.append(workers)
    else:
        parts.append("no worker is running (no heartbeat in Redis)")
    if status.crawls:
        crawls = Table("crawl", "state", "listed", "skipped", "enqueued", "rate", "updated")
        for c in status.crawls:
            crawls.add_row(
                plain(c.source),
                plain(c.state),
                f"{c.listed:,}",
                f"{c.skipped:,}",
                f"{c.enqueued:,}",
                f"{c.listed_per_s:.0f}/s",
                c.updated.isoformat(timespec="seconds"),
            )
        parts.append(crawls)
    return Group(*parts)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run_health(request: HealthRequest) -> int:
    """0 and what is fine, or 1 and why not: Redis, the database, and the heartbeats."""
    farm = request.farm
    problems: list[str] = []
    try:
        client = open_redis(farm.redis)
    except FarmUnreachable as exc:
        client = None
        problems.append(str(exc))
    if request.check_database:
        try:
            open_database(farm.db_url).dispose()
        except FarmUnreachable as exc:
            problems.append(str(exc))
    fine: list[str] = []
    if client is not None:
        workers = worker_states(
            read_heartbeats(client, farm.queue), farm.stale_after_s, redis_now(client)
        )
        beat_problems, fine = health_problems(
            workers, request.host, farm.stale_after_s, pid_space() if request.here else None
        )
        problems.extend(beat_problems)
    for line in problems:
        print(f"unhealthy: {plain_line(line)}")
    if problems:
        return 1
    # No worker asked for and none beating is healthy for the stores, but say so.
    said = "; ".join(fine) if fine else "Redis and the database answer; 0 workers beating"
    print("healthy: " + plain_line(said))
    return 0

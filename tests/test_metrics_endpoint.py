"""Metrics endpoints (`schema/metrics_endpoint.py`): the bearer token, checked on real sockets on
loopback, and where an endpoint may listen, decided by a pure function. No test binds anything
but loopback: the refusals of 0.0.0.0 and 10.0.0.5 are the decision's and the CLI's, made
before any socket is opened."""

from __future__ import annotations

import logging
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from conftest import run_cli
from prometheus_client import CollectorRegistry, Counter
from pydantic import SecretStr

from capworks.schema.metrics_endpoint import (
    MetricsRefused,
    bearer_allows,
    bind_refusal,
    check_bind,
    is_loopback,
    start_metrics_server,
)
from capworks.schema.redact import redact, register_secrets
from capworks.schema.settings import Settings
from capworks.workers import metrics

TOKEN = "metrics-token-4f2a9c"
NO_TOKEN_ENV = {"CAPWORKS_METRICS_TOKEN": "", "CAPWORKS_METRICS_ALLOW_OPEN": "0"}


def scrape(url: str, authorization: str | None = None) -> tuple[int, str]:
    """The status and body of one GET (an HTTP error's too)."""
    request = urllib.request.Request(url)
    if authorization is not None:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("capworks_test_scrapes", "A counter the test reads back", registry=registry).inc(3)
    return registry


def serving(registry: CollectorRegistry, token: SecretStr | None, host: str) -> Iterator[str]:
    server, thread = start_metrics_server(host, 0, registry, token)
    where = f"[{host}]" if ":" in host else host
    try:
        yield f"http://{where}:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture()
def guarded_url(registry: CollectorRegistry) -> Iterator[str]:
    yield from serving(registry, SecretStr(TOKEN), "127.0.0.1")


def test_with_a_token_only_the_right_bearer_token_reads_the_metrics(guarded_url: str) -> None:
    status, body = scrape(guarded_url)
    assert status == 401 and "capworks_test_scrapes" not in body
    assert scrape(guarded_url, "Bearer wrong-token")[0] == 401
    assert scrape(guarded_url, f"Bearer {TOKEN}x")[0] == 401  # a longer one is not a match
    assert scrape(guarded_url, f"Basic {TOKEN}")[0] == 401  # another scheme, the same text
    assert scrape(guarded_url, TOKEN)[0] == 401  # no scheme at all
    status, body = scrape(guarded_url, f"Bearer {TOKEN}")
    assert status == 200 and "capworks_test_scrapes_total 3.0" in body
    assert scrape(guarded_url, f"bearer {TOKEN}")[0] == 200  # the scheme's case does not matter


def test_without_a_token_loopback_metrics_are_open(registry: CollectorRegistry) -> None:
    for url in serving(registry, None, "127.0.0.1"):
        status, body = scrape(url)
        assert status == 200 and "capworks_test_scrapes_total 3.0" in body


def test_an_ipv6_loopback_endpoint_checks_the_token_too(registry: CollectorRegistry) -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    for url in serving(registry, SecretStr(TOKEN), "::1"):
        assert scrape(url)[0] == 401
        assert scrape(url, f"Bearer {TOKEN}")[0] == 200


def test_the_workers_endpoint_wants_the_token_and_never_logs_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    with caplog.at_level(logging.DEBUG):
        assert metrics.serve("127.0.0.1", port, SecretStr(TOKEN))
        url = f"http://127.0.0.1:{port}/metrics"
        assert scrape(url)[0] == 401
        status, body = scrape(url, f"Bearer {TOKEN}")
    assert status == 200 and "capworks_images_total" in body
    assert "(token required)" in caplog.text and TOKEN not in caplog.text
    assert not metrics.serve("127.0.0.1", 0, SecretStr(TOKEN))  # port 0: the endpoint is off


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.0.1", "::1", "localhost", "LOCALHOST"])
def test_loopback_needs_no_token(host: str) -> None:
    assert is_loopback(host)
    assert bind_refusal(host, None, allow_open=False) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5", "::", "", "fd00::1", "metrics.example"])
def test_any_other_address_without_a_token_is_refused(host: str) -> None:
    assert not is_loopback(host)
    reason = bind_refusal(host, None, allow_open=False)
    assert reason is not None and "CAPWORKS_METRICS_TOKEN" in reason
    assert bind_refusal(host, SecretStr(""), allow_open=False) == reason  # empty is no token
    with pytest.raises(MetricsRefused, match="CAPWORKS_METRICS_ALLOW_OPEN=1"):
        check_bind(host, None, allow_open=False)


def test_a_token_or_the_explicit_opt_in_lets_an_endpoint_listen_anywhere() -> None:
    assert bind_refusal("0.0.0.0", SecretStr(TOKEN), allow_open=False) is None
    assert bind_refusal("10.0.0.5", None, allow_open=True) is None


def test_only_a_bearer_header_with_the_exact_token_is_allowed() -> None:
    assert bearer_allows(f"Bearer {TOKEN}", TOKEN)
    assert bearer_allows(f"BEARER  {TOKEN} ", TOKEN)
    for header in (None, "", "Bearer", "Bearer ", f"Token {TOKEN}", f"Bearer {TOKEN[:-1]}"):
        assert not bearer_allows(header, TOKEN), header


def test_the_metrics_token_is_a_registered_secret_masked_in_what_is_logged() -> None:
    settings = Settings(metrics_token=SecretStr(TOKEN))
    assert TOKEN not in repr(settings)
    register_secrets(settings.secret_values())  # what get_settings does on first use
    assert redact(f"scrape with {TOKEN} failed") == "scrape with *** failed"


@pytest.mark.parametrize(
    "command", [["worker", "--gpus", "cpu"], ["status", "--serve-metrics", "9"]]
)
def test_off_loopback_without_a_token_the_cli_refuses_in_one_line(command: list[str]) -> None:
    # Refused before any socket is opened or any worker process started.
    env = {**NO_TOKEN_ENV, "CAPWORKS_METRICS_HOST": "0.0.0.0"}
    result = run_cli(*command, env=env, timeout=60)
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("capworks: error: metrics on 0.0.0.0 need CAPWORKS_METRICS_TOKEN")
    assert "Traceback" not in result.stderr and result.stdout == ""

"""One settings object for all of capworks, read once from `CAPWORKS_*` environment variables."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from capworks.schema.redact import redact, register_secrets, url_password
from capworks.schema.sentinel import is_sentinel_url, parse_sentinel_url

DEFAULT_MODEL = "damo/ofa_image-caption_coco_distilled_en"
# The webhook token and HMAC secret and the metrics token: shorter ones are refused at start-up.
MIN_SHARED_SECRET_CHARS = 16


def default_cache_dir() -> Path:
    """Where built checkpoints live: outside the repository, per user."""
    return Path.home() / ".cache" / "capworks"


class Settings(BaseSettings):
    """Every knob of capworks; each field is `CAPWORKS_<NAME>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="CAPWORKS_", extra="ignore")

    # Model
    model: str = DEFAULT_MODEL
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    generator: str = "fast"
    batch_size: int = Field(default=8, ge=1)
    cache_dir: Path = Field(default_factory=default_cache_dir)

    # Storage. URLs stay plain strings (every library takes them so); a password inside one is
    # masked wherever capworks prints, logs or stores it (`schema.redact`). PostgreSQL TLS goes
    # in the URL: `?sslmode=verify-full&sslrootcert=/path/ca.pem`.
    database_url: str = "sqlite:///capworks.db"
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_addressing_style: str = "auto"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    # A CA bundle for an https S3 endpoint signed by a private CA (boto3's `verify=`).
    s3_ca_bundle: Path | None = None
    # The whole of one http(s) image fetch (connect, redirects, body), not just the connect.
    http_timeout_s: float = 30.0
    # The fetch guard (workers/guard.py) lets http(s) image URIs reach public addresses only, and
    # the networks listed here (comma list of CIDRs; 127.0.0.0/8 for a server on this host). A
    # cloud metadata address opens only when named exactly (169.254.169.254/32). The S3
    # endpoint above is the operator's and is not guarded.
    fetch_allow_cidrs: Annotated[tuple[IPvAnyNetwork, ...], NoDecode] = ()
    # Folders local image paths may be read from (a list like PATH's, `:` between them). A
    # worker with none refuses every local path; `capworks caption` adds the paths it is given.
    file_roots: Annotated[tuple[Path, ...], NoDecode] = ()

    # Image validation (defaults from the model card's service limits)
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_px: int = 3000
    # Decode threads per worker process (0: one per core the process may use).
    decode_threads: int = Field(default=0, ge=0)
    # Images between fetch and caption at once in one process (0: 4 batches, at least 64):
    # bounds the memory that fetched bytes and decoded pixels take.
    images_in_flight: int = Field(default=0, ge=0)
    # Pillow's JPEG draft mode (decode at 1/2..1/8 scale): faster on large photos, but the
    # pixels differ from ModelScope's, so captions may too. Off unless asked for.
    jpeg_draft: bool = False
    # Where images are decoded and resized: `exact` (Pillow in the decode threads, ModelScope's
    # pixels) or `gpu` (JPEGs decoded in batches by torchvision on the model's device, just
    # before the model; other formats and failures the exact way). gpu needs a torchvision built
    # for the installed torch and is not bit-exact: a caption can differ.
    preprocess: Literal["exact", "gpu"] = "exact"
    # torch threads of a worker process (0: torch's default, one per core); `capworks worker
    # --cpu-procs N` sets cores / N for each of its N processes.
    torch_threads: int = Field(default=0, ge=0)

    # Queue (Celery on Redis)
    broker_url: str = "redis://127.0.0.1:6379/0"
    # Redis behind Sentinels (schema/sentinel.py): a `sentinel://h1:26379;sentinel://h2:26379`
    # broker URL, the name the Sentinels monitor the primary by, and their own password if any.
    redis_master_name: str | None = Field(default=None, validate_default=True)
    redis_sentinel_password: SecretStr | None = None
    # TLS to Redis (`rediss://` URLs): the CA that signed the server's certificate (the system's
    # when unset; the hostname is checked either way), and a client certificate if it asks for one.
    redis_ca_file: Path | None = None
    redis_cert_file: Path | None = None
    redis_key_file: Path | None = None
    queue_name: str = "capworks"
    # Leases (workers/leases.py): a worker process renews the lease on the jobs it holds every
    # lease_s / 4 (at most 5 s); a job whose holder died is back within lease_s plus one renewal.
    # 8 s: a lost host's jobs are back in the queue within 10 s (RELIABILITY.md).
    lease_s: float = Field(default=8.0, ge=1.0)
    # The last resort, for when no worker is alive to reap a dead one's leases: kombu itself
    # re-delivers an unacknowledged job after this long.
    visibility_timeout_s: int = 3600
    restore_interval_s: int = 10
    job_images: int = Field(default=64, ge=1, le=1000)
    prefetch_jobs: int = Field(default=4, ge=1)
    max_batch_wait_ms: int = 50
    max_attempts: int = Field(default=5, ge=1)
    retry_base_s: float = 2.0
    retry_cap_s: float = 300.0
    # A database outage is waited out (never dead-lettered): writes are tried again after a
    # backoff growing from retry_base_s to this cap, for as long as the outage lasts.
    database_retry_cap_s: float = Field(default=30.0, gt=0)
    poison_deliveries: int = Field(default=3, ge=1)
    # A message whose outcome cannot be recorded (an error the database keeps giving, not an
    # outage) is handed back this many times, then set aside in Redis (`capworks:gave-up`).
    max_record_requeues: int = Field(default=5, ge=0)
    # A worker starting while its broker or database is down (a restart, a failover) waits this
    # long for them before it exits (schema/startup.py).
    start_wait_s: float = Field(default=120.0, ge=0)
    max_queued_images: int = 200_000
    # Queued jobs live only in Redis: a broker that may evict keys is refused unless this is on.
    allow_evicting_broker: bool = False
    # Producers (crawl, events, enqueue()) move their position on (crawl row, SQS delete, filer
    # position, webhook 200) only once this many Redis replicas hold the batch they published
    # (Redis WAIT, up to the timeout); 0: as soon as the primary has it (RELIABILITY.md).
    enqueue_wait_replicas: int = Field(default=0, ge=0)
    enqueue_wait_timeout_ms: int = Field(default=1000, ge=1)

    # Storage events (`capworks events`). The webhook needs a bearer token or an HMAC secret
    # (either one authenticates a request); without one it refuses to start.
    events_token: SecretStr | None = None
    events_hmac_secret: SecretStr | None = None
    events_max_body_bytes: int = Field(default=1024 * 1024, ge=1)
    events_request_timeout_s: float = Field(default=10.0, gt=0)
    events_dedup_ttl_s: int = Field(default=7 * 24 * 3600, ge=1)
    events_sqs_queue_url: str | None = None
    events_sqs_endpoint_url: str | None = None
    events_sqs_region: str | None = None
    events_sqs_wait_s: int = Field(default=20, ge=0, le=20)
    events_sqs_visibility_timeout_s: int = Field(default=60, ge=1, le=43200)
    events_filer: str = "127.0.0.1:8888"  # SeaweedFS filer host:port (its gRPC is port + 10000)
    events_filer_path_prefix: str = "/buckets/"

    # Monitoring: each worker process serves Prometheus metrics on its own port (0 = off).
    # 127.0.0.1 keeps them on the host; another address (0.0.0.0 for a Prometheus on another
    # machine) needs metrics_token, which every scrape then sends as a bearer token, or the
    # explicit metrics_allow_open (schema/metrics_endpoint.py).
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9750, ge=0, le=65535)
    metrics_token: SecretStr | None = None
    metrics_allow_open: bool = False
    # Heartbeats (schema/heartbeat.py): one older than heartbeat_stale_s makes its worker
    # unhealthy (a hung model thread); its key expires heartbeat_ttl_s after the last beat.
    heartbeat_stale_s: float = Field(default=60.0, gt=0)
    heartbeat_ttl_s: int = Field(default=120, ge=1)
    # This worker process's identity in every lease, heartbeat and fetching key: the supervisor
    # makes a random one for each process it starts (hostnames and PIDs repeat across
    # containers); a process started without one makes its own (schema/instance.py).
    instance_id: str = Field(default="", pattern=r"^[A-Za-z0-9_-]{0,64}$")

    @field_validator("broker_url")
    @classmethod
    def _sentinels_parse(cls, value: str) -> str:
        if is_sentinel_url(value):
            parse_sentinel_url(value)  # BadSentinelUrl is a ValueError: one line, at start-up
        return value

    @field_validator("redis_master_name")
    @classmethod
    def _master_named(cls, value: str | None, info: ValidationInfo) -> str | None:
        if not value and is_sentinel_url(str(info.data.get("broker_url", ""))):
            raise ValueError("a sentinel:// broker URL needs the primary's name")
        return value or None

    @field_validator("fetch_allow_cidrs", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("file_roots", mode="before")
    @classmethod
    def _split_path_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part for part in value.split(os.pathsep) if part)
        return value

    @field_validator("events_token", "events_hmac_secret", "metrics_token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        # A shared secret anyone may guess at over the network: refuse a short one at start-up
        # (empty means unset). The value itself is never repeated (`describe_bad_settings`).
        if value is not None and 0 < len(value.get_secret_value()) < MIN_SHARED_SECRET_CHARS:
            raise ValueError(
                f"a shared secret needs at least {MIN_SHARED_SECRET_CHARS} characters"
                " (e.g. `openssl rand -hex 16`)"
            )
        return value

    def secret_values(self) -> list[str | None]:
        """Every secret these settings hold, for `capworks.schema.redact` to mask."""
        hidden = (
            self.s3_secret_access_key,
            self.events_token,
            self.events_hmac_secret,
            self.metrics_token,
            self.redis_sentinel_password,
        )
        return [
            *(s.get_secret_value() for s in hidden if s is not None),
            url_password(self.database_url),
            url_password(self.broker_url),
        ]

    @property
    def checkpoint_dir(self) -> Path:
        """Folder of checkpoints built offline by `capworks checkpoint build`."""
        return self.cache_dir / "checkpoints"


class BadSetting(ValueError):
    """`CAPWORKS_*` variables that do not parse, each named in one line with the reason."""


# The `SecretStr` fields: their values are never repeated in an error message.
_SECRET_FIELDS = frozenset(
    name
    for name, field in Settings.model_fields.items()
    if SecretStr in (field.annotation, *get_args(field.annotation))
)


def describe_bad_settings(exc: ValidationError) -> str:
    """One line for pydantic's errors: `CAPWORKS_JOB_IMAGES='abc': Input should be ...; ...`."""
    parts = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        name = f"CAPWORKS_{field.upper()}"
        value = error.get("input")
        shown = "" if field in _SECRET_FIELDS or not isinstance(value, str) else f"={value[:80]!r}"
        parts.append(f"{name}{shown}: {error['msg']}")
    return redact("bad setting " + "; ".join(parts))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use; their secrets are
    masked in everything `capworks.schema.redact` sees from then on. A variable that does not parse
    raises `BadSetting`, one line naming it."""
    try:
        settings = Settings()
    except ValidationError as exc:
        raise BadSetting(describe_bad_settings(exc)) from None
    register_secrets(settings.secret_values())
    return settings


# `CAPWORKS_*` names that are no setting yet are expected: the test harness's, the farm and soak
# runs', the install scripts' and the compose file's database role (prefixes and whole names).
NOT_SETTINGS = ("CAPWORKS_TEST_", "CAPWORKS_FARM_", "CAPWORKS_SOAK_", "CAPWORKS_DB_")
NOT_SETTING_NAMES = frozenset({"CAPWORKS_VENV", "CAPWORKS_TRAIN_VENV", "CAPWORKS_REQUIRE_SERVICES"})


def unknown_variable_warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """One line per `CAPWORKS_*` variable that names no setting (a typo is otherwise ignored
    in silence), with the closest setting's name when one is close."""
    known = [f"CAPWORKS_{name.upper()}" for name in Settings.model_fields]
    lines = []
    for name in sorted(os.environ if environ is None else environ):
        upper = name.upper()
        if not upper.startswith("CAPWORKS_") or upper in known or upper in NOT_SETTING_NAMES:
            continue
        if upper.startswith(NOT_SETTINGS):
            continue
        # compared without the prefix every name shares, which would make any two look alike
        fields = [k.removeprefix("CAPWORKS_") for k in known]
        close = difflib.get_close_matches(upper.removeprefix("CAPWORKS_"), fields, n=1, cutoff=0.75)
        hint = f" (did you mean CAPWORKS_{close[0]}?)" if close else ""
        lines.append(f"{name} is not a capworks setting and is ignored{hint}")
    return lines

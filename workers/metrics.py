"""Prometheus metrics of one worker process, served at http://HOST:PORT/metrics (behind
`CAPWORKS_METRICS_TOKEN` when set: `schema/metrics_endpoint.py`).

`capworks worker` gives its N processes the ports `metrics_port` .. `metrics_port + N - 1`;
`metrics_port = 0` turns the endpoint off. The names follow Prometheus conventions: counters end
in `_total`, durations are histograms in seconds.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from pydantic import SecretStr

from capworks.schema.metrics_endpoint import start_metrics_server

log = logging.getLogger(__name__)

IMAGES = Counter(
    "capworks_images_total",
    "Images this process finished, by outcome (captioned, dead_letter, retry) and error code",
    ["outcome", "code"],
)
JOBS = Counter(
    "capworks_jobs_total",
    "Job deliveries by how they ended: done, duplicate, malformed, split, poison, retried, failed",
    ["result"],
)
DATABASE_WAITS = Counter(
    "capworks_database_waits_total",
    "Writes put off because the database could not be reached (each is tried again)",
)
BATCH_IMAGES = Histogram(
    "capworks_batch_images",
    "Images per model batch",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BATCH_SECONDS = Histogram(
    "capworks_batch_seconds",
    "Model time per batch (preprocessed pixels in, captions out)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
OOM_SPLITS = Counter("capworks_oom_splits_total", "Batches halved after CUDA out of memory")
ERROR_SPLITS = Counter(
    "capworks_error_splits_total", "Batches halved to find the image the model failed on"
)
JOB_SECONDS = Histogram(
    "capworks_job_seconds",
    "Wall time of one job, first fetch to commit",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)
WRITE_SECONDS = Histogram(
    "capworks_write_seconds",
    "Time to commit one job's results to the database",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
WAITING_IMAGES = Gauge("capworks_batcher_waiting_images", "Images waiting for a model batch")
WORKING_BATCH_IMAGES = Gauge(
    "capworks_batcher_working_batch_images",
    "The most images the next model batch may hold: the batch size, lowered after CUDA out of"
    " memory",
)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
FETCH_SECONDS = Histogram(
    "capworks_fetch_seconds",
    "Time to fetch one image's bytes (failures included)",
    buckets=STAGE_BUCKETS,
)
DECODE_SECONDS = Histogram(
    "capworks_decode_seconds",
    "Time to decode, check and resize one image (failures included)",
    buckets=STAGE_BUCKETS,
)
BATCH_WAIT_SECONDS = Histogram(
    "capworks_batch_wait_seconds",
    "Time one decoded image waited for its model batch to start",
    buckets=STAGE_BUCKETS,
)
MODEL_LOAD_SECONDS = Gauge(
    "capworks_model_load_seconds", "Time this process took to load its model"
)
GPU_MEMORY_BYTES = Gauge(
    "capworks_gpu_memory_bytes",
    "CUDA memory held by tensors after the last batch (in_use) and its peak since start (peak)",
    ["kind"],
)

UPLOAD_TO_CAPTION_SECONDS = Histogram(
    "capworks_upload_to_caption_seconds",
    "Time from an object's upload (its storage event's time) to its caption's commit; event"
    " jobs only",
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400),
)
# An upload time further ahead of this process's clock than this is not a clock's skew but a
# wrong time (milliseconds sent as seconds, a clock years off): it is left out, not observed.
MAX_CLOCK_SKEW_S = 300.0


def upload_latency_s(upload_time_s: float | None, now_s: float) -> float | None:
    """Seconds from upload to `now_s` (Unix times): a little clock skew counts as 0; no upload
    time, or one more than `MAX_CLOCK_SKEW_S` in the future, gives None (nothing observed)."""
    if upload_time_s is None or upload_time_s - now_s > MAX_CLOCK_SKEW_S:
        return None
    return max(now_s - upload_time_s, 0.0)


def observe_upload_latency(upload_time_s: float | None, captioned: int) -> None:
    """Observe upload -> caption latency once for each of `captioned` images just committed."""
    latency_s = upload_latency_s(upload_time_s, time.time())
    if latency_s is None:
        return
    for _ in range(captioned):
        UPLOAD_TO_CAPTION_SECONDS.observe(latency_s)


def serve(host: str, port: int, token: SecretStr | None = None) -> bool:
    """Start the /metrics endpoint in a background thread, behind `token` when set; False
    (logged) when it cannot bind. Where it may listen is checked at start-up (`check_bind`)."""
    if port == 0:
        return False
    try:
        start_metrics_server(host, port, REGISTRY, token)
    except OSError as exc:
        log.warning("metrics endpoint on %s:%d not started: %s", host, port, exc)
        return False
    log.info("metrics at http://%s:%d/metrics%s", host, port, " (token required)" if token else "")
    return True

"""The Celery task shell: validate, isolate poison, run a suspect job alone, count the run,
run the job, retry transient failures with backoff, dead-letter the rest. The work itself is
`workers.job.run_job`. A database outage is waited out inside the job (`Runtime.durably`): the
message is acknowledged only once its outcome is committed.

Start a worker with `capworks worker` (which runs `celery -A capworks.workers.tasks worker ...`).
"""

from __future__ import annotations

import logging
import time
import traceback
from functools import partial
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject
from celery.signals import setup_logging, worker_init, worker_ready, worker_shutdown

from capworks.schema import heartbeat
from capworks.schema.broker_check import check_broker
from capworks.schema.errors import CapworksError, Code
from capworks.schema.jobs import Job, MalformedJob, derived_job_id, parse_message
from capworks.schema.logs import quiet_libraries
from capworks.schema.metrics_endpoint import check_bind
from capworks.schema.queue import CAPTION_TASK, make_celery, make_redis, task_reprs
from capworks.schema.redact import install_log_redaction
from capworks.schema.redis_transport import quarantine_key, record_quarantined_with
from capworks.schema.settings import get_settings
from capworks.schema.startup import wait_until_reachable
from capworks.workers import metrics, policy
from capworks.workers.engine import CaptionedImage
from capworks.workers.job import run_job
from capworks.workers.leases import LeaseStep, exit_stalled
from capworks.workers.ledger import GAVE_UP_KEY
from capworks.workers.outcome import Outcome
from capworks.workers.policy import Before
from capworks.workers.runtime import Runtime, built_runtime, get_runtime

log = logging.getLogger(__name__)
settings = get_settings()
app = make_celery(settings)
app.steps["consumer"].add(LeaseStep)


@setup_logging.connect  # type: ignore[untyped-decorator]
def configure_logging(loglevel: int | str | None = None, **_: Any) -> None:
    """One log format for the worker process, with timestamps (Celery's own is left off)."""
    logging.basicConfig(
        level=loglevel or logging.INFO,
        format="[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s",
        force=True,  # libraries imported earlier may have installed a handler of their own
    )
    install_log_redaction()


@worker_init.connect  # type: ignore[untyped-decorator]
def load_before_taking_jobs(sender: Any = None, **_: Any) -> None:
    """Load the model and open connections before consuming: a worker that cannot (a missing
    checkpoint, a bad database URL, a broker that would evict queued jobs, metrics that would
    listen off loopback with no token) exits instead of taking jobs and failing them; a broker or
    database that is down (restarting) is waited for, up to `start_wait_s`. Then one generated
    image is captioned: a model that does not answer within `heartbeat_stale_s` (a GPU still
    hung after the restart of a stalled process) ends the process as stalled, holding no job.

    Celery sets up logging after this signal: our format and level come first here, and the
    model libraries are quieted before and after the model loads (they log as they import)."""
    level = getattr(sender, "loglevel", None) or logging.INFO
    configure_logging(level)
    quiet_libraries(level, import_transformers=True)
    heartbeat.name_node(str(getattr(sender, "hostname", "") or ""))
    try:
        if settings.metrics_port:
            check_bind(settings.metrics_host, settings.metrics_token, settings.metrics_allow_open)
        broker = make_redis(settings)
        warnings = wait_until_reachable(
            lambda: check_broker(broker, settings.allow_evicting_broker),
            "the broker",
            settings.start_wait_s,
        )
        for warning in warnings:
            log.warning("%s", warning)
        rt = get_runtime(settings)
        quiet_libraries(level)  # a library may have lowered the root logger while loading
        probed = rt.path.probe(settings.heartbeat_stale_s)
    except Exception as exc:  # noqa: BLE001 - any start-up failure stops this worker
        log.critical("cannot start the worker: %s", exc)
        raise SystemExit(1) from exc
    if not probed:  # the device hangs before any job is held: none runs twice for it
        exit_stalled(settings.heartbeat_stale_s)


def record_quarantined(queue: str, item: bytes, reason: str) -> None:
    """Keep a queue entry that was no Celery message (the transport moved it to the queue's
    quarantine list) in `bad_messages`. One try, not `durably`: this runs in the consumer's
    loop, and the entry is kept in the list whatever happens here."""
    where = quarantine_key(queue)
    error = CapworksError(
        Code.MALFORMED_MESSAGE, f"not a Celery message, moved to {where}: {reason}"
    )
    body = item.decode("utf-8", "backslashreplace") if isinstance(item, bytes) else item
    get_runtime(settings).writer.save_message_failure(where, error, body)
    metrics.JOBS.labels("malformed").inc()


record_quarantined_with(record_quarantined)


@worker_ready.connect  # type: ignore[untyped-decorator]
def serve_metrics(**_: Any) -> None:
    """Serve this process's Prometheus metrics once the worker is up."""
    metrics.serve(settings.metrics_host, settings.metrics_port, settings.metrics_token)


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def close_runtime(**_: Any) -> None:
    """After the warm shutdown's jobs are done: stop the model thread, drop the heartbeat."""
    rt = built_runtime()
    if rt is not None:
        rt.close()


@app.task(name=CAPTION_TASK, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def caption_job(self: Task, *args: Any, **kwargs: Any) -> dict[str, int | str]:
    """Caption one job message `(body, attempt=1)`; see the module docstring for the policy.

    Whatever arrives ends as captions, dead letters or a `bad_messages` row. If even recording
    an outcome fails, the message is handed back to the queue rather than acknowledged, at most
    `max_record_requeues` times (`hand_back`).
    """
    rt = get_runtime(settings)
    try:
        return with_outcome(handle_message(rt, args, kwargs, str(self.request.id)))
    except Exception as exc:  # noqa: BLE001 - nothing was recorded: requeue, never acknowledge
        return with_outcome(hand_back(rt, str(self.request.id), args, kwargs, exc))


def with_outcome(counts: dict[str, int]) -> dict[str, int | str]:
    """A job's counts with a word for Flower's Result column, where every handled job is
    SUCCESS: `all dead-lettered` when no image of it was captioned or is being retried,
    `some dead-lettered` when some were."""
    dead = counts.get("dead_lettered", 0)
    if not dead:
        return dict(counts)
    alive = counts.get("captioned", 0) + counts.get("retrying", 0)
    return {**counts, "outcome": "some dead-lettered" if alive else "all dead-lettered"}


def hand_back(
    rt: Runtime, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any], exc: Exception
) -> dict[str, int]:
    """A message whose outcome could not be recorded goes back to the queue; once it has gone
    back `max_record_requeues` times (an error the database keeps giving: a dropped table, a
    revoked grant), it is set aside in Redis with the cause, logged at error, and acknowledged,
    instead of coming back every few seconds for ever. A database outage never gets here: writes
    wait it out (`Runtime.durably`)."""
    try:
        requeues = rt.ledger.count_requeue(task_id)
    except redis.RedisError as count_exc:
        log.warning("task %s: hand-back not counted (%s)", task_id, count_exc)
        requeues = 0
    if requeues > settings.max_record_requeues:
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500]
        entry = {
            "task_id": task_id,
            "args": list(args),
            "kwargs": kwargs,
            "reason": f"{type(exc).__name__}: {cause}",
            "requeues": requeues - 1,
            "at": time.time(),
        }
        try:
            rt.ledger.give_up(task_id, entry)
        except redis.RedisError as give_up_exc:
            log.warning("task %s: not set aside (%s); handing it back", task_id, give_up_exc)
        else:
            log.error(
                "task %s: recording its outcome failed %d times (%s); gave up: set aside in %s "
                "and dropped from the queue",
                task_id,
                requeues,
                entry["reason"],
                GAVE_UP_KEY,
                exc_info=exc,
            )
            metrics.JOBS.labels("gave_up").inc()
            return {"gave_up": 1}
    log.exception(
        "task %s: recording its outcome failed; handing it back (%d of %d)",
        task_id,
        requeues,
        settings.max_record_requeues,
    )
    metrics.JOBS.labels("requeued").inc()
    time.sleep(settings.retry_base_s)  # no hot loop when the cause lasts
    raise Reject(exc, requeue=True) from exc


def handle_message(
    rt: Runtime, args: tuple[Any, ...], kwargs: dict[str, Any], task_id: str
) -> dict[str, int]:
    """Validate the message, keep what is malformed in `bad_messages`, run the job."""
    try:
        received = parse_message(args, kwargs)
    except MalformedJob as exc:
        body = args[0] if args else kwargs.get("body")
        key = body.get("id") if isinstance(body, dict) else None
        log.error("dead-lettering malformed message %s: %s", task_id, exc.message)
        message = body if len(args) == 1 and not kwargs else {"args": args, "kwargs": kwargs}
        rt.durably(partial(rt.writer.save_message_failure, str(key or task_id), exc, message))
        metrics.JOBS.labels("malformed").inc()
        return {"dead_lettered": 1}
    job = received.job
    for bad in received.rejected:
        log.error("job %s: image entry %d left out: %s", job.job_id, bad.index, bad.reason)
        error = MalformedJob(f"image entry {bad.index}: {bad.reason}")
        rt.durably(partial(rt.writer.save_message_failure, job.job_id, error, bad.entry))
    # A copy delivered again while the first still runs here (a job outliving the visibility
    # timeout) waits for it, then finds it done.
    with rt.slots.one_copy(job.job_id):
        result = run_once(rt, job, received.attempt)
    if received.rejected:
        result["dead_lettered"] = result.get("dead_lettered", 0) + len(received.rejected)
    return result


def run_once(rt: Runtime, job: Job, attempt: int) -> dict[str, int]:
    """Carry out `policy.before_run`, run the job, carry out the decision after it."""
    deaths = rt.ledger.unfinished_runs(job.job_id)
    wrong_model = job.model is not None and job.model != rt.config.identity
    done = rt.ledger.is_done(job.job_id)
    before = policy.before_run(done, deaths, len(job.images), settings, wrong_model)
    if before is Before.DROP_DUPLICATE:
        log.info("job %s was already committed; dropping the redelivered copy", job.job_id)
        metrics.JOBS.labels("duplicate").inc()
        return {"duplicate": 1}
    if before is Before.WRONG_MODEL and job.model is not None:
        return dead_letter_wrong_model(rt, job, job.model)
    if before is Before.SPLIT:
        return split(rt, job, deaths)
    if before is Before.POISON:
        return dead_letter_poison(rt, job, deaths)
    with rt.slots.hold(exclusive=before is Before.RUN_ALONE):
        log.info("job %s: attempt %d starts, %d images", job.job_id, attempt, len(job.images))
        rt.ledger.count_run(job.job_id)
        try:
            result = run_job(job, rt)
        except Exception as exc:  # noqa: BLE001 - retried, then recorded per image; never lost
            return retry_whole_job(rt, job, exc, attempt)
    after = policy.after_images_failed(result.transient, attempt, settings)
    if after.dead_letters:
        rt.save([Outcome(ref, err) for ref, err in after.dead_letters], job_id=job.job_id)
    if after.retry:
        for _, err in result.transient:
            metrics.IMAGES.labels("retry", err.code.value).inc()
        log.warning(
            "job %s: %d images failed transiently (%s); retry %d in %.1f s",
            job.job_id,
            len(after.retry),
            result.transient[0][1].code.value,
            attempt + 1,
            after.delay_s,
        )
        send_again(job, after, "r", attempt)
    rt.ledger.mark_done(job.job_id)
    metrics.JOBS.labels("done").inc()
    return {
        "captioned": result.captioned,
        "dead_lettered": result.dead_lettered + len(after.dead_letters),
        "retrying": len(after.retry),
    }


def send_again(job: Job, after: policy.After, kind: str, attempt: int) -> None:
    """Publish the images to retry as a job with a derived id, after the decided delay."""
    again = job.derived(after.retry, derived_job_id(job.job_id, kind, attempt))
    body = again.to_wire()
    caption_job.apply_async(
        args=[body, attempt + 1], countdown=after.delay_s, **task_reprs(body, attempt + 1)
    )


def retry_whole_job(rt: Runtime, job: Job, exc: Exception, attempt: int) -> dict[str, int]:
    """A job that failed as a whole (a bug, a model that fails on every image) is sent again
    after a backoff; at the attempt cap its images are dead-lettered with the traceback."""
    after = policy.after_job_failed(job.images, exc, attempt, settings)
    if after.dead_letters:
        log.error("job %s failed %d times; dead-lettering its images: %r", job.job_id, attempt, exc)
        trace = "".join(traceback.format_exception(exc))
        outcomes: list[Outcome[CaptionedImage]] = [Outcome(r, e) for r, e in after.dead_letters]
        rt.save(outcomes, job_id=job.job_id, trace=trace)
        rt.ledger.mark_done(job.job_id)
        metrics.JOBS.labels("failed").inc()
        return {"dead_lettered": len(job.images)}
    log.warning(
        "job %s failed (%r); attempt %d in %.1f s", job.job_id, exc, attempt + 1, after.delay_s
    )
    send_again(job, after, "a", attempt)
    rt.ledger.mark_done(job.job_id)
    metrics.JOBS.labels("retried").inc()
    return {"retrying": len(job.images)}


def split(rt: Runtime, job: Job, deaths: int) -> dict[str, int]:
    """A job whose worker died too often while it ran is split into single-image jobs, so one
    bad image cannot keep killing workers."""
    log.error(
        "job %s was running when its worker died %d times: splitting its %d images",
        job.job_id,
        deaths,
        len(job.images),
    )
    for i, ref in enumerate(job.images):
        single = job.derived([ref], derived_job_id(job.job_id, "s", i))
        body = single.to_wire()
        caption_job.apply_async(args=[body], **task_reprs(body))
    rt.ledger.mark_done(job.job_id)
    metrics.JOBS.labels("split").inc()
    return {"split": len(job.images)}


def dead_letter_wrong_model(rt: Runtime, job: Job, model: tuple[str, str, str]) -> dict[str, int]:
    """A job the producer made for another caption identity (`model`, the job's) is not
    captioned under this one."""
    wanted = "{} revision {!r} settings {}".format(*model)
    served = "{} revision {!r} settings {}".format(*rt.config.identity)
    log.error(
        "job %s is for %s; this worker serves %s: dead-lettering it", job.job_id, wanted, served
    )
    error = CapworksError(Code.WRONG_MODEL, f"job is for {wanted}; the worker serves {served}")
    # The letters name the job's identity: a caption by this worker's model must not clear
    # them, and `dlq replay` sends them to workers serving the model they were made for.
    outcomes: list[Outcome[CaptionedImage]] = [Outcome(ref, error) for ref in job.images]
    rt.durably(partial(rt.writer.save, outcomes, job_id=job.job_id, model=model))
    metrics.IMAGES.labels("dead_letter", Code.WRONG_MODEL.value).inc(len(outcomes))
    rt.ledger.mark_done(job.job_id)
    metrics.JOBS.labels("wrong_model").inc()
    return {"dead_lettered": len(job.images)}


def dead_letter_poison(rt: Runtime, job: Job, deaths: int) -> dict[str, int]:
    """A single image whose worker died too often while captioning it is dead-lettered."""
    ref = job.images[0]
    log.error("image %s killed its worker %d times: dead-lettering it", ref.uri, deaths)
    error = CapworksError(Code.POISON, f"worker died {deaths} times while captioning it")
    rt.save(
        [Outcome(ref, error)], job_id=job.job_id, trace="".join(traceback.format_stack(limit=5))
    )
    rt.ledger.mark_done(job.job_id)
    metrics.JOBS.labels("poison").inc()
    return {"dead_lettered": 1}

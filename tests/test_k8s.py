"""deploy/k8s/ without a cluster: the built-in kinds pass Kubernetes' own schemas
(kubernetes-validate, strict), the KEDA objects are checked field by field, every command parses
in our CLI, every CAPWORKS_* variable is a setting, no secret is written in the files, and the
worker's preStop hook, run in a PID namespace whose PID 1 is a real `capworks worker`, makes it
drain and exit 0 (the readiness command's verdicts are tests/test_status.py's)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, require_service

from capworks.cli import build_parser
from capworks.commands.worker import parse_gpus
from capworks.schema.settings import Settings

K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.37.0"
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|DATABASE_URL|ACCESS_KEY")


def manifests() -> list[dict[str, Any]]:
    """Every object the kustomization applies, in its order."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [
        doc
        for name in kustomization["resources"]
        for doc in yaml.safe_load_all((K8S / name).read_text())
        if doc
    ]


def one(kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in manifests() if doc["kind"] == kind]
    return found


def pod_spec(kind: str) -> dict[str, Any]:
    doc = one(kind)
    spec = doc["spec"]["jobTemplate"]["spec"] if kind == "CronJob" else doc["spec"]
    return spec["template"]["spec"]  # type: ignore[no-any-return]


def test_the_kustomization_applies_every_manifest_in_the_folder() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    kinds = sorted(doc["kind"] for doc in manifests())
    assert kinds == ["ConfigMap", "CronJob", "Deployment", "ScaledObject", "TriggerAuthentication"]
    assert {i["name"] for i in kustomization["images"]} == {"capworks-worker", "capworks-producer"}


def test_built_in_kinds_pass_kubernetes_own_schemas() -> None:
    import kubernetes_validate

    built_in = [doc for doc in manifests() if not doc["apiVersion"].startswith("keda.sh/")]
    assert len(built_in) == 3
    for doc in built_in:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    # The check reads the fields we wrote: a misspelt one is refused.
    broken = copy.deepcopy(one("Deployment"))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 600
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_worker_pods_take_one_gpu_each_and_are_ready_on_their_own_heartbeat() -> None:
    spec = pod_spec("Deployment")
    (container,) = spec["containers"]
    assert container["image"] == "capworks-worker"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    args = build_parser().parse_args(container["args"])
    assert args.command == "worker" and parse_gpus(args.gpus) == ["0"]  # one process, one GPU
    probe = container["readinessProbe"]["exec"]["command"]
    # This pod's own heartbeat (its hostname), not the database: workers wait an outage out.
    assert probe == ["capworks", "health", "--worker", "--no-database"]
    build_parser().parse_args(probe[1:])
    strategy = one("Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxSurge"] == 0  # no pod waits for a GPU that a surge would need


def test_a_stopping_pod_has_room_to_finish_the_batch_it_runs() -> None:
    spec = pod_spec("Deployment")
    grace_s = spec["terminationGracePeriodSeconds"]
    # A batch running longer than heartbeat_stale_s is judged hung; the grace covers several.
    assert grace_s >= 5 * Settings().heartbeat_stale_s
    hook = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert hook == ["/bin/sh", "-c", "kill -TERM 1"]
    entrypoint = (REPO / "docker" / "worker.Dockerfile").read_text()
    assert 'ENTRYPOINT ["capworks"]' in entrypoint  # exec form: capworks is PID 1 of the pod


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def test_the_pre_stop_hook_drains_a_real_worker_that_is_pid_1(
    tmp_path: Path, tiny_dir: Path
) -> None:
    """PID 1 of a PID namespace is `capworks worker --gpus cpu`, as in the pod; the hook, run
    inside that namespace, makes it stop its Celery process and exit 0."""
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            require_service(tool, "not on PATH")
    if subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode:
        require_service("a PID namespace", "unshare --pid is not permitted here")
    hook = pod_spec("Deployment")["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    db = os.environ.get("CAPWORKS_TEST_REDIS_DB", "15")
    env = {
        **os.environ,
        "CAPWORKS_BROKER_URL": f"redis://127.0.0.1:6379/{db}",
        "CAPWORKS_QUEUE_NAME": f"k8s-drain-{os.getpid()}",
        "CAPWORKS_DATABASE_URL": f"sqlite:///{tmp_path / 'drain.db'}",
        "CAPWORKS_METRICS_PORT": "0",
        "CAPWORKS_MODEL": str(tiny_dir),  # a local folder: resolved at once
    }
    capworks = str(Path(sys.executable).parent / "capworks")
    pod = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", capworks, "worker", "--gpus", "cpu"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        pid_1: list[int] = []
        while time.monotonic() < deadline:  # PID 1 is up once it has started its Celery child
            pid_1 = children_of(pod.pid)
            if pid_1 and children_of(pid_1[0]):
                break
            assert pod.poll() is None, pod.stderr.read() if pod.stderr else ""
            time.sleep(0.1)
        assert pid_1 and children_of(pid_1[0]), "the worker started no Celery process"
        done = subprocess.run(
            ["nsenter", "--target", str(pid_1[0]), "--pid", *hook],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert done.returncode == 0, done.stderr
        # The kernel ignores a signal PID 1 has no handler for: only a drain ends it.
        assert pod.wait(timeout=90) == 0
    finally:
        if pod.poll() is None:
            pod.kill()
            pod.wait()


def test_keda_scales_the_worker_on_the_queue_the_workers_read() -> None:
    scaled = one("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == one("Deployment")["metadata"]["name"]
    assert 0 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    assert spec["cooldownPeriod"] >= 300  # a model load takes minutes: no stop at every lull
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "redis"
    metadata = trigger["metadata"]
    assert metadata["listName"] == Settings().queue_name  # `LLEN capworks`: jobs waiting
    assert all(isinstance(v, str) for v in metadata.values())  # KEDA's metadata is strings
    assert int(metadata["listLength"]) >= Settings().prefetch_jobs
    assert int(metadata["databaseIndex"]) == 0
    # The address comes from the worker's own environment, the password from the Secret.
    worker_env = {e["name"] for e in pod_spec("Deployment")["containers"][0]["env"]}
    assert metadata["addressFromEnv"] in worker_env
    assert "password" not in metadata and "passwordFromEnv" not in metadata
    auth = one("TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "password"
    redis_password = secret_refs()["REDIS_PASSWORD"]
    assert (ref["name"], ref["key"]) == redis_password


def secret_refs() -> dict[str, tuple[str, str]]:
    """Each variable taken from a Secret, in the worker and the CronJob: (secret, key)."""
    found = {}
    for kind in ("Deployment", "CronJob"):
        for container in pod_spec(kind)["containers"]:
            for var in container["env"]:
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    found[var["name"]] = (ref["name"], ref["key"])
    return found


def test_secrets_are_referenced_never_written() -> None:
    assert not [doc for doc in manifests() if doc["kind"] == "Secret"]
    for doc in manifests():
        if doc["kind"] == "ConfigMap":
            assert not [k for k in doc["data"] if SECRET_NAME.search(k)], doc["data"]
    for kind in ("Deployment", "CronJob"):
        for container in pod_spec(kind)["containers"]:
            defined: set[str] = set(
                yaml.safe_load((K8S / "config.yaml").read_text())["data"]
            )  # envFrom: the ConfigMap's keys
            for var in container["env"]:
                name, value = var["name"], var.get("value")
                if SECRET_NAME.search(name) and "BROKER_URL" not in name:
                    assert "secretKeyRef" in var.get("valueFrom", {}), f"{kind} {name}"
                if value is not None:
                    literal = re.sub(r"\$\([A-Z_]+\)", "", value)  # references are fine
                    assert not SECRET_NAME.search(literal), f"{kind} {name}: {value}"
                    used = set(re.findall(r"\$\(([A-Z_]+)\)", value))
                    assert used <= defined, f"{kind} {name} uses {used - defined} before it is set"
                defined.add(name)
    refs = secret_refs()
    assert {"REDIS_PASSWORD", "CAPWORKS_DATABASE_URL", "CAPWORKS_METRICS_TOKEN"} <= refs.keys()
    assert {secret for secret, _ in refs.values()} == {"capworks"}
    documented = (K8S / "kustomization.yaml").read_text()
    for _, key in refs.values():
        assert f"--from-file={key}=" in documented, f"how to create {key} is not shown"


def test_the_producer_crawls_on_a_schedule_one_crawl_at_a_time() -> None:
    cron = one("CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = pod_spec("CronJob")["containers"]
    assert container["image"] == "capworks-producer"
    args = build_parser().parse_args(container["args"])
    assert args.command == "enqueue" and args.no_progress  # a log, not a progress bar
    assert pod_spec("CronJob")["restartPolicy"] in {"Never", "OnFailure"}


def test_every_capworks_variable_is_a_real_setting() -> None:
    known = {f"CAPWORKS_{name.upper()}" for name in Settings.model_fields}
    used = set(one("ConfigMap")["data"])
    for kind in ("Deployment", "CronJob"):
        for container in pod_spec(kind)["containers"]:
            used |= {var["name"] for var in container["env"]}
    used = {name for name in used if name.startswith("CAPWORKS_")}
    assert len(used) >= 8
    assert used <= known, f"not settings: {sorted(used - known)}"

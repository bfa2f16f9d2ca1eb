"""A Redis primary, a replica and three Sentinels of a test's own on loopback ports, every one
with a password (the Sentinels' own is another), for failover tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from pipeline_support import free_port
from redis_server import RedisServer

MASTER_NAME = "capworks-test"
PASSWORD = "primary-pw-0123456789"
SENTINEL_PASSWORD = "sentinel-pw-0123456789"


class SentinelGroup:
    """Primary and replica (`RedisServer`s, append-only) watched by three Sentinels that call
    the primary down after `down_after_ms` without a reply (quorum 2)."""

    def __init__(self, data: Path, down_after_ms: int = 1000) -> None:
        aof = ["--appendonly", "yes", "--masterauth", PASSWORD]
        self.primary = RedisServer(free_port(), data / "primary", aof, password=PASSWORD)
        replica_of = ["--replicaof", "127.0.0.1", str(self.primary.port)]
        self.replica = RedisServer(free_port(), data / "replica", [*aof, *replica_of], PASSWORD)
        self.data, self.down_after_ms = data, down_after_ms
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """The `sentinel://` broker URL: the Redis password on the first Sentinel, as kombu."""
        first, *rest = self.sentinel_ports
        more = "".join(f";sentinel://127.0.0.1:{port}" for port in rest)
        return f"sentinel://:{PASSWORD}@127.0.0.1:{first}/0{more}"

    def env(self) -> dict[str, str]:
        """The settings that point capworks at the group."""
        return {
            "CAPWORKS_BROKER_URL": self.url,
            "CAPWORKS_REDIS_MASTER_NAME": MASTER_NAME,
            "CAPWORKS_REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
        }

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        for i, port in enumerate(self.sentinel_ports):
            folder = self.data / f"sentinel{i}"
            folder.mkdir(parents=True, exist_ok=True)
            conf = folder / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"requirepass {SENTINEL_PASSWORD}\nsentinel sentinel-pass {SENTINEL_PASSWORD}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel auth-pass {MASTER_NAME} {PASSWORD}\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}\n"
                f"sentinel failover-timeout {MASTER_NAME} 10000\n"
            )
            log = (folder / "sentinel.log").open("ab")
            cmd = ["redis-server", str(conf), "--sentinel"]
            self.sentinels.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        self.wait(lambda: self.replica_synced() and self.sentinels_agree(3), 30, "a synced group")

    def sentinel(self, i: int = 0) -> redis.Redis:
        port = self.sentinel_ports[i]
        return redis.Redis(port=port, password=SENTINEL_PASSWORD, socket_timeout=2)

    def master_port(self, i: int = 0) -> int:
        """The primary's port, as Sentinel `i` names it."""
        host_port = self.sentinel(i).sentinel_get_master_addr_by_name(MASTER_NAME)
        return int(host_port[1])

    def sentinels_agree(self, known: int) -> bool:
        """Whether Sentinel 0 knows the replica and `known` - 1 other Sentinels."""
        state = self.sentinel(0).sentinel_master(MASTER_NAME)
        return int(state["num-slaves"]) >= 1 and int(state["num-other-sentinels"]) >= known - 1

    def replica_synced(self) -> bool:
        info = redis.Redis.from_url(self.replica.url).info("replication")
        return info.get("master_link_status") == "up"

    def replica_synced_fully(self) -> bool:
        """Whether the replica has every write the primary acknowledged so far."""
        primary = redis.Redis.from_url(self.primary.url).info("replication")
        replica = redis.Redis.from_url(self.replica.url).info("replication")
        return int(replica["slave_repl_offset"]) >= int(primary["master_repl_offset"])

    def kill_primary(self) -> None:
        """SIGKILL the primary: whatever the replica had not received is gone."""
        assert self.primary.proc is not None
        self.primary.proc.kill()
        self.primary.proc.wait()
        self.primary.proc = None

    def pause_replica(self) -> None:
        """SIGSTOP the replica and have the primary drop its link: writes from now on never
        reach it (replication is asynchronous: the primary goes on acknowledging them). A
        stopped replica alone would still get them: the kernel buffers its socket."""
        assert self.replica.proc is not None
        os.kill(self.replica.proc.pid, signal.SIGSTOP)
        redis.Redis.from_url(self.primary.url).client_kill_filter(_type="replica")

    def resume_replica(self) -> None:
        assert self.replica.proc is not None
        os.kill(self.replica.proc.pid, signal.SIGCONT)

    def wait_failover(self, timeout_s: float = 60) -> None:
        """Until every Sentinel names the replica as the primary."""
        promoted = self.replica.port
        self.wait(
            lambda: all(self.master_port(i) == promoted for i in range(3)),
            timeout_s,
            "the Sentinels to promote the replica",
        )

    def new_primary(self) -> redis.Redis:
        return redis.Redis.from_url(self.replica.url, socket_timeout=5)

    def stop(self) -> None:
        for proc in self.sentinels:
            proc.kill()
            proc.wait()
        self.sentinels.clear()
        if self.replica.proc is not None:
            self.resume_replica()
        self.replica.stop()
        self.primary.stop()

    def wait(self, check: object, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if check():  # type: ignore[operator]
                    return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                logs = [p.read_text(errors="replace")[-1500:] for p in self.data.glob("*/*.log")]
                raise AssertionError(
                    f"timed out after {timeout_s:.0f} s: {what}\n" + "\n".join(logs)
                )
            time.sleep(0.2)


@contextmanager
def sentinel_group(data: Path, down_after_ms: int = 1000) -> Iterator[SentinelGroup]:
    """A started `SentinelGroup`, stopped afterwards (also when the test fails)."""
    group = SentinelGroup(data, down_after_ms)
    try:
        group.start()
        yield group
    finally:
        group.stop()

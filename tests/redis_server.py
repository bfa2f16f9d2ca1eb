"""A redis-server of a test's own on a loopback port (the shared one on 6379 is never stopped):
for restarts, append-only persistence, passwords or TLS."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import redis
from conftest import require_service
from pipeline_support import free_port


class RedisServer:
    """`redis-server` bound to 127.0.0.1:`port`, keeping its files in `data`; `args` are more
    of its options (`--appendonly yes`, TLS ones); `password` sets `--requirepass`."""

    def __init__(
        self, port: int, data: Path, args: Sequence[str] = (), password: str | None = None
    ) -> None:
        if shutil.which("redis-server") is None:
            require_service("redis-server", "not installed")
        self.port, self.data, self.password = port, data, password
        self.args = [*args, *(["--requirepass", password] if password else [])]
        self.proc: subprocess.Popen[bytes] | None = None
        data.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, ready: bool = True) -> None:
        cmd = [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data),
            "--save",
            "",
            *self.args,
        ]
        log = (self.data / "redis.log").open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        if ready:
            self.wait_ready()

    def wait_ready(self, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if redis.Redis.from_url(self.url, socket_timeout=1).ping():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError((self.data / "redis.log").read_text(errors="replace"))
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@contextmanager
def own_redis(data: Path, args: Sequence[str] = ()) -> Iterator[RedisServer]:
    """A running `RedisServer` on a free port, stopped afterwards: for a test that stops Redis
    or changes a server-wide setting (the shared one on 6379 serves tests running beside it)."""
    server = RedisServer(free_port(), data, args)
    server.start()
    try:
        yield server
    finally:
        server.stop()

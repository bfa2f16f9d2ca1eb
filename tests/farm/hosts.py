"""A farm of hosts on one machine, made of Linux namespaces: a services host (Redis append-only
with a password, a PostgreSQL cluster of the farm's own), worker hosts that look like
`docker compose --scale` replicas (each its own network, UTS and PID namespace, all named
`worker`, the real `capworks worker --gpus cpu` supervisor as PID 1), and a producer host.

Hosts sit on a bridge in a "switch" namespace, on 198.18.<n>.0/24 (the benchmarking range, which
no real network uses); no namespace has a default route, so nothing leaves the machine. The test
itself reaches the hosts through one veth of its own (198.18.<n>.254). Images are files on the
machine's disk, which every host sees (a shared mount, as NFS would be).

Named steps: `start_host`, `start_worker`, `partition`, `heal`, `kill_host`, `skew_clock`.
Everything a farm makes is named after its id (`cwf` + 4 hex digits): `remove_leftovers` finds
and removes what a crashed run left by that prefix; `close` removes the farm's own.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import redis
from redis.sentinel import Sentinel

PREFIX = "cwf"
CAPWORKS = Path(sys.executable).parent / "capworks"
PG_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
REDIS_PASSWORD = "farm-" + uuid.uuid4().hex[:12]
REDIS_PORT, PG_PORT = 6379, 5432
# With sentinels: a replica beside the primary on the services host, and three Sentinels.
REPLICA_PORT, SENTINEL_PORTS, MASTER_NAME = 6380, (26379, 26380, 26381), "capworks"
RUN_LINE = re.compile(r"job (\S+): attempt (\d+) starts")
LIBFAKETIME = sorted(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"))
MONOTONIC_SLEEP = Path(__file__).with_name("monotonic_sleep.c")


def sh(*cmd: str, check: bool = True) -> str:
    """Run a command, return its output; a failure raises with its stderr."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done.stdout


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


@dataclass
class Host:
    """One namespace: its name, address, log and the processes started in it."""

    ns: str
    addr: str
    log: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ready_at: int = 0  # "ready." lines in its log when its worker was last started

    def pid1(self) -> int | None:
        """The host's PID 1 (a worker host's supervisor), seen from outside; None when down."""
        for proc in self.procs:
            if proc.poll() is None:
                kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                if kids:
                    return int(kids[0])
        return None

    def workers(self) -> list[int]:
        """The host's Celery worker processes (children of its supervisor), seen from outside."""
        pid1 = self.pid1()
        if pid1 is None:
            return []
        path = Path(f"/proc/{pid1}/task/{pid1}/children")
        return [int(k) for k in path.read_text().split()] if path.exists() else []

    def runs(self) -> Counter[tuple[str, int]]:
        """Each (job id, attempt) this host's worker processes logged starting."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return Counter((job, int(attempt)) for job, attempt in RUN_LINE.findall(text))


class Farm:
    """The namespaces, servers and workers of one farm."""

    def __init__(self, worker_env: dict[str, str] | None = None, sentinels: bool = False) -> None:
        self.id = f"{PREFIX}{uuid.uuid4().hex[:4]}"
        self.net = 1 + int(self.id[-2:], 16) % 250  # 198.18.<net>.0/24
        self.root = Path(tempfile.mkdtemp(prefix=f"{self.id}-"))
        self.root.chmod(0o755)  # PostgreSQL runs as `postgres` and keeps its data under it
        (self.root / "owner").write_text(str(os.getpid()))  # a live owner's farm is not a leftover
        self.images = self.root / "images"  # what the producer crawls and the workers read
        self.images.mkdir()
        self.worker_env = worker_env or {}
        self.sentinels = sentinels  # capworks reaches Redis through three Sentinels
        self.redis_procs: dict[str, subprocess.Popen[bytes]] = {}  # "primary", "replica"
        self.hosts: dict[str, Host] = {}
        self.services: Host | None = None  # set by `start`
        self.producer: Host | None = None

    def addr(self, last: int) -> str:
        return f"198.18.{self.net}.{last}"

    @property
    def broker_url(self) -> str:
        """What capworks is given: the primary's URL, or the Sentinels' (`sentinel://`)."""
        if self.sentinels:
            first, *more = (f"{self.addr(1)}:{port}" for port in SENTINEL_PORTS)
            rest = "".join(f";sentinel://{address}" for address in more)
            return f"sentinel://:{REDIS_PASSWORD}@{first}/0{rest}"
        return self.redis_url(REDIS_PORT)

    def redis_url(self, port: int) -> str:
        return f"redis://:{REDIS_PASSWORD}@{self.addr(1)}:{port}/0"

    @property
    def db_url(self) -> str:
        return f"postgresql+psycopg://postgres@{self.addr(1)}:{PG_PORT}/capworks"

    def redis(self) -> redis.Redis:
        """The current primary (asked of the Sentinels, with them)."""
        if not self.sentinels:
            return redis.Redis.from_url(self.broker_url, socket_timeout=10)
        sentinels = [(self.addr(1), port) for port in SENTINEL_PORTS]
        kwargs = {"password": REDIS_PASSWORD, "socket_timeout": 10}
        found = Sentinel(sentinels, sentinel_kwargs=kwargs).master_for(MASTER_NAME, **kwargs)
        return cast(redis.Redis, found)

    # -- building -------------------------------------------------------------------------

    def start(self, workers: int) -> None:
        """The switch, the services host with Redis and PostgreSQL, a producer host and
        `workers` worker hosts, their models loaded."""
        switch = f"{self.id}-sw"
        sh("ip", "netns", "add", switch)
        sh("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", switch, "link", "set", "br0", "up")
        self._link(f"{self.id}-t", None, 254)  # the test's own way in
        self.services = self.start_host("svc", 1)
        self.producer = self.start_host("prod", 2)
        self._start_redis(self.services)
        if self.sentinels:
            self._start_sentinels(self.services)
        self._start_postgres(self.services)
        for i in range(workers):
            self.start_worker(self.start_host(f"w{i + 1}", 11 + i))
        for host in self.worker_hosts():
            self.wait_ready(host)

    def _link(self, name: str, ns: str | None, last: int) -> None:
        """A veth from the switch's bridge to `ns` (None: the test's own namespace)."""
        switch = f"{self.id}-sw"
        inside = "e0" if ns else name
        peer = ["peer", "name", f"v{last}", "netns", switch]
        sh("ip", "link", "add", f"{self.id}x{last}", "type", "veth", *peer)
        if ns:
            sh("ip", "link", "set", f"{self.id}x{last}", "netns", ns, "name", inside)
        else:
            sh("ip", "link", "set", f"{self.id}x{last}", "name", inside)
        sh("ip", "-n", switch, "link", "set", f"v{last}", "master", "br0", "up")
        prefix = ["ip", "-n", ns] if ns else ["ip"]
        sh(*prefix, "addr", "add", f"{self.addr(last)}/24", "dev", inside)
        sh(*prefix, "link", "set", inside, "up")
        if ns:
            sh(*prefix, "link", "set", "lo", "up")

    def start_host(self, name: str, last: int) -> Host:
        """A network namespace on the switch at 198.18.<net>.<last>, with no default route."""
        ns = f"{self.id}-{name}"
        sh("ip", "netns", "add", ns)
        self._link(ns, ns, last)
        host = Host(ns, self.addr(last), self.root / f"{name}.log")
        self.hosts[name] = host
        return host

    def _spawn(self, host: Host, cmd: list[str], env: dict[str, str] | None = None) -> None:
        out = host.log.open("ab")
        host.procs.append(subprocess.Popen(in_ns(host.ns, *cmd), stdout=out, stderr=out, env=env))

    def _start_redis(self, host: Host, port: int = REDIS_PORT, *more: str) -> None:
        """Redis on the services host (append-only, a password); `more` are more options."""
        data = self.root / f"redis{port}"
        data.mkdir()
        self._spawn(host, ["redis-server", "--bind", host.addr, "--port", str(port),
                           "--requirepass", REDIS_PASSWORD, "--masterauth", REDIS_PASSWORD,
                           "--dir", str(data), "--save", "", "--appendonly", "yes",
                           "--appendfsync", "everysec", *more])  # fmt: skip
        self.redis_procs["replica" if more else "primary"] = host.procs[-1]
        self._wait(lambda: bool(redis.Redis.from_url(self.redis_url(port)).ping()), 30, "Redis")

    def _start_sentinels(self, host: Host) -> None:
        """A replica of the primary and three Sentinels (quorum 2) that call it down after 1 s
        without a reply; every one with the Redis password."""
        self._start_redis(host, REPLICA_PORT, "--replicaof", host.addr, str(REDIS_PORT))
        for port in SENTINEL_PORTS:
            conf = self.root / f"sentinel{port}.conf"
            conf.write_text(
                f"port {port}\nbind {host.addr}\ndir {self.root}\n"
                f"requirepass {REDIS_PASSWORD}\nsentinel sentinel-pass {REDIS_PASSWORD}\n"
                f"sentinel monitor {MASTER_NAME} {host.addr} {REDIS_PORT} 2\n"
                f"sentinel auth-pass {MASTER_NAME} {REDIS_PASSWORD}\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
                f"sentinel failover-timeout {MASTER_NAME} 10000\n"
            )
            self._spawn(host, ["redis-server", str(conf), "--sentinel"])
        self._wait(lambda: self.sentinels_know(2), 30, "the Sentinels to find each other")

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(self.addr(1), port, password=REDIS_PASSWORD, socket_timeout=2)

    def sentinels_know(self, others: int) -> bool:
        """Whether every Sentinel knows the replica and `others` other Sentinels."""
        states = [self.sentinel(port).sentinel_master(MASTER_NAME) for port in SENTINEL_PORTS]
        return all(
            int(s["num-slaves"]) >= 1 and int(s["num-other-sentinels"]) >= others for s in states
        )

    def primary_port(self) -> int:
        """The port of the primary every Sentinel names; 0 while they disagree."""
        named = {
            int(self.sentinel(port).sentinel_get_master_addr_by_name(MASTER_NAME)[1])
            for port in SENTINEL_PORTS
        }
        return named.pop() if len(named) == 1 else 0

    def _start_postgres(self, host: Host) -> None:
        """A cluster of the farm's own (initdb as `postgres`: it refuses root), listening on
        the services host's address only, its socket in its own folder (not the machine's)."""
        if not PG_BIN:
            raise RuntimeError("no PostgreSQL binaries under /usr/lib/postgresql")
        data = self.root / "pg"
        data.mkdir()
        shutil.chown(data, "postgres", "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
        sh(*as_pg, str(PG_BIN[-1] / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
           "--no-sync")  # fmt: skip
        hba = data / "pg_hba.conf"
        hba.write_text(hba.read_text() + f"host all all 198.18.{self.net}.0/24 trust\n")
        opts = f"-c listen_addresses={host.addr} -p {PG_PORT} -c unix_socket_directories={data}"
        ctl = [str(PG_BIN[-1] / "pg_ctl"), "-D", str(data), "-l", str(data / "log"), "-o", opts]
        sh(*in_ns(host.ns, *as_pg, *ctl, "-w", "start"))
        admin = self.db_url.rsplit("/", 1)[0] + "/postgres"
        self._sql(admin, "CREATE DATABASE capworks")

    @staticmethod
    def _sql(url: str, statement: str) -> None:
        from sqlalchemy import create_engine, text

        engine = create_engine(url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(statement))
        finally:
            engine.dispose()

    def env(self, **extra: str) -> dict[str, str]:
        """What every capworks process of the farm is given."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("CAPWORKS_")}
        return {
            **base,
            "CAPWORKS_BROKER_URL": self.broker_url,
            **(self.sentinel_env() if self.sentinels else {}),
            "CAPWORKS_DATABASE_URL": self.db_url,
            "CAPWORKS_MODEL": "shapes",
            "CAPWORKS_FILE_ROOTS": str(self.images),
            "CUDA_VISIBLE_DEVICES": "",
            "PYTHONUNBUFFERED": "1",
            "AWS_EC2_METADATA_DISABLED": "true",
            **self.worker_env,
            **extra,
        }

    @staticmethod
    def sentinel_env() -> dict[str, str]:
        return {
            "CAPWORKS_REDIS_MASTER_NAME": MASTER_NAME,
            "CAPWORKS_REDIS_SENTINEL_PASSWORD": REDIS_PASSWORD,
        }

    def start_worker(
        self,
        host: Host,
        prefix: list[str] | None = None,
        command: list[str] | None = None,
        **env: str,
    ) -> None:
        """`capworks worker --gpus cpu` (or `command`) as PID 1 of its own UTS and PID
        namespaces, named `worker` like every other worker host (what compose replicas get);
        `prefix` runs before it inside (such as `faketime`), `env` adds settings."""
        boot = 'hostname worker && exec "$0" "$@"'
        worker = command or [str(CAPWORKS), "worker", "--gpus", "cpu"]
        cmd = ["unshare", "--uts", "--pid", "--fork", "--mount-proc", "sh", "-c", boot,
               *(prefix or []), *worker]  # fmt: skip
        host.ready_at = len(self._ready_lines(host))
        self._spawn(host, cmd, self.env(**env))

    @staticmethod
    def _ready_lines(host: Host) -> list[str]:
        text = host.log.read_text(errors="replace") if host.log.exists() else ""
        return [line for line in text.splitlines() if line.rstrip().endswith(" ready.")]

    def wait_ready(self, host: Host, timeout_s: float = 300) -> None:
        """Until the host's worker process logged that it consumes (its model is loaded)."""
        self._wait(
            lambda: len(self._ready_lines(host)) > host.ready_at,
            timeout_s,
            f"{host.ns} ready",
            lambda: host.log.read_text(errors="replace")[-3000:],
        )

    def worker_hosts(self) -> list[Host]:
        return [h for n, h in self.hosts.items() if n.startswith("w")]

    def enqueue(self, folder: Path, job_images: int, *options: str) -> None:
        """`capworks enqueue FOLDER` on the producer host, in jobs of `job_images`; `options`
        are more of its options (`--reconcile`)."""
        assert self.producer is not None
        args = ["enqueue", str(folder), "--no-progress", *options]
        cmd = in_ns(self.producer.ns, str(CAPWORKS), *args)
        env = self.env(CAPWORKS_JOB_IMAGES=str(job_images))
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr

    def runs(self) -> Counter[tuple[str, int]]:
        """Each (job id, attempt) started, summed over every worker host's log."""
        total: Counter[tuple[str, int]] = Counter()
        for host in self.worker_hosts():
            total += host.runs()
        return total

    # -- faults ---------------------------------------------------------------------------

    def partition(self, host: Host, port: int | None = None) -> None:
        """Drop every packet between `host` and the services host (only those of `port`, when
        given) both ways, inside `host`'s namespace: established connections hang, as when a
        link or a switch port dies, rather than being refused."""
        assert self.services is not None
        svc = self.services.addr
        match_in = ["-p", "tcp", "--sport", str(port)] if port else []
        match_out = ["-p", "tcp", "--dport", str(port)] if port else []
        sh(*in_ns(host.ns, "iptables", "-A", "INPUT", "-s", svc, *match_in, "-j", "DROP"))
        sh(*in_ns(host.ns, "iptables", "-A", "OUTPUT", "-d", svc, *match_out, "-j", "DROP"))

    def slow_network(self, host: Host, delay_ms: int = 50, loss_pct: float = 1.0) -> str:
        """Delay and lose packets on `host`'s link: `tc netem` where the kernel has it, else
        the loss alone (iptables' `statistic` match, both ways); says which it applied."""
        netem = ["tc", "qdisc", "add", "dev", "e0", "root", "netem"]
        args = ["delay", f"{delay_ms}ms", "loss", f"{loss_pct}%"]
        if subprocess.run(in_ns(host.ns, *netem, *args), capture_output=True).returncode == 0:
            return f"netem {delay_ms} ms, {loss_pct}% loss"
        drop = ["-m", "statistic", "--mode", "random", "--probability", str(loss_pct / 100)]
        for chain in ("INPUT", "OUTPUT"):
            sh(*in_ns(host.ns, "iptables", "-A", chain, *drop, "-j", "DROP"))
        return f"{loss_pct}% loss (iptables; this kernel has no netem, so no delay)"

    def heal(self, host: Host) -> None:
        """Remove every partition and loss rule of `host`, and its netem."""
        sh(*in_ns(host.ns, "iptables", "-F"))
        sh(*in_ns(host.ns, "tc", "qdisc", "del", "dev", "e0", "root"), check=False)

    def kill_host(self, host: Host) -> None:
        """SIGKILL the host's PID 1: the kernel kills every process of its PID namespace at
        once, as when a machine loses power."""
        pid1 = host.pid1()
        assert pid1 is not None, f"{host.ns} runs nothing"
        os.kill(pid1, signal.SIGKILL)
        for proc in host.procs:
            proc.wait(timeout=60)
        host.procs.clear()

    def freeze(self, host: Host, frozen: bool = True) -> None:
        """SIGSTOP (SIGCONT) every process of `host`: it takes nothing and renews nothing."""
        sig = signal.SIGSTOP if frozen else signal.SIGCONT
        for pid in sh("ip", "netns", "pids", host.ns, check=False).split():
            try:
                os.kill(int(pid), sig)
            except ProcessLookupError:
                pass

    def cut_replication(self) -> None:
        """Stop the replica and drop its link: from now on the primary acknowledges writes the
        replica never gets (a stopped replica alone would: the kernel buffers its socket)."""
        os.kill(self.redis_procs["replica"].pid, signal.SIGSTOP)
        redis.Redis.from_url(self.redis_url(REDIS_PORT)).client_kill_filter(_type="replica")

    def fail_over(self) -> None:
        """SIGKILL the primary and let the replica go on: the Sentinels promote it."""
        primary = self.redis_procs.pop("primary")
        primary.kill()
        primary.wait()
        os.kill(self.redis_procs["replica"].pid, signal.SIGCONT)

    def stop_host(self, host: Host, timeout_s: float = 180) -> int:
        """SIGTERM the host's PID 1 (a deploy: warm shutdown); its exit status."""
        pid1 = host.pid1()
        assert pid1 is not None, f"{host.ns} runs nothing"
        os.kill(pid1, signal.SIGTERM)
        status = host.procs[-1].wait(timeout=timeout_s)
        host.procs.clear()
        return status

    def skew_clock(self, host: Host, offset_s: int) -> None:
        """Restart `host`'s worker with its wall clock `offset_s` seconds off (0: true again),
        through libfaketime (Debian's `faketime`). The monotonic clock, on which every timeout
        runs, stays true; monotonic_sleep.c, preloaded first, is why 0.9.10 can do that."""
        prefix = None
        if offset_s:
            missing = skew_missing()
            if missing:
                raise FileNotFoundError(missing)
            preload = f"{self._monotonic_sleep()}:{LIBFAKETIME[-1]}"
            prefix = ["env", f"LD_PRELOAD={preload}", f"FAKETIME={offset_s:+d}s",
                      "FAKETIME_DONT_FAKE_MONOTONIC=1"]  # fmt: skip
        if host.pid1() is not None:
            self.stop_host(host)
        self.start_worker(host, prefix)

    def _monotonic_sleep(self) -> Path:
        built = self.root / "monotonic_sleep.so"
        if not built.exists():
            sh("cc", "-O2", "-shared", "-fPIC", "-o", str(built), str(MONOTONIC_SLEEP), "-ldl")
        return built

    def clock_offset_s(self, host: Host) -> tuple[float, float]:
        """How far `date` and Python's `time.time()` are off the true time inside `host`, run
        in the environment of its first worker process (seconds; positive: ahead)."""
        environ = Path(f"/proc/{host.workers()[0]}/environ").read_bytes().split(b"\0")
        probe = 'date +%s.%N && exec "$0" -c "import time; print(time.time())"'
        cmd = ["env", "-i", *(v.decode() for v in environ if v), "sh", "-c", probe]
        before = time.time()
        seen = sh(*in_ns(host.ns, *cmd, sys.executable)).split()
        true_s = (before + time.time()) / 2
        return float(seen[0]) - true_s, float(seen[1]) - true_s

    # -- removing -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop everything the farm started and remove its namespaces, links and files."""
        data = self.root / "pg"
        if PG_BIN and (data / "postmaster.pid").exists():  # a clean stop frees its shared memory
            ctl = [str(PG_BIN[-1] / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]
            sh("runuser", "-u", "postgres", "--", *ctl, check=False)
        remove_leftovers(self.id)

    @staticmethod
    def _wait(
        check: Callable[[], bool],
        timeout_s: float,
        what: str,
        detail: Callable[[], str] = lambda: "",
    ) -> None:
        """Until `check()` (a server not up yet may refuse or time out meanwhile)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if check():
                    return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s:.0f} s: {what}\n{detail()}")
            time.sleep(0.5)


@contextmanager
def running_farm(cache_dir: Path, workers: int, sentinels: bool = False) -> Iterator[Farm]:
    """A started farm of `workers` worker hosts (checkpoints under `cache_dir`), closed
    afterwards; skipped (failed in CI) where namespaces cannot be made."""
    from conftest import require_service

    needed = ("ip", "unshare", "iptables", "runuser", "redis-server")
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing or not PG_BIN:
        require_service("a farm of namespaces", f"needs root, PostgreSQL and {missing or needed}")
    remove_leftovers()  # what a crashed run left behind
    farm = Farm({"CAPWORKS_CACHE_DIR": str(cache_dir)}, sentinels=sentinels)
    try:
        farm.start(workers)
        yield farm
    finally:
        farm.close()


def skew_missing() -> str | None:
    """What `Farm.skew_clock` needs and this machine lacks, if anything."""
    if not LIBFAKETIME:
        return "libfaketime (Debian's faketime package; scripts/install.sh installs it)"
    if shutil.which("cc") is None:
        return "a C compiler (cc), to build monotonic_sleep.c"
    return None


def remove_leftovers(prefix: str = PREFIX) -> None:
    """Kill every process in a namespace named `prefix...` (by PID, from `ip netns pids`),
    delete those namespaces, links and the farm folders under the temporary directory; a farm
    whose owner (the test process that made it) still runs, and is not this one, is left alone:
    on a shared machine it is another session's farm, not a leftover."""
    live = live_farms()
    names = [line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.strip()]
    for ns in [n for n in names if n.startswith(prefix) and n[: len(PREFIX) + 4] not in live]:
        for pid in sh("ip", "netns", "pids", ns, check=False).split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        _wait_gone(ns)
        sh("ip", "netns", "del", ns, check=False)
    for line in sh("ip", "-o", "link", "show").splitlines():
        link = line.split(":")[1].strip().split("@")[0]
        if link.startswith(prefix) and link[: len(PREFIX) + 4] not in live:
            sh("ip", "link", "del", link, check=False)
    for folder in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        if folder.name[: len(PREFIX) + 4] not in live:
            shutil.rmtree(folder, ignore_errors=True)


def live_farms() -> set[str]:
    """The ids of the farms whose owner process is alive and is not this process."""
    live = set()
    for owner in Path(tempfile.gettempdir()).glob(f"{PREFIX}*/owner"):
        try:
            pid = int(owner.read_text())
            os.kill(pid, 0)  # raises when no such process is left
        except (OSError, ValueError):
            continue
        if pid != os.getpid():
            live.add(owner.parent.name[: len(PREFIX) + 4])
    return live


def _wait_gone(ns: str, timeout_s: float = 30) -> None:
    """Until no process is left in `ns` (a SIGKILLed process leaves when the kernel reaps it)."""
    deadline = time.monotonic() + timeout_s
    while sh("ip", "netns", "pids", ns, check=False).split() and time.monotonic() < deadline:
        time.sleep(0.2)

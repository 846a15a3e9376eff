"""A Redis set with failover on loopback: one master, replicas and Sentinels, each its own `redis-server`
process in a directory of its own. For the failover tests, the chaos soak, and trying failover on a laptop:

    with RedisHA(tmp_dir) as ha:            # 1 master, 1 replica, 3 sentinels on free 127.0.0.1 ports
        store = RedisStore(ha.target(), wait_replicas=1)
        ha.kill_master()                    # kill -9; the sentinels promote the replica
        ha.wait_failover(old)               # ... and ha.restart(old) brings the dead one back as a replica

Sentinels are `redis-server CONF --sentinel`; short `down-after-milliseconds` and `failover-timeout` make a
failover take a few seconds instead of the production defaults' 30 s and 3 min.

Locked down like production when asked: `password` is every data node's `requirepass` + `masterauth` (and the
Sentinels' `auth-pass` for the master), `sentinel_password` the Sentinels' own `requirepass` (+ `sentinel-pass`,
so they still talk to each other), and `tls` (ServerTLS) makes every port TLS only (`port 0` + `tls-port`, client
certificates required) with TLS replication and Sentinel links. Passwords go into each process's config file
(mode 0600), never its arguments. `target()` then carries the passwords and the client certificate.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from services.gateway.stores.redis_store import RedisTarget, RedisTLS

LOCALHOST = "127.0.0.1"


@dataclass(frozen=True)
class ServerTLS:
    """PEM files for a RedisHA set on TLS: `cert` + `key` are what every node and Sentinel serves (valid for
    127.0.0.1), `ca` verifies peers; `client_cert` + `client_key` are what the nodes and Sentinels present when they
    connect out (replication, monitoring), and what `target()` and the set's own admin clients present."""

    ca: str
    cert: str
    key: str
    client_cert: str
    client_key: str

    def server_conf(self) -> str:
        return (f"tls-cert-file {self.cert}\ntls-key-file {self.key}\ntls-ca-cert-file {self.ca}\n"
                f"tls-client-cert-file {self.client_cert}\ntls-client-key-file {self.client_key}\n"
                "tls-auth-clients yes\ntls-replication yes\n")

    def client(self) -> RedisTLS:
        return RedisTLS(ca=self.ca, cert=self.client_cert, key=self.client_key)


class RedisHA:
    def __init__(self, root: Path, replicas: int = 1, sentinels: int = 3, master_name: str = "genie",
                 down_after_ms: int = 1000, failover_timeout_ms: int = 2000, binary: str = "redis-server",
                 password: str = "", sentinel_password: str = "", tls: ServerTLS | None = None) -> None:
        if replicas < 1 or sentinels < 1:
            raise ValueError(f"need >= 1 replica and >= 1 sentinel, got {replicas}, {sentinels}")
        for name, value in (("password", password), ("sentinel_password", sentinel_password)):
            if any(c in value for c in "\"\\ \n\r"):  # they go into config files as one "word" each
                raise ValueError(f"RedisHA's {name} must not contain quotes, backslashes, spaces or newlines")
        self.root, self.replicas, self.n_sentinels, self.master_name = Path(root), replicas, sentinels, master_name
        self.down_after_ms, self.failover_timeout_ms, self.binary = down_after_ms, failover_timeout_ms, binary
        self.password, self.sentinel_password, self.tls = password, sentinel_password, tls
        self.data_ports: list[int] = []
        self.sentinel_ports: list[int] = []
        self._procs: dict[int, subprocess.Popen] = {}

    # --- lifecycle ---------------------------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> RedisHA:
        from services.triton import free_ports

        ports = free_ports(1 + self.replicas + self.n_sentinels)
        self.data_ports, self.sentinel_ports = ports[: 1 + self.replicas], ports[1 + self.replicas:]
        master = self.data_ports[0]
        self._start_data(master, None)
        for port in self.data_ports[1:]:
            self._start_data(port, master)
        for port in self.sentinel_ports:
            conf = self.root / f"sentinel-{port}.conf"  # a sentinel rewrites its config: one file each
            text = (f"{self._listen(port)}bind {LOCALHOST}\ndir {self.root}\nprotected-mode no\n"
                    f"sentinel monitor {self.master_name} {LOCALHOST} {master} {self.n_sentinels // 2 + 1}\n"
                    f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
                    f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}\n"
                    f"sentinel parallel-syncs {self.master_name} 1\n")
            # Who is who, written down: without it each sentinel learns the others and the replicas from hello
            # messages (every 2 s) and start() waits ~8 s for that; with it the set is whole at once.
            text += f"sentinel myid {_sentinel_id(port)}\n"
            for replica in self.data_ports[1:]:
                text += f"sentinel known-replica {self.master_name} {LOCALHOST} {replica}\n"
            for other in self.sentinel_ports:
                if other != port:
                    text += f"sentinel known-sentinel {self.master_name} {LOCALHOST} {other} {_sentinel_id(other)}\n"
            if self.password:
                text += f'sentinel auth-pass {self.master_name} "{self.password}"\n'
            if self.sentinel_password:  # clients and the other Sentinels alike must authenticate
                text += f'requirepass "{self.sentinel_password}"\nsentinel sentinel-pass "{self.sentinel_password}"\n'
            _write_private(conf, text)
            self._spawn(port, [str(conf), "--sentinel"], f"sentinel-{port}.log")
        deadline = time.monotonic() + timeout_s
        for port in self.data_ports + self.sentinel_ports:
            self._wait(lambda p=port: self.client(p).ping(), deadline, f"redis on port {port}")
        for port in self.data_ports[1:]:
            self._wait(lambda p=port: self.client(p).info("replication").get("master_link_status") == "up", deadline,
                       f"replica {port} linked to its master")
        self._wait(self._sentinels_see_all, deadline, "the sentinels to see every replica and each other")
        return self

    def stop(self) -> None:
        for port in list(self._procs):
            self.kill(port)

    def __enter__(self) -> RedisHA:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- faults ------------------------------------------------------------------------------------------

    def master_port(self) -> int:
        """The master's port as a majority of the sentinels report it (the sentinels' view is the truth)."""
        seen: dict[int, int] = {}
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError):
                addr = self.client(port).execute_command("SENTINEL", "get-master-addr-by-name", self.master_name)
                if addr:
                    seen[int(addr[1])] = seen.get(int(addr[1]), 0) + 1
        if not seen:
            raise RuntimeError("no sentinel answers")
        return max(seen, key=seen.__getitem__)

    def kill(self, port: int) -> None:
        """kill -9 the process on `port` (master, replica or sentinel) and reap it."""
        proc = self._procs.pop(port, None)
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        if proc is not None:
            proc.wait(timeout=10)

    def kill_master(self) -> int:
        """kill -9 the current master; returns its port (for wait_failover and restart)."""
        port = self.master_port()
        self.kill(port)
        return port

    def wait_failover(self, old_master: int, timeout_s: float = 30.0) -> int:
        """Waits until the sentinels name a new master that accepts writes; returns its port."""
        def promoted() -> int | None:
            port = self.master_port()
            if port != old_master and self.client(port).info("replication").get("role") == "master":
                return port
            return None

        return self._wait(promoted, time.monotonic() + timeout_s, f"a replica to replace master {old_master}")

    def restart(self, port: int, timeout_s: float = 30.0) -> None:
        """Starts a killed data node again, as a replica of the current master (the way an operator rejoins it)."""
        self._start_data(port, self.master_port())

        def synced() -> bool:
            info = self.client(port).info("replication")
            if info.get("master_link_status") == "up":
                return True
            # Restarted mid-failover, it may follow a master the Sentinels have since demoted (or one that died):
            # point it at the master they name now, as an operator would.
            with contextlib.suppress(RuntimeError):  # no Sentinel answers yet: try again on the next probe
                master = self.master_port()
                if int(info.get("master_port", -1)) != master:
                    self.client(port).execute_command("REPLICAOF", LOCALHOST, str(master))
            return False

        self._wait(synced, time.monotonic() + timeout_s, f"restarted node {port} to sync")

    def target(self, db: int = 0) -> RedisTarget:
        """The set as the gateway's store sees it: through the Sentinels, with this set's passwords and TLS."""
        return RedisTarget.parse(self.sentinel_url(db)).with_credentials(
            self.password, self.tls.client() if self.tls else None, self.sentinel_password)

    def sentinel_url(self, db: int = 0) -> str:
        """redis+sentinel:// (rediss+sentinel:// with TLS) naming the Sentinels; no passwords (give them by env)."""
        hosts = ",".join(f"{LOCALHOST}:{p}" for p in self.sentinel_ports)
        return f"{'rediss' if self.tls else 'redis'}+sentinel://{hosts}/{self.master_name}/{db}"

    # --- helpers -----------------------------------------------------------------------------------------

    def _listen(self, port: int) -> str:
        """The config lines for the listening port: plaintext, or TLS only."""
        return f"port 0\ntls-port {port}\n{self.tls.server_conf()}" if self.tls else f"port {port}\n"

    def _start_data(self, port: int, master: int | None) -> None:
        node = self.root / f"redis-{port}"
        node.mkdir(parents=True, exist_ok=True)
        conf = self._listen(port)
        if self.password:  # a replica authenticates to its master, which may be any node after a failover
            conf += f'requirepass "{self.password}"\nmasterauth "{self.password}"\n'
        _write_private(self.root / f"redis-{port}.conf", conf)
        args = [str(self.root / f"redis-{port}.conf"), "--bind", LOCALHOST, "--dir", str(node), "--save", "",
                "--appendonly", "no", "--protected-mode", "no"]
        if master is not None:
            args += ["--replicaof", LOCALHOST, str(master)]
        self._spawn(port, args, f"redis-{port}.log")

    def _spawn(self, port: int, args: list[str], log_name: str) -> None:
        with open(self.root / log_name, "ab") as log:
            self._procs[port] = subprocess.Popen([self.binary, *args], stdout=log, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, start_new_session=True)

    def client(self, port: int) -> redis.Redis:
        """An admin client of the node or Sentinel on `port`, with the password and TLS that one takes."""
        password = self.sentinel_password if port in self.sentinel_ports else self.password
        kw: dict = {"password": password or None}
        if self.tls is not None:
            kw.update(self.tls.client().kwargs(), ssl=True)
        return redis.Redis(host=LOCALHOST, port=port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True,
                           **kw)


    def _sentinels_see_all(self) -> bool:
        for port in self.sentinel_ports:
            info = self.client(port).execute_command("SENTINEL", "master", self.master_name)
            fields = dict(zip(info[::2], info[1::2], strict=True)) if isinstance(info, list) else info
            if int(fields["num-slaves"]) < self.replicas or int(fields["num-other-sentinels"]) < self.n_sentinels - 1:
                return False
        return True

    def _wait(self, probe, deadline: float, what: str):
        last: Exception | None = None
        while time.monotonic() < deadline:
            for port, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {port} exited ({proc.returncode}); see {self.root}")
            try:
                result = probe()
                if result:
                    return result
            except (redis.RedisError, OSError, KeyError) as exc:
                last = exc
            time.sleep(0.05)
        raise TimeoutError(f"timed out waiting for {what} (last error: {last}); logs in {self.root}")


def _sentinel_id(port: int) -> str:
    """A sentinel's run id (40 hex digits), fixed by its port so that the others' configs can name it."""
    return hashlib.sha1(f"genie-sentinel-{port}".encode()).hexdigest()


def _write_private(path: Path, text: str) -> None:
    """Writes a config file only its owner can read (it may hold passwords)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)

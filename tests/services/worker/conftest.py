"""Real Celery workers for the job tests: `celery -A services.worker.app worker --pool solo` subprocesses on Redis DB 3
(3 + N for pytest-xdist worker gwN; flushed first; DB 0 belongs to the gateway tests), the tiny trained world, and a
job client on the same broker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from services.worker.jobs import JobClient
from services.worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parents[3]
# Each pytest-xdist worker (gw0, gw1, ...) gets its own DB from 3 up, since every module flushes its DB first.
_XDIST = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
BROKER = os.environ.get("GENIE_TEST_WORKER_BROKER", f"redis://127.0.0.1:6379/{3 + _XDIST}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    """One worker process; its log (INFO) goes to a file the tests read."""

    def __init__(self, name: str, queues: str, env: dict[str, str], log_dir: Path) -> None:
        self.name, self.queues, self.env = name, queues, env
        self.log_path = log_dir / f"{name}.log"
        self.metrics_port = int(env["GENIE_WORKER_METRICS_PORT"])
        self.proc: subprocess.Popen | None = None

    def start(self) -> Worker:
        cmd = [sys.executable, "-m", "celery", "-A", "services.worker.app", "worker", "-Q", self.queues, "--pool", "solo",
               "--concurrency", "1", "-n", f"{self.name}@%h", "-l", "info", "--without-mingle", "--without-gossip"]
        self.log = open(self.log_path, "ab")  # noqa: SIM115  closed in stop()/kill()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 90.0) -> Worker:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b" ready." in self.log_path.read_bytes():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"worker {self.name} not ready after {timeout} s:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no ack; the message it held stays unacknowledged in Redis."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (warm shutdown): a running job hands itself on; then the process exits."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.log.close()
        return self.proc.returncode


class Kit:
    """What the worker tests share: their Redis DB, worker processes (stopped at teardown), job clients."""

    def __init__(self, broker_url: str, world: Path) -> None:
        self.broker_url, self.world = broker_url, world
        self.redis = redis.Redis.from_url(broker_url)
        assert self.redis.connection_pool.connection_kwargs.get("db", 0) != 0, "DB 0 belongs to the gateway tests"
        self.workers: list[Worker] = []

    def flush(self) -> None:
        self.redis.flushdb()

    def env(self, jobs_dir: Path, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GENIE_")}
        env.update({
            "GENIE_BROKER_URL": self.broker_url,
            "GENIE_JOBS_DIR": str(jobs_dir),
            "GENIE_WORLD": str(self.world),
            "GENIE_ROLLOUT_BACKEND": "inprocess",
            "GENIE_WORKER_METRICS_HOST": "127.0.0.1",
            "GENIE_WORKER_METRICS_PORT": str(free_port()),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(extra)
        return env

    @staticmethod
    def port() -> int:
        return free_port()

    def worker(self, name: str, queues: str, env: dict[str, str], log_dir: Path) -> Worker:
        w = Worker(name, queues, env, log_dir)
        self.workers.append(w)
        return w.start()

    def client(self, env: dict[str, str]) -> JobClient:
        return JobClient(WorkerSettings.from_env(env))

    @staticmethod
    def cli(env: dict[str, str], *args: str):
        """`genie jobs ARGS` through click's runner, against the broker, world and jobs dir of `env`."""
        from click.testing import CliRunner

        from services.worker.cli import jobs

        return CliRunner().invoke(jobs, list(args), env={k: env[k] for k in ("GENIE_BROKER_URL", "GENIE_WORLD", "GENIE_JOBS_DIR")})

    @staticmethod
    def submitted(result) -> str:
        """The job id a successful `genie jobs submit ...` printed."""
        assert result.exit_code == 0, (result.output, result.stderr)
        return json.loads(result.stdout.strip().splitlines()[0])["job"]

    @staticmethod
    def wait_for(condition, what: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def queue_lengths(self) -> dict[str, int]:
        return {q: self.redis.llen(q) for q in ("train", "rollout")}

    def stop_all(self) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.stop(timeout=15)
        self.workers.clear()


@pytest.fixture(scope="session")
def broker_url(require_redis) -> str:
    return require_redis(BROKER)


@pytest.fixture(scope="module")
def kit(broker_url, trained_world_dir):
    """Per test module: a flushed DB (3, or 3 + the xdist worker's number); every worker a module started is
    stopped when it ends."""
    k = Kit(broker_url, trained_world_dir)
    k.flush()
    yield k
    k.stop_all()


@pytest.fixture(scope="module")
def fake_kube(tmp_path_factory):
    """A TEST DOUBLE of the Kubernetes API server whose fake kubelet runs pods as local processes (fake_kube.py);
    point a worker at it with `fake_kube.kubeconfig(path)` as KUBECONFIG. Its pods are killed when the module ends."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("genie_tests_fake_kube", Path(__file__).with_name("fake_kube.py"))
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    with module.FakeKube(tmp_path_factory.mktemp("fake-kube")) as fake:
        yield fake

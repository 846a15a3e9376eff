"""Builds a Triton model repository for a world and runs the tritonserver 2.51 binary that nvidia-pytriton ships.

PyPI's `tritonserver` is a placeholder; `nvidia-pytriton` carries a real server with the Python backend only
(no torch/ONNX backends), which is all Genie's model.py glue needs. The recipe (../../shared/DESIGN.md):
copy the backend library, its utils and the Python 3.11 stub into `<backends>/python/`, and run the server with
this interpreter's `bin` first on PATH and its libpython first on LD_LIBRARY_PATH, so the stub embeds this
environment's Python (with torch, genie and numpy<2).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from genie.worlds import load_world_config_of
from services.gateway.backend import world_spec_of
from services.triton import protocol as P

log = logging.getLogger(__name__)

SERVICES_DIR = Path(__file__).resolve().parent.parent  # services/: holds the model dirs tokenizer/ lam/ dynamics/
PROJECT_ROOT = SERVICES_DIR.parent


def pytriton_dir() -> Path:
    """site-packages/pytriton/tritonserver: the server binary, the Python backend and its stubs."""
    spec = importlib.util.find_spec("pytriton")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed: pip install 'genie-world[triton]'")
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


@dataclass(frozen=True)
class Repository:
    """An assembled model repository and the backend directory the server loads the Python backend from."""

    root: Path
    models: Path  # --model-repository: tokenizer/ lam/ dynamics/, each config.pbtxt + 1/model.py
    backends: Path  # --backend-directory: python/{libtriton_python.so, triton_python_backend_utils.py, stub}


def assemble_repository(
    world_dir: Path,
    out_dir: Path,
    threads: int = 0,
    cache_bytes: int = 1 << 30,
    instances: int = 1,
    max_batch_size: int | None = None,
    queue_delay_us: int | None = None,
    models: Sequence[str] = P.MODELS,
) -> Repository:
    """Copies services/{tokenizer,lam,dynamics} into `out_dir/models`, filling each config's parameters.

    Args:
        world_dir: the world directory every model loads (world.json + checkpoints); must exist.
        threads: torch threads per model instance (0 = torch's default). Each model runs in its own process.
        cache_bytes: the soft K/V cache cap of each tokenizer / dynamics instance.
        instances: model instances (processes) per model.
        max_batch_size, queue_delay_us: override the pbtxt's dynamic batching settings when given.
        models: which of tokenizer, lam, dynamics to serve (all by default; one per server in the Helm chart).
    Returns the Repository; `out_dir` is created, and its models/ and backends/ replaced.
    """
    names = tuple(models)
    unknown = set(names) - set(P.MODELS)
    if unknown or not names:
        raise ValueError(f"models must be some of {list(P.MODELS)}, got {list(names)}")
    world_dir, out_dir = Path(world_dir).resolve(), Path(out_dir).resolve()
    cfg = load_world_config_of(world_dir)  # fails early on a directory that is not a world
    models, backends = out_dir / "models", out_dir / "backends"
    for d in (models, backends):
        shutil.rmtree(d, ignore_errors=True)
    extra = {
        P.TOKENIZER: {P.PARAM_CACHE_BYTES: str(cache_bytes)},
        P.LAM: {P.PARAM_MAX_FRAMES: str(cfg.lam.max_frames)},
        P.DYNAMICS: {P.PARAM_CACHE_BYTES: str(cache_bytes), P.PARAM_WORLD_SPEC: json.dumps(world_spec_of(world_dir).to_dict())},
    }
    for name in names:
        src = SERVICES_DIR / name
        config = text_format.Parse((src / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        params = {P.PARAM_WORLD_DIR: str(world_dir), P.PARAM_THREADS: str(threads), **extra[name]}
        for key, value in params.items():
            config.parameters[key].string_value = value
        for group in config.instance_group:
            group.count = instances
        if max_batch_size is not None:
            config.max_batch_size = max_batch_size
        if queue_delay_us is not None:
            config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
        (models / name / "1").mkdir(parents=True)
        shutil.copy2(src / "1" / "model.py", models / name / "1" / "model.py")
        header = f"# Assembled from services/{name}/config.pbtxt for {world_dir} by services/triton/launcher.py.\n"
        (models / name / "config.pbtxt").write_text(header + text_format.MessageToString(config))
    server = pytriton_dir()
    (backends / "python").mkdir(parents=True)
    for f in (server / "backends/python/libtriton_python.so", server / "backends/python/triton_python_backend_utils.py",
              server / f"python_backend_stubs/{sys.version_info.major}.{sys.version_info.minor}/triton_python_backend_stub"):
        shutil.copy2(f, backends / "python" / f.name)
    return Repository(out_dir, models, backends)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free right now on `host` (held open together so they differ)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]


class TritonServer:
    """One tritonserver process serving a Repository; start()/stop() can repeat on the same ports.

    The server runs in its own process group (its Python stubs are its children), so stop() and kill()
    end exactly the processes this object started. Use as a context manager: start, wait until ready, stop.
    """

    def __init__(self, repository: Repository, grpc_port: int = 8001, http_port: int = 8000, metrics_port: int = 8002,
                 host: str = "127.0.0.1", log_path: Path | None = None, exit_timeout_s: int = 5) -> None:
        self.repository, self.host = repository, host
        self.grpc_port, self.http_port, self.metrics_port = grpc_port, http_port, metrics_port
        self.log_path = Path(log_path) if log_path else None  # None: inherit this process's stdout/stderr
        self.exit_timeout_s = exit_timeout_s
        self.shm_prefix = f"genie_triton_{grpc_port}_"  # our stubs' shared memory names, removed after a kill
        self.process: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self._client_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def urls(self) -> dict[str, str]:
        return {"grpc": self.grpc_url, "http": self.http_url, "metrics": self.metrics_url}

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    def command(self) -> list[str]:
        return [
            str(pytriton_dir() / "bin" / "tritonserver"),
            f"--model-repository={self.repository.models}",
            f"--backend-directory={self.repository.backends}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--disable-auto-complete-config",  # the pbtxt is the contract, never code
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]

    def environment(self) -> dict[str, str]:
        """PATH and LD_LIBRARY_PATH that make the stub embed this interpreter's Python and find its packages."""
        env = dict(os.environ)
        libs = [sysconfig.get_config_var("LIBDIR"), str(pytriton_dir().parent.parent / "nvidia_pytriton.libs")]
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
        env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return env

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Starts the server process (returns at once; see wait_ready). No-op while it runs."""
        if self.running:
            return
        log_file = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log_file = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it after we return
        try:
            self.process = subprocess.Popen(self.command(), env=self.environment(), stdout=log_file,
                                            stderr=subprocess.STDOUT if log_file else None, start_new_session=True)
        finally:
            if log_file is not None:
                log_file.close()
        log.info("tritonserver pid %d: grpc %s, http %s", self.process.pid, self.grpc_url, self.http_url)

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Blocks until every model is loaded (HTTP /v2/health/ready); returns the seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not self.running:
                raise RuntimeError(f"tritonserver exited with code {self.process and self.process.returncode}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1.0) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f} s\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        """Graceful stop (SIGTERM: in-flight requests finish, models unload), then SIGKILL whatever is left."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver pid %d did not stop in %.0f s; killing it", self.process.pid, timeout)
        self.kill()

    def kill(self) -> None:
        """Kills the server and its stubs at once (a crash, for tests), and removes their shared memory."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # its own group: start_new_session=True
        self.process.wait()
        for f in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            f.unlink(missing_ok=True)

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log file)"
        return self.log_path.read_text(errors="replace")[-chars:]

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

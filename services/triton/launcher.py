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

from genie.spec import world_spec_of
from genie.worlds import load_world_config_of
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
    device: str = "cpu"  # where its instances run: cpu or gpu (Placement.device)
    explicit: bool = False  # explicit model control: no model loads at start; clients load and unload them


DEVICE_CHOICES = ("cpu", "gpu", "cuda", "auto")  # cuda is an alias of gpu; auto = gpu when one is visible
PRECISIONS = ("auto", "fp32", "bf16", "int8")  # P.PARAM_PRECISION; auto: bf16 on a GPU, fp32 on a CPU (the engines decide)


@dataclass(frozen=True)
class Batching:
    """One model's Triton batching: the largest batch an execute() gets and how long a request may wait for mates."""

    max_batch_size: int
    queue_delay_us: int
    preferred: tuple[int, ...] = ()  # preferred_batch_size: the batcher sends one of these sizes when it can

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max batch size must be >= 1, got {self.max_batch_size}")
        if self.queue_delay_us < 0:
            raise ValueError(f"queue delay must be >= 0 us, got {self.queue_delay_us}")
        if any(not 1 <= b <= self.max_batch_size for b in self.preferred):
            raise ValueError(f"preferred batch sizes {list(self.preferred)} must be in [1, {self.max_batch_size}]")


# On a CPU the pbtxt files' own settings apply (max batch 32, 1000 us): a step's compute grows with the batch, so
# waiting long for mates only adds latency. On a GPU a batch of 256 costs little more than one, so the batcher
# may wait longer for a fuller batch. PLACEHOLDERS until the H200 measurement (benchmarks/bench_triton_sessions.py,
# benchmarks/README.md) replaces them with measured values.
GPU_BATCHING = {
    P.TOKENIZER: Batching(256, 2000),
    P.LAM: Batching(32, 2000),
    P.DYNAMICS: Batching(256, 2000),
}


@dataclass(frozen=True)
class Placement:
    """Where a repository's models run: KIND_CPU instances, or KIND_GPU instances on each of some GPUs."""

    device: str = "cpu"  # "cpu" or "gpu" (resolve_placement turns cuda/auto into one of these)
    instances: int = 1  # instances (processes) per model on a CPU; per GPU on GPUs
    gpus: tuple[int, ...] = ()  # GPU ids for KIND_GPU; empty = every GPU Triton sees
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"device must be cpu or gpu here, got {self.device!r} (resolve_placement maps cuda/auto)")
        if self.instances < 1:
            raise ValueError(f"instances must be >= 1, got {self.instances}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if any(g < 0 for g in self.gpus) or len(set(self.gpus)) != len(self.gpus):
            raise ValueError(f"GPU ids must be distinct and >= 0, got {list(self.gpus)}")
        if self.gpus and self.device != "gpu":
            raise ValueError("GPU ids are given but the device is cpu")


def visible_gpus() -> list[int]:
    """The GPU ids this machine shows: torch's CUDA devices, else the lines of `nvidia-smi -L`; [] without a GPU."""
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            return list(range(torch.cuda.device_count()))
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return list(range(sum(1 for line in out.splitlines() if line.startswith("GPU "))))


def resolve_placement(device: str, instances: int = 1, gpus: Sequence[int] = (), precision: str = "auto",
                      visible: Sequence[int] | None = None) -> Placement:
    """A Placement for a device choice (cpu, gpu, cuda, auto), checked against the GPUs this machine shows.

    Raises ValueError (one line) for an unknown device, `gpu` with no GPU visible, or a GPU id not visible.
    """
    if device not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {list(DEVICE_CHOICES)}, got {device!r}")
    seen = list(visible_gpus() if visible is None else visible)
    if device == "auto":
        device = "gpu" if seen else "cpu"
    device = "gpu" if device == "cuda" else device
    if device == "gpu":
        if not seen:
            raise ValueError("--device gpu, but no GPU is visible (neither torch.cuda nor `nvidia-smi -L` shows one)")
        missing = sorted(set(gpus) - set(seen))
        if missing:
            raise ValueError(f"GPU ids {missing} are not visible; this machine shows {seen}")
        if precision == "int8":
            raise ValueError("--precision int8 runs on a CPU only; use bf16 or fp32 on a GPU")
    elif gpus:
        raise ValueError("GPU ids are given but the device is cpu")
    return Placement(device, instances, tuple(gpus), precision)


def assemble_repository(
    world_dir: Path,
    out_dir: Path,
    threads: int = 0,
    cache_bytes: int = 1 << 30,
    instances: int = 1,
    max_batch_size: int | None = None,
    queue_delay_us: int | None = None,
    models: Sequence[str] = P.MODELS,
    placement: Placement | None = None,
    batching: dict[str, Batching] | None = None,
) -> Repository:
    """Copies services/{tokenizer,lam,dynamics} into `out_dir/models`, filling each config's parameters.

    Args:
        world_dir: the world directory every model loads (world.json + checkpoints); must exist.
        threads: torch threads per model instance (0 = torch's default). Each model runs in its own process.
        cache_bytes: the soft K/V cache cap of each tokenizer / dynamics instance.
        instances: model instances (processes) per model, when no `placement` is given.
        max_batch_size, queue_delay_us: override every model's dynamic batching settings when given.
        models: which of tokenizer, lam, dynamics to serve (all by default; one per server in the Helm chart).
        placement: CPU or GPU instances and the precision (default: `instances` KIND_CPU instances, precision auto).
        batching: per-model Batching; a model not in it keeps its pbtxt's settings on a CPU and GPU_BATCHING's on a
            GPU. `max_batch_size` / `queue_delay_us` then override single fields of every model.
    Returns the Repository; `out_dir` is created, and its models/ and backends/ replaced.
    """
    names = tuple(models)
    unknown = set(names) - set(P.MODELS)
    if unknown or not names:
        raise ValueError(f"models must be some of {list(P.MODELS)}, got {list(names)}")
    unknown = set(batching or {}) - set(P.MODELS)
    if unknown:
        raise ValueError(f"batching for unknown models {sorted(unknown)}; expected some of {list(P.MODELS)}")
    placement = placement or Placement(instances=instances)
    world_dir, out_dir = Path(world_dir).resolve(), Path(out_dir).resolve()
    load_world_config_of(world_dir)  # fails early on a directory that is not a world
    models = out_dir / "models"
    shutil.rmtree(models, ignore_errors=True)
    for name in names:
        config = model_config(name, world_dir, threads, cache_bytes, placement, (batching or {}).get(name),
                              max_batch_size, queue_delay_us)
        (models / name / "1").mkdir(parents=True)
        shutil.copy2(SERVICES_DIR / name / "1" / "model.py", models / name / "1" / "model.py")
        header = f"# Assembled from services/{name}/config.pbtxt for {world_dir} by services/triton/launcher.py.\n"
        (models / name / "config.pbtxt").write_text(header + text_format.MessageToString(config))
    return Repository(out_dir, models, install_backends(out_dir), placement.device)


def explicit_repository(out_dir: Path, device: str = "cpu") -> Repository:
    """An empty model repository for a server with explicit model control (`--model-control-mode=explicit`): it
    starts with no model, and clients load each catalogue version's models into it (load_model with the config and
    model.py given in the request: services/backends/triton_catalogue.py), so nothing is copied here per version."""
    out_dir = Path(out_dir).resolve()
    models = out_dir / "models"
    shutil.rmtree(models, ignore_errors=True)
    models.mkdir(parents=True)
    return Repository(out_dir, models, install_backends(out_dir), device, explicit=True)


def model_config(kind: str, world_dir: Path, threads: int = 0, cache_bytes: int = 1 << 30,
                 placement: Placement | None = None, batching: Batching | None = None,
                 max_batch_size: int | None = None, queue_delay_us: int | None = None,
                 name: str | None = None) -> model_config_pb2.ModelConfig:
    """services/<kind>/config.pbtxt with the world's parameters filled in (see assemble_repository for the
    arguments). placement None leaves the instance group out, so Triton places the instances itself (one on each
    GPU it sees, else one on the CPU); `name` renames the model (a catalogue version's)."""
    if kind not in P.MODELS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {list(P.MODELS)}")
    world_dir = Path(world_dir).resolve()
    cfg = load_world_config_of(world_dir)
    extra = {
        P.TOKENIZER: {P.PARAM_CACHE_BYTES: str(cache_bytes)},
        P.LAM: {P.PARAM_MAX_FRAMES: str(cfg.lam.max_frames)},
        P.DYNAMICS: {P.PARAM_CACHE_BYTES: str(cache_bytes), P.PARAM_WORLD_SPEC: json.dumps(world_spec_of(world_dir).to_dict())},
    }
    config = text_format.Parse((SERVICES_DIR / kind / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    if name is not None:
        config.name = name
    precision = placement.precision if placement is not None else "auto"
    params = {P.PARAM_WORLD_DIR: str(world_dir), P.PARAM_THREADS: str(threads), P.PARAM_PRECISION: precision,
              **extra[kind]}
    for key, value in params.items():
        config.parameters[key].string_value = value
    if placement is not None:
        _place(config, placement)
    else:
        del config.instance_group[:]
    chosen = batching or (GPU_BATCHING[kind] if placement is not None and placement.device == "gpu" else None)
    if chosen is not None:
        _batch(config, chosen)
    if max_batch_size is not None or queue_delay_us is not None:
        _batch(config, Batching(config.max_batch_size if max_batch_size is None else max_batch_size,
                                config.dynamic_batching.max_queue_delay_microseconds if queue_delay_us is None
                                else queue_delay_us, tuple(config.dynamic_batching.preferred_batch_size)))
    return config


def model_file(kind: str) -> bytes:
    """services/<kind>/1/model.py: the Python backend glue of a model kind."""
    return (SERVICES_DIR / kind / "1" / "model.py").read_bytes()


def install_backends(out_dir: Path) -> Path:
    """`out_dir`/backends/python: the Python backend library, its utils and this interpreter's stub."""
    backends = Path(out_dir).resolve() / "backends"
    shutil.rmtree(backends, ignore_errors=True)
    server = pytriton_dir()
    (backends / "python").mkdir(parents=True)
    for f in (server / "backends/python/libtriton_python.so", server / "backends/python/triton_python_backend_utils.py",
              server / f"python_backend_stubs/{sys.version_info.major}.{sys.version_info.minor}/triton_python_backend_stub"):
        shutil.copy2(f, backends / "python" / f.name)
    return backends


def _place(config: model_config_pb2.ModelConfig, placement: Placement) -> None:
    """One instance group: `instances` KIND_CPU processes, or `instances` KIND_GPU processes on each GPU."""
    del config.instance_group[:]
    group = config.instance_group.add()
    group.count = placement.instances
    if placement.device == "gpu":
        group.kind = model_config_pb2.ModelInstanceGroup.KIND_GPU
        group.gpus.extend(placement.gpus)  # empty: Triton places `count` instances on every GPU it sees
    else:
        group.kind = model_config_pb2.ModelInstanceGroup.KIND_CPU


def _batch(config: model_config_pb2.ModelConfig, batching: Batching) -> None:
    if batching.max_batch_size > 1 and not config.HasField("dynamic_batching"):
        raise ValueError(f"model {config.name} has no dynamic_batching block to size")
    config.max_batch_size = batching.max_batch_size
    config.dynamic_batching.max_queue_delay_microseconds = batching.queue_delay_us
    del config.dynamic_batching.preferred_batch_size[:]
    config.dynamic_batching.preferred_batch_size.extend(batching.preferred)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free right now on `host` (held open together so they differ)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]


@dataclass(frozen=True)
class TritonTLS:
    """TLS on Triton's gRPC endpoint: the server's certificate + key (PEM), and `client_ca` to require client
    certificates signed by it (mutual). Triton's HTTP endpoint cannot do TLS and serves inference too, so a
    TritonServer with TLS binds it to loopback unless told otherwise; metrics (read-only) stay plain HTTP."""

    cert: str
    key: str
    client_ca: str = ""

    def __post_init__(self) -> None:
        for name, path in (("certificate", self.cert), ("key", self.key), ("client CA", self.client_ca)):
            if path and not Path(path).is_file():
                raise ValueError(f"Triton TLS {name} {path!r} is not a file")
        if not self.cert or not self.key:
            raise ValueError("Triton TLS needs both a certificate (--tls-cert) and a key (--tls-key)")

    def flags(self) -> list[str]:
        out = ["--grpc-use-ssl=true", f"--grpc-server-cert={self.cert}", f"--grpc-server-key={self.key}"]
        if self.client_ca:
            out += [f"--grpc-root-cert={self.client_ca}", "--grpc-use-ssl-mutual=true"]
        return out


class TritonServer:
    """One tritonserver process serving a Repository; start()/stop() can repeat on the same ports.

    The server runs in its own process group (its Python stubs are its children), so stop() and kill()
    end exactly the processes this object started. Use as a context manager: start, wait until ready, stop.
    """

    def __init__(self, repository: Repository, grpc_port: int = 8001, http_port: int = 8000, metrics_port: int = 8002,
                 host: str = "127.0.0.1", log_path: Path | None = None, exit_timeout_s: int = 5,
                 tls: TritonTLS | None = None, http_host: str | None = None) -> None:
        self.repository, self.host, self.tls = repository, host, tls
        # HTTP answers inference in plaintext: with TLS on gRPC it stays on this machine (or pod) unless asked.
        self.http_host = http_host or ("127.0.0.1" if tls is not None else host)
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
        return f"http://{_client_host(self.http_host)}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def urls(self) -> dict[str, str]:
        return {"grpc": self.grpc_url, "http": self.http_url, "metrics": self.metrics_url}

    @property
    def _client_host(self) -> str:
        return _client_host(self.host)

    def command(self) -> list[str]:
        return [
            str(pytriton_dir() / "bin" / "tritonserver"),
            f"--model-repository={self.repository.models}",
            f"--backend-directory={self.repository.backends}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--http-address={self.http_host}", f"--http-port={self.http_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            f"--allow-gpu-metrics={'true' if self.repository.device == 'gpu' else 'false'}",
            *(["--model-control-mode=explicit"] if self.repository.explicit else []),
            "--disable-auto-complete-config",  # the pbtxt is the contract, never code
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *(self.tls.flags() if self.tls is not None else []),
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


def _client_host(bound: str) -> str:
    """The address a client on this machine reaches an endpoint bound to `bound` at."""
    return "127.0.0.1" if bound in ("0.0.0.0", "") else bound

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

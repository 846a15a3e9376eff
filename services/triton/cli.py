"""`triton serve`: assemble a world's model repository and run tritonserver in the foreground until Ctrl-C."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click

from services.tls_files import check_server_pair, files_digest


@click.group("triton")
def triton() -> None:
    """Serve a world's tokenizer, LAM and dynamics models behind NVIDIA Triton (gRPC, HTTP, metrics)."""


@triton.command()
@click.option("--world", "world_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="World directory (world.json + tokenizer/ lam/ dynamics/).")
@click.option("--explicit", is_flag=True,
              help="Serve a world catalogue instead of --world: start with no model (explicit model control); gateways "
                   "run with --registry and --backend triton load each version's models when a session first needs "
                   "them and unload idle ones (the catalogue directory must be mounted at the same path here). Their "
                   "settings come from the gateway (--threads, --cache-bytes); the options on models, devices and "
                   "batching here do not apply.")
@click.option("--models-budget-mb", type=int, default=0, show_default=True,
              help="With --explicit: keep the loaded catalogue versions' checkpoints under this many MB, unloading "
                   "idle versions (least recently used first) that gateways left loaded; 0 = no budget here.")
@click.option("--models-idle-s", type=float, default=60.0, show_default=True,
              help="With --models-budget-mb: a version used within this many seconds is in play and never unloaded.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address every endpoint binds (0.0.0.0 in a pod).")
@click.option("--grpc-port", default=8001, show_default=True)
@click.option("--http-port", default=8000, show_default=True)
@click.option("--http-host", default="",
              help="Address the HTTP endpoint (health, and inference in plaintext) binds, if not --host. Default with "
                   "--tls-cert: 127.0.0.1, so TLS gRPC is the only inference endpoint other machines reach.")
@click.option("--metrics-port", default=8002, show_default=True)
@click.option("--threads", default=1, show_default=True,
              help="torch threads per model instance (0 = torch's default). Each model is its own process; on a small "
                   "CPU, 1 each avoids oversubscription (benchmarks/README.md: 19.0 vs 11.5 frames/s at 16 sessions).")
@click.option("--instances", default=1, show_default=True, help="Instances (processes) per model on a CPU.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "gpu", "cuda", "auto"]),
              help="Where the models run: KIND_CPU instances, or KIND_GPU instances (cuda = gpu; auto = gpu when "
                   "torch or `nvidia-smi -L` sees one). gpu with no GPU visible is an error.")
@click.option("--instances-per-gpu", default=1, show_default=True, help="KIND_GPU instances per model on each GPU.")
@click.option("--gpus", default="", help="Comma-separated GPU ids for the instances (default: every visible GPU).")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16", "int8"]),
              help="The engines' compute precision (auto: bf16 on a GPU, fp32 on a CPU).")
@click.option("--max-batch", default="",
              help="Triton max_batch_size: one number for every model, or model=N,... (default: 32 on a CPU; "
                   "on a GPU services/triton/launcher.py GPU_BATCHING, e.g. 256 for dynamics).")
@click.option("--queue-delay-us", default="",
              help="Dynamic batching max_queue_delay_microseconds: one number, or model=N,... (default: 1000 on a "
                   "CPU, GPU_BATCHING's on a GPU).")
@click.option("--dry-run", is_flag=True, help="Assemble the repository, print its path and the server command, and exit.")
@click.option("--cache-bytes", default=1 << 30, show_default=True, help="Soft K/V cache cap per tokenizer/dynamics instance.")
@click.option("--models", default="tokenizer,lam,dynamics", show_default=True,
              help="Comma-separated models to serve (one per server when each model is its own Deployment).")
@click.option("--repository", type=click.Path(file_okay=False, path_type=Path),
              help="Where to assemble the model repository (default: a temporary directory, removed on exit).")
@click.option("--tls-cert", default="", envvar="GENIE_TRITON_TLS_CERT",
              help="Server certificate (PEM): serve gRPC over TLS (--grpc-use-ssl); HTTP (on loopback, see --http-host) "
                   "and metrics stay plaintext.")
@click.option("--tls-key", default="", envvar="GENIE_TRITON_TLS_KEY", help="The server certificate's key (PEM).")
@click.option("--tls-client-ca", default="", envvar="GENIE_TRITON_TLS_CLIENT_CA",
              help="Require client certificates signed by this CA (mutual TLS, --grpc-use-ssl-mutual).")
@click.option("--tls-check-s", default=30.0, show_default=True, envvar="GENIE_TRITON_TLS_CHECK_S",
              help="Re-read the TLS files this often; tritonserver cannot reload them, so a renewed set restarts it "
                   "(0 = never look again).")
@click.option("--tls-restart-jitter-s", default=300.0, show_default=True, envvar="GENIE_TRITON_TLS_RESTART_JITTER_S",
              help="Wait a random 0..this many seconds before that restart, so replicas sharing a Secret restart at "
                   "different times and the gateways fail over between them.")
def serve(world_dir: Path | None, explicit: bool, models_budget_mb: int, models_idle_s: float, host: str, grpc_port: int,
          http_port: int, http_host: str,
          metrics_port: int, threads: int, instances: int, device: str, instances_per_gpu: int, gpus: str,
          precision: str, max_batch: str, queue_delay_us: str, dry_run: bool, cache_bytes: int, models: str,
          repository: Path | None, tls_cert: str, tls_key: str, tls_client_ca: str, tls_check_s: float,
          tls_restart_jitter_s: float) -> None:
    """Assemble the repository for WORLD (or an empty one, --explicit) and run tritonserver until Ctrl-C (or SIGTERM)."""
    from services.triton.launcher import TritonServer, TritonTLS, assemble_repository, explicit_repository

    with tempfile.TemporaryDirectory(prefix="genie-triton-") as tmp:
        names = [m.strip() for m in models.split(",") if m.strip()]
        try:
            tls = TritonTLS(tls_cert, tls_key, tls_client_ca) if (tls_cert or tls_key or tls_client_ca) else None
            if not (tls_check_s >= 0 and tls_restart_jitter_s >= 0):
                raise ValueError("--tls-check-s and --tls-restart-jitter-s must be >= 0")
            if (world_dir is None) == (not explicit):
                raise ValueError("give --world DIR (one world) or --explicit (a catalogue's versions, loaded by gateways)")
            if models_budget_mb < 0 or (models_budget_mb and not explicit) or not models_idle_s >= 0:
                raise ValueError("--models-budget-mb (>= 0) is for --explicit, and --models-idle-s must be >= 0")
            placement, batching = _placement_and_batching(device, instances, instances_per_gpu, gpus, precision,
                                                          max_batch, queue_delay_us, names)
            if explicit:
                repo = explicit_repository(repository or Path(tmp), placement.device)
            else:
                repo = assemble_repository(world_dir, repository or Path(tmp), threads=threads, cache_bytes=cache_bytes,
                                           models=names, placement=placement, batching=batching)
        except ValueError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        server = TritonServer(repo, grpc_port, http_port, metrics_port, host=host, tls=tls,
                              http_host=http_host or None)  # logs go to this terminal
        if dry_run:
            click.echo(json.dumps({"repository": str(repo.root), "device": repo.device, "command": server.command()}))
            return
        signal.signal(signal.SIGTERM, _interrupt)
        # The files as tritonserver is about to read them: a renewal from here on is one it has not seen.
        started_with = files_digest(tls.cert, tls.key, tls.client_ca) if tls is not None else None
        server.start()
        try:
            try:
                seconds = server.wait_ready(timeout=300)
            except (RuntimeError, TimeoutError) as exc:
                raise click.ClickException(str(exc)) from exc
            click.echo(f"Triton ready in {seconds:.1f} s: " + ", ".join(f"{k} {v}" for k, v in server.urls.items()), err=True)
            if models_budget_mb:
                from services.triton.budget import ModelsBudget

                budget = ModelsBudget(server.http_url.removeprefix("http://"), models_budget_mb << 20, models_idle_s)
                budget.start()
            if tls is not None and tls_check_s > 0:
                code = RenewalRestarts(server, tls, tls_check_s, tls_restart_jitter_s, started_with).run()
            else:
                code = server.process.wait()
            click.echo(f"tritonserver exited with code {code}", err=True)
            sys.exit(code or 1)
        except KeyboardInterrupt:
            click.echo("stopping Triton", err=True)
        finally:
            server.stop()


class RenewalRestarts:
    """Runs tritonserver until it exits, restarting it on renewed TLS files (it reads them only at start).

    Every `check_s` the certificate, key and client CA are hashed. A changed set is checked (the key matches the
    certificate, the CA holds one; a half-written set waits for the next look) and, after a random 0..`jitter_s`
    delay, the server is stopped gracefully and started again on the same ports. Its readiness probe fails while
    the models load, so the Service and the gateways' routing send calls to other replicas meanwhile.
    """

    def __init__(self, server, tls, check_s: float, jitter_s: float, started_with: bytes | None,
                 rng: random.Random | None = None) -> None:
        """`started_with`: files_digest of the TLS files taken just before the server started (it read those)."""
        self.server, self.tls, self.check_s, self.jitter_s = server, tls, check_s, jitter_s
        self.rng = rng or random.Random()
        self.digest = started_with

    def run(self) -> int:
        """Returns tritonserver's exit code once it exits on its own (a restart is not an exit)."""
        restart_at: float | None = None
        refused: bytes | None = None
        while True:
            try:
                return self.server.process.wait(timeout=self.check_s)
            except subprocess.TimeoutExpired:
                pass
            digest = files_digest(self.tls.cert, self.tls.key, self.tls.client_ca)
            if digest is None:  # a file being replaced: look again next time
                continue
            if digest == self.digest:  # unchanged, or a renewal undone before its restart
                restart_at = None
                continue
            try:
                check_server_pair(self.tls.cert, self.tls.key, self.tls.client_ca)
            except ValueError as exc:
                if digest != refused:  # once per new content, not every look while it stays broken
                    click.echo(f"new TLS files not used yet: {exc}", err=True)
                    refused = digest
                continue
            if restart_at is None:
                delay = self.rng.uniform(0.0, self.jitter_s)
                restart_at = time.monotonic() + delay
                click.echo(f"TLS files renewed: restarting tritonserver in {delay:.0f} s", err=True)
            if time.monotonic() < restart_at:
                continue
            self.server.stop()
            self.server.start()
            self.digest, restart_at = digest, None
            try:
                seconds = self.server.wait_ready(timeout=300)
            except (RuntimeError, TimeoutError) as exc:
                raise click.ClickException(f"tritonserver did not come back after a TLS renewal: {exc}") from exc
            click.echo(f"Triton restarted with the renewed TLS files, ready in {seconds:.1f} s", err=True)


def _placement_and_batching(device: str, instances: int, instances_per_gpu: int, gpus: str, precision: str,
                            max_batch: str, queue_delay_us: str, models: list[str]):
    """The CLI's device and batching options as a Placement and per-model Batching; ValueError (one line) if bad."""
    from services.triton.launcher import GPU_BATCHING, Batching, resolve_placement

    ids = _ints(gpus, "--gpus")
    placement = resolve_placement(device, 1, ids, precision)
    placement = replace(placement, instances=instances_per_gpu if placement.device == "gpu" else instances)
    sizes, delays = _per_model(max_batch, "--max-batch", models), _per_model(queue_delay_us, "--queue-delay-us", models)
    batching = {}
    for model in set(sizes) | set(delays):
        base = GPU_BATCHING[model] if placement.device == "gpu" else Batching(32, 1000)  # the pbtxt files' CPU values
        batching[model] = Batching(sizes.get(model, base.max_batch_size), delays.get(model, base.queue_delay_us))
    return placement, batching


def _ints(spec: str, option: str) -> list[int]:
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated integers, got {spec!r}") from None


def _per_model(spec: str, option: str, models: list[str]) -> dict[str, int]:
    """"256" -> that value for every model served; "dynamics=256,tokenizer=64" -> those models' values."""
    from services.triton import protocol as P

    spec = spec.strip()
    if not spec:
        return {}
    try:
        if "=" not in spec:
            return dict.fromkeys(models, int(spec))
        out = {}
        for item in spec.split(","):
            name, value = (x.strip() for x in item.split("=", 1))
            if name not in P.MODELS:
                raise ValueError(f"{option}: unknown model {name!r}; expected some of {list(P.MODELS)}")
            out[name] = int(value)
        return {m: v for m, v in out.items() if m in models}
    except ValueError as exc:
        if str(exc).startswith(option):
            raise
        raise ValueError(f"{option} must be N or model=N[,model=N...], got {spec!r}") from None


def _interrupt(signum, frame) -> None:
    """SIGTERM (a pod stopping) takes the same graceful path as Ctrl-C."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    triton()

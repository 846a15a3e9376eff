"""`triton serve`: assemble a world's model repository and run tritonserver in the foreground until Ctrl-C."""

from __future__ import annotations

import signal
import sys
import tempfile
from pathlib import Path

import click


@click.group("triton")
def triton() -> None:
    """Serve a world's tokenizer, LAM and dynamics models behind NVIDIA Triton (gRPC, HTTP, metrics)."""


@triton.command()
@click.option("--world", "world_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="World directory (world.json + tokenizer/ lam/ dynamics/).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address every endpoint binds (0.0.0.0 in a pod).")
@click.option("--grpc-port", default=8001, show_default=True)
@click.option("--http-port", default=8000, show_default=True)
@click.option("--metrics-port", default=8002, show_default=True)
@click.option("--threads", default=1, show_default=True,
              help="torch threads per model instance (0 = torch's default). Each model is its own process; on a small "
                   "CPU, 1 each avoids oversubscription (benchmarks/README.md: 19.0 vs 11.5 frames/s at 16 sessions).")
@click.option("--instances", default=1, show_default=True, help="Instances (processes) per model.")
@click.option("--cache-bytes", default=1 << 30, show_default=True, help="Soft K/V cache cap per tokenizer/dynamics instance.")
@click.option("--models", default="tokenizer,lam,dynamics", show_default=True,
              help="Comma-separated models to serve (one per server when each model is its own Deployment).")
@click.option("--repository", type=click.Path(file_okay=False, path_type=Path),
              help="Where to assemble the model repository (default: a temporary directory, removed on exit).")
def serve(world_dir: Path, host: str, grpc_port: int, http_port: int, metrics_port: int, threads: int, instances: int,
          cache_bytes: int, models: str, repository: Path | None) -> None:
    """Assemble the repository for WORLD and run tritonserver until Ctrl-C (or SIGTERM)."""
    from services.triton.launcher import TritonServer, assemble_repository

    with tempfile.TemporaryDirectory(prefix="genie-triton-") as tmp:
        names = [m.strip() for m in models.split(",") if m.strip()]
        try:
            repo = assemble_repository(world_dir, repository or Path(tmp), threads=threads, cache_bytes=cache_bytes,
                                       instances=instances, models=names)
        except ValueError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        server = TritonServer(repo, grpc_port, http_port, metrics_port, host=host)  # logs go to this terminal
        signal.signal(signal.SIGTERM, _interrupt)
        server.start()
        try:
            try:
                seconds = server.wait_ready(timeout=300)
            except (RuntimeError, TimeoutError) as exc:
                raise click.ClickException(str(exc)) from exc
            click.echo(f"Triton ready in {seconds:.1f} s: " + ", ".join(f"{k} {v}" for k, v in server.urls.items()), err=True)
            code = server.process.wait()
            click.echo(f"tritonserver exited with code {code}", err=True)
            sys.exit(code or 1)
        except KeyboardInterrupt:
            click.echo("stopping Triton", err=True)
        finally:
            server.stop()


def _interrupt(signum, frame) -> None:
    """SIGTERM (a pod stopping) takes the same graceful path as Ctrl-C."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    triton()

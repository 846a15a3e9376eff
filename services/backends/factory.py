"""Which model backend to build, from a BackendConfig: the in-process models (the embedded default) or the Triton
services. The gateway, the rollout workers and `genie rollout` build theirs here."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from services.backends.backend import ModelBackend


@dataclass(frozen=True)
class BackendConfig:
    world: str = "worlds/demo"  # world dir of the in-process backend's models
    backend: str = "inprocess"  # "inprocess" (embedded default) or "triton"
    # Triton endpoints: "host:port", several comma-separated replicas, or "dns:name:port" (every A record of a
    # headless Service); a session's calls stick to one replica (services/backends/routing.py).
    triton_url: str = "127.0.0.1:8001"
    triton_model_urls: str = ""  # "tokenizer=host:port,dynamics=a:port,b:port,lam=...": endpoints per model
    triton_tls: bool = False  # gRPC over TLS to Triton (implied by triton_ca / triton_cert)
    triton_ca: str = ""  # PEM CA that signed Triton's certificate (empty = the system CAs)
    triton_cert: str = ""  # client certificate + key for a Triton with --grpc-use-ssl-mutual
    triton_key: str = ""
    threads: int = 0  # torch threads of the in-process backend (0 = torch's default), or of each Triton model instance
    # that a catalogue version loads (0 = 1: each model runs in a process of its own)
    cache_bytes: int = 1 << 30  # in-process backend: K/V cache budget of each engine (idle caches evicted, LRU)
    device: str = "auto"  # in-process backend: auto (a GPU when torch sees one) | cpu | cuda | cuda:N
    precision: str = "auto"  # in-process backend: auto (bf16 on a GPU, fp32 on a CPU) | fp32 | bf16


def make_backend(cfg: BackendConfig, registry=None, version=None, metrics=None) -> ModelBackend:
    """The configured backend; `registry` (a prometheus CollectorRegistry) receives the Triton routing counters.

    version: a catalogue WorldVersion to serve (genie/catalog.py): in-process, its directory; on Triton, its own
    models, loaded on a Triton with explicit model control (services/backends/triton_catalogue.py), counting into
    `metrics` (one RoutingMetrics shared by every version's backend)."""
    if cfg.backend == "triton":
        from services.backends.triton_backend import TritonBackend
        from services.backends.triton_catalogue import VersionModels

        models = None
        if version is not None:
            models = VersionModels(version, threads=cfg.threads or 1, cache_bytes=cfg.cache_bytes)
        return TritonBackend(cfg.triton_url, model_urls=parse_model_urls(cfg.triton_model_urls), registry=registry,
                             tls=triton_tls(cfg), models=models, metrics=metrics)
    if version is not None:
        cfg = replace(cfg, world=str(version.path))
    from services.backends.inprocess import InProcessBackend

    return InProcessBackend(Path(cfg.world), threads=cfg.threads, device=cfg.device, precision=cfg.precision,
                            cache_bytes=cfg.cache_bytes)


def parse_model_urls(spec: str) -> dict[str, str]:
    """"tokenizer=host:port,dynamics=a:port,b:port" -> {"tokenizer": "host:port", "dynamics": "a:port,b:port"}:
    an item without "model=" is one more endpoint of the model named before it."""
    urls: dict[str, list[str]] = {}
    model = None
    for item in (p.strip() for p in spec.split(",")):
        if not item:
            continue
        if "=" in item:
            model, _, url = (x.strip() for x in item.partition("="))
            urls.setdefault(model, [])
        else:
            url = item
        if model is None or not url:
            raise ValueError(f"Triton model URLs must be model=host:port[,host:port...][,model=host:port...], got {spec!r}")
        urls[model].append(url)
    return {name: ",".join(u) for name, u in urls.items()}


def triton_tls(cfg: BackendConfig):
    """The TritonClientTLS the config asks for, or None for plaintext gRPC."""
    if not (cfg.triton_tls or cfg.triton_ca or cfg.triton_cert or cfg.triton_key):
        return None
    from services.backends.triton_backend import TritonClientTLS

    return TritonClientTLS(cfg.triton_ca, cfg.triton_cert, cfg.triton_key)

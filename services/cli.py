"""The installed `genie` command: the library's commands (genie/cli.py) plus play, serve, rollout, triton and jobs.

The serving and job commands are registered here, beside the services they start, so the library never imports
services/ (`python -m genie.cli` has the library's commands only, which is all torchrun's training processes need).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from genie.cli import main
from genie.cli_common import DEFAULT_WORLD
from genie.cli_common import fail as _fail
from services.triton.cli import triton
from services.worker.cli import jobs

if TYPE_CHECKING:
    from genie.spec import WorldSpec

main.add_command(triton)
main.add_command(jobs)


def _device_options(f):
    f = click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "int8"]), default="auto", show_default=True,
                     envvar="GENIE_PRECISION", help="In-process models: auto = bf16 on a GPU, fp32 on a CPU (bf16 on a CPU "
                     "only with bf16 hardware; int8 on a CPU only).")(f)
    f = click.option("--device", default="auto", show_default=True, envvar="GENIE_DEVICE",
                     help="In-process models: auto (a GPU when torch sees one), cpu, cuda or cuda:N.")(f)
    return f


def _backend_options(f):
    f = click.option("--triton-key", default="", envvar="GENIE_TRITON_KEY", help="Key (PEM) for --triton-cert.")(f)
    f = click.option("--triton-cert", default="", envvar="GENIE_TRITON_CERT",
                     help="Client certificate (PEM) for a Triton that requires one (mutual TLS).")(f)
    f = click.option("--triton-ca", default="", envvar="GENIE_TRITON_CA",
                     help="Talk TLS to Triton and verify it with this CA (PEM); see also --triton-tls.")(f)
    f = click.option("--triton-tls", is_flag=True, envvar="GENIE_TRITON_TLS",
                     help="Talk TLS to Triton, verified with the system CAs (implied by --triton-ca/--triton-cert).")(f)
    f = click.option("--triton-model-urls", default="", envvar="GENIE_TRITON_MODEL_URLS",
                     help="Per-model Triton addresses, e.g. tokenizer=tok:8001,dynamics=dyn-a:8001,dyn-b:8001,lam=lam:8001 "
                          "(an address without model= is another replica of the model before it; "
                          "default: all at --triton-url).")(f)
    f = click.option("--triton-url", default="127.0.0.1:8001", show_default=True, envvar="GENIE_TRITON_URL",
                     help="Triton gRPC address(es) (--backend triton): host:port, several comma-separated replicas, or "
                          "dns:name:port for every A record of a headless Service. A session sticks to one replica.")(f)
    f = click.option("--backend", type=click.Choice(["inprocess", "triton"]), default="inprocess", show_default=True,
                     help="Run the models in this process, or call the Triton model services.")(f)
    return f


@main.command()
@click.option("--world", "world_dir", type=click.Path(path_type=Path), default=DEFAULT_WORLD, show_default=True)
@click.option("--steps", type=int, default=32, show_default=True, help="Frames to generate.")
@click.option("--actions", default="random", show_default=True,
              help="'random', or a comma-separated list of latent action ids (3), arrow keys the world binds (left, "
                   "right, up or jump, down; `genie world names`) and the world's action names, e.g. up,up,2,down.")
@click.option("--prompt", default="0", show_default=True,
              help="A PNG/JPEG file, or the index of one of the world's prompts (WORLD/prompts/).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sampling-steps", type=int, help="MaskGIT steps (default: the world's).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("rollout.gif"), show_default=True)
@_backend_options
@_device_options
def rollout(world_dir, steps, actions, prompt, seed, sampling_steps, out, backend, triton_url, triton_model_urls, triton_tls,
            triton_ca, triton_cert, triton_key, device,
            precision) -> None:
    """Generate frames for a prompt and an action sequence and write a GIF, through the same model backend
    interface the gateway uses (in process, or the Triton services). Each frame is captioned with its step and the
    name of the action that led to it (WORLD/actions.json; `genie world names`)."""
    import asyncio
    from dataclasses import replace

    from genie.media import load_image, write_gif
    from genie.worlds import load_prompts
    from services.backends.backend import BackendUnavailable
    from services.backends.factory import BackendConfig, make_backend
    from services.rollout import rollout_one

    async def run(image: Path):
        models = make_backend(BackendConfig(world=str(world_dir), backend=backend, triton_url=triton_url,
                                            triton_model_urls=triton_model_urls, triton_tls=triton_tls, triton_ca=triton_ca,
                                            triton_cert=triton_cert, triton_key=triton_key, device=device,
                                            precision=precision))
        try:
            await models.start()
            spec = models.spec
            seq = _action_sequence(actions, steps, spec, seed)
            sampling = replace(spec.sampling, steps=sampling_steps) if sampling_steps else spec.sampling
            frame = load_image(image, spec.height, spec.width)
            t0 = time.perf_counter()
            frames = await rollout_one(models, frame[None], seq, seed, sampling)
            captions = ["prompt"] + [f"{t + 1}: {spec.action_name(a)}" for t, a in enumerate(seq)]
            return seq, frames, captions, time.perf_counter() - t0
        finally:
            await models.close()

    try:
        if backend == "inprocess" and not (Path(world_dir) / "world.json").exists():
            raise ValueError(f"{world_dir} is not a world directory (no world.json)")
        seq, frames, captions, elapsed = asyncio.run(run(_prompt_path(prompt, load_prompts(world_dir))))
    except (ValueError, BackendUnavailable) as exc:
        _fail(str(exc))
    write_gif(frames, out, captions=captions)  # under each frame: the step and the action that led to it
    click.echo(json.dumps({"gif": str(out), "frames": len(seq), "fps": round(len(seq) / elapsed, 2), "actions": seq}))


def _action_sequence(actions: str, steps: int, spec: WorldSpec, seed: int) -> list[int]:
    """The latent actions of --actions for a world (services.backends.backend.WorldSpec): `steps` seeded random ones
    for 'random'; else each comma-separated item resolved, case-insensitively, as a latent action id, an arrow key
    the world binds (a bound key wins over an action name that spells it), or one of the world's action names.
    ValueError listing the valid names for an unbound key, an unknown or ambiguous name, or an id out of range."""
    import torch

    from genie.controls import KEY_ALIASES, canonical_key

    if actions.strip().lower() == "random":
        return torch.randint(0, spec.num_actions, (steps,), generator=torch.Generator().manual_seed(seed)).tolist()
    bound = {b.key: b.action for b in spec.key_bindings() if b.action is not None}
    named: dict[str, list[int]] = {}
    for a, name in enumerate(spec.action_names):
        named.setdefault(name.strip().lower(), []).append(a)
    keys = [f"{k}={a}" for k, a in bound.items()] + [f"{alias}={bound[k]}" for alias, k in KEY_ALIASES.items() if k in bound]
    valid = (f"valid: latent ids 0..{spec.num_actions - 1}; bound keys: {', '.join(keys) or 'none'}"
             + (f"; action names: {', '.join(map(repr, spec.action_names))}" if spec.action_names else ""))
    seq = []
    for item in actions.split(","):
        token = item.strip()
        key = canonical_key(token)
        if token.isdigit():
            if int(token) >= spec.num_actions:
                raise ValueError(f"--actions: latent action {token} is out of range ({valid})")
            seq.append(int(token))
        elif key in bound:
            seq.append(bound[key])
        elif len(named.get(token.lower(), [])) == 1:
            seq.append(named[token.lower()][0])
        elif key is not None and token.lower() not in named:
            raise ValueError(f"--actions: the {token} key is unbound in this world: no latent action is tied to it "
                             f"({valid})")
        else:
            what = "ambiguous" if token.lower() in named else "unknown"
            raise ValueError(f"--actions: {what} action {token!r} ({valid})")
    return seq


def _gateway_options(f):
    opts = [
        click.option("--metrics-port", type=int, default=9090, show_default=True, help="Prometheus /metrics; -1 = off."),
        click.option("--http-port", type=int, default=8080, show_default=True, help="Web play page; 0 = any free port, -1 = off."),
        click.option("--grpc-port", type=int, default=50051, show_default=True, help="gRPC API; 0 = any free port."),
        click.option("--host", default="127.0.0.1", show_default=True),
        click.option("--world", "world_dir", type=click.Path(path_type=Path), default=DEFAULT_WORLD, show_default=True),
    ]
    for opt in opts:
        f = opt(f)
    return f


def _tls_options(f):
    opts = [
        click.option("--tls-reload-s", type=float, default=10.0, show_default=True, envvar="GENIE_TLS_RELOAD_S",
                     help="Re-read the TLS files this often and serve a renewed certificate without a restart "
                          "(also on SIGHUP); 0 = only on SIGHUP."),
        click.option("--plaintext-grpc-port", type=int, default=-1, show_default=True,
                     help="With TLS: also serve gRPC in plaintext on this port (0 = any free port; -1 = no plaintext)."),
        click.option("--tls-client-ca", default="", envvar="GENIE_TLS_CLIENT_CA",
                     help="PEM CA file: gRPC clients must present a certificate it signed (mutual TLS; not the page)."),
        click.option("--tls-key", default="", envvar="GENIE_TLS_KEY", help="PEM private key of --tls-cert."),
        click.option("--tls-cert", default="", envvar="GENIE_TLS_CERT",
                     help="PEM certificate (chain): serve gRPC and the page over TLS (HTTPS) with it."),
    ]
    for opt in opts:
        f = opt(f)
    return f


def _tls_config(tls_cert: str, tls_key: str, tls_client_ca: str, plaintext_grpc_port: int, tls_reload_s: float) -> dict:
    return {"tls_cert": tls_cert, "tls_key": tls_key, "tls_client_ca": tls_client_ca,
            "plaintext_grpc_port": plaintext_grpc_port, "tls_reload_s": tls_reload_s}


@main.command()
@_gateway_options
@_tls_options
@click.option("--token", envvar="GENIE_PLAY_TOKEN", help="API token for the page (default: a fresh random one).")
@click.option("--open-browser/--no-browser", default=True, show_default=True, help="Open the page in a browser, if there is one.")
@click.option("--threads", type=int, default=0, help="torch threads (0 = torch's default).")
@_device_options
def play(world_dir, host, grpc_port, http_port, metrics_port, tls_cert, tls_key, tls_client_ca, plaintext_grpc_port, tls_reload_s,
         token, open_browser, threads, device, precision) -> None:
    """Play a world interactively: starts a gateway on the embedded defaults (models in process, sessions in
    memory) and serves the web play page; number keys send latent actions, arrow keys the ones the world binds to
    them (`genie world names`). Ctrl-C stops it. One process serves every session here, so `--precision auto` is int8
    on a CPU with int8 dot products (VNNI, AMX), its fastest setting there."""
    from genie.device import single_process_precision
    from services.gateway.app import GatewayConfig

    if not (Path(world_dir) / "world.json").exists():
        _fail(f"{world_dir} is not a world directory (no world.json)")
    try:
        precision = single_process_precision(precision, device)
        cfg = GatewayConfig(world=str(world_dir), host=host, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
                            tokens=f"local:{token}" if token else "", threads=threads, device=device, precision=precision,
                            **_tls_config(tls_cert, tls_key, tls_client_ca, plaintext_grpc_port, tls_reload_s))
    except ValueError as exc:
        _fail(str(exc))

    def ready(gw) -> None:
        url = gw.page_url() or ""
        info = {"page": url, "grpc": gw.grpc_address, "metrics_port": gw.metrics_port, "token": token or gw.token,
                "precision": precision}
        if gw.grpc.plaintext_address:
            info["grpc_plaintext"] = gw.grpc.plaintext_address
        click.echo(json.dumps(info), nl=True)
        click.echo(f"Play at {url}  (Ctrl-C to stop)", err=True)
        if open_browser and url:
            import webbrowser

            webbrowser.open(url)

    _run_gateway(cfg, ready)


@main.command()
@_gateway_options
@_tls_options
@_backend_options
@click.option("--store", type=click.Choice(["memory", "redis"]), default="memory", show_default=True, envvar="GENIE_STORE")
@click.option("--redis-url", default="redis://127.0.0.1:6379/0", show_default=True, envvar="GENIE_REDIS_URL",
              help="redis://... or redis+sentinel://host:port,host:port/MASTER[/DB]; rediss://... and "
                   "rediss+sentinel://... use TLS to every hop (the Sentinels too).")
@click.option("--redis-sentinels", default="", envvar="GENIE_REDIS_SENTINELS",
              help="host:port,...: find the master via Sentinel (TLS when --redis-url is rediss://). Sentinels with "
                   "their own requirepass: set env GENIE_REDIS_SENTINEL_PASSWORD (no flag: keep it out of argv).")
@click.option("--redis-master", default="", envvar="GENIE_REDIS_MASTER", help="The master name the sentinels monitor.")
@click.option("--redis-wait-replicas", type=int, default=0, show_default=True, envvar="GENIE_REDIS_WAIT_REPLICAS",
              help="Acknowledge a step only once this many replicas have it (Redis WAIT).")
@click.option("--redis-wait-ms", type=int, default=100, show_default=True, envvar="GENIE_REDIS_WAIT_MS",
              help="How long WAIT may take before the step answers UNAVAILABLE with its version.")
@click.option("--redis-password", default="", envvar="GENIE_REDIS_PASSWORD", show_default=False,
              help="Redis AUTH password when the URL has none; prefer env GENIE_REDIS_PASSWORD (from a Secret).")
@click.option("--redis-ca", default="", envvar="GENIE_REDIS_CA",
              help="PEM CA of the Redis servers and Sentinels (rediss:// URLs).")
@click.option("--redis-cert", default="", envvar="GENIE_REDIS_CERT", help="Client certificate (PEM) for mutual TLS to Redis.")
@click.option("--redis-key", default="", envvar="GENIE_REDIS_KEY", help="Client key (PEM) for --redis-cert.")
@click.option("--max-in-flight", type=int, default=32, show_default=True,
              help="Model calls running at once; 0 = no admission control (never shed load).")
@click.option("--max-queue", type=int, default=64, show_default=True,
              help="Model calls waiting for a slot; past it a call is refused with RESOURCE_EXHAUSTED.")
@click.option("--queue-timeout", type=float, default=2.0, show_default=True,
              help="Seconds a model call may wait for a slot before UNAVAILABLE.")
@click.option("--step-deadline", type=float, default=0.0, show_default=True,
              help="Seconds from a step's arrival by which its model calls must be admitted (0 = none).")
@click.option("--tokens", envvar="GENIE_TOKENS", default="", help="client:token,... or @tokens.json (env GENIE_TOKENS).")
@click.option("--session-ttl", type=float, default=600.0, show_default=True, help="Idle seconds before a session expires.")
@click.option("--max-sessions", type=int, default=16, show_default=True, help="Open sessions per client.")
@click.option("--max-streams", type=int, default=16, show_default=True,
              help="Open Play streams per client on this gateway; past it a new stream is refused (RESOURCE_EXHAUSTED).")
@click.option("--rate", type=int, default=100, show_default=True, help="Requests per second per client.")
@click.option("--threads", type=int, default=0, help="torch threads of the in-process backend (0 = torch's default).")
@click.option("--kv-cache-mb", type=int, default=1024, show_default=True,
              help="In-process backend: K/V cache budget of each engine; idle sessions' caches are evicted (LRU) past it.")
@click.option("--registry", default="", envvar="GENIE_REGISTRY",
              help="Serve a world catalogue (`genie world publish`) instead of --world: sessions name a world and stay "
                   "pinned to its version; published versions become playable without a restart (in-process backend).")
@click.option("--default-world", default="", envvar="GENIE_DEFAULT_WORLD",
              help="With --registry: the world a session gets when it names none (default: the only one there is).")
@click.option("--models-budget-mb", type=int, default=2048, show_default=True, envvar="GENIE_MODELS_BUDGET_MB",
              help="With --registry: model memory of the versions loaded at once; idle ones unload past it (0 = no limit).")
@_device_options
def serve(world_dir, host, grpc_port, http_port, metrics_port, tls_cert, tls_key, tls_client_ca, plaintext_grpc_port, tls_reload_s,
          backend, triton_url, triton_model_urls, triton_tls, triton_ca, triton_cert, triton_key, store, redis_url,
          redis_sentinels, redis_master, redis_wait_replicas, redis_wait_ms, redis_password, redis_ca, redis_cert,
          redis_key, max_in_flight, max_queue, queue_timeout,
          step_deadline, tokens, session_ttl, max_sessions, max_streams, rate, threads, kv_cache_mb, registry, default_world,
          models_budget_mb, device, precision) -> None:
    """Run a gateway: the gRPC API (+ web page, + /metrics) over Triton or in-process models and a Redis or
    in-memory session store. Replicas sharing one Redis serve any session."""
    from services.backends.admission import AdmissionConfig
    from services.gateway.app import GatewayConfig
    from services.gateway.sessions import Limits

    try:
        limits = Limits(session_ttl_s=session_ttl, max_sessions_per_client=max_sessions, requests_per_second=rate,
                        step_deadline_s=step_deadline, max_streams_per_client=max_streams)
        admission = AdmissionConfig(max_in_flight, max_queue, queue_timeout) if max_in_flight else None
        cfg = GatewayConfig(world=str(world_dir), backend=backend, triton_url=triton_url, triton_model_urls=triton_model_urls,
                            triton_tls=triton_tls, triton_ca=triton_ca, triton_cert=triton_cert, triton_key=triton_key,
                            store=store, redis_url=redis_url, redis_sentinels=redis_sentinels, redis_master=redis_master,
                            redis_wait_replicas=redis_wait_replicas, redis_wait_ms=redis_wait_ms,
                            redis_password=redis_password, redis_ca=redis_ca, redis_cert=redis_cert, redis_key=redis_key,
                            redis_sentinel_password=os.environ.get("GENIE_REDIS_SENTINEL_PASSWORD", ""),
                            admission=admission,
                            host=host, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port, tokens=tokens,
                            threads=threads, cache_bytes=kv_cache_mb << 20, device=device, precision=precision,
                            limits=limits, registry=registry, default_world=default_world,
                            models_budget_bytes=models_budget_mb << 20,
                            **_tls_config(tls_cert, tls_key, tls_client_ca, plaintext_grpc_port, tls_reload_s))
    except ValueError as exc:
        _fail(str(exc))

    def ready(gw) -> None:
        info = {"grpc": gw.grpc_address, "page": gw.page_url(), "metrics_port": gw.metrics_port, "tls": gw.tls is not None}
        if gw.grpc.plaintext_address:
            info["grpc_plaintext"] = gw.grpc.plaintext_address
        if gw.token:
            info["token"] = gw.token
        click.echo(json.dumps(info))

    _run_gateway(cfg, ready)


def _run_gateway(cfg, ready) -> None:
    import asyncio

    from services.backends.backend import BackendUnavailable
    from services.gateway.app import Gateway, serve_forever

    try:
        asyncio.run(serve_forever(Gateway(cfg), on_ready=ready))
    except (ValueError, OSError, BackendUnavailable) as exc:
        _fail(str(exc))


def _prompt_path(prompt: str, shipped: list[Path]) -> Path:
    if prompt.isdigit():
        if int(prompt) >= len(shipped):
            raise ValueError(f"the world ships {len(shipped)} prompts; --prompt {prompt} is out of range")
        return shipped[int(prompt)]
    path = Path(prompt)
    if not path.is_file():
        raise ValueError(f"prompt image {path} does not exist")
    return path


if __name__ == "__main__":
    main()

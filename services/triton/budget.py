"""The models budget of a Triton that serves a world catalogue (`genie triton serve --explicit --models-budget-mb N`).

Gateways load catalogue versions into the server (services/backends/triton_catalogue.py) and each unloads what its
own budget wants gone; with several gateways the server could still hold more than one gateway's budget. This
sweeper bounds the server itself: every `every_s` it reads which catalogue models are loaded (Triton's inference
statistics: name and the time of the last inference) and, while their checkpoints add up to more than the budget,
unloads whole versions, least recently used first, never one used in the last `idle_s` (a version in play). A
session on an unloaded version loads it again on its next call (a slower step, the same frames).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tritonclient.http import InferenceServerClient
from tritonclient.utils import InferenceServerException

from services.triton import protocol as P

log = logging.getLogger(__name__)
VERSION_MODEL = re.compile(r"^(?P<version>.+\.v\d+)\.(?P<kind>tokenizer|lam|dynamics)$")


@dataclass
class LoadedVersion:
    """One catalogue version's models on the server."""

    models: list[str]
    bytes: int  # their checkpoints on disk: what the loaded weights hold, to first order
    last_used: float  # seconds since the epoch of the newest inference of any of them (0: none yet)


class ModelsBudget:
    """Keeps a Triton's catalogue models within `budget_bytes` (see the module docstring)."""

    def __init__(self, url: str, budget_bytes: int, idle_s: float = 60.0, every_s: float = 5.0) -> None:
        """url: the server's HTTP endpoint, host:port (plaintext; with TLS on gRPC it is the pod's loopback)."""
        if budget_bytes <= 0 or idle_s < 0 or every_s <= 0:
            raise ValueError(f"need budget > 0, idle_s >= 0, every_s > 0; got {budget_bytes}, {idle_s}, {every_s}")
        self.url, self.budget_bytes, self.idle_s, self.every_s = url, budget_bytes, idle_s, every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def loaded(self, client: InferenceServerClient) -> dict[str, LoadedVersion]:
        """The catalogue versions whose models are loaded, by "name.vN"."""
        stats = client.get_inference_statistics().get("model_stats", [])
        out: dict[str, LoadedVersion] = {}
        for s in stats:
            match = VERSION_MODEL.match(s.get("name", ""))
            if match is None or not client.is_model_ready(s["name"]):
                continue
            config = client.get_model_config(s["name"])
            world_dir = Path(config["parameters"][P.PARAM_WORLD_DIR]["string_value"])
            size = (world_dir / match["kind"] / "model.safetensors").stat().st_size
            entry = out.setdefault(match["version"], LoadedVersion([], 0, 0.0))
            entry.models.append(s["name"])
            entry.bytes += size
            entry.last_used = max(entry.last_used, int(s.get("last_inference", 0)) / 1000)
        return out

    def sweep(self, client: InferenceServerClient, now: float | None = None) -> list[str]:
        """Unloads idle versions, least recently used first, until the loaded ones fit the budget; returns them."""
        now = time.time() if now is None else now
        versions = self.loaded(client)
        total = sum(v.bytes for v in versions.values())
        unloaded: list[str] = []
        for name, v in sorted(versions.items(), key=lambda kv: kv[1].last_used):
            if total <= self.budget_bytes:
                break
            if now - v.last_used < self.idle_s:
                continue  # in play: a session stepped it moments ago
            for model in v.models:
                try:
                    client.unload_model(model)
                except InferenceServerException as exc:
                    log.warning("could not unload %s: %s", model, exc.message())
            total -= v.bytes
            unloaded.append(name)
            log.info("models budget: unloaded idle version %s (%.1f MB; %.1f of %.1f MB loaded now)", name,
                     v.bytes / 1e6, total / 1e6, self.budget_bytes / 1e6)
        if total > self.budget_bytes:
            log.warning("models budget: %.1f MB loaded, over the %.1f MB budget, and every version is in play",
                        total / 1e6, self.budget_bytes / 1e6)
        return unloaded

    def start(self) -> None:
        """Sweeps every `every_s` on a daemon thread until stop()."""
        self._thread = threading.Thread(target=self._run, name="triton-models-budget", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        client = InferenceServerClient(self.url, connection_timeout=10.0, network_timeout=30.0)
        try:
            while not self._stop.wait(self.every_s):
                try:
                    self.sweep(client)
                except (InferenceServerException, OSError, KeyError) as exc:  # the server restarting: next time
                    log.info("models budget: sweep skipped: %s", exc)
        finally:
            client.close()
